"""Bridge to lm-evaluation-harness (optional: pip install 'loram[eval]').

The model is evaluated in memory (an adapter is merged first), so pruned and recovered models
need no export:

    HFLM(pretrained=<model object>, tokenizer=<tokenizer>)  +  simple_evaluate(model=..., tasks=...,
         task_manager=TaskManager(include_path=DIR))

Local task YAMLs (``--lm-eval-include DIR``) make it work offline, e.g. a task with
``dataset_path: json`` and ``dataset_kwargs: {data_files: {test: FILE}}``.
Returns {task: {metric: (value, n)}} with lm-eval's "acc,none" keys shortened to "acc" and
the stderr entries dropped.
"""

from __future__ import annotations

from ..errors import LoramError
from ..progress import library_bars


def lm_eval_tasks(model, tok, tasks: list[str], include: str | None = None, limit: int | None = None,
                  num_fewshot: int | None = None, batch_size: int = 8) -> dict[str, dict[str, tuple[float, int]]]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LoramError("--lm-eval needs lm-evaluation-harness: pip install 'loram[eval]' (or pip install lm-eval)") from None
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)
    tm = TaskManager(include_path=include) if include else TaskManager()
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise LoramError(f"lm-eval does not know the task(s) {unknown}: check the names (lm-eval ls tasks) or pass "
                         "--lm-eval-include DIR with their YAMLs")
    with library_bars():  # lm-eval's own tqdm bars: none with --quiet, --json or stderr not a terminal
        res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                              log_samples=False, bootstrap_iters=0)
    if res is None:  # non-zero ranks in distributed runs
        return {}
    counts = res.get("n-samples", {})
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for task, metrics in res["results"].items():
        n = int(counts.get(task, {}).get("effective", 0))
        out[task] = {k.split(",")[0]: (float(v), n) for k, v in metrics.items()
                     if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return out
