"""loram train MODEL --data FILE[=W] -o OUT [--steps N] [--quantize nf4] [--eval NAME=FILE] ..."""

from __future__ import annotations

import os
import sys

from ..errors import LoramError
from .common import COUNT, COUNT_OR_OFF, DROPOUT, NON_NEGATIVE, POSITIVE, SEED, SEQ_LEN, Number, add_out


def add_run_args(p, lr: float, seq_len: int) -> None:
    """Optimisation, checkpoint and eval flags shared by `train` and `align`."""
    p.add_argument("--lr", type=POSITIVE, default=lr)
    p.add_argument("--schedule", default="cosine", help="cosine | linear | constant | constant_with_warmup")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=0.03, help="fraction of steps (<1) or number of steps")
    p.add_argument("--steps", type=COUNT, default=100)
    p.add_argument("--epochs", type=POSITIVE, default=None, help="train for epochs instead of --steps")
    p.add_argument("--micro-batch", type=COUNT, default=4, help="sequences per device per forward")
    p.add_argument("--grad-accum", type=COUNT, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=SEQ_LEN, default=seq_len)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations (less memory, ~30%% slower)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (~1.2-1.3x faster on a bf16 CPU)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0)
    p.add_argument("--loss-chunk", type=COUNT_OR_OFF, default=0, metavar="N",
                   help="cross-entropy N positions at a time, never the full logits (same loss, less memory; "
                        "e.g. 128; 0: transformers' loss). Not with FSDP/DeepSpeed")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--save-steps", type=COUNT_OR_OFF, default=0, help="checkpoint every N steps (to OUT-checkpoints)")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default OUT-checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint (exact)")
    p.add_argument("--logging-steps", type=COUNT, default=10)
    p.add_argument("--eval", action="append", default=[], metavar="NAME=FILE",
                   help="held-out set, perplexity logged by name (repeatable)")
    p.add_argument("--eval-steps", type=Number(int, min=0, zero="0: at each checkpoint and at the end"), default=0, help="evaluate every N steps (default: at each checkpoint, and at the end)")


def add(sub) -> None:
    p = sub.add_parser("train", help="LoRA/QLoRA on a pruned model folder (LoRAM) or an ordinary model (plain LoRA)")
    p.add_argument("model", help="pruned model folder (from `loram prune`) or an original model")
    add_out(p, "adapter folder")
    p.add_argument("--data", action="append", required=True,
                   help="FILE (.json/.jsonl/.parquet) or hub id, optionally FILE=WEIGHT for mixtures; repeatable")
    p.add_argument("--rank", type=COUNT, default=8)
    p.add_argument("--alpha", type=COUNT, default=16)
    p.add_argument("--dropout", type=DROPOUT, default=0.05)
    p.add_argument("--targets", default="q,k,v,o,gate,up,down", help="comma list of q,k,v,o,gate,up,down,lm_head")
    p.add_argument("--quantize", default=None, choices=["nf4"], help="QLoRAM: NF4 + double quant base (needs bitsandbytes)")
    p.add_argument("--train-on-inputs", action="store_true", help="loss on prompt tokens too")
    p.add_argument("--packing", action="store_true", help="concatenate rows into full --seq-len sequences")
    add_run_args(p, lr=2e-4, seq_len=512)
    p.set_defaults(func=run)


def parse_data(specs: list[str]) -> tuple[list[str], list[float] | None]:
    files, weights = [], []
    for s in specs:
        f, eq, w = s.rpartition("=")
        if eq and f:
            weights.append(POSITIVE.named(f"--data {f} mixture weight")(w))  # finite and > 0, e.g. FILE=0.5
            files.append(f)
        else:
            files.append(s)
            weights.append(None)
    if all(w is None for w in weights):
        return files, None
    if any(w is None for w in weights):
        raise LoramError("give a mixture weight to every --data (FILE=WEIGHT) or to none")
    return files, weights


def parse_evals(specs: list[str]) -> dict[str, str]:
    out = {}
    for s in specs:
        name, eq, f = s.partition("=")
        if not eq or not name or not f:
            raise LoramError(f"--eval {s!r} is not NAME=FILE: e.g. --eval alpaca=held_out.json")
        if name in out:
            raise LoramError(f"--eval name {name!r} given twice: give each held-out set its own name")
        out[name] = f
    return out


def run_kwargs(a) -> dict:
    files, weights = parse_data(a.data)
    return dict(data=files, data_weights=weights, lr=a.lr, schedule=a.schedule, warmup=a.warmup, steps=a.steps, epochs=a.epochs,
                micro_batch=a.micro_batch, grad_accum=a.grad_accum, seq_len=a.seq_len, grad_checkpointing=a.grad_checkpointing,
                bf16=a.bf16, seed=a.seed, save_steps=a.save_steps, logging_steps=a.logging_steps, eval=parse_evals(a.eval),
                eval_steps=a.eval_steps, weight_decay=a.weight_decay, loss_chunk=a.loss_chunk)


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def interrupted(e) -> int:
    """Ctrl-C: one line, exit 130 (the shell's code for SIGINT)."""
    print(f"error: {e}", file=sys.stderr)
    return 130


def run(a) -> int:
    from ..data import skip_summary
    from ..train import TrainConfig, train
    from ..training import TrainingInterrupted

    cfg = TrainConfig(**run_kwargs(a), rank=a.rank, alpha=a.alpha, dropout=a.dropout,
                      targets=tuple(t.strip() for t in a.targets.split(",") if t.strip()), quantize=a.quantize,
                      train_on_inputs=a.train_on_inputs, packing=a.packing)
    try:
        r = train(a.model, a.out, cfg, resume=a.resume, overwrite=a.overwrite, checkpoint_dir=a.checkpoint_dir)
    except TrainingInterrupted as e:
        return interrupted(e)
    if is_main():
        print(f"adapter written to {r.out}: {r.summary()}" + (f"; {skip_summary(r.dropped)}" if r.dropped.get("total") else ""))
    return 0
