"""loram align PRUNED -o OUT --data CORPUS[=W]... [--steps N | --tokens T]"""

from __future__ import annotations

from .common import COUNT, add_out
from .train import add_run_args, interrupted, is_main, run_kwargs


def add(sub) -> None:
    p = sub.add_parser("align", help="continual pre-training of a pruned model on raw text (once, before LoRA)")
    p.add_argument("pruned", help="pruned model folder (from `loram prune`)")
    add_out(p, "aligned pruned model folder")
    p.add_argument("--data", action="append", required=True,
                   help="corpus: .txt (one document per line), .jsonl/.json/.parquet with `text`, or hub id; FILE=WEIGHT mixes")
    p.add_argument("--tokens", type=COUNT, default=None, help="token budget (sets --steps from batch and sequence length)")
    p.add_argument("--train-embeddings", action="store_true", help="also train embed_tokens (frozen by default)")
    p.add_argument("--train-lm-head", action="store_true", help="also train lm_head (frozen by default, as the paper)")
    add_run_args(p, lr=2e-5, seq_len=512)
    p.set_defaults(func=run)


def run(a) -> int:
    from ..align import AlignConfig, align
    from ..training import TrainingInterrupted

    cfg = AlignConfig(**run_kwargs(a), tokens=a.tokens, train_embeddings=a.train_embeddings, train_lm_head=a.train_lm_head)
    try:
        r = align(a.pruned, a.out, cfg, resume=a.resume, overwrite=a.overwrite, checkpoint_dir=a.checkpoint_dir)
    except TrainingInterrupted as e:
        return interrupted(e)
    if is_main():
        print(f"aligned model written to {r.out}: {r.summary()}")
    return 0
