"""The paper's headline on this machine: QLoRAM training of a LLaMA-3.1-70B-geometry model in 24 GB.

    LLaMA-3.1-70B config (bundled preset: hidden 8192, 80 layers, 64 / 8 KV heads, head_dim 128,
    MLP 28672, vocab 128256, untied)  ->  random structured plan, ratio 0.85 on layers 4:78
    ->  loram.build.build_pruned(quantize="nf4", dtype=bf16): built layer by layer, NF4 + double
        quant decoder linears, bf16 embeddings / lm_head / norms, never the 70B
    ->  loram.planner.trial.trial_steps: LoRA r 8 on q,k,v,o,gate,up,down, batch 1, gradient checkpointing,
        AdamW, fp32 compute over the NF4/bf16 storage (see build.py for why on this CPU)

Each sequence length runs in a fresh child process under a hard timeout, one at a time, and only
when MemAvailable >= --min-free-gb. Measured beside loram.planner's prediction (precision fp32:
fp32 activations, NF4 + 16-bit weights), on the planner's convention:

    measured = peak RSS during the training steps - the post-import baseline
    error    = (predicted - measured) / measured

Usage:  nice -n 5 python benchmarks/headline_70b.py --seq 64 512 --steps 2
        python benchmarks/headline_70b.py --child '{"seq": 64, "steps": 2}'     (one run, JSON out)
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
PRESET = "Llama-3.1-70B"
RATIO, LAYERS = 0.85, "4:78"


def child(cfg: dict) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import loram.build  # noqa: F401
    from loram.procmem import peak_rss_gb, pin_mmap_threshold, reset_peak, rss_gb

    torch.set_num_threads(cfg["threads"])
    pin_mmap_threshold()  # the planner's convention (see loram.procmem): freed buffers leave RSS
    baseline = rss_gb()

    from loram.build import build_pruned
    from loram.planner import TrainSettings, predict, preset_config
    from loram.planner.trial import trial_steps
    from loram.prune.random_plan import random_plan

    preset, layers = cfg.get("preset", PRESET), cfg.get("layers", LAYERS)
    config = preset_config(preset)
    plan = random_plan(config, RATIO, layers=layers, name=preset)
    settings = TrainSettings(seq_len=cfg["seq"], micro_batch=1, rank=8, grad_checkpointing=True, precision="fp32", device="cpu")
    pred = predict(config, plan, settings, name=preset)
    q = pred.schemes["QLoRAM"]
    reset_peak()
    model = build_pruned(config, plan, quantize="nf4", dtype=torch.bfloat16)
    b = model.loram_build
    build_peak = peak_rss_gb()
    after_build = rss_gb()
    print(f"built {b.params:,} parameters in {b.seconds:.0f} s, RSS {after_build:.2f} GB (peak {build_peak:.2f})",
          file=sys.stderr, flush=True)
    partial = {"seq_len": cfg["seq"], "params_pruned": b.params, "build_s": round(b.seconds, 1),
               "build_peak_rss_gb": round(build_peak, 3), "baseline_gb": round(baseline, 3), "predicted_gb": round(q.gb, 3),
               "step_s": [], "threads": cfg["threads"]}

    def on_step(i, sec, loss, peak):  # progress survives a timeout: the parent reads this file
        partial["step_s"].append(round(sec, 1))
        partial["train_peak_rss_gb"] = round(peak, 3)
        print(f"step {i}: {sec:.0f} s, loss {loss:.3f}, peak RSS {peak:.2f} GB", file=sys.stderr, flush=True)
        if cfg.get("partial"):
            Path(cfg["partial"]).write_text(json.dumps(partial))

    reset_peak()
    r = trial_steps(model, cfg["seq"], steps=cfg["steps"], on_step=on_step)
    train_peak = peak_rss_gb()
    measured = train_peak - baseline
    return {
        "seq_len": cfg["seq"], "batch": 1, "steps": cfg["steps"], "params_original": pred.params_original,
        "params_pruned": b.params, "params_predicted": pred.params_pruned, "build_s": round(b.seconds, 1),
        "build_peak_rss_gb": round(build_peak, 3), "after_build_rss_gb": round(after_build, 3),
        "baseline_gb": round(baseline, 3), "train_peak_rss_gb": round(train_peak, 3),
        "measured_gb": round(measured, 3), "predicted_gb": round(q.gb, 3), "predicted_terms_gb": q.terms_gb(),
        "error": round((q.gb - measured) / measured, 4), "step_s": [round(t, 1) for t in r.step_s],
        "s_per_step": round(r.s_per_step, 1), "tokens_per_s": round(r.tokens_per_s, 2), "losses": r.losses,
        "trainable_params": r.trainable_params, "threads": cfg["threads"],
    }


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


def hardware() -> str:
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024 / 1e9
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {mem:.0f} GB RAM, no GPU"


def write(rows: list[dict], command: str, results: Path = RESULTS) -> None:
    results.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "headline_70b", "model": f"{PRESET} geometry, random weights", "plan": f"random structured, ratio {RATIO} "
           f"on layers {LAYERS}", "setup": "NF4 + double quant decoder linears, bf16 embeddings/lm_head/norms, LoRA r 8 "
           "(q,k,v,o,gate,up,down), batch 1, gradient checkpointing, AdamW, fp32 compute", "hardware": hardware(),
           "versions": versions(), "command": command, "runs": rows}
    (results / "headline_70b.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# QLoRAM on {PRESET} geometry ({RATIO} on layers {LAYERS}), CPU", "",
             f"{out['setup']}. Hardware: {out['hardware']}. Versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items()) + ".",
             f"Command: `{command}`. Peak RSS = process high-water mark during the training steps; "
             "measured = that minus the post-import baseline (the planner's convention). Allocator: glibc mmap threshold "
             "pinned at 128 KiB (`loram.procmem.pin_mmap_threshold`).", "",
             "| seq | threads | parameters | build s | build peak RSS GB | train peak RSS GB | measured GB | predicted GB | error | s/step | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    def f(r, k, fmt):
        return format(r[k], fmt) if r.get(k) is not None else "n/a"

    for r in rows:
        lines.append(f"| {r['seq_len']} | {f(r, 'threads', 'd')} | {f(r, 'params_pruned', ',')} | {f(r, 'build_s', '.0f')} | "
                     f"{f(r, 'build_peak_rss_gb', '.2f')} | {f(r, 'train_peak_rss_gb', '.2f')} | {f(r, 'measured_gb', '.2f')} | "
                     f"{f(r, 'predicted_gb', '.2f')} | {f(r, 'error', '+.1%')} | {f(r, 's_per_step', '.0f')} | "
                     f"{f(r, 'tokens_per_s', '.2f')} |")
    notes = [f"- seq {r['seq_len']}: {r['error_msg']}" for r in rows if r.get("error_msg")]
    lines += [""] + notes if notes else []
    (results / "headline_70b.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--seq", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1800, help="hard limit per run, seconds")
    ap.add_argument("--min-free-gb", type=float, default=18.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 2 on an idle machine, 1 when the load average is above 1: with the "
                         "cores shared, 2 OpenMP threads wait on each other and small ops slow down ~10x, measured)")
    ap.add_argument("--preset", default=None, help="smoke test on a smaller preset (results go to --results)")
    ap.add_argument("--layers", default=None)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--wait-until", default=None, help="HH:MM: give up waiting for free memory then")
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
        return 0
    command = "python benchmarks/headline_70b.py " + " ".join(sys.argv[1:])
    rows = []
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    prev = results / "headline_70b.json"
    if prev.exists():  # keep runs of other sequence lengths from earlier invocations
        rows = [r for r in json.loads(prev.read_text()).get("runs", []) if r["seq_len"] not in a.seq]
    for seq in a.seq:
        while mem_available_gb() < a.min_free_gb:
            if a.wait_until and time.strftime("%H:%M") >= a.wait_until:
                print(f"seq {seq}: only {mem_available_gb():.1f} GB available at {a.wait_until}: not run", file=sys.stderr)
                return 1
            print(f"waiting: {mem_available_gb():.1f} GB available < {a.min_free_gb}", file=sys.stderr, flush=True)
            time.sleep(60)
        threads = a.threads or (2 if os.getloadavg()[0] < 1 else 1)
        print(f"seq {seq}: starting, {threads} threads, load {os.getloadavg()[0]:.1f} ({mem_available_gb():.1f} GB available)", file=sys.stderr, flush=True)
        t0 = time.time()
        part = results / f".partial_{seq}.json"
        part.unlink(missing_ok=True)
        try:
            cfg = {"seq": seq, "steps": a.steps, "threads": threads, "partial": str(part)}
            cfg.update({k: v for k, v in (("preset", a.preset), ("layers", a.layers)) if v})
            p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], stdout=subprocess.PIPE, text=True,
                               timeout=a.timeout)
            res = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(res[-1][7:]) if res else {"seq_len": seq, "error_msg": f"child exited {p.returncode}"}
        except subprocess.TimeoutExpired:
            done = json.loads(part.read_text()) if part.exists() else {}
            row = {**done, "seq_len": seq, "error_msg": f"timed out after {a.timeout} s, {len(done.get('step_s', []))} steps done"}
        row["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows = sorted([r for r in rows if r["seq_len"] != seq] + [row], key=lambda r: r["seq_len"])
        write(rows, command, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
