"""loram build SOURCE -o OUT (--plan PLAN | --ratio R [--layers S:E]) [--plan-only]

SOURCE is a safetensors checkpoint folder (the kept rows/columns are streamed from its shards,
one layer at a time) or a config.json / folder without weights (random weights: capacity
planning). --plan-only writes just the plan (method random when made here).
"""

from __future__ import annotations

from .common import ATTN_RATIO, RATIO, SEED, add_out, table

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add(sub) -> None:
    p = sub.add_parser("build", help="build a pruned model from a checkpoint (or a config) + plan, layer by layer")
    p.add_argument("source", help="safetensors checkpoint folder, or config.json (or a folder with only config.json) for random weights")
    add_out(p, "pruned model folder (or plan folder with --plan-only)")
    p.add_argument("--plan", default=None, help="loram_plan.json (or a folder holding one) to apply")
    p.add_argument("--ratio", type=RATIO, default=None, help="no --plan: make a random structured plan removing this fraction")
    p.add_argument("--attn-ratio", type=ATTN_RATIO, default=None, help="fraction of KV groups removed (default: --ratio)")
    p.add_argument("--layers", default=None, help="START:END layers to prune (default: skip first 4 and last 2)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--plan-only", action="store_true", help="write only loram_plan.json")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of the written tensors (default bf16)")
    p.set_defaults(func=run)


def _source(path: str):
    """(config, weights source: the checkpoint folder, or 'random' when there are no weights)."""
    from pathlib import Path

    from transformers import AutoConfig

    from ..errors import LoramError
    from ..families import family_of
    from ..io import read_json

    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        d = {k: v for k, v in read_json(p).items() if k != "transformers_version"}
        if "model_type" not in d:
            raise LoramError(f"{p} has no model_type: pass a transformers config.json")
        config, source = AutoConfig.for_model(d.pop("model_type"), **d), "random"
    elif p.is_dir() and (p / "config.json").exists():
        config = AutoConfig.from_pretrained(str(p))
        source = str(p) if any(p.glob("*.safetensors")) else "random"
    else:
        raise LoramError(f"{path} is neither a model folder nor a config.json: pass a safetensors checkpoint folder or a config.json")
    family_of(config)
    return config, source


def run(a) -> int:
    import torch

    from ..build import write_pruned
    from ..errors import LoramError
    from ..io import atomic_dir, check_output
    from ..prune.random_plan import random_plan
    from ..prune_plan import PrunePlan

    config, source = _source(a.source)
    inputs = (a.source, a.plan)
    check_output(a.out, a.overwrite, inputs)
    if a.plan:
        plan = PrunePlan.load(a.plan)
    elif a.ratio is not None:
        fp = None
        if source != "random":
            from ..fingerprint import base_fingerprint

            fp = base_fingerprint(source)
        plan = random_plan(config, a.ratio, a.attn_ratio, a.layers, a.seed, name=a.source, fingerprint=fp)
    else:
        raise LoramError("nothing to build: pass --plan PLAN, or --ratio R to make a random structured plan")
    if a.plan_only:
        with atomic_dir(a.out, a.overwrite, "build", inputs) as tmp:
            plan.save(tmp)
        rows = [("plan", f"{a.out}/loram_plan.json")]
    else:
        from ..procmem import pin_mmap_threshold

        pin_mmap_threshold()  # layer-by-layer temporaries go back to the kernel: peak ~ result + one layer
        r = write_pruned(config, plan, source, a.out, dtype=getattr(torch, DTYPES[a.dtype]), seed=a.seed, overwrite=a.overwrite,
                         inputs=inputs)
        rows = [("weights", "random" if source == "random" else source), ("parameters pruned", f"{r.params:,}"),
                ("time", f"{r.seconds:.1f} s"), ("peak RSS", f"{r.peak_rss_gb:.2f} GB"), ("written", a.out)]
    s, e = plan.layers
    extra = plan.extra or {}
    table([("method", plan.method), ("layers", f"{s}:{e}"), ("MLP / KV-group ratio", f"{plan.mlp_ratio} / {plan.attn_ratio}"),
           *([("parameters original", f"{extra['params_original']:,}")] if "params_original" in extra else []),
           *rows], title="loram build")
    return 0
