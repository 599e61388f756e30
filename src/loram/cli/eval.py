"""loram eval MODEL [--adapter A] --ppl NAME=FILE --mc NAME=FILE [--gsm8k F] [--humaneval F] [--lm-eval TASKS]"""

from __future__ import annotations

from pathlib import Path

from ..data import FILE_SUFFIXES, missing_local_file, split_slice
from ..errors import LoramError
from ..settings import add_flags, from_args
from .common import add_device


def add(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, multiple choice, GSM8K, HumanEval or lm-eval tasks on a model (+ adapter)")
    p.add_argument("model", help="original model (folder, .gguf, hub id, smollm2), pruned folder or merged folder")
    p.add_argument("--adapter", default=None, help="adapter to evaluate with (merged into the weights in memory)")
    add_flags(p, "eval")  # loram.settings.EvalSettings
    add_device(p)
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run)


def named(spec: str, flag: str) -> tuple[str, Path]:
    """NAME=SOURCE (or SOURCE, named by its stem). SOURCE is what `loram train --data` reads: a file, which may
    carry a slice (FILE[a:b], as a recipe's eval section prints it), a dataset folder or a hub id (streamed).
    A missing local file is refused here, before the model loads; a hub id is left to the data layer."""
    name, eq, f = spec.partition("=")
    source = f if eq else spec
    file, _ = split_slice(source)
    if not eq:
        name = Path(file).stem
    if missing_local_file(file, (*FILE_SUFFIXES, ".txt")):  # .txt: raw-text perplexity
        raise LoramError(f"{flag} {spec}: file {file} does not exist")
    return name, Path(source)


def run(a) -> int:
    import json
    from dataclasses import asdict

    from ..device import compute_dtype, resolve_device
    from ..eval.runner import EvalRequest, evaluate
    from ..progress import Measure

    m = Measure()
    s = from_args("eval", a)
    req = EvalRequest(**s.request_fields(ppl=[named(x, "--ppl") for x in s.ppl], mc=[named(x, "--mc") for x in s.mc]))
    device = resolve_device(a.device)  # before any model is read: a missing GPU is one line
    results = evaluate(a.model, a.adapter, req, dtype=compute_dtype(s.precision, device, s.bf16), max_memory=s.max_memory,
                       device=device)
    if a.json:
        print(json.dumps({"model": a.model, "adapter": a.adapter, "results": [asdict(r) for r in results],
                          "seconds": round(m.seconds(), 1), "peak_rss_gb": round(m.peak.gb(), 2)}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"loram eval {a.model}" + (f" + {a.adapter}" if a.adapter else ""))
    for c in ("task", "metric", "value", "n"):
        t.add_column(c, justify="left" if c in ("task", "metric") else "right")
    for r in results:
        t.add_row(r.task, r.metric, f"{r.value:.4f}", str(r.n))
    Console().print(t)
    print(m.line(f"{len({r.task for r in results})} task(s) evaluated"))
    return 0
