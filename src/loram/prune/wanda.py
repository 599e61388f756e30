"""Wanda (Sun et al. 2023) and magnitude pruning: a score per weight, no weight update.

    Wanda       S_ij = |W_ij| * ||X_j||_2     (X_j: input feature j over every calibration token)
                compared per output row: each row loses its floor(in * R) lowest scores,
                N:M removes the M - N lowest of each group of M consecutive inputs of a row
    magnitude   S_ij = |W_ij|
                compared over the whole matrix (layer-wise magnitude pruning, the baseline of the
                SparseGPT and Wanda papers); N:M as above

Only ||X_j||^2 summed over tokens is needed, one vector per linear input: [in] floats.
"""

from __future__ import annotations

import torch

from .pattern import Pattern, matrix_mask, nm_mask, row_mask


class ColumnNorms:
    """Running sum over tokens of x_j^2 for each input feature j."""

    def __init__(self, cols: int, device="cpu"):
        self.sq = torch.zeros(cols, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.sq += x.pow(2).sum(0)
        self.tokens += x.shape[0]


def wanda_mask(weight: torch.Tensor, col_sq: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """True where Wanda removes a weight."""
    score = weight.detach().abs().double() * col_sq.sqrt()[None, :]
    return nm_mask(score, pattern.n, pattern.m) if pattern.m else row_mask(score, pattern.ratio)


def magnitude_mask(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """True where magnitude pruning removes a weight."""
    score = weight.detach().abs()
    return nm_mask(score, pattern.n, pattern.m) if pattern.m else matrix_mask(score, pattern.ratio)
