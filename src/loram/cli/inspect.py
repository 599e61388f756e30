"""loram inspect ADAPTER -o DIR: head-wise / layer-wise update norms (the paper's App. C maps)"""

from __future__ import annotations

from .common import add_out


def add(sub) -> None:
    p = sub.add_parser("inspect", help="update-norm maps of an adapter (pruned or recovered): JSON + heatmap PNGs")
    p.add_argument("adapter", help="adapter folder (pruned, recovered or plain LoRA)")
    add_out(p, "folder for update_norms.json, attn_heads.png, mlp_layers.png")
    p.add_argument("--base", default=None, help="base model, only for plain adapters without a plan (head geometry)")
    p.add_argument("--no-plots", action="store_true", help="JSON only (no matplotlib needed)")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..inspect_adapter import inspect

    norms, files = inspect(a.adapter, a.out, base=a.base, plots=not a.no_plots, overwrite=a.overwrite)
    mlp = {r: [v for v in vals if v is not None] for r, vals in norms.mlp.items()}
    means = ", ".join(f"{r} {sum(v) / len(v):.3g}" for r, v in mlp.items() if v)
    print(f"{norms.stage} adapter, scaling {norms.scaling:g}: mean MLP row norms {means or 'n/a'}")
    print("written: " + ", ".join(str(f) for f in files))
    return 0
