"""Bridge to lm-evaluation-harness (optional: pip install 'loram[eval]').

The model is evaluated in memory (an adapter is merged first), so pruned and recovered models
need no export:

    HFLM(pretrained=<model object>, tokenizer=<tokenizer>)  +  simple_evaluate(model=..., tasks=...,
         task_manager=TaskManager(include_path=DIR))

Local task YAMLs (``--lm-eval-include DIR``) make it work offline, e.g. a task with
``dataset_path: json`` and ``dataset_kwargs: {data_files: {test: FILE}}``.
Returns {task: {metric: (value, n)}} with lm-eval's "acc,none" keys shortened to "acc" and
the stderr entries dropped.

Tasks lm-eval marks ``unsafe_code`` (humaneval, mbpp, ...) execute the model's generated programs on this
machine through HF evaluate's code_eval, outside loram's sandbox. They run only with
``--allow-code-execution`` (lm-eval's ``confirm_run_unsafe_code=True``, and HF_ALLOW_CODE_EVAL=1 for
code_eval); ``check_tasks`` refuses them, and unknown names, from the task configs before the model loads.
"""

from __future__ import annotations

import os
from functools import lru_cache

from ..errors import LoramError
from ..progress import library_bars

ALLOW_FLAG = "--allow-code-execution"


@lru_cache(maxsize=4)
def task_manager(include: str | None = None):
    """lm-eval's task registry (indexing every task YAML takes seconds: built once per include folder)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LoramError("--lm-eval needs lm-evaluation-harness: pip install 'loram[eval]' (or pip install lm-eval)") from None
    return TaskManager(include_path=include) if include else TaskManager()


def _unsafe(index: dict, name, seen: set) -> bool:
    """Whether task, group or tag ``name`` (or an inline task dict of a group) runs generated code, by its config."""
    if isinstance(name, dict):  # a group's inline task: its own flag, or the task it names
        return bool(name.get("unsafe_code")) or _unsafe(index, name.get("task"), seen)
    if not isinstance(name, str) or name in seen or name not in index:
        return False
    seen.add(name)
    entry = index[name]
    cfg = entry.cfg or {}
    # members: a group's task list, a tag's tasks (a task's or group's own ``tags`` are its labels, not members)
    kind = entry.kind.name
    members = cfg.get("task") if kind == "GROUP" else sorted(entry.tags) if kind == "TAG" else []
    members = members if isinstance(members, list) else [members]
    return bool(cfg.get("unsafe_code")) or any(_unsafe(index, m, seen) for m in members)


def unsafe_tasks(tasks: list[str], include: str | None = None) -> list[str]:
    """The requested tasks whose config (or a member's) says ``unsafe_code: true``."""
    index = task_manager(include).task_index
    return [t for t in tasks if _unsafe(index, t, set())]


def check_tasks(tasks: list[str], include: str | None = None, allow_code_execution: bool = False) -> None:
    """Unknown task names, and code-executing tasks without ``--allow-code-execution``: one line, before any load."""
    tm = task_manager(include)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise LoramError(f"lm-eval does not know the task(s) {unknown}: check the names (lm-eval ls tasks) or pass "
                         "--lm-eval-include DIR with their YAMLs")
    unsafe = unsafe_tasks(tasks, include)
    if unsafe and not allow_code_execution:
        raise LoramError(f"lm-eval task(s) {unsafe} execute the model's generated code on this machine, outside loram's "
                         f"sandbox (lm-eval marks them unsafe): pass {ALLOW_FLAG} to run them anyway, or use "
                         "`--humaneval FILE` (sandboxed)")


def lm_eval_tasks(model, tok, tasks: list[str], include: str | None = None, limit: int | None = None,
                  num_fewshot: int | None = None, batch_size: int = 8,
                  allow_code_execution: bool = False) -> dict[str, dict[str, tuple[float, int]]]:
    check_tasks(tasks, include, allow_code_execution)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if allow_code_execution and unsafe_tasks(tasks, include):
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")  # HF evaluate's code_eval asks for this consent too
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)
    try:
        with library_bars():  # lm-eval's own tqdm bars: none with --quiet, --json or stderr not a terminal
            res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager(include),
                                  log_samples=False, bootstrap_iters=0, confirm_run_unsafe_code=allow_code_execution)
    except ValueError as e:  # a Python-class task that is unsafe cannot be told from its config before it is built
        if "marked as unsafe" not in str(e):
            raise
        raise LoramError(f"{str(e).split('. ')[0]}: pass {ALLOW_FLAG} to run it (it executes generated code)") from None
    if res is None:  # non-zero ranks in distributed runs
        return {}
    counts = res.get("n-samples", {})
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for task, metrics in res["results"].items():
        n = int(counts.get(task, {}).get("effective", 0))
        out[task] = {k.split(",")[0]: (float(v), n) for k, v in metrics.items()
                     if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return out
