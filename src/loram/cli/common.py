"""Argument helpers shared by the verbs."""

from __future__ import annotations

from ..errors import LoramError


def add_out(p, what: str = "output folder") -> None:
    p.add_argument("-o", "--out", required=True, help=f"{what} (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LoramError(f"ratio {text!r} is not a number: use e.g. 0.5") from None


def table(rows: list[tuple[str, str]], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)
