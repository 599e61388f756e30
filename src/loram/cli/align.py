"""loram align PRUNED -o OUT --data CORPUS[=W]... [--steps N | --tokens T]"""

from __future__ import annotations

from ..settings import add_flags, from_args
from .common import add_config, add_out
from .train import interrupted, is_main


def add(sub) -> None:
    p = sub.add_parser("align", help="continual pre-training of a pruned model on raw text (once, before LoRA)")
    p.add_argument("pruned", help="pruned model folder (from `loram prune`)")
    add_out(p, "aligned pruned model folder")
    add_config(p, "align")
    add_flags(p, "align")  # --data, --tokens, what to train and the optimisation knobs: loram.settings.ALIGN_KNOBS
    p.set_defaults(func=run)


def run(a) -> int:
    from ..align import align
    from ..training import TrainingInterrupted

    cfg = from_args("align", a)
    try:
        r = align(a.pruned, a.out, cfg, resume=a.resume, overwrite=a.overwrite, checkpoint_dir=a.checkpoint_dir)
    except TrainingInterrupted as e:
        return interrupted(e)
    if is_main():
        print(f"aligned model written to {r.out}: {r.summary()}")
    return 0
