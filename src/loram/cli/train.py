"""loram train MODEL --data FILE[=W] -o OUT [--steps N] [--quantize nf4] [--eval NAME=FILE] ..."""

from __future__ import annotations

import os
import sys

from ..settings import add_flags, from_args
from .common import add_config, add_out


def add(sub) -> None:
    p = sub.add_parser("train", help="LoRA/QLoRA on a pruned model folder (LoRAM) or an ordinary model (plain LoRA)")
    p.add_argument("model", help="pruned model folder (from `loram prune`) or an original model")
    add_out(p, "adapter folder")
    add_config(p, "train")
    add_flags(p, "train")  # --data, LoRA and the optimisation knobs: loram.settings.TRAIN_KNOBS
    p.set_defaults(func=run)


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def interrupted(e) -> int:
    """Ctrl-C: one line, exit 130 (the shell's code for SIGINT)."""
    print(f"error: {e}", file=sys.stderr)
    return 130


def run(a) -> int:
    from ..data import skip_summary
    from ..train import train
    from ..training import TrainingInterrupted

    cfg = from_args("train", a)
    try:
        r = train(a.model, a.out, cfg, resume=a.resume, overwrite=a.overwrite, checkpoint_dir=a.checkpoint_dir)
    except TrainingInterrupted as e:
        return interrupted(e)
    if is_main():
        rows = r.dropped.get("total") or r.dropped.get("truncated")
        print(f"adapter written to {r.out}: {r.summary()}" + (f"; {skip_summary(r.dropped)}" if rows else ""))
    return 0
