"""loram demo [--smoke] [--with-baseline] [--out runs/demo]"""

from __future__ import annotations

import argparse

from .common import COUNT, POSITIVE, RATIO


def add(sub) -> None:
    p = sub.add_parser("demo", help="offline end-to-end demo on SmolLM2-135M-Instruct: prune -> LoRA -> recover -> evaluate")
    p.add_argument("--out", "-o", default="runs/demo", help="output folder (default runs/demo; a previous demo there is replaced)")
    p.add_argument("--model", default="smollm2", help="base model (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, a few steps: checks the pipeline in seconds")
    p.add_argument("--with-baseline", action="store_true", help="also train plain LoRA on the original (about +4 min)")
    p.add_argument("--steps", type=COUNT, default=None, help="LoRA steps (default 60)")
    p.add_argument("--lr", type=POSITIVE, default=None)
    p.add_argument("--ratio", type=RATIO, default=None, help="MLP pruning ratio (default 0.5)")
    p.add_argument("--attn-ratio", type=RATIO, default=None, help="KV-group pruning ratio (default 0: attention kept whole)")
    p.add_argument("--plain", action="store_true", help="train LoRA on the pruned model plainly (the paper's LoRAM) instead of "
                                                       "through the original (loram train --original-offset)")
    p.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=None,
                   help="train with `loram train --anchor` on the shipped anchor text (another novel than the general text scored): "
                        "keeps the original's general ability (default: off; see docs/evaluation.md#the-demo)")
    p.add_argument("--bf16", action="store_true", help="bf16 training (slower than fp32 on some CPUs)")
    p.add_argument("--eval-split", default="test", choices=["dev", "test"], help="dev: for choosing settings")
    p.add_argument("--no-isolate", action="store_true", help="train in this process (peak memory then includes the rest)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--overwrite", action="store_true", help="accepted for compatibility: a previous demo in --out is always replaced, "
                        "any other non-empty folder never")
    p.set_defaults(func=run)


def run(a) -> int:
    import json
    from dataclasses import asdict

    from ..demo import DemoConfig, run_demo

    kw = {k: v for k, v in dict(steps=a.steps, lr=a.lr, ratio=a.ratio, attn_ratio=a.attn_ratio).items() if v is not None}
    if a.plain:
        kw["original_offset"] = False
    if a.anchor is not None:
        kw["anchor"] = a.anchor
    kw.update(out=a.out, with_baseline=a.with_baseline, eval_split=a.eval_split, overwrite=a.overwrite)
    if a.bf16:
        kw["bf16"] = True
    if a.no_isolate:
        kw["isolate"] = False
    cfg = DemoConfig.smoke_config(**kw) if a.smoke else DemoConfig(model=a.model, **kw)
    res = run_demo(cfg)
    if a.json:
        print(json.dumps({"rows": [asdict(r) for r in res.rows], "timings": res.timings, "files": res.files}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"loram demo: {cfg.model}, reverse 3-5 words (exact match, task perplexity on the {cfg.eval_split} "
                    "split); general: text perplexity, capital quiz acc_norm ± s.e.")
    quiz = f"capital quiz (n={res.config['quiz_n']})"
    for c in ("model", "exact match", "task ppl", "general text ppl", quiz, "train peak RSS", "train tok/s",
              "params trained on", "params served"):
        t.add_column(c, justify="left" if c == "model" else "right")
    dash = lambda x, s: "—" if x is None else s.format(x)  # noqa: E731
    for r in res.rows:
        t.add_row(r.name, f"{r.exact_match:.1%}", f"{r.ppl:.3f}", f"{r.general_ppl:.2f}",
                  f"{r.quiz_acc:.1%} ± {r.quiz_se:.1%}", dash(r.train_peak_gb, "{:.2f} GB"),
                  dash(r.train_tokens_per_s, "{:.0f}"), dash(r.train_params and r.train_params / 1e6, "{:.1f} M"),
                  dash(r.served_params and r.served_params / 1e6, "{:.1f} M"))
    import sys

    c = Console(width=None if sys.stdout.isatty() else 200)  # piped: keep one row per line
    c.print(t)
    c.print(res.closing())
    c.print(f"total {res.timings['total']:.0f} s ({', '.join(f'{k} {v:.0f}s' for k, v in res.timings.items() if k != 'total')})")
    c.print(f"written to {cfg.out}: results.md, demo.json, " + ", ".join(res.files))
    return 0
