"""loram plan MODEL --ratio 0.85 --layers 4:78 --quantize nf4 --seq-len 512 --gpu-gb 20 [--max-memory GB] [--json]"""

from __future__ import annotations

import json

from ..settings import add_precision
from .common import ATTN_RATIO, COUNT, DROPOUT, NON_NEGATIVE, POSITIVE


def add(sub) -> None:
    p = sub.add_parser("plan", help="parameters, storage and training memory of LoRA/QLoRA/LoRAM/QLoRAM from a config alone")
    p.add_argument("model", help="preset name (e.g. Llama-3.1-70B), config.json, model or pruned folder, hub id (config only)")
    p.add_argument("--method", default="structured",
                   help="structured (= taylor) | random | taylor | fisher | magnitude | wanda-sp (structured) | sparsegpt | wanda (sparse)")
    p.add_argument("--ratio", type=ATTN_RATIO, default=None, help="pruning ratio (default 0.5, or the smallest that fits --gpu-gb)")
    p.add_argument("--attn-ratio", type=ATTN_RATIO, default=None, help="KV-group ratio (default: --ratio)")
    p.add_argument("--layers", default=None, help="START:END layers to prune (default as `loram prune`)")
    p.add_argument("--sparsity", default="unstructured", help="sparse methods: unstructured | N:M (e.g. 2:4)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="search the ratio for QLoRAM instead of LoRAM")
    p.add_argument("--seq-len", type=COUNT, default=512)
    p.add_argument("--micro-batch", type=COUNT, default=1)
    p.add_argument("--rank", type=COUNT, default=8)
    p.add_argument("--dropout", type=DROPOUT, default=0.05, help="LoRA dropout (its masks cost activation memory)")
    p.add_argument("--targets", nargs="+", default=None, help="LoRA targets among q k v o gate up down lm_head (default: all seven)")
    p.add_argument("--grad-checkpointing", action="store_true")
    add_precision(p)  # the same knob and default as `loram train`: auto is resolved for --device
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where the training is predicted to run (default cuda: adds the CUDA context, the allocator's reserve, "
                        "cuBLAS/NCCL workspaces; --precision auto is bf16 there, fp32 on cpu). --try runs there when it can")
    p.add_argument("--world-size", type=COUNT, default=1, help="GPUs of a torchrun launch (NCCL buffers when > 1)")
    p.add_argument("--overhead-gb", type=NON_NEGATIVE, default=None, help="framework overhead term (default: the CPU calibration)")
    p.add_argument("--gpu-gb", type=POSITIVE, default=None, help="memory budget: say what fits; without --ratio find the smallest ratio")
    p.add_argument("--max-memory", type=POSITIVE, default=None, metavar="GB",
                   help="memory budget of the stages table: which stages would stream (default: this machine's, as "
                        "`loram prune/merge/eval` read it: the memory cgroup's limit, else MemAvailable)")
    p.add_argument("--try", dest="try_it", action="store_true",
                   help="build the plan with random weights (layer by layer) and run --try-steps LoRA steps: "
                        "measured peak RSS and step time beside the prediction")
    p.add_argument("--try-steps", type=COUNT, default=2, help="steps for --try (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON for programs instead of tables")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..errors import LoramError
    from ..planner import SPARSE, PruneSpec, TrainSettings, predict, resolve, smallest_ratio
    from ..planner.memory import DEFAULT_TARGETS, OVERHEAD_GB_CPU

    src = resolve(a.model)
    targets = tuple(a.targets or DEFAULT_TARGETS)
    bad = [t for t in targets if t not in DEFAULT_TARGETS + ("lm_head",)]
    if bad:
        raise LoramError(f"unknown --targets {bad}: choose from {', '.join(DEFAULT_TARGETS + ('lm_head',))}")
    settings = TrainSettings(seq_len=a.seq_len, micro_batch=a.micro_batch, rank=a.rank, targets=targets, dropout=a.dropout,
                             grad_checkpointing=a.grad_checkpointing, precision=a.precision, device=a.device, world=a.world_size,
                             overhead_gb=OVERHEAD_GB_CPU if a.overhead_gb is None else a.overhead_gb)
    searched = None
    if src.plan is not None and a.ratio is None:
        spec = src.plan  # a pruned folder: its exact kept lists
    else:
        spec = PruneSpec(method=a.method, ratio=0.5 if a.ratio is None else a.ratio, attn_ratio=a.attn_ratio,
                         layers=a.layers, sparsity=a.sparsity)
        if a.gpu_gb is not None and a.ratio is None and a.method not in SPARSE:
            searched = smallest_ratio(src.config, spec, settings, a.gpu_gb, quantized=a.quantize == "nf4")
            if searched is not None:
                spec = PruneSpec(a.method, searched, a.attn_ratio, a.layers, a.sparsity)
    pred = predict(src.config, spec, settings, a.gpu_gb, name=src.name)
    if a.try_it:
        return try_it(a, src, spec, settings)
    budget, peaks = stages(a, src, spec, settings)
    if a.json:
        d = pred.to_dict()
        d["searched_ratio"] = searched
        d["memory_budget"] = {"gb": budget.gb, "source": budget.source}
        d["stages"] = [p.to_dict(budget) for p in peaks]
        print(json.dumps(d, indent=2))
        return 0
    show(pred, searched, a)
    show_stages(budget, peaks)
    return 0


def stages(a, src, spec, settings):
    """The memory budget (--max-memory, else this machine's) and each stage's predicted peak."""
    from ..budget import memory_budget
    from ..planner.stages import StageInputs, stage_peaks

    budget = memory_budget(a.max_memory)
    return budget, stage_peaks(src.config, spec, StageInputs(train=settings, quantize=a.quantize == "nf4"))


def show_stages(budget, peaks) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..budget import SAFETY_MARGIN
    from ..planner.memory import GB

    t = Table(title=f"stage memory, GB (budget {budget.gb:.1f} GB: {budget.source})")
    for col in ("stage", "predicted for", "in memory", "streamed", "runs", "fits"):
        t.add_column(col, justify="right" if col in ("in memory", "streamed") else "left")
    for p in peaks:
        how = "streamed" if p.streams(budget) else "in memory"
        t.add_row(p.stage, p.detail, *("-" if b is None else f"{b / GB:.2f}" for b in (p.in_memory_bytes, p.streamed_bytes)),
                  how, "yes" if p.fits(budget) else "no")
    c = Console()
    c.print(t)
    c.print(f"prune and eval stream when the in-memory peak exceeds {1 - SAFETY_MARGIN:.0%} of the budget (loram.budget); "
            "build (layer by layer) and merge (tensor by tensor) always stream, train and recover run in memory (-: no such path). "
            "fits: the peak of the path taken is within that share. Merge and eval are predicted on the original shapes.")


def show(pred, searched, a) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..planner import SCHEMES

    c = Console()
    spec = pred.spec
    t = Table(title=f"loram plan: {pred.name}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    attn = spec.get("attn_ratio")
    t.add_row("pruning", f"{spec.get('method')}, ratio {spec.get('ratio')}, attention {spec.get('ratio') if attn is None else attn}, "
                         f"layers {spec.get('layers') or 'default (as loram prune)'}")
    t.add_row("parameters original", f"{pred.params_original:,}")
    t.add_row("parameters pruned", f"{pred.params_pruned:,}" +
              (f" ({pred.pruned.nonzeros:,} non-zero)" if pred.pruned.nonzeros else ""))
    t.add_row("parameter reduction", f"{pred.param_reduction:.2f}x")
    t.add_row("storage reduction, NF4 = 4 bits (paper)", f"{pred.storage_reduction_nf4:.2f}x")
    t.add_row("storage reduction, NF4 actual", f"{pred.storage_reduction_nf4_actual:.2f}x (constants + 16-bit embeddings)")
    if a.gpu_gb is not None and a.ratio is None and pred.spec.get("method") is not None:
        scheme = "QLoRAM" if a.quantize == "nf4" else "LoRAM"
        t.add_row(f"smallest ratio fitting {a.gpu_gb} GB", "none fits" if searched is None else
                  f"{searched} ({scheme})" if searched > 0 else f"0 ({'QLoRA' if a.quantize == 'nf4' else 'LoRA'} fits unpruned)")
    c.print(t)
    m = Table(title=f"training memory, GB (batch {pred.settings.micro_batch} x {pred.settings.seq_len}, r {pred.settings.rank}, "
                    f"{'grad checkpointing' if pred.settings.grad_checkpointing else 'no checkpointing'}, "
                    f"{pred.settings.compute} on {pred.settings.device})")
    m.add_column("term")
    for s in SCHEMES:
        m.add_column(s, justify="right")
    for term in pred.schemes["LoRA"].terms:
        m.add_row(term, *(f"{pred.schemes[s].terms[term] / 1e9:.3f}" for s in SCHEMES))
    m.add_row("[bold]peak[/bold]", *(f"[bold]{pred.schemes[s].gb:.2f}[/bold]" for s in SCHEMES))
    if a.gpu_gb is not None:
        m.add_row(f"fits {a.gpu_gb} GB", *("yes" if pred.fits(s) else "no" for s in SCHEMES))
    c.print(m)
    gpu = "; gpu_* terms: the CUDA context, the allocator's reserve, cuBLAS/NCCL workspaces" if pred.settings.device == "cuda" else ""
    c.print(f"peak = {pred.schemes['LoRA'].peak_rule}; overhead {pred.settings.overhead_gb} GB is the CPU calibration{gpu}.")


def try_it(a, src, spec, settings) -> int:
    """--try: measure the plan (see loram.planner.trial.try_plan)."""
    from ..errors import LoramError
    from ..planner.trial import try_plan
    from ..prune.random_plan import random_plan
    from ..prune_plan import PrunePlan

    if isinstance(spec, PrunePlan):
        plan = spec
    elif spec.kind != "structured":
        raise LoramError("--try builds structured plans only: use --method structured (or random/taylor/magnitude)")
    else:  # the kept channels do not change memory or speed: a random plan of the same ratios
        plan = random_plan(src.config, spec.ratio, spec.attn_ratio, spec.layers, name=src.name)
    from ..procmem import pin_mmap_threshold

    pin_mmap_threshold()  # measure on the planner's convention: freed temporaries leave RSS
    r = try_plan(src.config, plan, settings, a.quantize, a.try_steps)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    from .common import table

    cuda = r["device"] == "cuda"
    table([("scheme", f"{r['scheme']} ({r['precision']} compute on {r['device']})"), ("parameters", f"{r['params']:,}"),
           ("build (random weights)", f"{r['build_s']:.1f} s"),
           ("peak memory measured", f"{r['measured_gb']:.2f} GB " +
            ("(torch.cuda.max_memory_allocated)" if cuda else "(RSS above the pre-build baseline)")),
           ("peak memory predicted", f"{r['predicted_gb']:.2f} GB" + (f" ({r['error']:+.1%})" if r["error"] is not None else "")),
           *([("CUDA reserved, measured / predicted", f"{r['cuda_reserved_gb']:.2f} / {r['predicted_reserved_gb']:.2f} GB")]
             if cuda else []),
           ("step time", f"{r['s_per_step']:.2f} s ({r['tokens_per_s']:.1f} tokens/s, batch {settings.micro_batch} x {settings.seq_len})")],
          title=f"loram plan --try: {r['steps']} steps")
    return 0
