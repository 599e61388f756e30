"""loram train MODEL --data FILE -o OUT [--steps N] [--quantize nf4] ..."""

from __future__ import annotations

from ..errors import LoramError
from .common import add_out


def add(sub) -> None:
    p = sub.add_parser("train", help="LoRA/QLoRA on a pruned model folder (LoRAM) or an ordinary model (plain LoRA)")
    p.add_argument("model", help="pruned model folder (from `loram prune`) or an original model")
    add_out(p, "adapter folder")
    p.add_argument("--data", action="append", required=True,
                   help="FILE (.json/.jsonl/.parquet) or hub id, optionally FILE=WEIGHT for mixtures; repeatable")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", default="q,k,v,o,gate,up,down", help="comma list of q,k,v,o,gate,up,down,lm_head")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--schedule", default="cosine", help="cosine | linear | constant | constant_with_warmup")
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of steps (<1) or number of steps")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--epochs", type=float, default=None, help="train for epochs instead of --steps")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512, help="rows longer than this are dropped (count reported)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (~1.2-1.3x faster on a bf16 CPU)")
    p.add_argument("--quantize", default=None, choices=["nf4"], help="QLoRAM: NF4 + double quant base (needs bitsandbytes)")
    p.add_argument("--train-on-inputs", action="store_true", help="loss on prompt tokens too")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (to OUT-checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logging-steps", type=int, default=10)
    p.set_defaults(func=run)


def parse_data(specs: list[str]) -> tuple[list[str], list[float] | None]:
    files, weights = [], []
    for s in specs:
        f, eq, w = s.rpartition("=")
        if eq and f:
            try:
                weights.append(float(w))
            except ValueError:
                raise LoramError(f"--data {s}: the mixture weight {w!r} is not a number (use FILE=0.5)") from None
            files.append(f)
        else:
            files.append(s)
            weights.append(None)
    if all(w is None for w in weights):
        return files, None
    if any(w is None for w in weights):
        raise LoramError("give a mixture weight to every --data (FILE=WEIGHT) or to none")
    return files, weights


def run(a) -> int:
    from ..train import TrainConfig, train

    files, weights = parse_data(a.data)
    cfg = TrainConfig(data=files, data_weights=weights, rank=a.rank, alpha=a.alpha, dropout=a.dropout,
                      targets=tuple(t.strip() for t in a.targets.split(",") if t.strip()), lr=a.lr, schedule=a.schedule,
                      warmup=a.warmup, steps=a.steps, epochs=a.epochs, micro_batch=a.micro_batch, grad_accum=a.grad_accum,
                      seq_len=a.seq_len, grad_checkpointing=a.grad_checkpointing, bf16=a.bf16, seed=a.seed,
                      quantize=a.quantize, train_on_inputs=a.train_on_inputs, packing=a.packing, save_steps=a.save_steps,
                      logging_steps=a.logging_steps)
    r = train(a.model, a.out, cfg, resume=a.resume, overwrite=a.overwrite)
    print(f"adapter written to {r.out}: {r.summary()}" + (f"; {r.dropped} rows longer than --seq-len dropped" if r.dropped else ""))
    return 0
