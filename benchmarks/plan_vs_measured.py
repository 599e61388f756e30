"""Planner prediction vs measured training peak (CPU RSS), one fresh process per configuration.

    nice -n 5 python benchmarks/plan_vs_measured.py            # all configurations
    nice -n 5 python benchmarks/plan_vs_measured.py --only smollm2-lora-gc

Each configuration runs in its own subprocess:

    import torch/transformers/peft/loram  -> baseline = RSS (the post-import baseline)
    build the model (fp32 weights), prune it by a random plan for LoRAM, wrap it with PEFT LoRA
    (r 8, alpha 16, dropout 0.05, all seven projections: `loram train`'s defaults) and a HF Trainer
    with `loram train`'s arguments (AdamW, use_cpu), gradient checkpointing as
    `loram train --grad-checkpointing` enables it
    malloc_trim(0) (return the build's freed heap to the OS) and reset the RSS high-water mark
    (memory.reset_peak: /proc/self/clear_refs)
    STEPS optimizer steps on random token sequences of exactly seq_len tokens
    measured = peak RSS - baseline;  predicted = loram.planner.predict(...) for the same plan

Precision: fp32, `loram train`'s default. With bf16 weights (`--bf16`) the backward matmuls on this
CPU fell to torch's scalar reference GEMM (py-spy: cpublas_gemm_impl under MmBackward0), about 5
minutes per SmolLM2 step, too slow to measure here; the planner's bf16 activation count is checked
by tests/test_planner.py against autograd's saved tensors instead. Each child runs with
OMP_NUM_THREADS=1 (a shared 2-core machine) and MALLOC_MMAP_THRESHOLD_=131072 (see MMAP_THRESHOLD;
`--malloc default` measures with glibc's dynamic threshold).

The prediction uses the planner's fixed CPU overhead (planner.memory.OVERHEAD_GB_CPU), the same
for every row: it is not fitted per configuration. Random tokens instead of a dataset: memory
depends only on shapes, and every sequence is full length. Results: benchmarks/results/plan_vs_measured.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# glibc raises its mmap threshold after each large free (up to 32 MiB), after which freed activations
# stay in the heap and RSS keeps 0.4-1 GB of dead memory that varies run to run. Pinning the threshold
# at glibc's initial 128 KiB makes RSS follow the live tensors, which is what the planner models.
MMAP_THRESHOLD = 128 * 1024
# TinyLlama-1.1B geometry (its published config.json), randomly initialised: no download.
TINYLLAMA = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False)
CONFIGS = [
    dict(name="smollm2-lora-gc", model="smollm2", ratio=0.0, seq=512, batch=1, gc=True, steps=3, precision="fp32"),
    dict(name="smollm2-loram0.5-gc", model="smollm2", ratio=0.5, layers="4:28", seq=512, batch=1, gc=True, steps=3, precision="fp32"),
    dict(name="smollm2-lora-nogc-4x256", model="smollm2", ratio=0.0, seq=256, batch=4, gc=False, steps=3, precision="fp32"),
    dict(name="tinyllama-lora-gc", model="tinyllama", ratio=0.0, seq=512, batch=1, gc=True, steps=2, precision="fp32"),
    dict(name="tinyllama-loram0.65-gc", model="tinyllama", ratio=0.65, layers="4:20", seq=512, batch=1, gc=True, steps=2, precision="fp32"),
]


from loram.procmem import malloc_trim  # noqa: E402


def build(cfg: dict):
    import torch

    DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
    from transformers import AutoConfig, AutoModelForCausalLM

    from loram.loading import load_model

    if cfg["model"] == "smollm2":
        return load_model("smollm2", dtype=DTYPE[cfg["precision"]])
    d = dict(TINYLLAMA)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d),
                                            dtype=DTYPE[cfg["precision"]])


def run_one(cfg: dict) -> dict:
    """Runs in the child process: build, train STEPS steps, return measured and predicted."""
    import gc

    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from loram.data import collate
    from loram.families import geometry
    from loram.planner import TrainSettings, predict
    from loram.procmem import peak_rss_gb, reset_peak, rss_gb
    from loram.prune.structured import select
    from loram.prune_plan import PrunePlan, parse_layers
    from loram.pruned_model import apply_plan
    from loram.train import TrainConfig, lora_config

    gc.collect()
    malloc_trim()
    baseline = rss_gb()
    model = build(cfg)
    g = geometry(model.config)
    plan = None
    if cfg["ratio"] > 0:
        start, end = parse_layers(cfg.get("layers"), g.n_layers)
        plan = PrunePlan(kind="structured", method="random", layers=(start, end), mlp_ratio=cfg["ratio"],
                         attn_ratio=cfg["ratio"], base={"name": cfg["model"], "config": model.config.to_dict()},
                         pruned=select(g, "random", range(start, end), cfg["ratio"], cfg["ratio"], 0))
        apply_plan(model, plan)
    tc = TrainConfig(data=[], micro_batch=cfg["batch"], seq_len=cfg["seq"], grad_checkpointing=cfg["gc"],
                     bf16=cfg["precision"] == "bf16")
    if tc.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    pm = get_peft_model(model, lora_config(tc))
    gen = torch.Generator().manual_seed(0)
    n_rows = cfg["steps"] * cfg["batch"]
    rows = [torch.randint(3, g.vocab, (cfg["seq"],), generator=gen).tolist() for _ in range(n_rows)]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return n_rows

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}

    args = TrainingArguments(output_dir="/tmp/loram-plan-bench", max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                             learning_rate=2e-4, bf16=tc.bf16, use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
                             remove_unused_columns=False, dataloader_num_workers=0, optim="adamw_torch", logging_steps=1000)
    class Progress(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            print(f"step {state.global_step} at {time.time() - t0:.0f} s, RSS peak {peak_rss_gb() - baseline:.3f} GB", file=sys.stderr,
                  flush=True)

    trainer = Trainer(model=pm, args=args, train_dataset=Rows(), data_collator=collate(0), callbacks=[Progress()])
    gc.collect()
    malloc_trim()
    after_build = rss_gb() - baseline
    reset_peak()
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    measured = peak_rss_gb() - baseline
    settings = TrainSettings(seq_len=cfg["seq"], micro_batch=cfg["batch"], rank=tc.rank, targets=tuple(tc.targets),
                             dropout=tc.dropout, grad_checkpointing=cfg["gc"], precision=cfg["precision"], device="cpu")
    pred = predict(model.config, plan, settings, name=cfg["model"])
    m = pred.schemes["LoRAM" if plan is not None else "LoRA"]
    return {**cfg, "params": pred.params_pruned, "baseline_gb": baseline, "after_build_gb": after_build,
            "measured_gb": measured, "predicted_gb": m.gb, "error": m.gb / measured - 1, "terms_gb": m.terms_gb(),
            "seconds_per_step": wall / cfg["steps"], "tokens_per_s": cfg["steps"] * cfg["batch"] * cfg["seq"] / wall}


def config_of(cfg: dict):
    """The model config of a row, from its name alone (no weights): the SmolLM2 preset or TinyLlama's geometry."""
    from loram.planner import preset_config
    from loram.planner.presets import config_from_dict

    return preset_config("SmolLM2-135M") if cfg["model"] == "smollm2" else config_from_dict(dict(TINYLLAMA))


