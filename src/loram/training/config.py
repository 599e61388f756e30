"""The report `loram train` and `loram align` write (their knobs: loram.configs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    eval_kl: dict = field(default_factory=dict)  # align --distill: --eval NAME -> final KL to the teacher (loram.distill)

    def as_json(self) -> dict:
        """What the report file holds: every field, eval_kl only when it has values (other runs keep their keys)."""
        out = asdict(self)
        if not self.eval_kl:
            del out["eval_kl"]
        return out

    def summary(self) -> str:
        cuda = f", CUDA peak {self.peak_cuda_gb:.2f} GB" if self.peak_cuda_gb is not None else ""
        ppl = "".join(f", ppl {k} {v:.3f}" for k, v in self.eval_ppl.items())
        ppl += "".join(f", kl {k} {v:.4g}" for k, v in self.eval_kl.items())  # align --distill
        return (f"{self.steps} steps in {self.wall_s:.1f} s, {self.tokens_per_s:.0f} tokens/s, peak RSS {self.peak_rss_gb:.2f} GB{cuda}, "
                f"trainable {self.trainable_params:,} / frozen {self.frozen_params:,} parameters{ppl}")
