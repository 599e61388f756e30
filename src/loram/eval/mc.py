"""Multiple choice by log-likelihood, scored like lm-evaluation-harness (0.4).

Row format (JSONL): {"query": str, "choices": [str, ...], "gold": int}. For each choice c

    context      = few-shot block + query
    continuation = " " + c                      (lm-eval's target_delimiter)
    ll(c)        = sum log p(continuation tokens | context)

    acc      = [argmax_c ll(c) == gold]
    acc_norm = [argmax_c ll(c) / len(c) == gold]     len in characters of the choice string,
                                                     as lm-eval's `completion_len`

Tokenization follows lm-eval: the continuation's tokens are those of tokenize(context +
continuation) after the tokens of tokenize(context), with trailing spaces of the context moved
into the continuation. A few-shot block is k solved examples "query choice[gold]" joined by
blank lines, drawn per row with a seeded RNG from a separate pool (a file, or the first k rows
of the evaluated file, which are then not evaluated).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import LoramError
from .scoring import IGNORE, score_sequences

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class MCResult:
    acc: float
    acc_norm: float
    n: int
    shots: int
    predictions: list  # per row: (argmax by ll, argmax by ll/len)


def check_rows(rows: list[dict], name: str) -> None:
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not {"query", "choices", "gold"} <= set(r):
            raise LoramError(f"{name} row {i} needs fields query, choices, gold (got {sorted(r) if isinstance(r, dict) else r!r})")
        if not isinstance(r["choices"], list) or len(r["choices"]) < 2:
            raise LoramError(f"{name} row {i}: choices must be a list of at least 2 strings")
        if not isinstance(r["gold"], int) or not 0 <= r["gold"] < len(r["choices"]):
            raise LoramError(f"{name} row {i}: gold must be an index into choices (0..{len(r['choices']) - 1})")


def fewshot_context(pool: list[dict], k: int, rng: random.Random) -> str:
    if k == 0:
        return ""
    if len(pool) < k:
        raise LoramError(f"--shots {k} needs at least {k} few-shot rows, the pool has {len(pool)}")
    shots = rng.sample(pool, k)
    return "".join(r["query"] + TARGET_DELIMITER + r["choices"][r["gold"]] + FEWSHOT_DELIMITER for r in shots)


def split_fewshot(rows: list[dict], shots: int, fewshot_rows: list[dict] | None) -> tuple[list[dict], list[dict]]:
    """(rows to evaluate, few-shot pool): the pool never contains an evaluated row."""
    if shots == 0:
        return rows, []
    if fewshot_rows is not None:
        return rows, fewshot_rows
    if len(rows) <= shots:
        raise LoramError(f"--shots {shots} with no --fewshot-file takes the first {shots} rows as examples, "
                         f"but the file has only {len(rows)}: pass --fewshot-file or fewer shots")
    return rows[shots:], rows[:shots]


def pair_sequence(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) scoring ``continuation`` after ``context`` (lm-eval's tokenization)."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = list(tok(context + continuation, add_special_tokens=False)["input_ids"])
    ctx = list(tok(context, add_special_tokens=False)["input_ids"]) if context else []
    if not ctx:  # empty context: condition on the end-of-text token, as lm-eval does
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        whole, ctx = [start] + whole, [start]
    cont = whole[len(ctx):]
    return ctx + cont, [IGNORE] * len(ctx) + cont


def choice_logliks(model, tok, rows: list[dict], contexts: list[str], batch_size: int = 8) -> list[list[float]]:
    pairs, owner = [], []
    for i, (r, c) in enumerate(zip(rows, contexts)):
        for choice in r["choices"]:
            pairs.append(pair_sequence(tok, c + r["query"], TARGET_DELIMITER + choice))
            owner.append(i)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    scores = score_sequences(model, pairs, batch_size, pad)
    out: list[list[float]] = [[] for _ in rows]
    for i, s in zip(owner, scores):
        out[i].append(s.loglik)
    return out


def decide(lls: list[float], choices: list[str]) -> tuple[int, int]:
    """(argmax of ll, argmax of ll / character length): ties go to the first choice like numpy."""
    acc = max(range(len(lls)), key=lambda j: (lls[j], -j))
    norm = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
    return acc, max(range(len(norm)), key=lambda j: (norm[j], -j))


def multiple_choice(model, tok, rows: list[dict], shots: int = 0, fewshot_rows: list[dict] | None = None,
                    seed: int = 1234, batch_size: int = 8, name: str = "mc") -> MCResult:
    check_rows(rows, name)
    if fewshot_rows is not None:
        check_rows(fewshot_rows, f"{name} few-shot")
    rows, pool = split_fewshot(rows, shots, fewshot_rows)
    rng = random.Random(seed)
    contexts = [fewshot_context(pool, shots, rng) for _ in rows]
    lls = choice_logliks(model, tok, rows, contexts, batch_size)
    preds = [decide(ll, r["choices"]) for ll, r in zip(lls, rows)]
    acc = sum(p[0] == r["gold"] for p, r in zip(preds, rows)) / len(rows)
    acc_norm = sum(p[1] == r["gold"] for p, r in zip(preds, rows)) / len(rows)
    return MCResult(acc, acc_norm, len(rows), shots, preds)
