"""kill -9 during `loram train`, then --resume: at most one checkpoint interval is lost and the
result equals an uninterrupted run (real subprocess, real SIGKILL)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from loram.train import TrainConfig, train
from loram.training import CHECKPOINT_MARK, complete_checkpoints

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
    if p.poll() is None:  # an early exit (finished or crashed) is reported below with its stderr, not as a kill error
        os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, f"training ended before it could be killed: {p.stderr.read().decode()[-2000:]}"
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


# ---- --resume with other settings -----------------------------------------------------------------
def run_cli(tiny_dir, data, out, *extra):
    from loram.cli import main

    return main(["train", str(tiny_dir), "--data", str(data), "-o", str(out), "--steps", "2", "--save-steps", "2",
                 "--micro-batch", "2", "--lr", "1e-2", "--seq-len", "64", *map(str, extra)])


@pytest.fixture(scope="module")
def stopped(tiny_dir, alpaca_file, tmp_path_factory):
    """A run's checkpoint folder (2 steps) as if it had been stopped; each test copies it."""
    root = tmp_path_factory.mktemp("stopped")
    data = root / "d.jsonl"
    shutil.copy(alpaca_file, data)
    assert run_cli(tiny_dir, data, root / "A") == 0
    return root


def copy_run(stopped, tmp_path):
    shutil.copytree(stopped / "A-checkpoints", tmp_path / "A-checkpoints")
    shutil.copy(stopped / "d.jsonl", tmp_path / "d.jsonl")
    return tmp_path / "d.jsonl", tmp_path / "A", tmp_path / "A-checkpoints"


@pytest.mark.parametrize("change, expect", [
    (["--lr", "1e-3", "--seed", "1"], "--lr 0.01 -> 0.001; --seed 0 -> 1"),
    (["--rank", "4"], "--rank 8 -> 4"),
    (["--seq-len", "48", "--targets", "q,v"], "--seq-len 64 -> 48; --targets q,k,v,o,gate,up,down -> q,v"),
])
def test_resume_with_other_settings_refused(tiny_dir, stopped, tmp_path, capsys, change, expect):
    data, out, ckpt = copy_run(stopped, tmp_path)
    before = sorted(p.name for p in ckpt.rglob("*"))
    capsys.readouterr()
    assert run_cli(tiny_dir, data, out, "--resume", *change) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume with other settings than checkpoint-2 was trained with "
                                               f"({expect}): give the original values (only --steps, --epochs")
    assert not out.exists() and sorted(p.name for p in ckpt.rglob("*")) == before  # nothing written, nothing deleted


def test_resume_with_changed_data_content_refused(tiny_dir, stopped, tmp_path, capsys):
    data, out, _ = copy_run(stopped, tmp_path)
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[:-1]) + "\n")  # same path, one row fewer
    assert run_cli(tiny_dir, data, out, "--resume") == 2
    assert "(content of d.jsonl changed)" in capsys.readouterr().err


def test_resume_with_more_steps_and_safe_flags_allowed(tiny_dir, stopped, tmp_path):
    data, out, ckpt = copy_run(stopped, tmp_path)
    assert run_cli(tiny_dir, data, out, "--resume", "--steps", "4", "--logging-steps", "1", "--eval", f"x={data}[:4]") == 0
    rep = json.loads((out / "train_report.json").read_text())
    assert rep["steps"] == 4 and rep["resumed_from"].endswith("checkpoint-2") and "x" in rep["eval_ppl"]
    mark = json.loads((ckpt / "checkpoint-4" / CHECKPOINT_MARK).read_text())
    assert mark["settings"]["lr"] == 1e-2 and mark["settings"]["rank"] == 8 and "steps" not in mark["settings"]
