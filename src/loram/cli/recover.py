"""loram recover ADAPTER --base BASE -o OUT [--fill zero|normal] [--calibrate DATA [--calibrate-scope global|layer]]"""

from __future__ import annotations

from dataclasses import asdict

from ..settings import add_flags, from_args
from .common import add_out, add_verify_base


def add(sub) -> None:
    p = sub.add_parser("recover", help="scatter a pruned-model adapter to the original shapes (standard PEFT adapter)")
    p.add_argument("adapter", help="adapter folder written by `loram train` on a pruned model")
    p.add_argument("--base", required=True, help="the original model the plan was made from (checked by fingerprint)")
    add_out(p, "recovered adapter folder")
    add_flags(p, "recover")  # loram.settings.RecoverSettings
    add_verify_base(p, record=False)
    p.set_defaults(func=run)


def run(a) -> int:
    from ..progress import Measure
    from ..recover import recover

    m = Measure()
    out = recover(a.adapter, a.base, a.out, **asdict(from_args("recover", a)), overwrite=a.overwrite, verify_base=a.verify_base)
    print(m.line(f"recovered adapter for {a.base} written to {out}") + "; loads with stock PeftModel.from_pretrained")
    if a.calibrate is not None:
        from ..adapter import read_meta
        from ..calibrate import summary

        print(summary(read_meta(out)["calibration"]))
    return 0
