"""`loram inspect`: where did the LoRA updates go? (the paper's App. C maps)

For every targeted projection the update is dW = s * B A  (s = alpha / r, or alpha / sqrt(r)
with rsLoRA), never formed explicitly: with Gram matrices of the rank-r factors

    ||row_i(dW)||^2 = s^2 * b_i^T (A A^T) b_i        ||col_j(dW)||^2 = s^2 * a_j^T (B^T B) a_j

Head maps [layer, head] (Frobenius norm of one head's slice of dW):
    q: rows h*d .. (h+1)*d - 1 of q_proj (H heads)   k, v: rows of k/v_proj (K KV heads)
    o: columns h*d .. (h+1)*d - 1 of o_proj (H heads)
MLP maps [layer]: mean L2 norm of the rows of dW for gate / up / down, counting only rows that
are not exactly zero (a recovered adapter has all-zero rows at pruned channels: they did not
train, so they must not dilute the mean).

Pruned and recovered adapters give the same maps: a pruned adapter's heads are placed at their
original indices through the plan (kv_keep), and heads without an update - pruned away, or
exactly zero after recovery - are null in the JSON and blank in the heatmaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import ADAPTER_CONFIG, read_meta, read_tensors
from .errors import LoramError
from .families import ATTN_ROLES, MLP_ROLES, Geometry, geometry, parse_name
from .io import atomic_dir, check_output, load_config, read_json, write_json
from .prune_plan import PrunePlan, has_plan


@dataclass
class UpdateNorms:
    stage: str
    scaling: float
    n_layers: int
    heads: dict = field(default_factory=dict)  # role -> [layer][head] float | None
    mlp: dict = field(default_factory=dict)  # role -> [layer] float | None

    def to_dict(self) -> dict:
        return {"format": "loram-update-norms", "stage": self.stage, "scaling": self.scaling, "n_layers": self.n_layers,
                "heads": self.heads, "mlp_mean_row_norm": self.mlp}


def _scaling(cfg: dict) -> float:
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def row_norms(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """L2 norm of each row of s * B A (B [out, r], A [r, in])."""
    A, B = A.double(), B.double()
    sq = ((B @ (A @ A.T)) * B).sum(1)
    return s * sq.clamp_min(0).sqrt()


def col_norms(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """L2 norm of each column of s * B A."""
    A, B = A.double(), B.double()
    sq = ((A.T @ (B.T @ B)) * A.T).sum(1)
    return s * sq.clamp_min(0).sqrt()


def _kept_heads(plan: PrunePlan | None, layer: int, role: str, g: Geometry, n_present: int) -> list[int]:
    """Original head indices of the heads present in this adapter's tensor (in order)."""
    total = g.n_kv_heads if role in ("k", "v") else g.n_heads
    if n_present == total:
        return list(range(total))
    idx = plan.kept_index(layer, role, g) if plan is not None else None
    if idx is None:
        raise LoramError(f"layer {layer} {role} has {n_present} heads but the model has {total} and no plan says why: "
                         "the adapter and its plan disagree")
    return (idx[:: g.head_dim] // g.head_dim).tolist()  # kept rows/columns come in whole heads


def _head_norms(norms_sq: torch.Tensor, d: int) -> list[float]:
    return norms_sq.view(-1, d).sum(1).sqrt().tolist()


def update_norms(tensors: dict[str, torch.Tensor], lora_cfg: dict, config, plan: PrunePlan | None = None,
                 stage: str = "original") -> UpdateNorms:
    """Head-wise and layer-wise update norms of one adapter's tensors (see the module docstring)."""
    g = geometry(config)
    s = _scaling(lora_cfg)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        name = parse_name(k)
        if name is not None and name.lora is not None and name.kind == "weight":
            pairs.setdefault((name.layer, name.role), {})[name.lora] = t
    res = UpdateNorms(stage, s, g.n_layers)
    for role in ATTN_ROLES:
        total = g.n_kv_heads if role in ("k", "v") else g.n_heads
        grid: list[list[float | None]] = [[None] * total for _ in range(g.n_layers)]
        for (layer, r), ab in pairs.items():
            if r != role or layer >= g.n_layers:
                continue
            A, B = ab["A"], ab["B"]
            norms = col_norms(A, B, s) if role == "o" else row_norms(A, B, s)
            heads = _head_norms(norms ** 2, g.head_dim)
            for h, v in zip(_kept_heads(plan, layer, role, g, len(heads)), heads):
                grid[layer][h] = v if v > 0 else None  # exactly zero = pruned and recovered: no update
        res.heads[role] = grid
    for role in MLP_ROLES:
        per_layer: list[float | None] = [None] * g.n_layers
        for (layer, r), ab in pairs.items():
            if r != role or layer >= g.n_layers:
                continue
            norms = row_norms(ab["A"], ab["B"], s)
            nz = norms[norms > 0]
            per_layer[layer] = float(nz.mean()) if nz.numel() else None
        res.mlp[role] = per_layer
    return res


def adapter_norms(adapter: str | Path, base: str | None = None) -> UpdateNorms:
    """UpdateNorms of an adapter folder (pruned, recovered or plain; plain ones need ``base`` for the config)."""

    adapter = Path(adapter)
    tensors = read_tensors(adapter)
    lora_cfg = read_json(adapter / ADAPTER_CONFIG)
    meta = read_meta(adapter) or {}
    plan = PrunePlan.load(adapter) if has_plan(adapter) else None
    if plan is not None:
        config = plan.base_config()
    else:
        src = base or lora_cfg.get("base_model_name_or_path")
        if not src:
            raise LoramError(f"{adapter} has no plan and no base_model_name_or_path: pass --base MODEL for the head geometry")
        config = load_config(src)
    return update_norms(tensors, lora_cfg, config, plan, meta.get("stage", "original"))


def plot_norms(norms: UpdateNorms, out: str | Path, title: str = "") -> list[Path]:
    """Heatmaps: attn_heads.png (q/k/v/o, layer x head) and mlp_layers.png (gate/up/down, per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def arr(x):
        return np.array([[np.nan if v is None else v for v in row] for row in x], dtype=float)

    fig, axes = plt.subplots(1, 4, figsize=(14, 5), constrained_layout=True)
    for ax, role in zip(axes, ATTN_ROLES):
        a = arr(norms.heads[role])
        cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
        im = ax.imshow(np.ma.masked_invalid(a), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(f"{role}_proj: head-wise ||dW||")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"{title} ({norms.stage} adapter; grey: no update)".strip())
    p1 = out / "attn_heads.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 2.8), constrained_layout=True)
    m = np.array([[np.nan if v is None else v for v in norms.mlp[r]] for r in MLP_ROLES], dtype=float)
    cmap = plt.get_cmap("magma").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(MLP_ROLES)), [f"{r}_proj" for r in MLP_ROLES])
    ax.set_xlabel("layer")
    ax.set_title(f"{title} MLP: mean row norm of dW (all-zero rows excluded)".strip())
    fig.colorbar(im, ax=ax)
    p2 = out / "mlp_layers.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def inspect(adapter: str | Path, out: str | Path, base: str | None = None, plots: bool = True,
            overwrite: bool = False) -> tuple[UpdateNorms, list[Path]]:
    """Write update_norms.json (+ heatmap PNGs) for an adapter folder into the new folder ``out``.

    Like every output, ``out`` must not exist (``overwrite`` replaces it) and appears complete or not at all."""
    out = check_output(out, overwrite)  # before reading the adapter: a taken -o fails at once
    norms = adapter_norms(adapter, base)
    with atomic_dir(out, overwrite) as tmp:
        write_json(tmp / "update_norms.json", dict(norms.to_dict(), adapter=str(adapter)))
        names = ["update_norms.json"]
        if plots:
            try:
                names += [p.name for p in plot_norms(norms, tmp, Path(adapter).name)]
            except ImportError:
                raise LoramError("the heatmaps need matplotlib: pip install matplotlib (or pass --no-plots for the JSON only)") from None
    return norms, [out / n for n in names]
