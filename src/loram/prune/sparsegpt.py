"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS weight updates.

For a linear W [out, in] with calibration inputs X [in, tokens] the layer-wise problem is

    min over mask M and W'   || W X - (M * W') X ||^2,      Hessian  H = 2 X X^T   [in, in]

solved greedily, column by column, with the inverse Hessian of the not-yet-processed columns:

    H   += lambda I,      lambda = 1% of mean(diag H)        (dampening; dead inputs get H_jj = 1)
    U    = chol(H^-1)^T   (upper Cholesky factor of the inverse: row j of U holds, for column j, the
                           inverse-Hessian row restricted to the columns after j, already
                           conditioned on the columns before it)
    for each block of B = 128 columns:
        choose the mask inside the block: score w_ij^2 / U_jj^2 (the OBS saliency); unstructured
        removes the lowest fraction R of the block's scores, N:M removes the M - N lowest of each
        group of M columns, chosen when the column loop reaches the group's first column
        for each column j of the block:
            q_j   = w_j with the masked entries set to 0
            e_j   = (w_j - q_j) / U_jj
            w_k  -= e_j U_jk      for the later columns k of the block   (the OBS compensation)
        w_k -= E U[block, k]  for every column k after the block (one matmul per block)

The mask is re-chosen per block on weights already updated by the earlier blocks, which is
what makes SparseGPT better than choosing the whole mask up front. The result has exact zeros.
"""

from __future__ import annotations

import torch

from ..errors import LoramError
from .pattern import Pattern, _lowest

BLOCK = 128
DAMP = 0.01


class Hessian:
    """Running X X^T of one linear input (its scale does not matter: the dampening is relative)."""

    def __init__(self, cols: int, device="cpu"):
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.H.addmm_(x.t(), x)
        self.tokens += x.shape[0]


def _inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1 (``H`` is the caller's copy: damped in place).

    Computed in float32, float64 only when the float32 Cholesky fails: with the 1% dampening the
    damped H has condition number <= 100 * cols, and against float64 the factor differs by <= 2e-3
    relative even for a rank-1 H; the masks were identical in every case measured (see
    docs/pruning.md, "SparseGPT's Hessian in float32"). float64 would double the largest buffers of
    a streamed layer (H of a 70B's down_proj: 3.3 GB in float32)."""
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp * torch.mean(torch.diag(H))
    for dtype in (torch.float32, torch.float64):
        try:
            L = torch.linalg.cholesky(H.to(dtype))
            Hinv = torch.cholesky_inverse(L)
            del L
            return torch.linalg.cholesky(Hinv, upper=True).float()
        except torch.linalg.LinAlgError:
            continue
    raise LoramError("the calibration Hessian is not positive definite even after dampening: give more "
                     "calibration data (--calib-samples / --calib-seq-len)")


def sparsegpt(weight: torch.Tensor, H: torch.Tensor, pattern: Pattern, block: int = BLOCK,
              damp: float = DAMP, overwrite_h: bool = False) -> torch.Tensor:
    """The pruned and OBS-updated weight (a new float32 tensor, same shape, exact zeros).

    overwrite_h: H may be modified (the caller's last use of it), which saves one in x in copy: the
    largest buffer of a layer (down_proj's H)."""
    W = weight.detach().float().clone()
    H = H if overwrite_h else H.clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: any weight there is free to prune
    H[dead, dead] = 1
    W[:, dead] = 0
    U = _inverse_factor(H, damp)
    rows, cols = W.shape
    n, m = pattern.n, pattern.m
    if m:  # a group of M must not straddle two blocks
        block = max(m, block - block % m)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        Wb = W[:, b0:b1].clone()
        Ub = U[b0:b1, b0:b1]
        d = torch.diag(Ub)
        err = torch.zeros_like(Wb)
        if m:
            mask = torch.zeros_like(Wb, dtype=torch.bool)
        else:
            score = Wb.pow(2) / d.pow(2)[None, :]
            mask = _lowest(score.reshape(-1), int(score.numel() * pattern.ratio), dim=0).reshape(score.shape)
        for j in range(b1 - b0):
            g = b0 + j
            if m and g % m == 0 and g + m <= cols:  # a group of M starts here (tail columns past the last group stay dense)
                span = slice(j, j + m)
                s = Wb[:, span].pow(2) / d[span].pow(2)[None, :]
                mask[:, span] = _lowest(s, m - n, dim=1)
            w = Wb[:, j]
            q = torch.where(mask[:, j], torch.zeros_like(w), w)
            e = (w - q) / Ub[j, j]
            Wb[:, j:] -= e[:, None] * Ub[j, j:][None, :]
            Wb[:, j] = q  # exact zeros (the update above leaves rounding residue on the pruned entries)
            err[:, j] = e
        W[:, b0:b1] = Wb
        if b1 < cols:
            W[:, b1:] -= err @ U[b0:b1, b1:]
    return W
