"""loram merge BASE ADAPTER -o OUT"""

from __future__ import annotations

from .common import add_out, add_verify_base


def add(sub) -> None:
    p = sub.add_parser("merge", help="merge a recovered adapter into the original model (standard HF folder)")
    p.add_argument("base", help="the original model (or a pruned folder for a pruned adapter)")
    p.add_argument("adapter", help="recovered adapter folder")
    add_out(p, "merged model folder")
    p.add_argument("--keep-sparse", action="store_true",
                   help="sparse plans: BASE is the sparse pruned folder and the update is masked to its non-zeros, "
                        "so the merged model keeps its zeros (default: full update, as the paper)")
    add_verify_base(p, record=False)
    p.set_defaults(func=run)


def run(a) -> int:
    from ..merge import merge
    from ..progress import Measure

    m = Measure()
    out = merge(a.base, a.adapter, a.out, overwrite=a.overwrite, keep_sparse=a.keep_sparse, verify_base=a.verify_base)
    print(m.line(f"merged model written to {out}"))
    return 0
