"""The demo's general columns: what a model kept of the base's general ability, on data shipped in loram/data.

    general_text.txt   chapters 1-2 of Austen's Persuasion (1818, public domain)       -> perplexity
    anchor_text.txt    chapters 1-4 of Austen's Northanger Abbey (1817, public domain) -> `train --anchor` text
    capitals.txt       256 capitals of countries, territories and US states          -> 4-way multiple choice
                       (from the bsdgames `quiz` files, BSD-3-Clause)

Sources, licenses and how capitals.txt was derived: general_text.LICENSE.md and capitals.LICENSE.md
beside them. Neither text is used by pruning calibration (calibration.txt) or by the demo's
training task, so a change on them is a change of general ability, not of the task.

The quiz: "The capital of France is" -> " Paris" among 4 capitals, 3 of them drawn (seeded) from the
same region's other capitals, so every distractor is a plausible capital name of the right kind.
Scored by loram.eval.multiple_choice (acc_norm, as lm-evaluation-harness), zero-shot.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
GENERAL_TEXT = DATA / "general_text.txt"
ANCHOR_TEXT = DATA / "anchor_text.txt"  # never scored: what `loram train --anchor` keeps the adapter from changing
CAPITALS = DATA / "capitals.txt"
GENERAL_SOURCE = "chapters 1-2 of Jane Austen's Persuasion (1818, public domain)"
ANCHOR_SOURCE = "chapters 1-4 of Jane Austen's Northanger Abbey (1817, public domain)"
QUIZ_SOURCE = "capital-city quiz (bsdgames quiz data, BSD-3-Clause)"


def general_text(lines: int | None = None) -> str:
    """The shipped general text: all of it, or its first ``lines`` lines."""
    text = GENERAL_TEXT.read_text(encoding="utf-8").splitlines()
    return "\n".join(text[:lines] if lines else text) + "\n"


def capitals() -> list[tuple[str, str, str]]:
    """(region, place, capital) of every line of capitals.txt; region "US state" or a continent."""
    return [tuple(line.split("\t")) for line in CAPITALS.read_text(encoding="utf-8").splitlines() if line]


def _query(region: str, place: str) -> str:
    return f"The capital of the US state of {place} is" if region == "US state" else f"The capital of {place} is"


def capital_quiz(n: int | None = None, n_choices: int = 4, seed: int = 0) -> list[dict]:
    """Multiple-choice rows {"query", "choices", "gold"}: all places (or a seeded sample of ``n``), each
    with its capital and n_choices - 1 other capitals of the same region in a seeded order."""
    rows = capitals()
    rng = random.Random(seed)
    pool: dict[str, list[str]] = {}
    for region, _, cap in rows:
        pool.setdefault(region, []).append(cap)
    if n is not None:
        rows = rng.sample(rows, n)
    out = []
    for region, place, cap in rows:
        others = sorted(set(pool[region]) - {cap})
        choices = rng.sample(others, n_choices - 1)
        gold = rng.randrange(n_choices)
        choices.insert(gold, cap)
        out.append({"query": _query(region, place), "choices": choices, "gold": gold})
    return out


def standard_error(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy over n independent questions."""
    return math.sqrt(acc * (1 - acc) / n)
