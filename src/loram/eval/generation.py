"""Generation tasks: exact match of a free-form answer, and GSM8K's final number.

    exact match  = [normalise(answer_of(completion)) == normalise(target)]
    GSM8K        = [last number in the completion == the number after "####" in the answer]

Numbers are compared after removing thousands separators, a trailing period and a leading
"$"; "18.0" equals "18". Completions are greedy, from the chat template when the tokenizer has one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ..errors import LoramError
from .scoring import generate_texts

NUMBER = re.compile(r"-?[\d,]*\.?\d+")
GSM8K_PROMPT = "{question}\nSolve the problem step by step and end with the final answer as a number."


@dataclass(frozen=True)
class GenResult:
    accuracy: float
    n: int
    outputs: list  # (completion, extracted answer, target, correct)


def first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(model, tok, prompts: list[str], targets: list[str], max_new_tokens: int = 32, batch_size: int = 16,
                extract: Callable[[str], str] = first_line, chat: bool = True) -> GenResult:
    """Greedy completions of ``prompts`` scored by exact match of extract(completion) with the targets."""
    outs = generate_texts(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat)
    rows = [(o, extract(o), t, extract(o) == t.strip()) for o, t in zip(outs, targets)]
    return GenResult(sum(r[3] for r in rows) / max(len(rows), 1), len(rows), rows)


def normalise_number(s: str | None) -> str | None:
    if s is None:
        return None
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        x = float(s)
    except ValueError:
        return s
    return str(int(x)) if x == int(x) else str(x)


def last_number(text: str) -> str | None:
    nums = NUMBER.findall(text)
    return normalise_number(nums[-1]) if nums else None


def gsm8k_target(answer: str) -> str:
    if "####" not in answer:
        raise LoramError("a GSM8K row's answer has no '#### <number>' line: pass the original GSM8K jsonl (question, answer)")
    return normalise_number(answer.split("####")[-1])  # type: ignore[return-value]


def gsm8k(model, tok, rows: list[dict], max_new_tokens: int = 256, batch_size: int = 8) -> GenResult:
    for i, r in enumerate(rows):
        if not {"question", "answer"} <= set(r):
            raise LoramError(f"GSM8K row {i} needs fields question and answer (the original GSM8K jsonl format)")
    prompts = [GSM8K_PROMPT.format(question=r["question"]) for r in rows]
    targets = [gsm8k_target(r["answer"]) for r in rows]
    outs = generate_texts(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=True)
    res = [(o, last_number(o), t, last_number(o) == t) for o, t in zip(outs, targets)]
    return GenResult(sum(r[3] for r in res) / max(len(res), 1), len(res), res)
