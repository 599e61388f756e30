"""loram import-plan MODEL --base ORIGINAL -o OUT [--kept-index KEPT.json]"""

from __future__ import annotations

from .common import add_out, add_verify_base, table


def add(sub) -> None:
    p = sub.add_parser("import-plan", help="make a plan + pruned model folder from a model pruned by another tool")
    p.add_argument("model", help="the pruned model: a safetensors folder (sparse: same shapes with exact zeros; "
                                 "structured: smaller tensors described by --kept-index)")
    p.add_argument("--base", required=True, help="the original model it was pruned from (folder, .gguf, hub id or 'smollm2')")
    add_out(p, "pruned model folder")
    p.add_argument("--kept-index", default=None,
                   help='structured: JSON {"LAYER": {"mlp_keep": [...], "kv_keep": [...]}} of kept MLP channels and KV '
                        "groups per pruned layer (without it MODEL is read as a sparse model)")
    p.add_argument("--allow-retrained", action="store_true",
                   help="structured: check shapes only (the pruned model was trained after pruning, so its kept rows "
                        "no longer equal the original's)")
    add_verify_base(p, record=True)
    p.set_defaults(func=run)


def run(a) -> int:
    from ..errors import LoramError
    from ..import_plan import import_sparse, import_structured
    from ..progress import Measure

    m = Measure()
    if a.kept_index is None:
        if a.allow_retrained:
            raise LoramError("--allow-retrained applies to structured imports (--kept-index): drop it")
        plan = import_sparse(a.model, a.base, a.out, overwrite=a.overwrite, verify_base=a.verify_base)
        sp = plan.sparse
        rows = [("kind", f"sparse ({sp['pattern']})"), ("sparsity of the targeted linears", f"{sp['sparsity']:.4f}")]
    else:
        plan = import_structured(a.model, a.base, a.kept_index, a.out, allow_retrained=a.allow_retrained,
                                 overwrite=a.overwrite, verify_base=a.verify_base)
        rows = [("kind", "structured"), ("MLP / KV-group ratio", f"{plan.mlp_ratio} / {plan.attn_ratio}"),
                ("parameters original", f"{plan.extra['params_original']:,}"),
                ("parameters pruned", f"{plan.extra['params_pruned']:,}"), ("validated", plan.extra["validated"])]
    s, e = plan.layers
    table([*rows, ("layers", f"{s}:{e}"), ("base", plan.base["name"]), *m.rows(), ("written", a.out)], title="loram import-plan")
    return 0
