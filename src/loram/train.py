"""`loram train`: LoRA (or QLoRA) on a pruned model folder or an ordinary HF model.

Memory of LoRA training (why LoRAM prunes the base first):

    frozen base weights  P_base * bytes      <- dominant for large models; LoRAM shrinks P_base,
                                                NF4 (QLoRAM) shrinks the bytes to ~0.5
    LoRA params+grads+AdamW   16 B * r * sum(in + out) over targets   (tiny)
    activations          ~ batch * seq * layers * widths (checkpointing keeps one layer's)

The adapter folder written here carries the plan and the base fingerprint, so `loram recover`
needs nothing else. Checkpoints go to OUT-checkpoints/ (Trainer format, safetensors) and
--resume continues from the last one with the same optimizer, scheduler, RNG and data order.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapter import ADAPTER_META, STAGE_PRUNED, write_adapter
from .errors import LoramError
from .io import atomic_dir, check_output, load_model, load_tokenizer, write_json
from .plan import has_plan

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
TARGET_MODULES = {r: f"{r}_proj" for r in DEFAULT_TARGETS} | {"lm_head": "lm_head"}


@dataclass
class TrainConfig:
    data: list[str]
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup: float = 0.03  # fraction of steps (< 1) or a step count (>= 1)
    steps: int = 100
    epochs: float | None = None
    micro_batch: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    grad_checkpointing: bool = False
    bf16: bool = False
    seed: int = 0
    quantize: str | None = None
    train_on_inputs: bool = False
    packing: bool = False
    save_steps: int = 0
    logging_steps: int = 10
    data_weights: list[float] | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class TrainReport:
    out: str
    steps: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    peak_rss_gb: float
    peak_cuda_gb: float | None
    trainable_params: int
    frozen_params: int
    losses: list = field(default_factory=list)
    dropped: int = 0

    def summary(self) -> str:
        cuda = f", CUDA peak {self.peak_cuda_gb:.2f} GB" if self.peak_cuda_gb is not None else ""
        return (f"{self.steps} steps in {self.wall_s:.1f} s, {self.tokens_per_s:.0f} tokens/s, peak RSS {self.peak_rss_gb:.2f} GB{cuda}, "
                f"trainable {self.trainable_params:,} / frozen {self.frozen_params:,} parameters")


def load_base(model: str | Path, quantize: str | None, bf16: bool):
    """(model, tokenizer, plan or None) for a pruned folder or an ordinary model."""
    from .pruned import load_pruned, quantize_nf4

    dtype = torch.bfloat16 if bf16 and quantize is None else torch.float32
    if Path(str(model)).is_dir() and has_plan(model):
        m = load_pruned(model, quantize=quantize, dtype=dtype, device_map="auto")
        return m, load_tokenizer(model), m.loram_plan
    m = load_model(model, dtype=dtype)
    if quantize == "nf4":
        quantize_nf4(m)
    elif quantize is not None:
        raise LoramError(f"--quantize {quantize!r} is not supported: use nf4")
    if torch.cuda.is_available():
        m.to("cuda")
    return m, load_tokenizer(model), None


def build_dataset(tok, cfg: TrainConfig):
    from .data import ListDataset, encode_all, pack, read_rows

    weights = cfg.data_weights or [1.0] * len(cfg.data)
    if len(weights) != len(cfg.data):
        raise LoramError(f"{len(weights)} mixture weights for {len(cfg.data)} datasets: give one weight per --data")
    g = torch.Generator().manual_seed(cfg.seed)
    parts, dropped = [], 0
    encoded = [encode_all(tok, read_rows(src), cfg.seq_len, cfg.train_on_inputs, name=src) for src in cfg.data]
    total = sum(len(e.examples) for e in encoded)
    for e, w in zip(encoded, weights):
        dropped += e.dropped
        # mixture: sample each source in proportion to its weight (with replacement when upsampling)
        n = max(1, round(total * w / sum(weights)))
        idx = torch.randint(len(e.examples), (n,), generator=g).tolist() if n > len(e.examples) else \
            torch.randperm(len(e.examples), generator=g)[:n].tolist()
        parts += [e.examples[i] for i in idx]
    if cfg.packing:
        parts = pack(parts, cfg.seq_len)
    return ListDataset(parts), dropped


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    bad = [t for t in cfg.targets if t not in TARGET_MODULES]
    if bad:
        raise LoramError(f"unknown --targets {bad}: choose from {', '.join(TARGET_MODULES)}")
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=[TARGET_MODULES[t] for t in cfg.targets], task_type="CAUSAL_LM")


def _count(model) -> tuple[int, int]:
    from .pruned import count_params

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, count_params(model) - trainable


def train(model_name: str | Path, out: str | Path, cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          checkpoint_dir: str | Path | None = None) -> TrainReport:
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from .data import collate
    from .memory import PeakRSS

    check_output(out, overwrite)
    ckpt = Path(checkpoint_dir or f"{out}-checkpoints")
    if resume and not ckpt.exists():
        raise LoramError(f"--resume: no checkpoints in {ckpt}: start without --resume (or pass --checkpoint-dir)")
    torch.manual_seed(cfg.seed)
    model, tok, plan = load_base(model_name, cfg.quantize, cfg.bf16)
    dataset, dropped = build_dataset(tok, cfg)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    pm = get_peft_model(model, lora_config(cfg))
    trainable, frozen = _count(pm)
    warmup = cfg.warmup if cfg.warmup >= 1 else math.ceil(cfg.warmup * cfg.steps)
    cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(ckpt), max_steps=cfg.steps if cfg.epochs is None else -1,
        num_train_epochs=cfg.epochs or 1, per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=cfg.schedule,
        warmup_steps=int(warmup), logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500, seed=cfg.seed, data_seed=cfg.seed,
        bf16=cfg.bf16, use_cpu=cpu, report_to=[], disable_tqdm=False, remove_unused_columns=False,
        dataloader_num_workers=0, include_num_input_tokens_seen=True, optim="adamw_torch",
        save_only_model=False,
    )
    losses = []

    class Log(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append({"step": state.global_step, "loss": logs["loss"]})

    trainer = Trainer(model=pm, args=args, train_dataset=dataset, data_collator=collate(tok.pad_token_id),
                      callbacks=[Log()])
    peak = PeakRSS()
    t0 = time.time()
    trainer.train(resume_from_checkpoint=True if resume else None)
    wall = time.time() - t0
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    report = TrainReport(str(out), trainer.state.global_step, wall, tokens, tokens / max(wall, 1e-9), peak.gb(),
                         PeakRSS.cuda_gb(), trainable, frozen, losses, dropped)
    if trainer.args.process_index == 0:
        save_adapter(pm, out, model_name, plan, cfg, report, overwrite)
    return report


def save_adapter(pm, out, model_name, plan, cfg: TrainConfig, report: TrainReport, overwrite: bool) -> None:
    from peft import get_peft_model_state_dict

    from .prune import base_fingerprint

    sd = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(pm).items()}
    lcfg = pm.peft_config["default"].to_dict()
    lcfg["base_model_name_or_path"] = str(model_name)
    lcfg = json.loads(json.dumps(lcfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    if plan is not None:
        meta = {"stage": STAGE_PRUNED, "plan_id": plan.id, "base_fingerprint": plan.base["fingerprint"],
                "base_name": plan.base.get("name"), "trained_on": str(model_name)}
    else:
        meta = {"stage": "original", "base_fingerprint": base_fingerprint(model_name, pm.get_base_model()),
                "base_name": str(model_name)}
    meta["train"] = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    with atomic_dir(out, overwrite) as tmp:
        write_adapter(tmp, sd, lcfg, meta, plan)
        write_json(Path(tmp) / "train_report.json", asdict(report))
    assert (Path(out) / ADAPTER_META).exists()
