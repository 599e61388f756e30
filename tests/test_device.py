"""Device and precision selection (loram.device): the rules every command shares."""

import pytest
import torch

from loram.device import default_device, local_rank, resolve_device, resolve_precision
from loram.errors import LoramError


def _cuda(monkeypatch, n=2, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")


def test_default_device_follows_local_rank(monkeypatch):
    _cuda(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device() == torch.device("cuda:1")  # not cuda:0: one copy per GPU under torchrun
    assert resolve_device("cuda") == torch.device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    monkeypatch.delenv("LOCAL_RANK")
    assert local_rank() == 0 and default_device() == torch.device("cuda:0")


def test_cpu_without_cuda(monkeypatch):
    _cuda(monkeypatch, n=0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == torch.device("cpu")
    with pytest.raises(LoramError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize("flag,msg", [("gpu", "is not a device"), ("cuda:7", "has 2 CUDA device")])
def test_bad_device(monkeypatch, flag, msg):
    _cuda(monkeypatch)
    with pytest.raises(LoramError, match=msg):
        resolve_device(flag)


def test_bad_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(LoramError, match="LOCAL_RANK"):
        local_rank()


def test_precision_auto(monkeypatch):
    assert resolve_precision("auto", "cpu") == torch.float32  # bf16 backward is 60-150x slower on CPU
    _cuda(monkeypatch, bf16=True)
    assert resolve_precision("auto", "cuda:0") == torch.bfloat16
    _cuda(monkeypatch, bf16=False)
    assert resolve_precision("auto", "cuda:0") == torch.float16  # pre-Ampere
    with pytest.raises(LoramError, match="no bf16"):
        resolve_precision("bf16", "cuda:0")
    assert resolve_precision("fp32", "cuda:0") == torch.float32
    with pytest.raises(LoramError, match="choose one of"):
        resolve_precision("int8", "cpu")


@pytest.mark.parametrize("verb", ["prune", "eval", "generate"])
@pytest.mark.parametrize("flag,msg", [("gpu", "is not a device"), ("cuda:0", "CUDA is not available")])
def test_device_flag_refused_before_any_load(verb, flag, msg, tiny_dir, tmp_path, capsys, monkeypatch):
    import loram.merge
    from loram.cli import main

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the --device check")

    monkeypatch.setattr(loram.merge, "load_with_adapter", no_load)  # generate's loader
    if flag.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 10)
    args = {"prune": ["prune", str(tiny_dir), "-o", str(tmp_path / "P")], "eval": ["eval", str(tiny_dir), "--ppl", f"t={text}"],
            "generate": ["generate", str(tiny_dir), "--prompt", "hi"]}[verb]
    assert main([*args, "--device", flag]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device") and msg in err and "\n" not in err
    assert not (tmp_path / "P").exists()


def test_device_cpu_runs(tiny_dir, tmp_path, capsys):
    from loram.cli import main

    assert main(["prune", str(tiny_dir), "-o", str(tmp_path / "P"), "--method", "magnitude", "--device", "cpu"]) == 0
    capsys.readouterr()
    # generate: the model and the prompt on the device: the library's greedy text (its device defaults to cpu)
    from loram.merge import generate

    assert main(["generate", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == generate(tiny_dir, "hi", max_new_tokens=4) + "\n"
