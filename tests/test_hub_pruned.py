"""A pruned base loram pushed to the Hub, named by its hub id: `loram train` and `loram recover` read it from
the hub cache exactly as they read the local folder (tests: an offline hub cache, conftest.offline_hub)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from loram.adapter import read_meta, read_tensors
from loram.cli import main
from loram.prune import prune

TRAIN = ["--steps", "2", "--micro-batch", "2", "--seq-len", "32", "--lr", "1e-2", "--seed", "3", "--logging-steps", "1"]


@pytest.fixture
def pushed(tiny_dir, tmp_path, offline_hub):
    """(local pruned folder, hub id of the same folder in the offline hub cache)."""
    folder = tmp_path / "pruned"
    prune(str(tiny_dir), folder, method="random", ratio=0.5)
    offline_hub("me/tiny-loram", folder)
    return folder, "me/tiny-loram"


def test_train_on_a_hub_pruned_base_equals_the_local_folder(pushed, tiny_dir, alpaca_file, tmp_path):
    """`loram train OWNER/NAME` on a pushed pruned base: the adapter equals the one trained on the local
    folder (same seed), records the hub id it was trained on and the original the plan names, and
    `loram recover` makes it the original's adapter."""
    folder, hub_id = pushed
    for model, out in ((hub_id, "a-hub"), (folder, "a-local")):
        assert main(["train", str(model), "-o", str(tmp_path / out), "--data", str(alpaca_file), *TRAIN]) == 0
    a, b = read_tensors(tmp_path / "a-hub"), read_tensors(tmp_path / "a-local")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = read_meta(tmp_path / "a-hub")
    assert meta["trained_on"] == hub_id and meta["base_name"] == str(tiny_dir)
    assert meta["plan_id"] == read_meta(tmp_path / "a-local")["plan_id"]
    assert main(["recover", str(tmp_path / "a-hub"), "--base", str(tiny_dir), "-o", str(tmp_path / "r")]) == 0
    rec = read_meta(tmp_path / "r")
    assert rec["stage"] == "recovered" and rec["base_name"] == str(tiny_dir)
    assert json.loads((tmp_path / "r" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)


def test_recover_refuses_the_hub_pruned_base_as_base(pushed, tiny_dir, alpaca_file, tmp_path, capsys):
    """--base must be the original: a pruned base named by its hub id is refused as its local folder is."""
    folder, hub_id = pushed
    assert main(["train", str(folder), "-o", str(tmp_path / "a"), "--data", str(alpaca_file), *TRAIN]) == 0
    capsys.readouterr()
    assert main(["recover", str(tmp_path / "a"), "--base", hub_id, "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --base {hub_id} is a loram pruned model: pass the original model the plan was made from ({tiny_dir})"
    assert not (tmp_path / "r").exists()


def test_train_on_a_hub_id_missing_offline_is_one_line(offline_hub, alpaca_file, tmp_path):
    """A hub id that is neither cached nor downloadable (HF_HUB_OFFLINE=1): one line naming it and the fix,
    exit 2, before the tokenizer, data or weights are read, nothing written."""
    r = subprocess.run([sys.executable, "-m", "loram", "train", "me/not-cached", "-o", str(tmp_path / "a"), "--data",
                        str(alpaca_file), "--steps", "1"], env=offline_hub.env, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: hub repo me/not-cached is not in the local Hugging Face cache and the Hub is switched off here (HF_HUB_OFFLINE / "
        "TRANSFORMERS_OFFLINE is set): unset it to download me/not-cached, download it once where the Hub can be reached "
        "(`hf download me/not-cached`), or pass a local folder"]
    assert not (tmp_path / "a").exists()


def test_train_on_an_ordinary_hub_model_is_plain_lora(tiny_dir, offline_hub, alpaca_file, tmp_path):
    """A hub repo without loram_plan.json is an original model: plain LoRA, as before (the plan probe finds none)."""
    offline_hub("me/tiny", tiny_dir)
    assert main(["train", "me/tiny", "-o", str(tmp_path / "a"), "--data", str(alpaca_file), *TRAIN]) == 0
    meta = read_meta(tmp_path / "a")
    assert meta["stage"] == "original" and meta["base_name"] == "me/tiny"
