"""Issue 3 benchmark: `loram train` on a 0.5-Taylor-pruned SmolLM2 vs the unpruned model, and `loram align`.

    python benchmarks/train_smollm2.py [--steps 40] [--align-steps 200] [--work runs/bench-train]

Runs each stage as its own `loram` process (clean peak-RSS per run) on the real data in
../shared/data (skips with a message when absent):

    train   math_data.json[:3000]=0.5 + codegen-instruct.json[:4000]=0.5, micro-batch 4, seq 256, lr 2e-4
    eval    held-out math_data.json[3000:3030], codegen-instruct.json[4000:4030] (in-domain) and
            alpaca_en_demo.json[:30] (out-of-domain): token-weighted perplexity on response tokens
    align   corpus/wiki_demo.txt=0.5 + corpus/c4_demo.jsonl=0.5, seq 128, micro-batch 1, lr 2e-5;
            eval wikitext2/valid.txt[:300] (raw text, 128-token blocks)

The LoRAM number is the pruned-trained adapter recovered into the original model
(`loram recover`), evaluated on the original: the paper's "train small, infer large".
Writes benchmarks/results/train_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


ASSEMBLE_ONLY = False


class Missing(Exception):
    pass


def sh(cmd: list[str], log: Path) -> float:
    if ASSEMBLE_ONLY:
        raise Missing(cmd[0:2])
    t0 = time.time()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    with open(log, "w") as f:
        p = subprocess.run(["nice", "-n", "5", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)} - see {log}")
    return time.time() - t0


def evals(kind: str) -> dict[str, str]:
    if kind == "instruct":
        return {"math": f"{DATA}/instruct/math_data.json[3000:3030]", "code": f"{DATA}/instruct/codegen-instruct.json[4000:4030]",
                "alpaca": f"{DATA}/instruct/alpaca_en_demo.json[:30]"}
    return {"wikitext2": f"{DATA}/wikitext2/valid.txt[:300]"}


def ppl_on_original(adapter: str | None, names: dict[str, str], seq_len: int) -> dict[str, float]:
    """Perplexity of smollm2 (+ a recovered adapter) on the instruct eval sets, same masking as training."""
    import torch

    from loram.data import encode_all, read_rows
    from loram.merge import load_with_adapter
    from loram.train import perplexity

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok = load_with_adapter("smollm2", adapter)
    out = {}
    for n, f in names.items():
        ex = encode_all(tok, read_rows(f), seq_len, name=n).examples
        out[n] = perplexity(model, ex, tok.pad_token_id, batch=4)
    return out


def cached(path: Path, compute):
    """Results of a slow evaluation, kept in the work folder so a re-run only redoes what is missing."""
    if path.exists():
        return json.loads(path.read_text())
    if ASSEMBLE_ONLY:
        return {}
    value = compute()
    path.write_text(json.dumps(value, indent=2) + "\n")
    return value


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--align-steps", type=int, default=200)
    ap.add_argument("--work", default="runs/bench-train")
    ap.add_argument("--assemble-only", action="store_true",
                    help="run nothing: write the results from the reports already in --work (missing ones shown as -)")
    a = ap.parse_args()
    global ASSEMBLE_ONLY
    ASSEMBLE_ONLY = a.assemble_only
    if not DATA.is_dir():
        print(f"skipped: {DATA} not found (the benchmark needs the shared data)")
        return 0
    work = ROOT / a.work
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"runs": {}, "command": " ".join(["python", "benchmarks/train_smollm2.py", *sys.argv[1:]])}
    pruned = work / "pruned"
    if not pruned.exists():
        sh(["loram", "prune", "smollm2", "-o", str(pruned), "--method", "taylor", "--ratio", "0.5", "--layers", "4:28"],
           work / "prune.log")
    data = [f"{DATA}/instruct/math_data.json[:3000]=0.5", f"{DATA}/instruct/codegen-instruct.json[:4000]=0.5"]
    common = ["--steps", str(a.steps), "--micro-batch", "4", "--seq-len", "256", "--lr", "2e-4", "--logging-steps", "5"]
    for d in data:
        common += ["--data", d]
    for n, f in evals("instruct").items():
        common += ["--eval", f"{n}={f}"]
    for name, model in (("loram_pruned_0.5", str(pruned)), ("lora_unpruned", "smollm2")):
        out = work / name
        if not (out / "train_report.json").exists():
            wall = sh(["loram", "train", model, "-o", str(out), "--overwrite", *common], work / f"{name}.log")
        else:
            wall = None
        rep = json.loads((out / "train_report.json").read_text())
        res["runs"][name] = {k: rep[k] for k in ("steps", "wall_s", "tokens", "tokens_per_s", "peak_rss_gb", "peak_cuda_gb",
                                                 "trainable_params", "frozen_params", "eval_ppl", "dropped")}
        res["runs"][name]["final_loss"] = rep["losses"][-1]["loss"] if rep["losses"] else None
        res["runs"][name]["process_wall_s"] = wall
    return finish_runs(a, work, pruned, res)


def finish_runs(a, work: Path, pruned: Path, res: dict) -> int:
    try:
        stages(a, work, pruned, res)
    except Missing as m:
        print(f"assembling partial results: {m} not run")
    import torch
    import transformers

    res["hardware"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other jobs (load varies)"
    res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_smollm2.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "train_smollm2.md").write_text(table(res))
    print(table(res))
    return 0


def stages(a, work: Path, pruned: Path, res: dict) -> None:
    rec = work / "loram_recovered"
    if not rec.exists():
        sh(["loram", "recover", str(work / "loram_pruned_0.5"), "--base", "smollm2", "-o", str(rec)], work / "recover.log")
    res["runs"]["loram_recovered_on_original"] = {"eval_ppl": cached(work / "ppl_recovered.json",
                                                                     lambda: ppl_on_original(str(rec), evals("instruct"), 256))}
    res["runs"]["smollm2_base_no_training"] = {"eval_ppl": cached(work / "ppl_base.json",
                                                                  lambda: ppl_on_original(None, evals("instruct"), 256))}
    al = work / "aligned"
    if not (al / "align_report.json").exists():
        sh(["loram", "align", str(pruned), "-o", str(al), "--overwrite", "--steps", str(a.align_steps), "--seq-len", "128",
            "--micro-batch", "1", "--lr", "2e-5", "--logging-steps", "20", "--eval-steps", str(max(1, a.align_steps // 2)),
            "--data", f"{DATA}/corpus/wiki_demo.txt=0.5", "--data", f"{DATA}/corpus/c4_demo.jsonl=0.5",
            *[x for n, f in evals("text").items() for x in ("--eval", f"{n}={f}")]], work / "align.log")
    if not (al / "align_report.json").exists():
        raise Missing("align")
    rep = json.loads((al / "align_report.json").read_text())
    res["runs"]["align_pruned_0.5"] = {k: rep[k] for k in ("steps", "wall_s", "tokens", "tokens_per_s", "peak_rss_gb",
                                                           "trainable_params", "frozen_params", "eval_ppl", "eval_history")}
    res["runs"]["align_pruned_0.5"]["eval_ppl_before"] = cached(work / "ppl_text_before.json",
                                                                lambda: text_ppl(pruned, evals("text")))
    res["runs"]["align_pruned_0.5"]["first_loss"] = rep["losses"][0]["loss"]
    res["runs"]["align_pruned_0.5"]["final_loss"] = rep["losses"][-1]["loss"]


def text_ppl(folder: Path, names: dict[str, str]) -> dict[str, float]:
    from loram import load_pruned
    from loram.data import chunk_tokens, read_texts
    from loram.io import load_tokenizer
    from loram.train import perplexity

    m, tok = load_pruned(folder), load_tokenizer(folder)
    return {n: perplexity(m, chunk_tokens(tok, read_texts(f), 128), tok.pad_token_id) for n, f in names.items()}


def table(res: dict) -> str:
    r = res["runs"]
    lines = ["# SmolLM2-135M-Instruct: `loram train` (pruned vs unpruned) and `loram align`", "",
             f"Hardware: {res['hardware']}. Versions: {res['versions']}.", f"Command: `{res['command']}`", "",
             "| run | steps | tokens | tokens/s | peak RSS GB | trainable | frozen | final loss | ppl math | ppl code | ppl alpaca (OOD) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("loram_pruned_0.5", "lora_unpruned", "loram_recovered_on_original", "smollm2_base_no_training"):
        x = r.get(name, {})
        p = {k: x.get("eval_ppl", {}).get(k, float("nan")) for k in ("math", "code", "alpaca")}
        cells = [f"{x[k]:,}" if isinstance(x.get(k), int) else (f"{x[k]:.2f}" if isinstance(x.get(k), float) else "-")
                 for k in ("steps", "tokens", "tokens_per_s", "peak_rss_gb", "trainable_params", "frozen_params", "final_loss")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {p['math']:.3f} | {p['code']:.3f} | {p['alpaca']:.3f} |")
    al = r.get("align_pruned_0.5")
    if al is None:
        return "\n".join(lines + ["", "align: not run (see the report)", ""])
    lines += ["", "| align | steps | tokens | tokens/s | peak RSS GB | trainable | frozen | loss first -> last | ppl wikitext2 before -> after |",
              "|---|---|---|---|---|---|---|---|---|",
              f"| pruned 0.5 | {al['steps']} | {al['tokens']:,} | {al['tokens_per_s']:.1f} | {al['peak_rss_gb']:.2f} | "
              f"{al['trainable_params']:,} | {al['frozen_params']:,} | {al['first_loss']:.3f} -> {al['final_loss']:.3f} | "
              f"{al['eval_ppl_before'].get('wikitext2', float('nan')):.2f} -> {al['eval_ppl']['wikitext2']:.2f} |", "",
             "Perplexities: token-weighted over response tokens (instruct, 30 held-out rows each) or 128-token blocks "
             "(wikitext2). `loram_pruned_0.5` is measured on the pruned model with its adapter; "
             "`loram_recovered_on_original` is the same adapter recovered into the original SmolLM2. "
             "tokens/s counts non-padding input tokens over the training loop; peak RSS is the process "
             "high-water mark during training. The machine is shared with other jobs, so speeds are noisy.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
