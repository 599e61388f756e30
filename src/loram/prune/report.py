"""What `loram prune` returns (structured and sparse alike); its own module so that the pruning
methods (sparse.py) need nothing from the package's __init__."""

from __future__ import annotations

from dataclasses import dataclass

from ..prune_plan import PrunePlan


@dataclass
class PruneReport:
    out: str
    plan: PrunePlan
    params_original: int
    params_pruned: int
    seconds: float
    peak_rss_gb: float
    params_nonzero: int | None = None  # sparse plans: shapes are kept, zeros in the targeted linears are not counted

    @property
    def param_reduction(self) -> float:
        return self.params_original / (self.params_nonzero or self.params_pruned)
