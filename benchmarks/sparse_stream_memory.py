"""Peak memory of `loram prune --sparsity` in memory vs weight-streamed, side by side (issue 15, item 3).

    nice -n 5 python benchmarks/sparse_stream_memory.py [--layers 12 24] [--hidden 1024] [--method sparsegpt --sparsity 2:4]

For each depth, a random Llama checkpoint (bf16 safetensors, written once under /tmp) is pruned twice by
``loram.prune.sparse.prune_sparse``: stream=False (the whole model loaded in fp32, written in fp32)
and stream=True (one decoder layer loaded in fp32, pruned, written in bf16, dropped). Each run is a
fresh child process: glibc's mmap threshold pinned (loram.procmem), RSS after the imports is the
baseline, the high-water mark is reset, then prune_sparse runs. Reported: checkpoint size, peak RSS
above the baseline, output size, wall time, and whether both outputs have the same zero positions.
Results: benchmarks/results/sparse_stream_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CHILD = """
import json, sys, time, torch
from loram.procmem import malloc_trim, peak_rss_gb, pin_mmap_threshold, reset_peak, rss_gb
pin_mmap_threshold()
from loram.prune.sparse import prune_sparse
malloc_trim(); reset_peak(); base = rss_gb(); t0 = time.time()
a = json.loads(sys.argv[1])
prune_sparse(a["model"], a["out"], a["method"], a["sparsity"], calib_samples=4, calib_seq_len=128, stream=a["stream"])
print(json.dumps({"peak_gb": peak_rss_gb() - base, "wall_s": time.time() - t0}))
"""


def make_checkpoint(folder: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loram.testing import tiny_tokenizer

    if (folder / "config.json").exists():
        return folder
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30


def same_zeros(a: Path, b: Path) -> bool:
    from loram.weights import Weights

    wa, wb = Weights(a, use_index=True), Weights(b, use_index=True)
    return wa.names == wb.names and all(bool(((wa.get(k) == 0) == (wb.get(k) == 0)).all()) for k in wa.names)


def run(model: Path, out: Path, a, stream: bool) -> dict:
    subprocess.run(["rm", "-rf", str(out)], check=True)
    args = json.dumps({"model": str(model), "out": str(out), "method": a.method, "sparsity": a.sparsity, "stream": stream})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAM_QUIET": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, args], env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "out_gb": gb(out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--work", default="/tmp/loram-sparse-stream")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = [f"Random Llama, hidden {a.hidden}, MLP {a.hidden * 11 // 4}, 16 / 4 heads, vocab 256, bf16 safetensors; "
             f"`--method {a.method} --sparsity {a.sparsity}`, default layer range, 4 x 128 calibration tokens, OMP_NUM_THREADS=1.", "",
             "| layers | checkpoint (GB) | path | peak RSS above imports (GB) | output (GB) | wall (s) | same zeros |",
             "|---|---|---|---|---|---|---|"]
    for n in a.layers:
        model = make_checkpoint(work / f"llama-h{a.hidden}-l{n}-bf16", a.hidden, n)
        mem, st = run(model, work / "out-in-memory", a, False), run(model, work / "out-streamed", a, True)
        same = same_zeros(work / "out-in-memory", work / "out-streamed")
        for name, r in (("in memory", mem), ("streamed", st)):
            lines.append(f"| {n} | {gb(model):.3f} | {name} | {r['peak_gb']:.3f} | {r['out_gb']:.3f} | {r['wall_s']:.0f} | {same} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sparse_stream_memory.md").write_text(text)


if __name__ == "__main__":
    main()
