"""loram merge BASE ADAPTER -o OUT"""

from __future__ import annotations

from dataclasses import asdict

from ..settings import add_flags, from_args
from .common import add_out, add_verify_base


def add(sub) -> None:
    p = sub.add_parser("merge", help="merge a recovered adapter into the original model (standard HF folder)")
    p.add_argument("base", help="the original model (or a pruned folder for a pruned adapter)")
    p.add_argument("adapter", help="recovered adapter folder")
    add_out(p, "merged model folder")
    add_flags(p, "merge")  # loram.settings.MergeSettings
    add_verify_base(p, record=False)
    p.set_defaults(func=run)


def run(a) -> int:
    from ..merge import merge
    from ..progress import Measure

    m = Measure()
    out = merge(a.base, a.adapter, a.out, overwrite=a.overwrite, **asdict(from_args("merge", a)), verify_base=a.verify_base)
    print(m.line(f"merged model written to {out}"))
    return 0
