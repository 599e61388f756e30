"""The knobs of the training stages as plain dataclasses: `loram train` (TrainConfig), `loram align`
(AlignConfig) and what they share (RunConfig).

No torch here: loram.settings derives the CLI flags and the recipe schema from these, and the CLI must
stay fast on its error paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# --precision values (loram.device.resolve_precision turns one into a dtype); here, torch-free, for the flags
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def auto_precision(device_type: str, bf16_gpu: bool = True) -> str:
    """What --precision auto computes in on a device of ``device_type``: bf16 on a GPU that has it, fp16
    on one that does not (pre-Ampere: training adds loss scaling), fp32 elsewhere (a CPU's bf16 backward
    is 60-150x slower than fp32 on the machines we measured). loram.device and the planner both use it."""
    if device_type == "cuda":
        return "bf16" if bf16_gpu else "fp16"
    return "fp32"


@dataclass
class RunConfig:
    """Optimisation knobs shared by `loram train` and `loram align`."""

    data: list[str]
    data_weights: list[float] | None = None
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup: float = 0.03  # fraction of steps (< 1) or a step count (>= 1)
    steps: int = 100
    epochs: float | None = None
    micro_batch: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    grad_checkpointing: bool = False
    bf16: bool = False  # old spelling of precision="bf16" (recipes write `bf16: true`): settings.precision_of
    precision: str = "auto"  # compute dtype: auto | bf16 | fp16 | fp32 (loram.device)
    seed: int = 0
    save_steps: int = 0
    logging_steps: int = 10
    eval: dict[str, str] = field(default_factory=dict)  # name -> held-out file
    eval_steps: int = 0  # 0: every --save-steps, else only at the end
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # 0: transformers' loss (full fp32 logits: batch x seq x vocab x 4 B, ~4 live copies with their
    # gradients: 0.1 GB each per 512 tokens at vocab 49152). N: lm_head + cross-entropy N positions at a time (loram.loss), the
    # same value; costs one extra lm_head matmul per token. Pays off when the base is small (pruned).
    loss_chunk: int = 0
    report_to: str = "none"  # comma list of Trainer trackers (tensorboard, wandb, mlflow): loram.training.tracking


DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LONG_ROWS = ("truncate", "drop")  # --long-rows: what happens to a row longer than --seq-len (loram.data.encode_all)
TARGET_MODULES = {r: f"{r}_proj" for r in DEFAULT_TARGETS} | {"lm_head": "lm_head"}


@dataclass
class TrainConfig(RunConfig):
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    quantize: str | None = None
    train_on_inputs: bool = False
    long_rows: str = "truncate"  # LONG_ROWS
    chat_template: str | None = None  # Jinja file replacing the tokenizer's chat template
    packing: bool = False
    # --original-offset: train the update as it acts on the original (loram.offset)
    original_offset: bool = False
    teacher: str | None = None  # default: the plan's base model
    offset_top_k: int = 32
    offset_cache: str | None = None  # default: CHECKPOINT_DIR/teacher-topk
    offset_at: str = "logits"  # logits (loram.offset) or layers (loram.layer_offset: after every decoder layer)
    max_memory: float | None = None  # the original's pass's memory budget (streams it when it does not fit)
    # --anchor: KL to the adapter-off model on general text blocks (loram.anchor)
    anchor: str | None = None
    anchor_weight: float = 1.0
    anchor_batch: int = 1
    extra: dict = field(default_factory=dict)


@dataclass
class AlignConfig(RunConfig):
    lr: float = 2e-5
    tokens: int | None = None  # token budget (overrides steps)
    train_embeddings: bool = False
    train_lm_head: bool = False
    # --distill: align to the original's next-token distribution (loram.distill)
    distill: bool = False
    teacher: str | None = None  # default: the plan's base model
    distill_top_k: int = 32
    distill_lm_weight: float = 0.0
    distill_temperature: float = 1.0
    distill_cache: str | None = None  # default: CHECKPOINT_DIR/teacher-topk
    max_memory: float | None = None  # the teacher pass's memory budget (streams the teacher when it does not fit)
