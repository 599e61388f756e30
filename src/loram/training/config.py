"""What `loram train` and `loram align` share: the optimisation knobs and the report they write."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    bf16: bool = False
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
    dropped: dict = field(default_factory=dict)  # training rows skipped: reason -> count, and "total"
    eval_ppl: dict = field(default_factory=dict)  # name -> final perplexity
    eval_history: list = field(default_factory=list)  # [{"step", name: ppl, ...}]
    resumed_from: str | None = None
    eval_dropped: dict = field(default_factory=dict)  # --eval NAME -> {reason: count, "total"}

    def summary(self) -> str:
        cuda = f", CUDA peak {self.peak_cuda_gb:.2f} GB" if self.peak_cuda_gb is not None else ""
        ppl = "".join(f", ppl {k} {v:.3f}" for k, v in self.eval_ppl.items())
        return (f"{self.steps} steps in {self.wall_s:.1f} s, {self.tokens_per_s:.0f} tokens/s, peak RSS {self.peak_rss_gb:.2f} GB{cuda}, "
                f"trainable {self.trainable_params:,} / frozen {self.frozen_params:,} parameters{ppl}")
