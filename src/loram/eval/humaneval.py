"""HumanEval pass@k: complete each function, run its unit tests in the sandbox (sandbox.py).

Row format (the original HumanEval jsonl): {"task_id", "prompt", "test", "entry_point", ...}.
The model continues ``prompt`` as plain text (no chat template, as in the HumanEval paper); the
completion is cut at the first line that starts a new top-level block, then

    program = prompt + completion + "\n" + test + "\ncheck(entry_point)\n"

passes if it exits 0 within the timeout. With n samples per task of which c pass, the unbiased
estimator (Chen et al. 2021) is

    pass@k = 1 - C(n - c, k) / C(n, k)        averaged over tasks, for every k <= n in (1, 10, 100)

n = 1 is greedy decoding; n > 1 samples at --temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from ..errors import LoramError
from ..progress import track
from .sandbox import require_sandbox, run_program
from .scoring import generate_texts

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


@dataclass(frozen=True)
class HumanEvalResult:
    pass_at: dict  # k -> value
    n: int
    samples: int
    sandbox: dict
    per_task: list  # (task_id, passed count)


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def program_of(row: dict, completion: str) -> str:
    return row["prompt"] + completion + "\n\n" + row["test"] + f"\n\ncheck({row['entry_point']})\n"


def humaneval(model, tok, rows: list[dict], samples: int = 1, temperature: float = 0.8, timeout: float = 10.0,
              max_new_tokens: int = 384, batch_size: int = 8, allow_unsandboxed: bool = False) -> HumanEvalResult:
    info = require_sandbox(allow_unsandboxed)  # before generating: refuse early where code cannot be contained
    for i, r in enumerate(rows):
        if not {"prompt", "test", "entry_point"} <= set(r):
            raise LoramError(f"HumanEval row {i} needs fields prompt, test, entry_point (the original HumanEval jsonl)")
    if samples < 1:
        raise LoramError("--samples must be at least 1")
    temp = 0.0 if samples == 1 else temperature
    prompts = [r["prompt"] for r in rows for _ in range(samples)]
    outs = generate_texts(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=False,
                          stop=STOP, temperature=temp)
    per_task = []
    for i, r in enumerate(track(rows, "running programs", unit="task")):
        c = sum(run_program(program_of(r, o), timeout=timeout, allow_unsandboxed=allow_unsandboxed).passed
                for o in outs[i * samples:(i + 1) * samples])
        per_task.append((r.get("task_id", str(i)), c))
    ks = [k for k in (1, 10, 100) if k <= samples]
    pass_at = {k: sum(pass_at_k(samples, c, k) for _, c in per_task) / len(rows) for k in ks}
    return HumanEvalResult(pass_at, len(rows), samples, {"isolated": info.isolated, "limits": list(info.limits)},
                           per_task)
