"""Sparsity patterns and the mask selections shared by the non-structured methods.

A pattern says which weights of a linear W [out, in] may become zero:

    unstructured R   a fraction R of the weights (compared per output row, per matrix or per
                     column block, depending on the method)
    N:M              in every group of M consecutive *input* weights of a row, at most N stay
                     non-zero (2:4 = NVIDIA's semi-structured sparsity). Columns past the last full
                     group (in % M of them) stay dense. The ratio is implied: 1 - N/M.

N counts the weights *kept* (the hardware convention "2:4 = 2 non-zeros out of 4"), which is also
how `loram plan --sparsity N:M` counts them. Every selection here returns a bool mask that is True
on the weights to *remove*; ties break towards the lower index, so masks are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LoramError


@dataclass(frozen=True)
class Pattern:
    name: str  # "unstructured" or "N:M"
    ratio: float  # fraction of weights removed (implied for N:M)
    n: int = 0  # weights kept per group (N:M only)
    m: int = 0  # group size (N:M only)

    @property
    def structured_groups(self) -> bool:
        return self.m > 0


def parse_pattern(sparsity: str, ratio: float | None) -> Pattern:
    """The pattern of `--sparsity S --ratio R` (R defaults to 0.5; for N:M it must be absent or 1 - N/M)."""
    s = sparsity.strip().lower()
    if s == "unstructured":
        r = 0.5 if ratio is None else ratio
        if not 0 < r < 1:
            raise LoramError(f"--ratio {r} is out of range for unstructured sparsity: use 0 < R < 1, e.g. 0.5")
        return Pattern("unstructured", float(r))
    try:
        n, m = (int(x) for x in s.split(":"))
    except ValueError:
        raise LoramError(f"--sparsity {sparsity!r} is not unstructured or N:M: use e.g. unstructured or 2:4") from None
    if not 0 < n < m:
        raise LoramError(f"--sparsity {sparsity} keeps {n} of every {m} weights: use 0 < N < M, e.g. 2:4")
    implied = 1 - n / m
    if ratio is not None and abs(ratio - implied) > 1e-9:
        raise LoramError(f"--ratio {ratio} contradicts --sparsity {n}:{m}, which removes {implied:g} of the weights: "
                         "drop --ratio (N:M implies it)")
    return Pattern(f"{n}:{m}", implied, n, m)


def _lowest(score: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Bool mask of the k lowest scores along ``dim`` (stable: ties go to the lower index)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k <= 0:
        return mask
    order = torch.argsort(score, dim=dim, stable=True)
    return mask.scatter_(dim, order.narrow(dim, 0, k), True)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Remove the M - N lowest scores in each group of M consecutive columns (tail columns kept)."""
    rows, cols = score.shape
    full = cols - cols % m
    mask = torch.zeros_like(score, dtype=torch.bool)
    if full:
        groups = score[:, :full].reshape(rows, full // m, m)
        mask[:, :full] = _lowest(groups, m - n, dim=2).reshape(rows, full)
    return mask


def row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Remove floor(in * R) lowest scores of every output row (Wanda's comparison group)."""
    return _lowest(score, int(score.shape[1] * ratio), dim=1)


def matrix_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Remove the floor(numel * R) lowest scores of the whole matrix (layer-wise magnitude pruning)."""
    return _lowest(score.reshape(-1), int(score.numel() * ratio), dim=0).reshape(score.shape)