def repredict(row: dict) -> dict:
    """The planner's prediction for a measured row, recomputed from the config and the ratios
    (the random plan's widths equal the closed form, which the tests check)."""
    from loram.planner import PruneSpec, TrainSettings, predict
    from loram.train import TrainConfig

    tc = TrainConfig(data=[])
    settings = TrainSettings(seq_len=row["seq"], micro_batch=row["batch"], rank=tc.rank, targets=tuple(tc.targets),
                             dropout=tc.dropout, grad_checkpointing=row["gc"], precision=row["precision"], device="cpu")
    spec = PruneSpec("random", row["ratio"], row["ratio"], row.get("layers")) if row["ratio"] > 0 else None
    pred = predict(config_of(row), spec, settings)
    m = pred.schemes["LoRAM" if spec else "LoRA"]
    assert pred.params_pruned == row["params"], row["name"]
    return {**row, "predicted_gb": m.gb, "error": m.gb / row["measured_gb"] - 1, "terms_gb": m.terms_gb()}


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def write(rows: list[dict], command: str, malloc: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    from loram.planner import OVERHEAD_GB_CPU

    hw = f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), " \
         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    meta = {"hardware": hw, "versions": versions(), "command": command, "overhead_gb": OVERHEAD_GB_CPU,
            "malloc": f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}" if malloc == "pinned" else "glibc default (dynamic threshold)"}
    (RESULTS / "plan_vs_measured.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Hardware: {hw}. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
             f"Command: `{command}`. Allocator: {meta['malloc']}. Overhead term: {OVERHEAD_GB_CPU} GB (fixed). Peak = RSS high-water mark during "
             "training minus the post-import baseline.", "",
             "| configuration | params | batch x seq | grad ckpt | measured GB | predicted GB | error | s/step |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f} M | {r['batch']} x {r['seq']} | {'yes' if r['gc'] else 'no'} | "
                     f"{r['measured_gb']:.3f} | {r['predicted_gb']:.3f} | {100 * r['error']:+.1f} % | {r['seconds_per_step']:.1f} |")
    lines += ["", f"The overhead term was measured on the first row ({rows[0]['name'] if rows else '-'}) and is used unchanged "
              "for the others; predictions were recomputed with `--repredict` after that calibration (no retraining). "
              "Seconds per step are inflated by other jobs sharing the 2 cores (OMP_NUM_THREADS=1)."]
    (RESULTS / "plan_vs_measured.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP threads per run (1: the machine is shared, and spinning OpenMP threads waste it)")
    ap.add_argument("--malloc", choices=["pinned", "default"], default="pinned",
                    help="pinned: glibc mmap threshold fixed at 128 KiB (RSS tracks live tensors); default: glibc's dynamic threshold")
    ap.add_argument("--repredict", action="store_true",
                    help="recompute the predictions of results/plan_vs_measured.json with the current planner (no training)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(run_one(json.loads(a.child))), flush=True)
        return
    if a.repredict:
        d = json.loads((RESULTS / "plan_vs_measured.json").read_text())
        write([repredict(r) for r in d["rows"]], d["command"], "pinned" if "MALLOC" in d.get("malloc", "") else "default")
        return
    rows = []
    for cfg in CONFIGS:
        if a.only and cfg["name"] not in a.only:
            continue
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": str(a.threads)}
        if a.malloc == "pinned":
            env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], stdout=subprocess.PIPE, text=True, env=env)
        res = [line[7:] for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        if p.returncode or not res:
            raise SystemExit(f"{cfg['name']} failed (exit {p.returncode})")
        row = json.loads(res[0])
        rows.append(row)
        print(f"{row['name']}: measured {row['measured_gb']:.3f} GB, predicted {row['predicted_gb']:.3f} GB "
              f"({100 * row['error']:+.1f} %), after build {row['after_build_gb']:.3f} GB, {row['seconds_per_step']:.1f} s/step",
              flush=True)
    write(rows, "nice -n 5 python benchmarks/plan_vs_measured.py" + (" --only " + " ".join(a.only) if a.only else "")
          + (f" --threads {a.threads}" if a.threads != 1 else "") + (" --malloc default" if a.malloc == "default" else ""),
          a.malloc)


if __name__ == "__main__":
    main()
