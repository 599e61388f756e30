"""loram eval MODEL [--adapter A] --ppl NAME=FILE --mc NAME=FILE [--gsm8k F] [--humaneval F] [--lm-eval TASKS]"""

from __future__ import annotations

from pathlib import Path

from ..errors import LoramError
from .common import COUNT, POSITIVE, SEQ_LEN, Number


def add(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, multiple choice, GSM8K, HumanEval or lm-eval tasks on a model (+ adapter)")
    p.add_argument("model", help="original model (folder, .gguf, hub id, smollm2), pruned folder or merged folder")
    p.add_argument("--adapter", default=None, help="adapter to evaluate with (merged into the weights in memory)")
    p.add_argument("--ppl", action="append", default=[], metavar="NAME=FILE",
                   help="perplexity: .json/.jsonl instruction rows (response tokens) or .txt raw text; repeatable")
    p.add_argument("--seq-len", type=SEQ_LEN, default=1024, help="ppl: window length for .txt / cut-off for rows")
    p.add_argument("--stride", type=COUNT, default=None, help="ppl on .txt: window start every STRIDE tokens (default --seq-len)")
    p.add_argument("--mc", action="append", default=[], metavar="NAME=FILE",
                   help='multiple choice: .jsonl rows {"query","choices","gold"}; repeatable')
    p.add_argument("--shots", type=Number(int, min=0), default=0, help="mc: few-shot examples per row")
    p.add_argument("--fewshot-file", default=None, help="mc: pool of few-shot rows (default: the first --shots rows of the file)")
    p.add_argument("--gsm8k", default=None, metavar="FILE", help="GSM8K jsonl (question, answer): exact match of the final number")
    p.add_argument("--humaneval", default=None, metavar="FILE", help="HumanEval jsonl: pass@k, run in a sandboxed subprocess")
    p.add_argument("--samples", type=COUNT, default=1, help="humaneval: completions per task (1 = greedy)")
    p.add_argument("--temperature", type=POSITIVE, default=0.8, help="humaneval: sampling temperature when --samples > 1")
    p.add_argument("--timeout", type=POSITIVE, default=10.0, help="humaneval: seconds per program")
    p.add_argument("--allow-unsandboxed-code", action="store_true",
                   help="humaneval: run generated code even where the namespace sandbox is unavailable (limits only)")
    p.add_argument("--limit", type=COUNT, default=None, help="evaluate only the first N rows of each task")
    p.add_argument("--max-new-tokens", type=COUNT, default=None, help="generation tasks (default gsm8k 256, humaneval 384)")
    p.add_argument("--lm-eval", default=None, metavar="TASKS", help="comma list of lm-evaluation-harness tasks")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR", help="folder of local lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=Number(int, min=0), default=None, help="lm-eval: few-shot examples")
    p.add_argument("--batch-size", type=COUNT, default=8)
    p.add_argument("--bf16", action="store_true", help="load the weights in bfloat16 (faster on bf16 CPUs/GPUs, less exact)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run)


def named(spec: str, flag: str) -> tuple[str, Path]:
    name, eq, f = spec.partition("=")
    if not eq:
        name, f = Path(spec).stem, spec
    path = Path(f)
    if not path.exists():
        raise LoramError(f"{flag} {spec}: file {path} does not exist")
    return name, path


def run(a) -> int:
    import json
    from dataclasses import asdict

    import torch

    from ..eval import load_for_eval
    from ..eval.runner import EvalRequest, check_files, run_tasks

    req = EvalRequest(
        ppl=[named(s, "--ppl") for s in a.ppl], mc=[named(s, "--mc") for s in a.mc], shots=a.shots,
        fewshot_file=a.fewshot_file, gsm8k=a.gsm8k, humaneval=a.humaneval, samples=a.samples, temperature=a.temperature,
        timeout=a.timeout, limit=a.limit, max_new_tokens=a.max_new_tokens, seq_len=a.seq_len, stride=a.stride,
        lm_eval=[t.strip() for t in a.lm_eval.split(",") if t.strip()] if a.lm_eval else [], lm_eval_include=a.lm_eval_include,
        num_fewshot=a.num_fewshot, batch_size=a.batch_size, allow_unsandboxed_code=a.allow_unsandboxed_code)
    if req.empty():
        raise LoramError("nothing to evaluate: pass --ppl, --mc, --gsm8k, --humaneval or --lm-eval")
    check_files(req)
    req.check_sandbox()
    model, tok = load_for_eval(a.model, a.adapter, dtype=torch.bfloat16 if a.bf16 else torch.float32)
    results = run_tasks(model, tok, req)
    if a.json:
        print(json.dumps({"model": a.model, "adapter": a.adapter, "results": [asdict(r) for r in results]}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"loram eval {a.model}" + (f" + {a.adapter}" if a.adapter else ""))
    for c in ("task", "metric", "value", "n"):
        t.add_column(c, justify="left" if c in ("task", "metric") else "right")
    for r in results:
        t.add_row(r.task, r.metric, f"{r.value:.4f}", str(r.n))
    Console().print(t)
    return 0
