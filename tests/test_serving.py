"""Serving: vLLM does not serve LoRA on lm_head, so train and recover warn (one line) when lm_head is a
target and say how to serve (merge first); adapters without it get no warning."""

import pytest

from loram.recover import recover
from loram.train import TrainConfig, train

WARNING = "warning: lm_head is a LoRA target: vLLM does not serve LoRA on lm_head"


@pytest.fixture(scope="module")
def pruned_dir(tiny_dir, tmp_path_factory):
    from loram.prune import prune

    out = tmp_path_factory.mktemp("pr") / "pruned"
    prune(str(tiny_dir), out, method="magnitude", ratio=0.5)
    return out


def warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: lm_head")]


@pytest.mark.parametrize("targets", [("q", "v", "lm_head"), ("q", "v")])
def test_lm_head_target_warns_once_on_train_and_recover(targets, tiny_dir, pruned_dir, alpaca_file, tmp_path, capsys):
    cfg = TrainConfig(data=[str(alpaca_file)], steps=1, micro_batch=2, seq_len=64, targets=targets)
    capsys.readouterr()
    train(pruned_dir, tmp_path / "A", cfg)
    w = warnings(capsys)
    recover(tmp_path / "A", tiny_dir, tmp_path / "R")
    w2 = warnings(capsys)
    if "lm_head" not in targets:
        assert w == [] and w2 == []
        return
    assert len(w) == 1 and w[0].startswith(WARNING) and f"loram recover {tmp_path / 'A'} --base ORIGINAL" in w[0], w
    assert len(w2) == 1 and w2[0].startswith(WARNING) and f"loram merge {tiny_dir} {tmp_path / 'R'} -o MERGED" in w2[0], w2
