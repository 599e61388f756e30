"""Issue 4 benchmark: non-structured pruning of SmolLM2-135M-Instruct (wikitext-2 perplexity, reconstruction, memory).

    python benchmarks/sparse_ppl.py [--tokens 16384] [--calib-samples 32] [--calib-seq-len 512]

    dense, then magnitude / Wanda / SparseGPT at 50 % unstructured and 2:4, every decoder layer (0:30)
    calibration  corpus/c4_demo.jsonl: --calib-samples consecutive windows of --calib-seq-len tokens
    held-out     the next 8 windows of the same file: layer-output reconstruction error per method
                 err_i = ||f_i^pruned(X_i) - f_i(X_i)||^2 / ||f_i(X_i) - X_i||^2 on the dense inputs X_i,
                 averaged over the 30 layers (loram.prune.sparse.layer_errors)
    perplexity   wikitext2/test.txt, its first --tokens tokens, disjoint windows of 512 (stride 512)
    memory       peak RSS of `loram prune smollm2 --method sparsegpt|wanda --sparsity unstructured` as its
                 own process (GNU time's max RSS), pruning 2 layers and all 30 (streaming: the peak
                 should not grow with the number of layers)

Writes benchmarks/results/sparse_ppl.{json,md}. Needs ../shared/data (skips with a message when absent).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
CALIB = DATA / "corpus" / "c4_demo.jsonl"
WIKI = DATA / "wikitext2" / "test.txt"
RUNS = [("magnitude", "unstructured"), ("wanda", "unstructured"), ("sparsegpt", "unstructured"),
        ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4")]
HELD_OUT = 8


def wikitext_ppl(model, ids: list[int], pad: int) -> float:
    from loram.eval.ppl import _result, text_windows
    from loram.eval.scoring import score_sequences

    return _result(score_sequences(model, text_windows(ids, 512, 512), 4, pad)).ppl


def peak_rss(method: str, layers: str, args) -> dict:
    """Peak RSS (GB) of one `loram prune` process, from GNU time."""
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "time.txt"
        cmd = ["/usr/bin/time", "-f", "%M %e", "-o", str(log), "nice", "-n", "5", sys.executable, "-m", "loram", "prune",
               "smollm2", "-o", f"{d}/P", "--method", method, "--sparsity", "unstructured", "--layers", layers,
               "--calib-data", str(CALIB), "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if p.returncode != 0:
            sys.exit(f"prune failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
        kb, secs = log.read_text().split()[-2:]
        return {"method": method, "layers": layers, "peak_rss_gb": round(int(kb) * 1024 / 1e9, 3), "wall_s": float(secs),
                "command": "python " + " ".join(cmd[9:]).replace(d, "TMP")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocess runs")
    args = ap.parse_args()
    if not CALIB.exists() or not WIKI.exists():
        print(f"skipped: {CALIB} / {WIKI} not found (benchmarks need ../shared/data)")
        return
    import torch
    import transformers

    from loram.io import load_tokenizer
    from loram.loading import load_model
    from loram.prune.pattern import parse_pattern
    from loram.prune.sparse import layer_errors, sparsify
    from loram.prune.structured import calibration_batches

    torch.manual_seed(0)
    t0 = time.time()
    tok, dense = load_tokenizer("smollm2"), load_model("smollm2")
    n_layers = dense.config.num_hidden_layers
    layers = range(0, n_layers)
    ids = list(tok(WIKI.read_text(), add_special_tokens=False)["input_ids"])[: args.tokens]
    seqs, calib_desc = calibration_batches(tok, str(CALIB), args.calib_samples + HELD_OUT, args.calib_seq_len)
    calib, held = seqs[: args.calib_samples], seqs[args.calib_samples:]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = [{"method": "dense", "pattern": "-", "sparsity": 0.0, "ppl": wikitext_ppl(dense, ids, pad), "recon_err": 0.0,
             "prune_s": 0.0}]
    print(rows[-1], flush=True)
    for method, pat in RUNS:
        p = copy.deepcopy(dense)
        t = time.time()
        achieved = sparsify(p, method, parse_pattern(pat, 0.5 if pat == "unstructured" else None), layers,
                            calib if method != "magnitude" else None)
        prune_s = time.time() - t
        errs = layer_errors(dense, p, layers, held)
        rows.append({"method": method, "pattern": pat, "sparsity": round(sum(achieved.values()) / len(achieved), 4),
                     "ppl": wikitext_ppl(p, ids, pad), "recon_err": sum(errs.values()) / len(errs),
                     "recon_err_by_layer": {str(k): round(v, 5) for k, v in errs.items()}, "prune_s": round(prune_s, 1)})
        print({k: v for k, v in rows[-1].items() if k != "recon_err_by_layer"}, flush=True)
        del p
    memory = [] if args.no_memory else [peak_rss(m, lay, args) for m in ("sparsegpt", "wanda") for lay in ("0:2", f"0:{n_layers}")]
    for m in memory:
        print(m, flush=True)
    out = {
        "model": "SmolLM2-135M-Instruct (smollm2 alias, GGUF Q4_1 dequantised to fp32)",
        "layers": f"0:{n_layers} (every decoder layer; q,k,v,o,gate,up,down)",
        "calibration": {**calib_desc, "samples": args.calib_samples, "held_out_windows": HELD_OUT},
        "eval": {"data": "wikitext2/test.txt", "tokens": len(ids), "window": 512, "stride": 512},
        "rows": rows, "memory": memory,
        "command": "python benchmarks/sparse_ppl.py " + " ".join(sys.argv[1:]),
        "hardware": "2-core CPU, 24 GB RAM (shared with other jobs)", "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "wall_s": round(time.time() - t0, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sparse_ppl.json").write_text(json.dumps(out, indent=1) + "\n")
    md = ["# Non-structured pruning of SmolLM2-135M-Instruct", "",
          f"wikitext-2 test, first {len(ids)} tokens, windows of 512 (stride 512); every decoder layer pruned; "
          f"calibration {args.calib_samples} x {args.calib_seq_len} tokens of C4 (`corpus/c4_demo.jsonl`); "
          f"reconstruction error on the next {HELD_OUT} windows (mean over layers of "
          "||f_pruned(X) - f(X)||^2 / ||f(X) - X||^2 on the dense model's inputs).", "",
          "| method | pattern | sparsity | wikitext-2 ppl | layer reconstruction error | prune time (s) |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | {r['ppl']:.2f} | {r['recon_err']:.4f} | {r['prune_s']} |")
    if memory:
        md += ["", "Peak RSS of `loram prune` as its own process (GNU time max RSS, includes the model load):", "",
               "| method | layers pruned | peak RSS (GB) | wall (s) |", "|---|---|---|---|"]
        md += [f"| {m['method']} | {m['layers']} | {m['peak_rss_gb']:.2f} | {m['wall_s']:.0f} |" for m in memory]
        md += ["", f"Command (memory rows): `{memory[-1]['command']}`"]
    md += ["", f"Command: `{out['command']}`; {out['hardware']}; Python {out['python']}, torch {out['torch']}, "
           f"transformers {out['transformers']}; {out['wall_s']:.0f} s in all.", ""]
    (RESULTS / "sparse_ppl.md").write_text("\n".join(md))
    print("\n".join(md))
    if any(math.isnan(r["ppl"]) for r in rows):
        sys.exit("a perplexity is NaN")


if __name__ == "__main__":
    main()
