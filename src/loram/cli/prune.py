"""loram prune MODEL -o OUT --method taylor --ratio 0.5"""

from __future__ import annotations

from dataclasses import asdict

from ..settings import add_flags, from_args
from .common import add_device, add_out, add_verify_base, table


def add(sub) -> None:
    p = sub.add_parser("prune", help="prune a model (structured, or sparse with --sparsity) and write a pruned model folder + plan")
    p.add_argument("model", help="HF model folder, .gguf file, hub id, or the built-in alias 'smollm2'")
    add_out(p, "pruned model folder")
    add_flags(p, "prune")  # loram.settings.PruneSettings
    add_verify_base(p, record=True)
    add_device(p)
    p.set_defaults(func=run)


def allocation_rows(plan) -> list[tuple[str, str]]:
    """--allocate global: the MLP widths it chose (uniform plans show none: every layer has the ratio's width)."""
    if plan.allocation is None:
        return []
    kept = [len(lp.mlp_keep) for lp in plan.pruned.values() if lp.mlp_keep is not None]
    whole = sum(lp.mlp_keep is None for lp in plan.pruned.values())
    span = f"{min(kept)}-{max(kept)}" if kept else "-"
    return [("MLP allocation", f"{plan.allocation}: {span} channels kept per layer" + (f", {whole} layer(s) whole" if whole else ""))]


def run(a) -> int:
    from ..device import resolve_device
    from ..prune import prune

    device = resolve_device(a.device)  # before any model is read: a missing GPU is one line
    r = prune(a.model, a.out, **asdict(from_args("prune", a)), overwrite=a.overwrite, verify_base=a.verify_base, device=device)
    s, e = r.plan.layers
    if r.plan.kind == "sparse":
        sp = r.plan.sparse
        table([("method", f"{r.plan.method} ({sp['pattern']})"), ("layers", f"{s}:{e}"),
               ("sparsity of the targeted linears", f"{sp['sparsity']:.4f} (requested {sp['ratio']:g})"),
               ("parameters (shapes kept)", f"{r.params_original:,}"), ("non-zero parameters", f"{r.params_nonzero:,}"),
               ("time", f"{r.seconds:.1f} s"), ("peak RSS", f"{r.peak_rss_gb:.2f} GB"), ("written", r.out)], title="loram prune")
        return 0
    method = r.plan.method + (" + --compensate (o/down refitted)" if r.plan.compensation else "")
    table([("method", method), ("layers", f"{s}:{e}"), ("MLP / KV-group ratio", f"{r.plan.mlp_ratio} / {r.plan.attn_ratio}"),
           *allocation_rows(r.plan),
           ("parameters original", f"{r.params_original:,}"), ("parameters pruned", f"{r.params_pruned:,}"),
           ("parameter reduction", f"{r.param_reduction:.2f}x"), ("time", f"{r.seconds:.1f} s"),
           ("peak RSS", f"{r.peak_rss_gb:.2f} GB"), ("written", r.out)], title="loram prune")
    return 0
