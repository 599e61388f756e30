"""One evaluation request (what `loram eval` was asked) -> a flat list of EvalResult rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import read_rows, read_utf8
from ..errors import LoramError
from ..progress import stage
from ..settings import check_config
from . import EvalResult
from .generation import gsm8k
from .mc import multiple_choice
from .ppl import perplexity_rows, perplexity_text
from .streamed import DEFAULT_HIDDEN_BYTES


@dataclass
class EvalRequest:
    ppl: list[tuple[str, Path]] = field(default_factory=list)
    mc: list[tuple[str, Path]] = field(default_factory=list)
    shots: int = 0
    fewshot_file: str | None = None
    gsm8k: str | None = None
    humaneval: str | None = None
    samples: int = 1
    temperature: float = 0.8
    timeout: float = 10.0
    limit: int | None = None
    max_new_tokens: int | None = None
    seq_len: int = 1024
    stride: int | None = None
    lm_eval: list[str] = field(default_factory=list)
    lm_eval_include: str | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    allow_unsandboxed_code: bool = False
    allow_code_execution: bool = False  # lm-eval tasks marked unsafe_code (harness.check_tasks)

    def __post_init__(self):

        check_config(self, "eval")  # the ranges of `loram eval`'s flags, before any model is loaded

    def empty(self) -> bool:
        return not (self.ppl or self.mc or self.gsm8k or self.humaneval or self.lm_eval)

    def check_sandbox(self) -> None:
        """Generated code runs only where allowed, refused before the model loads: HumanEval where it cannot be
        sandboxed; lm-eval tasks marked unsafe without --allow-code-execution (and unknown lm-eval names)."""
        if self.humaneval:
            from .sandbox import require_sandbox

            require_sandbox(self.allow_unsandboxed_code)
        if self.lm_eval:
            from .harness import check_tasks

            check_tasks(self.lm_eval, self.lm_eval_include, self.allow_code_execution)


def _rows(path, limit: int | None) -> list[dict]:
    return read_rows(str(path), limit or None)  # a streamed source (folder, hub id) stops after --limit rows


def check_files(req: EvalRequest) -> None:
    """Read every local input file once before the model loads: a non-UTF-8, malformed or corrupt
    file is a one-line error in seconds, not after minutes of loading."""

    files = [p for _, p in req.ppl + req.mc] + [Path(f) for f in (req.fewshot_file, req.gsm8k, req.humaneval) if f]
    for p in files:
        if p.suffix == ".txt":
            read_utf8(p, "eval file")
        elif p.exists():
            read_rows(str(p))


def check_streamable(req: EvalRequest) -> None:
    """Streamed evaluation scores (--ppl, --mc); generation needs every layer for every new token."""
    need = [f for f, on in (("--gsm8k", req.gsm8k), ("--humaneval", req.humaneval), ("--lm-eval", req.lm_eval)) if on]
    if need:
        raise LoramError(f"{', '.join(need)} generate text, which needs the whole model in memory, and this evaluation "
                         "streams the model layer by layer: run only --ppl and --mc streamed, or evaluate the other tasks "
                         "in memory (a machine with more memory, or a smaller model)")


def evaluate(model: str, adapter: str | None, req: EvalRequest, dtype=torch.float32, stream: bool | None = None,
             device="cpu", max_hidden_bytes: int | None = None, max_memory: float | None = None) -> list[EvalResult]:
    """Every task of ``req`` on ``model`` (+ ``adapter``), checks first, then the model.

    stream=True: the model is read one decoder layer at a time (eval.streamed; --ppl and --mc only,
    ``device`` holds one layer and the hidden states of at most ``max_hidden_bytes`` at a time);
    False: loaded in memory; None: streamed when the predicted in-memory peak does not fit the memory
    budget (``max_memory`` GB, else what the cgroup / MemAvailable leave: loram.budget) and the
    model is a local safetensors folder and every task scores (see ``_decide``)."""
    if req.empty():
        raise LoramError("nothing to evaluate: pass --ppl, --mc, --gsm8k, --humaneval or --lm-eval")
    check_files(req)
    req.check_sandbox()
    if stream is None:
        stream, budget_hidden = _decide(model, req, dtype, max_memory)
        max_hidden_bytes = max_hidden_bytes or budget_hidden
    if stream:
        from .streamed import open_streamed

        check_streamable(req)
        m, tok = open_streamed(model, adapter, dtype=dtype, device=device, max_hidden_bytes=max_hidden_bytes or DEFAULT_HIDDEN_BYTES)
    else:
        from . import load_for_eval

        m, tok = load_for_eval(model, adapter, dtype=dtype)
        m = m.to(device)
    return run_tasks(m, tok, req)


MIN_HIDDEN_BYTES = 64 << 20  # below this a wave holds too few sequences to be worth a pass over the weights


def _decide(model: str, req: EvalRequest, dtype, max_memory: float | None) -> tuple[bool, int | None]:
    """(stream?, hidden-state bytes per wave) from the memory budget: the in-memory prediction
    (planner.stages, "eval") against loram.budget. GGUF files, hub ids and generation tasks cannot
    stream, so they load in memory whatever the budget says."""
    from ..budget import SAFETY_MARGIN, memory_budget
    from ..loading import open_checkpoint
    from ..planner.stages import StageInputs, must_stream
    from .streamed import HEAD_BYTES, resident_bytes

    budget = memory_budget(max_memory)
    if req.gsm8k or req.humaneval or req.lm_eval:
        return False, None
    try:
        config, plan, _ = open_checkpoint(model, "streamed evaluation")
    except LoramError:
        return False, None  # not a local safetensors folder: the in-memory loader gives its own errors
    if not must_stream("eval", config, plan, StageInputs(eval_batch=req.batch_size, eval_seq_len=req.seq_len), budget):
        return False, None
    outer, layer = resident_bytes(config, plan, dtype)
    room = int(budget.bytes * (1 - SAFETY_MARGIN)) - outer - 2 * layer - HEAD_BYTES  # a layer + its transient copy
    return True, max(MIN_HIDDEN_BYTES, room)


def scoring_plan(model: str, seq_len: int, batch_size: int, max_memory: float | None = None) -> tuple[bool, int | None]:
    """(stream?, hidden-state bytes per wave) for scoring rows of at most ``seq_len`` tokens on ``model`` in fp32:
    ``_decide`` for a perplexity-only request (`loram recover --calibrate` scores this way)."""
    req = EvalRequest(ppl=[("rows", Path("rows.jsonl"))], seq_len=seq_len, batch_size=batch_size)
    return _decide(model, req, torch.float32, max_memory)


def run_tasks(model, tok, req: EvalRequest) -> list[EvalResult]:

    out: list[EvalResult] = []
    for name, path in req.ppl:
        with stage(f"eval {name} (ppl)"):  # labels the scoring bar
            if path.suffix == ".txt":
                from ..data import read_utf8

                text = read_utf8(path, "eval file")
                p = perplexity_text(model, tok, text, seq_len=req.seq_len, stride=req.stride, batch_size=req.batch_size)
            else:
                p = perplexity_rows(model, tok, _rows(path, req.limit), seq_len=req.seq_len, batch_size=req.batch_size)
        out.append(EvalResult(name, "ppl", p.ppl, p.sequences, {"nll": p.nll, "tokens": p.tokens, "truncated": p.truncated}))
    pool = _rows(req.fewshot_file, None) if req.fewshot_file else None
    for name, path in req.mc:
        rows = _rows(path, req.limit + req.shots if req.limit and pool is None else req.limit)
        with stage(f"eval {name} (mc)"):
            r = multiple_choice(model, tok, rows, shots=req.shots, fewshot_rows=pool, batch_size=req.batch_size, name=name)
        out += [EvalResult(name, "acc", r.acc, r.n, {"shots": r.shots}),
                EvalResult(name, "acc_norm", r.acc_norm, r.n, {"shots": r.shots})]
    if req.gsm8k:
        with stage("eval gsm8k"):
            g = gsm8k(model, tok, _rows(req.gsm8k, req.limit), max_new_tokens=req.max_new_tokens or 256, batch_size=req.batch_size)
        out.append(EvalResult("gsm8k", "exact_match", g.accuracy, g.n))
    if req.humaneval:
        from .humaneval import humaneval

        with stage("eval humaneval"):
            h = humaneval(model, tok, _rows(req.humaneval, req.limit), samples=req.samples, temperature=req.temperature,
                          timeout=req.timeout, max_new_tokens=req.max_new_tokens or 384, batch_size=req.batch_size,
                          allow_unsandboxed=req.allow_unsandboxed_code)
        out += [EvalResult("humaneval", f"pass@{k}", v, h.n, {"samples": req.samples, "sandbox": h.sandbox})
                for k, v in h.pass_at.items()]
    if req.lm_eval:
        from .harness import lm_eval_tasks

        for task, metrics in lm_eval_tasks(model, tok, req.lm_eval, include=req.lm_eval_include, limit=req.limit,
                                           num_fewshot=req.num_fewshot, batch_size=req.batch_size,
                                           allow_code_execution=req.allow_code_execution).items():
            for metric, (value, n) in metrics.items():
                out.append(EvalResult(task, metric, value, n, {"source": "lm-eval"}))
    return out
