"""benchmarks/gpu_check.py's CPU fallback (what runs where there is no CUDA): the issue-16 GPU chain,
the same CLI commands with --device cpu on a tiny model, every stage exits 0 and the JSON says so."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_fallback(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-fallback", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["cpu_fallback"] is True and "CPU fallback" in p.stdout
    stages = [row["stage"] for row in r["chain"]]
    assert stages == ["prune taylor", "prune sparsegpt 2:4", "train LoRA", "train QLoRA", "recover", "merge", "generate", "eval --ppl"]
    assert all(row["rc"] == 0 for row in r["chain"])
    assert "--device cpu" in r["chain"][0]["command"] and "task(s) evaluated" in r["chain"][-1]["summary"]
    assert "lora_vs_loram_1b" not in r and "headline_70b" not in r  # GPU parts skipped, not faked
