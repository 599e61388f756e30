"""Memory and speed of LoRAM vs plain PEFT LoRA on the same model, data and settings (issue 5).

    nice -n 5 python benchmarks/memory_speed.py                 # every run below, one child at a time
    nice -n 5 python benchmarks/memory_speed.py --only tinyllama-lora-stock tinyllama-loram-stock

Pairs (LoRA on the original vs LoRA on its pruned copy), weights stored in bf16:
    smollm2     SmolLM2-135M-Instruct (`loram.loading.load_model("smollm2")`) vs its random structured
                prune, ratio 0.5 on layers 4:28 (`loram prune smollm2 --method random --ratio 0.5
                --layers 4:28`, loaded with `loram.load_pruned`): 1.41x fewer parameters
    tinyllama   TinyLlama-1.1B geometry (hidden 2048, 22 layers, 32 / 4 KV heads, MLP 5632, vocab
                32000), random weights (no download; memory and speed depend on shapes only) vs
                `loram.build.build_pruned(random_plan(ratio 0.65, layers 4:20))` (layers 4..19): 1.65x.
                Weights dominate memory here, as on real large models.
Training step (each run): PEFT LoRA r 8, alpha 16, dropout 0.05 on q,k,v,o,gate,up,down, AdamW lr
1e-4, batch 1 x seq 512 random tokens (memory and speed depend on shapes, not on values), gradient
checkpointing (use_reentrant False); STEPS steps, the first a warm-up excluded from tokens/s (it
pays one-time allocations: AdamW states, allocator growth) but not from the peak.

Compute precision. The issue asks for bf16 autocast. On this CPU (torch 2.13) a bf16 matmul whose
second operand is row-major, grad_out @ W, which is every frozen linear's input gradient, runs at
0.3-0.6 GFLOP/s against ~40 for fp32 (`--probe` measured it; a whole SmolLM2 step at seq 64: 40 s
vs 4 s): the input gradients of one 1.1B step at seq 512 alone would take 30-60 min. So the table is measured with bf16 *storage* and fp32 *compute*: each bf16 linear
casts its weight to fp32 1,024 rows at a time in forward and backward (loram.build's chunked cast,
no full fp32 copy is ever made or saved), embeddings cast to fp32. `--probe` also runs one bf16
autocast step at seq 64 next to the fp32-compute one, so the gap is on record.

Loss. "stock": the model's own loss (full-vocabulary fp32 logits + log-softmax and their grads).
"chunked": `loram.loss.chunked_causal_lm_loss` (lm_head + cross-entropy 128 positions at a time,
each chunk checkpointed): the same value, without the full logits.

Measurement (each run in a fresh child process, JSON out): glibc mmap threshold pinned
(`loram.procmem.pin_mmap_threshold`, the planner's convention: freed buffers leave RSS), baseline =
RSS after imports, model built, PEFT-wrapped, malloc_trim, then the RSS high-water mark is reset
(`loram.procmem.reset_peak`) and the steps run. peak = high-water mark - baseline (weights included);
after_build = weights as resident; persistent = RSS after the steps (weights + LoRA + AdamW states).
OMP_NUM_THREADS=1 (a shared 2-core machine; tokens/s carry that noise, the ratios less so).
Ratios: memory = LoRA peak / LoRAM peak, tokens/s = LoRAM / LoRA, params = original / pruned.
Targets: memory ratio >= 0.9 x param ratio, tokens/s ratio >= 0.8 x param ratio.
Results: benchmarks/results/memory_speed.{json,md}.
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
PRUNED_SMOLLM2 = Path("/tmp/loram-memspeed/smollm2-random-0.5")
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
RUNS = [dict(name=f"{m}-{s}-{loss}", model=m, scheme=s, loss=loss, compute="fp32", seq=512)
        for loss in ("stock", "chunked") for m in ("smollm2", "tinyllama") for s in ("lora", "loram")]
# bf16 autocast costs ~100x fp32 compute here (see the docstring): one short step each to show it
PROBES = [dict(name=f"probe-smollm2-lora-{c}-seq64", model="smollm2", scheme="lora", loss="stock", compute=c, seq=64, steps=1)
          for c in ("bf16", "fp32")]
CHUNK_ROWS = 1024  # rows of a bf16 weight cast to fp32 at once: <= 23 MB transient on these shapes


from loram.procmem import malloc_trim  # noqa: E402


def build(cfg: dict):
    import torch

    if cfg["model"] == "smollm2":
        from loram import load_pruned
        from loram.loading import load_model

        return load_model("smollm2", dtype=torch.bfloat16) if cfg["scheme"] == "lora" else load_pruned(PRUNED_SMOLLM2, dtype=torch.bfloat16)
    from transformers import LlamaConfig

    from loram.build import build_pruned
    from loram.prune.random_plan import random_plan

    config = LlamaConfig(**TINYLLAMA)
    if cfg["scheme"] == "loram":
        return build_pruned(config, random_plan(config, 0.65, layers="4:20", name="tinyllama-1.1b-geometry"), source="random",
                            dtype=torch.bfloat16)
    return _stock_bf16(config)  # random_plan refuses ratio 0: the original is built the same way, unpruned


def _stock_bf16(config):
    """The unpruned model, materialised module by module from the meta device with build_pruned's
    own random source (same init, same bf16 dtype, no fp32 copy of the model at any point)."""
    import torch

    from loram.build import _assign, _Source
    from loram.pruned_model import materialize_buffers, skeleton

    model = skeleton(config, None, dtype=torch.bfloat16)
    src = _Source(None, None, config, seed=0)  # no weights: random
    for name, mod in list(model.named_modules()):
        if any(True for _ in mod.parameters(recurse=False)):
            _assign(mod, name + ".", src, torch.bfloat16)
    materialize_buffers(model, "cpu")
    return model.eval()


def fp32_over_bf16(model) -> None:
    """bf16 storage, fp32 compute: every bf16 Linear casts its weight chunk-wise (no full fp32 copy)."""
    import functools

    import torch

    from loram.planner.trial import _ChunkedLinear  # the chunked cast `loram plan --try` uses for NF4/bf16 storage

    def fwd(mod, x):
        y = _ChunkedLinear.apply(x.float(), mod.weight, CHUNK_ROWS)
        return y if mod.bias is None else y + mod.bias.float()

    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.dtype != torch.float32:
            m.forward = functools.partial(fwd, m)  # PEFT's LoRA layer calls base_layer(x): this forward
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.float())


def child(cfg: dict) -> dict:
    from loram.procmem import peak_rss_gb, pin_mmap_threshold, reset_peak, rss_gb

    pin_mmap_threshold()  # before the imports allocate: the planner's convention
    import gc

    import peft  # noqa: F401 - imported before the baseline, like everything the run uses
    import torch
    import transformers  # noqa: F401
    from peft import LoraConfig, get_peft_model

    import loram.build  # noqa: F401
    from loram.loss import chunked_causal_lm_loss
    from loram.pruned_model import count_params

    torch.set_num_threads(1)
    gc.collect()
    malloc_trim()
    baseline = rss_gb()
    model = build(cfg)
    params = count_params(model)
    weight_bytes = sum(t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values())
    if cfg["compute"] == "fp32":
        fp32_over_bf16(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, cfg["seq"]), generator=torch.Generator().manual_seed(0))
    inner, head = pm.base_model.model.model, pm.base_model.model.lm_head
    pm.train()
    gc.collect()
    malloc_trim()
    after_build = rss_gb() - baseline
    reset_peak()
    times, losses = [], []
    for i in range(cfg["steps"]):
        t0 = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["compute"] == "bf16"):
            if cfg["loss"] == "chunked":
                loss = chunked_causal_lm_loss(inner(input_ids=ids).last_hidden_state, head, ids, chunk=128)
            else:
                loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t0)
        losses.append(float(loss.detach()))
        del loss
        print(f"{cfg['name']} step {i + 1}: {times[-1]:.1f} s, loss {losses[-1]:.4f}, peak {peak_rss_gb() - baseline:.3f} GB",
              file=sys.stderr, flush=True)
    gc.collect()
    malloc_trim()
    timed = times[1:] or times  # the warm-up step is excluded when there is more than one
    return {**cfg, "params": params, "weights_gb": weight_bytes / 1e9, "trainable_params": sum(p.numel() for p in trainable),
            "baseline_gb": baseline, "after_build_gb": after_build, "persistent_gb": rss_gb() - baseline,
            "peak_gb": peak_rss_gb() - baseline, "step_s": times, "losses": losses,
            "tokens_per_s": cfg["seq"] * len(timed) / sum(timed)}


def matmul_probe() -> list[dict]:
    """GFLOP/s of the three matmuls of a frozen linear (forward, input grad, weight grad), fp32 vs bf16."""
    import torch

    torch.set_num_threads(1)
    out = []
    for o, i in [(5632, 2048), (2048, 5632)]:
        for dt in (torch.float32, torch.bfloat16):
            w, x, g, t = torch.randn(o, i).to(dt), torch.randn(64, i).to(dt), torch.randn(64, o).to(dt), {}
            for k, f in (("forward x@W^T", lambda: x @ w.t()), ("input grad g@W", lambda: g @ w), ("weight grad g^T@x", lambda: g.t() @ x)):
                t0 = time.time()
                f()
                t[k] = round(2 * 64 * o * i / 1e9 / (time.time() - t0), 2)
            out.append({"shape": f"64x{o} / {o}x{i}", "dtype": str(dt).split(".")[-1], "gflops": t})
    return out


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def meta(command: str) -> dict:
    import peft
    import torch
    import transformers

    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024 / 2**30
    return {"hardware": f"{os.cpu_count()}-core CPU ({platform.machine()}), {mem:.0f} GiB RAM, no GPU; OMP_NUM_THREADS=1, shared with other jobs",
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__}, "command": command}


def pairs(rows: list[dict]) -> list[dict]:
    """The LoRAM rows with their ratios to the LoRA row of the same model, loss and compute."""
    by = {(r["model"], r["scheme"], r["loss"], r["compute"], r["seq"]): r for r in rows if "peak_gb" in r}
    out = []
    for (m, s, loss, c, seq), r in by.items():
        base = by.get((m, "lora", loss, c, seq))
        if s != "loram" or base is None:
            continue
        pr = base["params"] / r["params"]
        mr, tr = base["peak_gb"] / r["peak_gb"], r["tokens_per_s"] / base["tokens_per_s"]
        out.append({"model": m, "loss": loss, "compute": c, "param_ratio": pr, "memory_ratio": mr, "tokens_ratio": tr,
                    "memory_vs_param": mr / pr, "tokens_vs_param": tr / pr, "memory_target_met": mr >= 0.9 * pr,
                    "tokens_target_met": tr >= 0.8 * pr})
    return out


def write(rows: list[dict], probe: dict | None, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "memory_speed", **meta(command), "runs": rows, "pairs": pairs(rows), "probe": probe}
    (RESULTS / "memory_speed.json").write_text(json.dumps(out, indent=2) + "\n")
    ratio = {(p["model"], p["loss"], p["compute"]): p for p in out["pairs"]}
    lines = ["# Memory and speed: LoRAM vs plain LoRA (CPU)", "",
             f"Hardware: {out['hardware']}. Versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items()) + ".",
             f"Command: `{command}`. Batch 1 x seq 512 random tokens, LoRA r 8 / alpha 16 on q,k,v,o,gate,up,down, AdamW, "
             "gradient checkpointing, bf16 weights with fp32 compute (under bf16 autocast a frozen linear's input-gradient matmul runs 60-150x "
             "slower than fp32 on this CPU: see the probe below). Peak = RSS high-water mark during the steps minus the post-import baseline (glibc mmap threshold pinned). "
             "tokens/s excludes the warm-up step. Ratios: memory = LoRA peak / LoRAM peak, tok/s = LoRAM / LoRA, params = "
             "original / pruned; targets: memory >= 0.9 x params, tok/s >= 0.8 x params.", "",
             "| model | loss | scheme | params | weights GB | peak GB | persistent GB | tokens/s | memory ratio | tok/s ratio | "
             "param ratio | mem / param | tok/s / param | target met (mem, tok/s) |", "|" + "---|" * 14]
    for r in sorted((r for r in rows if "peak_gb" in r and not r["name"].startswith("probe")),
                    key=lambda r: (r["model"] != "smollm2", r["loss"] != "stock", r["scheme"])):
        p = ratio.get((r["model"], r["loss"], r["compute"])) if r["scheme"] == "loram" else None
        tail = (f"{p['memory_ratio']:.2f} | {p['tokens_ratio']:.2f} | {p['param_ratio']:.2f} | {p['memory_vs_param']:.2f} | "
                f"{p['tokens_vs_param']:.2f} | {'yes' if p['memory_target_met'] else 'no'}, {'yes' if p['tokens_target_met'] else 'no'} |"
                if p else "- | - | - | - | - | - |")
        lines.append(f"| {r['model']} | {r['loss']} | {'LoRAM' if r['scheme'] == 'loram' else 'LoRA'} | {r['params'] / 1e6:.1f} M | "
                     f"{r['weights_gb']:.3f} | {r['peak_gb']:.3f} | {r['persistent_gb']:.3f} | {r['tokens_per_s']:.2f} | {tail}")
    lines += ["", "Where the non-weight memory goes (GB): peak - weights = (persistent - weights: LoRA params, AdamW states, "
              "allocator) + (peak - persistent: the step's transients: checkpointed activations, one layer's recompute, logits):", ""]
    lines += [f"- {r['name']}: {r['peak_gb'] - r['weights_gb']:.3f} = {r['persistent_gb'] - r['weights_gb']:.3f} + "
              f"{r['peak_gb'] - r['persistent_gb']:.3f}" for r in rows if "peak_gb" in r and not r["name"].startswith("probe")]
    if probe:
        lines += ["", "Probe (why fp32 compute): GFLOP/s of a frozen linear's three matmuls, 64 rows, 1 thread:", "",
                  "| shape | dtype | forward x@W^T | input grad g@W | weight grad g^T@x |", "|---|---|---|---|---|"]
        lines += [f"| {m['shape']} | {m['dtype']} | " + " | ".join(str(v) for v in m["gflops"].values()) + " |" for m in probe["matmul"]]
        lines += [""] + [f"- {r['name']}: one step {r['step_s'][0]:.1f} s, peak {r['peak_gb']:.3f} GB" for r in probe["steps"]]
    fails = [r for r in rows if "error_msg" in r]
    lines += [""] + [f"- {r['name']}: {r['error_msg']}" for r in fails] if fails else []
    (RESULTS / "memory_speed.md").write_text("\n".join(lines) + "\n")


def run_child(cfg: dict, timeout: int, min_free: float) -> dict:
    while mem_available_gb() < min_free:  # another job holds most of the RAM: wait rather than swap it out
        print(f"waiting: {mem_available_gb():.1f} GB available", file=sys.stderr, flush=True)
        time.sleep(30)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    try:
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], stdout=subprocess.PIPE, text=True, env=env,
                           timeout=timeout)
        res = [line[7:] for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        return json.loads(res[-1]) if res else {**cfg, "error_msg": f"child exited {p.returncode}"}
    except subprocess.TimeoutExpired:
        return {**cfg, "error_msg": f"timed out after {timeout} s"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help="run names (default: all; earlier results of other runs are kept)")
    ap.add_argument("--steps", type=int, default=3, help="steps per run, the first a warm-up")
    ap.add_argument("--probe", action="store_true", help="also run the bf16-vs-fp32 probe")
    ap.add_argument("--timeout", type=int, default=2400)
    ap.add_argument("--min-free-gb", type=float, default=5.0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        cfg = json.loads(a.child)
        print("RESULT " + json.dumps(matmul_probe() if cfg.get("matmul") else child(cfg)), flush=True)
        return 0
    command = "nice -n 5 python benchmarks/memory_speed.py " + " ".join(sys.argv[1:])
    if not PRUNED_SMOLLM2.exists():
        subprocess.run(["loram", "prune", "smollm2", "--method", "random", "--ratio", "0.5", "--layers", "4:28", "-o",
                        str(PRUNED_SMOLLM2)], check=True)
    prev = json.loads((RESULTS / "memory_speed.json").read_text()) if (RESULTS / "memory_speed.json").exists() else {}
    rows, probe = prev.get("runs", []), prev.get("probe")
    if a.probe:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps({"matmul": True})], stdout=subprocess.PIPE, text=True, env=env)
        probe = {"matmul": json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:]),
                 "steps": [run_child(c, a.timeout, a.min_free_gb) for c in PROBES]}
        write(rows, probe, command)
    for cfg in RUNS:
        if a.only is not None and cfg["name"] not in a.only:
            continue
        row = run_child({**cfg, "steps": a.steps}, a.timeout, a.min_free_gb)
        print(json.dumps({k: v for k, v in row.items() if k not in ("losses",)}), file=sys.stderr, flush=True)
        rows = [r for r in rows if r["name"] != cfg["name"]] + [row]
        write(rows, probe, command)  # after every run: a later timeout keeps what was measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
