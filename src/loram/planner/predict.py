"""One call from a config to every number `loram plan` prints: ``predict(config, spec, settings)``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..errors import LoramError
from ..families import geometry
from ..prune_plan import PrunePlan
from .memory import MemoryEstimate, TrainSettings, estimate
from .params import ParamCounts, PruneSpec, count, layer_widths, sparse_nonzeros, storage

SCHEMES = ("LoRA", "QLoRA", "LoRAM", "QLoRAM")


@dataclass
class Prediction:
    name: str
    spec: dict
    settings: TrainSettings
    original: ParamCounts
    pruned: ParamCounts
    schemes: dict[str, MemoryEstimate] = field(default_factory=dict)
    gpu_gb: float | None = None

    @property
    def params_original(self) -> int:
        return self.original.total

    @property
    def params_pruned(self) -> int:
        return self.pruned.total

    @property
    def param_reduction(self) -> float:
        """Original / pruned parameters (sparse: original / non-zeros)."""
        return self.original.total / (self.pruned.nonzeros or self.pruned.total)

    @property
    def storage_reduction_nf4(self) -> float:
        """The paper's convention: original at 16 bits over pruned at 4 bits, every parameter."""
        return 16 * self.original.total / (4 * (self.pruned.nonzeros or self.pruned.total))

    @property
    def storage_reduction_nf4_actual(self) -> float:
        """Original bf16 bytes over what the pruned NF4 model really stores (constants, 16-bit embeddings)."""
        return storage(self.original).bf16 / storage(self.pruned).nf4_total

    def fits(self, scheme: str) -> bool | None:
        return None if self.gpu_gb is None else self.schemes[scheme].gb <= self.gpu_gb

    def to_dict(self) -> dict:
        so, sp = storage(self.original), storage(self.pruned)
        return {
            "model": self.name, "prune": self.spec, "train": asdict(self.settings),
            "params_original": self.params_original, "params_pruned": self.params_pruned,
            "params_nonzero": self.pruned.nonzeros, "param_reduction": self.param_reduction,
            "storage_reduction_nf4": self.storage_reduction_nf4,
            "storage_reduction_nf4_actual": self.storage_reduction_nf4_actual,
            "storage_bytes": {"original_bf16": so.bf16, "pruned_bf16": sp.bf16, "pruned_nf4_weights": sp.nf4_weights,
                              "pruned_nf4_constants": sp.nf4_constants, "pruned_nf4_rest_bf16": sp.nf4_rest_bf16},
            "gpu_gb": self.gpu_gb,
            "schemes": {k: {"memory_gb": m.gb, "terms_gb": m.terms_gb(), "peak_rule": m.peak_rule, "fits": self.fits(k)}
                        for k, m in self.schemes.items()},
        }


def predict(config, plan_or_spec: PrunePlan | PruneSpec | None = None, settings: TrainSettings | None = None,
            gpu_gb: float | None = None, name: str = "model") -> Prediction:
    """Parameters, storage and training memory of LoRA / QLoRA on ``config`` and LoRAM / QLoRAM on
    it pruned by ``plan_or_spec`` (a PrunePlan for its exact kept lists, or a PruneSpec of ratios)."""
    settings = settings or TrainSettings()
    geometry(config)  # refuses unsupported families with a one-line error
    full = layer_widths(config, None)
    pruned_w = layer_widths(config, plan_or_spec)
    original, pruned = count(config, full), count(config, pruned_w)
    if isinstance(plan_or_spec, PruneSpec):
        spec = asdict(plan_or_spec)
        if plan_or_spec.kind == "sparse" and plan_or_spec.ratio > 0:
            pruned.nonzeros = sparse_nonzeros(config, plan_or_spec, pruned)
    elif isinstance(plan_or_spec, PrunePlan):
        spec = {"method": plan_or_spec.method, "ratio": plan_or_spec.mlp_ratio, "attn_ratio": plan_or_spec.attn_ratio,
                "layers": "{}:{}".format(*plan_or_spec.layers), "plan_id": plan_or_spec.id}
    else:
        spec = {"method": None, "ratio": 0.0}
    schemes = {
        "LoRA": estimate(config, full, original, settings, False, "LoRA"),
        "QLoRA": estimate(config, full, original, settings, True, "QLoRA"),
        "LoRAM": estimate(config, pruned_w, pruned, settings, False, "LoRAM"),
        "QLoRAM": estimate(config, pruned_w, pruned, settings, True, "QLoRAM"),
    }
    return Prediction(name, spec, settings, original, pruned, schemes, gpu_gb)


def smallest_ratio(config, spec: PruneSpec, settings: TrainSettings, gpu_gb: float, quantized: bool,
                   step: float = 0.01) -> float | None:
    """Smallest pruning ratio (on a ``step`` grid) whose LoRAM (QLoRAM if ``quantized``) peak fits
    in ``gpu_gb``: 0.0 if the unpruned model fits, None if even the largest ratio does not. Memory falls monotonically with the ratio,
    so a bisection over the grid suffices."""
    scheme = "QLoRAM" if quantized else "LoRAM"
    grid = [round(k * step, 6) for k in range(1, int(round(1 / step)))]

    def fits(r: float) -> bool:
        try:
            s = replace(spec, ratio=r)
            return predict(config, s, settings, gpu_gb).schemes[scheme].gb <= gpu_gb
        except LoramError:  # a ratio that removes every MLP channel does not fit
            return False

    if fits(0.0):
        return 0.0  # it fits unpruned
    if not fits(grid[-1]):
        return None
    lo, hi = 0, len(grid) - 1  # invariant: grid[hi] fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(grid[mid]):
            hi = mid
        else:
            lo = mid + 1
    return grid[hi]
