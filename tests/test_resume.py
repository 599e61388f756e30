"""kill -9 during `loram train`, then --resume: at most one checkpoint interval is lost and the
result equals an uninterrupted run (real subprocess, real SIGKILL)."""

import json
import os
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from loram.train import CHECKPOINT_MARK, TrainConfig, complete_checkpoints, train

STEPS, SAVE = 40, 4


def args(model, data, out):
    return [sys.executable, "-m", "loram", "train", str(model), "--data", str(data), "-o", str(out), "--steps", str(STEPS),
            "--save-steps", str(SAVE), "--logging-steps", "1", "--micro-batch", "2", "--lr", "1e-2", "--seq-len", "64",
            "--dropout", "0.1"]


def test_kill_9_then_resume_matches_uninterrupted_run(tiny_dir, alpaca_file, tmp_path):
    ref = train(tiny_dir, tmp_path / "ref", TrainConfig(data=[str(alpaca_file)], steps=STEPS, save_steps=SAVE, logging_steps=1,
                                                       micro_batch=2, lr=1e-2, seq_len=64, dropout=0.1))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out, ckpt = tmp_path / "A", tmp_path / "A-checkpoints"
    p = subprocess.Popen(args(tiny_dir, alpaca_file, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not (ckpt / f"checkpoint-{2 * SAVE}" / CHECKPOINT_MARK).exists():
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not out.exists()  # no half-written adapter
    done = complete_checkpoints(ckpt)
    assert done and int(done[-1].name.split("-")[1]) >= 2 * SAVE
    # a checkpoint killed mid-save (no completion marker) must be ignored by --resume
    partial = ckpt / f"checkpoint-{STEPS - 1}"
    partial.mkdir(exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 10)

    r = subprocess.run(args(tiny_dir, alpaca_file, out) + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "train_report.json").read_text())
    resumed = int(rep["resumed_from"].rsplit("-", 1)[1])
    assert resumed >= int(done[-1].name.split("-")[1])  # lost at most the interval after the last checkpoint
    assert not partial.exists()
    la, lb = [x["loss"] for x in ref.losses], [x["loss"] for x in rep["losses"]]
    assert len(la) == len(lb) == STEPS and max(abs(a - b) for a, b in zip(la, lb)) < 1e-5
    A, B = load_file(str(tmp_path / "ref" / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert A.keys() == B.keys() and max((A[k] - B[k]).abs().max().item() for k in A) < 1e-5
