"""Typed ranges for numeric arguments: one validator per knob, shared by the CLI and the library.

A :class:`Number` is the argparse ``type=`` of every numeric flag (``loram.cli``), checks the
same knob in a recipe (``loram.recipe``, through the stage's knobs in ``loram.settings``) and in the library
functions that check their arguments. It parses text or checks a value and raises LoramError
with one line naming the flag, the value and the valid range, e.g.

    --steps 0 is out of range: use an integer >= 1

so a meaningless value (0 steps, a NaN learning rate, -2 rows) fails before anything is loaded.
NaN and infinity are never valid: no knob means anything by them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .errors import LoramError


def _fmt(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"  # 10**9 stays 1000000000, 2e-05 stays short


@dataclass(frozen=True)
class Number:
    """An int or float knob with an optional [min, max] range (either end may be open).

    ``zero`` says what 0 means for knobs where 0 is a setting (``"0: off"``), for the message.
    ``flag`` is the name in messages; ``loram.cli.build_parser`` sets it to the option string.
    """

    kind: type = int
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # True: the value must be > min (not >=)
    max_open: bool = False  # True: the value must be < max (not <=)
    zero: str = ""
    flag: str = "value"

    def named(self, flag: str) -> Number:
        return replace(self, flag=flag)

    def describe(self) -> str:
        """The valid range in words: 'an integer >= 1', 'a number >= 0 and < 1'."""
        parts = []
        if self.min is not None:
            parts.append(f"{'>' if self.min_open else '>='} {_fmt(self.min)}")
        if self.max is not None:
            parts.append(f"{'<' if self.max_open else '<='} {_fmt(self.max)}")
        what = "an integer" if self.kind is int else "a number"
        return " ".join([what, " and ".join(parts)]).strip() + (f" ({self.zero})" if self.zero else "")

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int) or not math.isfinite(value):
            return False
        if self.min is not None and (value <= self.min if self.min_open else value < self.min):
            return False
        return self.max is None or (value < self.max if self.max_open else value <= self.max)

    def _refuse(self, shown: str, problem: str):
        raise LoramError(f"{self.flag} {shown} {problem}: use {self.describe()}")

    def __call__(self, text: str):
        """Parse a flag's text (argparse ``type=``), then check it."""
        s = str(text).strip()
        try:
            value = self.kind(s)
        except ValueError:
            self._refuse(repr(text), "is not an integer" if self.kind is int else "is not a number")
        return self.check(value)

    def check(self, value):
        """Check a value that is already a number (a Python argument, a YAML scalar); returns it."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._refuse(repr(value), "is not an integer" if self.kind is int else "is not a number")
        if self.kind is int and not isinstance(value, int):
            self._refuse(_fmt(value), "is not an integer")
        if not math.isfinite(value):
            self._refuse(_fmt(value), "is not a finite number")
        if not self.accepts(value):
            self._refuse(_fmt(value), "is out of range")
        return float(value) if self.kind is float else value

    def value(self, v):
        """A recipe value: text goes through the flag's parser (as on the command line), numbers are checked."""
        return self(v) if isinstance(v, str) else self.check(v)


@dataclass(frozen=True)
class Ratio(Number):
    """A pruning ratio: the fraction removed, 0 < R < 1 (0 <= R < 1 where 0 keeps the part whole)."""

    kind: type = float
    min: float | None = 0.0
    max: float | None = 1.0
    min_open: bool = True
    max_open: bool = True

    @classmethod
    def allowing_zero(cls, allow_zero: bool) -> Ratio:
        return cls(min_open=not allow_zero)

    def _refuse(self, shown: str, problem: str):
        rng = "0 < R < 1" if self.min_open else "0 <= R < 1 (0 keeps it whole)"
        if problem == "is out of range" and float(shown) >= 1:
            problem = "would remove every " + ("KV group" if "attn" in self.flag else "MLP channel")
        raise LoramError(f"{self.flag} {shown} {problem}: use {rng}, e.g. 0.5 to remove half")

    def check(self, value):
        if isinstance(value, float) and math.isfinite(value) or isinstance(value, int) and not isinstance(value, bool):
            if not self.accepts(value):  # keep the historical "--ratio 0.0" wording for ints too
                self._refuse(repr(float(value)), "is out of range")
            return float(value)
        return super().check(value)


def check_ratio(name: str, r: float, allow_zero: bool) -> None:
    """Library check of a pruning ratio (same rule and message as the --ratio / --attn-ratio flags)."""
    Ratio.allowing_zero(allow_zero).named(name).check(r)


# ---- the ranges used by several flags ----------------------------------------------------------
COUNT = Number(int, min=1)  # steps, batch sizes, rows: at least one
COUNT_OR_OFF = Number(int, min=0, zero="0: off")
SEED = Number(int, min=0, max=2**32 - 1)  # numpy's seed range (transformers seeds numpy too)
SEQ_LEN = Number(int, min=2)  # a next-token loss needs two tokens
POSITIVE = Number(float, min=0.0, min_open=True)
NON_NEGATIVE = Number(float, min=0.0)
DROPOUT = Number(float, min=0.0, max=1.0, max_open=True)
RATIO = Ratio.allowing_zero(False)
ATTN_RATIO = Ratio.allowing_zero(True)
