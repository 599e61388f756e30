"""Recovery speed on a LLaMA-3.1-70B-shaped adapter (issue 5 target: under 10 s here).

    python benchmarks/recovery_speed.py            # writes benchmarks/results/recovery_speed.{json,md}

A random rank-8 adapter on all seven targets of the 0.85-pruned (layers 4:78) LLaMA-3.1-70B
geometry is scattered to the full shapes with loram.recover.recover_tensors (the pure function the
CLI uses), then written as safetensors. No weights of the 70B model are needed: only its config.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from loram.families import MODULE_OF_ROLE, ROLES, geometry
from loram.planner.presets import preset_config
from loram.prune.structured import select
from loram.prune_plan import PrunePlan, parse_layers
from loram.recover import recover_tensors

RANK = 8
RESULTS = Path(__file__).resolve().parent / "results"


def pruned_adapter(plan: PrunePlan, g, rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(g.n_layers):
        for role in ROLES:
            out_f, in_f = plan.pruned_dim(i, role, g)
            key = f"base_model.model.model.layers.{i}.{MODULE_OF_ROLE[role]}"
            sd[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen)
            sd[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen)
    return sd


def main() -> int:
    config = preset_config("Llama-3.1-70B")
    g = geometry(config)
    start, end = parse_layers("4:78", g.n_layers)
    plan = PrunePlan(kind="structured", method="random", layers=(start, end), mlp_ratio=0.85, attn_ratio=0.85,
                     base={"name": "Llama-3.1-70B (config only)", "config": config.to_dict()},
                     pruned=select(g, "random", range(start, end), 0.85, 0.85, 0))
    sd = pruned_adapter(plan, g, RANK)
    n_pruned = sum(t.numel() for t in sd.values())
    t0, c0 = time.perf_counter(), time.process_time()
    full = recover_tensors(sd, plan, config)
    t_recover, c_recover = time.perf_counter() - t0, time.process_time() - c0
    n_full = sum(t.numel() for t in full.values())
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        save_file(full, str(Path(d) / "adapter_model.safetensors"))
        t_write = time.perf_counter() - t0
    res = {"geometry": "Llama-3.1-70B", "plan": "random 0.85 on layers 4:78 (MLP + KV groups)", "rank": RANK,
           "targets": "q,k,v,o,gate,up,down", "adapter_params_pruned": n_pruned, "adapter_params_full": n_full,
           "recover_s": round(t_recover, 2), "recover_cpu_s": round(c_recover, 2), "write_safetensors_s": round(t_write, 2),
           "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, 24 GB",
           "versions": {"python": platform.python_version(), "torch": torch.__version__},
           "command": "python benchmarks/recovery_speed.py"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recovery_speed.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ("| geometry | plan | rank | adapter params pruned → full | recover wall (s) | recover CPU (s) | write safetensors (s) |\n"
          "|---|---|---|---|---|---|---|\n"
          f"| {res['geometry']} | {res['plan']} | {RANK} | {n_pruned:,} → {n_full:,} | {res['recover_s']} | {res['recover_cpu_s']} | {res['write_safetensors_s']} |\n"
          f"\n{res['hardware']}; torch {torch.__version__}; `{res['command']}`\n")
    (RESULTS / "recovery_speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
