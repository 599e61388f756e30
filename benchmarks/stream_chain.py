"""Issue 15 benchmark: the whole LoRAM chain on a checkpoint larger than the memory it runs in.

    python benchmarks/stream_chain.py --geometry 13b --cap 12        # 26 GB of bf16 under a 12 GiB cap
    python benchmarks/stream_chain.py --geometry 1.1b --compare       # in-memory vs streamed, side by side
    python benchmarks/stream_chain.py --geometry smoke --cap 2        # a minute: checks the script
    python benchmarks/stream_chain.py --geometry 13b --resume WORK    # an interrupted chain: the stages not yet measured

Chain (each stage its own `python -m loram` process, no streaming flag: each stage decides from the
memory budget it sees, here the cgroup limit that ../shared/tools/memcap sets):

    random checkpoint (bf16, written tensor by tensor: loram.testing.random_checkpoint)
    plan   -> prune --method taylor -> train --quantize nf4 (2 steps) -> recover -> merge -> eval --ppl

Per stage: wall time, peak RSS (GNU time), the cgroup's peak (page cache included: a streaming job
sits near the cap by design, so "finished under the cap" is the result), how often the cap was hit,
whether the stage streamed, and the planner's predicted peak (`loram plan --json`, "stages").
Intermediates are deleted as the chain goes (disk). --compare runs prune/merge/eval twice without a
cap, `--max-memory 1000` (in memory) and `--max-memory 0.5` (streamed), for the before/after peaks.

Writes benchmarks/results/stream_chain_<geometry>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MEMCAP = ROOT.parent / "shared" / "tools" / "memcap"
GEOMETRIES = {
    # LLaMA-2-13B: 40 layers, MHA; 13.0 B parameters, 26 GB of bf16
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    # TinyLlama-1.1B: 22 layers, GQA 32/4; 2.2 GB of bf16 (the measurement)
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "smoke": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512),
}


def run(stage: str, args: list[str], cap: float | None, timeout: int) -> dict:
    """One `python -m loram` process (under the cap when given): wall, max RSS, cgroup peak, streamed?"""
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "time.txt"
        cmd = ["/usr/bin/time", "-f", "%M %e", "-o", str(log), sys.executable, "-m", "loram", *args]
        if cap is not None:
            cmd = [str(MEMCAP), str(cap), *cmd]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"),
                   MALLOC_MMAP_THRESHOLD_="65536", MEMCAP_TIMEOUT=str(timeout))
        print(f"[{time.strftime('%H:%M:%S')}] {stage}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.time() - t0
        kb = log.read_text().split()[-2] if log.exists() and log.read_text().split() else "0"
    cg = [ln for ln in p.stderr.splitlines() if ln.startswith("memcap: peak")]
    row = {"stage": stage, "rc": p.returncode, "wall_s": round(wall, 1), "peak_rss_gb": round(int(kb) / 1e6, 2),
           "cgroup": cg[-1] if cg else None, "streamed": "streaming" in p.stderr, "command": "loram " + " ".join(args)}
    own = re.findall(r"peak RSS[^0-9]*([0-9.]+) GB", p.stdout)  # the command's own summary (VmHWM, loram.procmem)
    if own:
        row["own_peak_rss_gb"] = float(own[-1])
    if cg:
        parts = cg[-1].split()
        row["cgroup_peak_gib"] = float(parts[2])
        row["cap_hits"] = int(parts[parts.index("hit") + 1])
    if p.returncode != 0:
        row["stderr_tail"] = p.stderr[-1500:]
        print(p.stderr[-3000:], file=sys.stderr)
    print(f"    rc {p.returncode}, {row['wall_s']} s, max RSS {row['peak_rss_gb']} GB, {row.get('cgroup')}", flush=True)
    return row


def dataset(folder: Path) -> tuple[Path, Path]:
    rows = [{"instruction": f"add {a} and {b}", "input": "", "output": str(a + b)} for a in range(10) for b in range(10)]
    train = folder / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows))
    text = folder / "eval.txt"
    text.write_text(" ".join(f"{a} plus {b} is {a + b}." for a in range(20) for b in range(5)))
    return train, text


def predictions(orig: Path, cap: float | None, timeout: int) -> tuple[dict, dict]:
    args = ["plan", str(orig), "--method", "taylor", "--ratio", "0.5", "--quantize", "nf4", "--seq-len", "64", "--micro-batch", "1",
            "--rank", "8", "--grad-checkpointing", "--device", "cpu", "--json"]
    if cap is not None:
        args += ["--max-memory", str(cap * 2**30 / 1e9)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "loram", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    row = {"stage": "plan", "rc": p.returncode, "command": "loram " + " ".join(args)}
    try:
        stages = json.loads(p.stdout).get("stages", {})
    except json.JSONDecodeError:
        stages = {}
    return row, {s.get("stage"): s for s in stages} if isinstance(stages, list) else stages


def chain(args, work: Path) -> list[dict]:
    orig = work / "orig"
    t0 = t_start = time.time()
    from loram.testing import random_checkpoint

    done = resumed(args, work)
    if done:
        rows = done
        print(f"resuming in {work} after {', '.join(r['stage'] for r in rows)}", flush=True)
    else:
        random_checkpoint(orig, one_row=args.geometry == "13b", **GEOMETRIES[args.geometry])  # 13B: bytes matter, not values
        size = sum(f.stat().st_size for f in orig.glob("*.safetensors"))
        rows = [{"stage": "make checkpoint", "rc": 0, "wall_s": round(time.time() - t0, 1), "checkpoint_gb": round(size / 1e9, 2)}]
        print(f"checkpoint: {size / 1e9:.2f} GB in {rows[0]['wall_s']} s", flush=True)
    train, text = dataset(work)
    plan_row, pred = predictions(orig, args.cap, 600)
    if done:  # the current planner's numbers beside the stages still to run; the rows measured keep theirs
        rows = [r for r in rows if r["stage"] != "plan"] + [plan_row]
    else:
        rows.append(plan_row)
    cap, to = args.cap, args.timeout
    calib = ["--calib-samples", str(args.calib_samples), "--calib-seq-len", "64"]
    steps = [
        ("prune", ["prune", str(orig), "-o", str(work / "pruned"), "--method", "taylor", "--ratio", "0.5", *calib]),
        ("train", ["train", str(work / "pruned"), "-o", str(work / "adapter"), "--data", str(train), "--quantize", "nf4",
                   "--steps", "2", "--seq-len", "64", "--micro-batch", "1", "--rank", "8", "--grad-checkpointing"]),
        ("recover", ["recover", str(work / "adapter"), "--base", str(orig), "-o", str(work / "recovered")]),
        ("merge", ["merge", str(orig), str(work / "recovered"), "-o", str(work / "merged")]),
        ("eval", ["eval", str(work / "merged"), "--ppl", f"text={text}", "--seq-len", "64", "--json"]),
    ]
    for stage, cmd in steps:
        if any(r["stage"] == stage and r.get("rc") == 0 for r in rows):
            continue  # measured before --resume
        row = run(stage, cmd, cap, to)
        p = pred.get(stage) or {}
        row["predicted_in_memory_gb"] = _gb(p.get("in_memory_gb"))
        row["predicted_streamed_gb"] = _gb(p.get("streamed_gb"))
        rows.append(row)
        write(args, rows, time.time() - t_start)  # after every stage: a killed run keeps what it measured
        if row["rc"] != 0:
            break
        if stage == "recover":
            shutil.rmtree(work / "pruned", ignore_errors=True)  # disk: the pruned folder is no longer needed
        if stage == "merge":
            shutil.rmtree(orig, ignore_errors=True)
    return rows


def resumed(args, work: Path) -> list[dict]:
    """With --resume: the rows an interrupted chain in ``work`` measured (its results json), failed stages dropped."""
    if not args.resume:
        return []
    old = json.loads((RESULTS / f"stream_chain_{args.geometry}.json").read_text())["rows"]
    return [r for r in old if r.get("rc") == 0]


def compare(args, work: Path) -> list[dict]:
    """prune taylor / merge / eval with the budget forcing the in-memory path, then the streamed one."""
    from loram.testing import random_checkpoint

    orig = random_checkpoint(work / "orig", **GEOMETRIES[args.geometry])
    train, text = dataset(work)
    calib = ["--calib-samples", str(args.calib_samples), "--calib-seq-len", "64"]
    rows = []
    for mode, budget in (("in-memory", "1000"), ("streamed", "0.5")):
        out = work / mode
        out.mkdir()
        r = run(f"prune taylor ({mode})", ["prune", str(orig), "-o", str(out / "p"), "--method", "taylor", "--ratio", "0.5",
                                           *calib, "--max-memory", budget], None, args.timeout)
        rows.append(r)
        if mode == "in-memory":  # one adapter for both merges
            rows.append(run("train (NF4)", ["train", str(out / "p"), "-o", str(work / "a"), "--data", str(train), "--quantize",
                                            "nf4", "--steps", "2", "--seq-len", "64", "--rank", "8"], None, args.timeout))
            rows.append(run("recover", ["recover", str(work / "a"), "--base", str(orig), "-o", str(work / "r")], None, args.timeout))
        rows.append(run(f"merge ({mode})", ["merge", str(orig), str(work / "r"), "-o", str(out / "m"), "--max-memory", budget],
                        None, args.timeout))
        rows.append(run(f"eval --ppl ({mode})", ["eval", str(orig), "--adapter", str(work / "r"), "--ppl", f"text={text}",
                                                  "--seq-len", "64", "--json", "--max-memory", budget], None, args.timeout))
        shutil.rmtree(out, ignore_errors=True)
    return rows


def _gb(x) -> float | None:
    return round(x, 2) if isinstance(x, (int, float)) else None


def write(args, rows: list[dict], seconds: float) -> None:
    import torch
    import transformers

    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"stream_chain_{args.geometry}{'_compare' if args.compare else ''}"
    meta = {"command": "python benchmarks/stream_chain.py " + " ".join(sys.argv[1:]), "geometry": GEOMETRIES[args.geometry],
            "cap_gib": None if args.compare else args.cap, "cpu": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "seconds": round(seconds)}
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Streaming chain: {args.geometry} geometry", "",
             f"`{meta['command']}`; {meta['cpu']}, 24 GB RAM; Python {meta['python']}, torch {meta['torch']}, "
             f"transformers {meta['transformers']}; {meta['seconds']} s in all.", "",
             "| stage | exit | wall (s) | peak RSS (GB) | cgroup peak (GiB) | cap hits | streamed | predicted in-memory (GB) | predicted streamed (GB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r.get('rc')} | {r.get('wall_s', '')} | {r.get('peak_rss_gb', '')} | {r.get('cgroup_peak_gib', '')} "
                     f"| {r.get('cap_hits', '')} | {r.get('streamed', '')} | {r.get('predicted_in_memory_gb') or ''} "
                     f"| {r.get('predicted_streamed_gb') or ''} |")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows if r.get("command")]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="smoke")
    ap.add_argument("--cap", type=float, default=12.0, help="memory cap in GiB (../shared/tools/memcap)")
    ap.add_argument("--compare", action="store_true", help="in-memory vs streamed peaks, no cap")
    ap.add_argument("--calib-samples", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per stage")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (needs ~2.5x the checkpoint on disk)")
    ap.add_argument("--resume", default=None, metavar="WORK",
                    help="the work folder of an interrupted chain: keep the rows its results json holds, run the other stages")
    args = ap.parse_args()
    if not args.compare and not MEMCAP.exists():
        sys.exit(f"{MEMCAP} not found: the capped chain needs ../shared/tools/memcap (or use --compare)")
    t0 = time.time()
    if args.resume:
        rows = chain(args, Path(args.resume))
    else:
        with tempfile.TemporaryDirectory(dir=args.workdir) as d:
            rows = compare(args, Path(d)) if args.compare else chain(args, Path(d))
    write(args, rows, time.time() - t0)


if __name__ == "__main__":
    main()
