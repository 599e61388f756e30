"""Argument helpers shared by the verbs."""

from __future__ import annotations

# the validators every verb uses as argparse type= (one range per knob, see loram.validate)
from ..validate import ATTN_RATIO, COUNT, COUNT_OR_OFF, DROPOUT, NON_NEGATIVE, POSITIVE, RATIO, SEED, SEQ_LEN, Number  # noqa: F401


def add_out(p, what: str = "output folder") -> None:
    p.add_argument("-o", "--out", required=True, help=f"{what} (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def add_verify_base(p, record: bool) -> None:
    """--verify-base sampled|full: record (prune, import-plan) or check (recover, merge) the base's full digest."""
    what = ("also record a sha256 of every byte of the base's weight files in the plan, so `loram recover/merge "
            "--verify-base full` can check it" if record else
            "also compare every byte of the base's weight files with the digest the plan recorded (needs a plan made "
            "with --verify-base full)")
    p.add_argument("--verify-base", default="sampled", choices=["sampled", "full"],
                   help=f"sampled (default): fingerprint from 8 sampled rows per tensor; full: {what}. "
                        "File hashes are cached under $XDG_CACHE_HOME/loram by path, size and mtime")


def name_numbers(parser) -> None:
    """Give every numeric validator (argparse ``type=``) its flag's name, for its one-line message.

    Walks the verbs' subparsers; the shared validators (COUNT, SEED, ...) are copied, not changed."""
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values() if hasattr(action, "add_parser") else ():
            name_numbers(sub)
        if isinstance(action.type, Number) and action.option_strings:
            action.type = action.type.named(max(action.option_strings, key=len))


def table(rows: list[tuple[str, str]], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)
