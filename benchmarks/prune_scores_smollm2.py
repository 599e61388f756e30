"""Issue 15 benchmark: structured importance scores on SmolLM2-135M-Instruct, in memory vs layer-streamed.

    python benchmarks/prune_scores_smollm2.py [--data ../shared/data] [--calib-samples 8] [--calib-seq-len 128] [--tokens 8192]

    model        the `smollm2` alias (GGUF Q4_1) dequantised once and saved as a bf16 safetensors folder in a
                 temp dir (the form a hub checkpoint has; the streamed path needs safetensors)
    methods      random, magnitude, wanda-sp, taylor at --ratio 0.5 (MLP channels and KV groups), the default
                 layers (4:28 of 30, as the demo and the recipes), calibration corpus/c4_demo.jsonl
    each run     `prune(..., stream=False|True)` in its own process: wall time and peak RSS (GNU time's max
                 RSS, MALLOC_MMAP_THRESHOLD_=65536 so freed memory is returned and the peak is the real one)
    quality      wikitext2/test.txt, its first --tokens tokens in disjoint windows of 512: perplexity of the
                 dense model and of each pruned folder (loaded in fp32)
    agreement    whether the streamed and the in-memory run chose the same plan (same kept indices)

Writes benchmarks/results/prune_scores_smollm2.{json,md}. Needs ../shared/data (skips with a message when absent).
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
METHODS = ("random", "magnitude", "wanda-sp", "taylor")


def child(a) -> None:
    """One prune in this process (the parent measures it from outside)."""
    from loram.prune import prune

    r = prune(a.model, a.out, method=a.method, ratio=0.5, calib_data=a.calib, calib_samples=a.calib_samples,
              calib_seq_len=a.calib_seq_len, stream=a.stream == "1")
    print(json.dumps({"params_original": r.params_original, "params_pruned": r.params_pruned, "seconds": r.seconds}))


def run_prune(folder: Path, out: Path, method: str, stream: bool, calib: Path, a) -> dict:
    log = out.parent / f"{out.name}.time"
    cmd = ["/usr/bin/time", "-f", "%M %e", "-o", str(log), sys.executable, __file__, "--child", "--model", str(folder),
           "--out", str(out), "--method", method, "--stream", "1" if stream else "0", "--calib", str(calib),
           "--calib-samples", str(a.calib_samples), "--calib-seq-len", str(a.calib_seq_len)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"),
               MALLOC_MMAP_THRESHOLD_="65536", LORAM_QUIET="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"prune failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    kb, secs = log.read_text().split()[-2:]
    return {"method": method, "streamed": stream, "peak_rss_gb": round(int(kb) * 1024 / 1e9, 3), "wall_s": float(secs),
            **json.loads(p.stdout.strip().splitlines()[-1])}


def wikitext_ppl(model, ids: list[int], pad: int) -> float:
    from loram.eval.ppl import _result, text_windows
    from loram.eval.scoring import score_sequences

    return _result(score_sequences(model, text_windows(ids, 512, 512), 4, pad)).ppl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for k in ("--model", "--out", "--method", "--stream", "--calib"):
        ap.add_argument(k, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    data = Path(a.data)
    calib, wiki = data / "corpus" / "c4_demo.jsonl", data / "wikitext2" / "test.txt"
    if not calib.exists() or not wiki.exists():
        print(f"skipped: {calib} / {wiki} not found (pass --data, the folder described by ../shared/data/DATA.md)")
        return
    import torch
    import transformers

    from loram.io import load_tokenizer
    from loram.loading import load_model, load_pruned_model
    from loram.prune_plan import PrunePlan

    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "smollm2-bf16"
        dense, tok = load_model("smollm2"), load_tokenizer("smollm2")
        dense.to(torch.bfloat16).save_pretrained(folder)
        tok.save_pretrained(folder)
        dense.float()
        ids = list(tok(wiki.read_text(), add_special_tokens=False)["input_ids"])[: a.tokens]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        # the dense reference from the bf16 folder (what both prune paths read), evaluated in fp32
        dense = load_model(str(folder))
        rows = [{"method": "dense", "ppl": round(wikitext_ppl(dense, ids, pad), 3)}]
        del dense
        print(rows[-1], flush=True)
        for method in METHODS:
            runs = {s: run_prune(folder, Path(d) / f"{method}-{int(s)}", method, s, calib, a) for s in (False, True)}
            plans = {s: PrunePlan.load(Path(d) / f"{method}-{int(s)}") for s in runs}
            model, _ = load_pruned_model(Path(d) / f"{method}-1")
            row = {"method": method, "ppl": round(wikitext_ppl(model, ids, pad), 3),
                   "same_plan": plans[True].weights_digest() == plans[False].weights_digest(),
                   "in_memory": runs[False], "streamed": runs[True]}
            del model
            rows.append(row)
            print(row, flush=True)
    out = {"model": "SmolLM2-135M-Instruct (smollm2 alias, GGUF Q4_1 dequantised, saved as bf16 safetensors)",
           "ratio": 0.5, "layers": "default (4:28 of 30)",
           "calibration": {"data": "corpus/c4_demo.jsonl", "samples": a.calib_samples, "seq_len": a.calib_seq_len},
           "eval": {"data": "wikitext2/test.txt", "tokens": len(ids), "window": 512, "stride": 512}, "rows": rows,
           "command": "python benchmarks/prune_scores_smollm2.py " + " ".join(sys.argv[1:]),
           "hardware": f"{os.cpu_count()}-core CPU shared with other jobs", "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "wall_s": round(time.time() - t0, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prune_scores_smollm2.json").write_text(json.dumps(out, indent=1) + "\n")
    md = ["# Structured importance on SmolLM2-135M-Instruct: quality, time and memory, in memory vs streamed", "",
          f"Ratio 0.5 (MLP channels and KV groups) on layers 4:28 of 30; calibration {a.calib_samples} x {a.calib_seq_len} "
          f"tokens of C4 (`corpus/c4_demo.jsonl`); perplexity on the first {len(ids)} tokens of wikitext-2 test "
          "(windows of 512) of the streamed run's folder, loaded in fp32. Each prune is its own process: wall time "
          "and GNU time's max RSS (MALLOC_MMAP_THRESHOLD_=65536), including Python, torch and the tokenizer.", "",
          "| method | wikitext-2 ppl | in memory: wall (s) | in memory: peak RSS (GB) | streamed: wall (s) | "
          "streamed: peak RSS (GB) | same plan |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "dense":
            md.append(f"| dense (unpruned) | {r['ppl']:.2f} | | | | | |")
            continue
        m, s = r["in_memory"], r["streamed"]
        md.append(f"| {r['method']} | {r['ppl']:.2f} | {m['wall_s']:.1f} | {m['peak_rss_gb']:.2f} | {s['wall_s']:.1f} | "
                  f"{s['peak_rss_gb']:.2f} | {'yes' if r['same_plan'] else 'no'} |")
    md += ["", f"Command: `{out['command']}`; {out['hardware']}; Python {out['python']}, torch {out['torch']}, "
           f"transformers {out['transformers']}; {out['wall_s']:.0f} s in all.", ""]
    (RESULTS / "prune_scores_smollm2.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
