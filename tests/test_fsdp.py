"""FSDP (version 2, `fully_shard`) on two CPU ranks (torchrun, gloo) through the real CLI, Trainer and
accelerate: `loram train` writes the same adapter and `loram align` the same aligned model as one
process, the parameters really were DTensor shards, and a sparse model's zeros stay exactly zero.

accelerate 1.15 never turns a CPU run (MULTI_CPU) into FSDP, so the torchrun children get the
test-only shim tests/fsdp_cpu/sitecustomize.py on PYTHONPATH: it makes that one switch and records
what accelerate's fsdp2_prepare_model returned on each rank. Everything else is the product's code.

Why the results can be compared: the data is exactly one global batch (4 rows / 4 blocks), so every
step sees the same rows in one process (micro-batch 4) and on two ranks (2 x 2) whatever the sampler's
order; LoRA dropout is off. What remains is fp32 summation order. Measured: FSDP equals 2-rank DDP
(train bit for bit, align within 2e-7). One process vs two ranks after 3 AdamW steps at lr 1e-2: the
adapter within 3e-7; the aligned model within 1e-5 except single elements (1 in ~1,000, max 9e-5)
whose gradient is at rounding level: AdamW moves every weight by about lr * sign(grad), so there the
rounding decides the sign. A wrong gather or a lost step differs by ~lr = 1e-2 on most elements.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_align import make_sparse
from test_errors import fails

import loram.loading
import loram.train
from loram.cli import main
from loram.training.distributed import check_engine

SHIM = Path(__file__).parent / "fsdp_cpu"
TIGHT, LOOSE = 1e-5, 1e-3  # fp32 reduce order through AdamW: nearly all elements / the worst one (module docstring)
COMMON = ["--steps", "3", "--lr", "1e-2", "--quiet"]

# the FSDP runs need torch.distributed with gloo (CPU builds without it exist, e.g. some macOS wheels)
gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                          reason="torch.distributed with the gloo backend is not available in this torch build")

RANKS = textwrap.dedent('''
    import json, sys
    from loram.cli import main

    train, align = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    assert main(train) == 0 and main(align) == 0
''')


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """One process and two FSDP ranks, each running `loram train` then `loram align` on the same inputs."""
    d = tmp_path_factory.mktemp("fsdp")
    rows = [{"instruction": f"add {a} {b}", "input": "", "output": str(a + b)} for a, b in ((0, 1), (2, 3), (4, 5), (6, 7))]
    (d / "four.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "four.txt").write_text("\n".join(f"the river {i} runs to the sea and back {i * 3}" for i in range(4)))  # 4 blocks of 32
    sparse = make_sparse(tiny_dir, d / "sparse")

    def argv(out: str, micro_batch: int) -> tuple[list[str], list[str]]:
        mb = ["--micro-batch", str(micro_batch)]
        return (["train", str(tiny_dir), "-o", str(d / f"{out}-adapter"), "--data", str(d / "four.jsonl"), "--dropout", "0",
                 "--seq-len", "64", *mb, *COMMON],
                ["align", str(sparse), "-o", str(d / f"{out}-aligned"), "--data", str(d / "four.txt"), "--seq-len", "32",
                 "--weight-decay", "0.1", *mb, *COMMON])

    for cmd in argv("one", 4):
        assert main(cmd) == 0
    script = d / "ranks.py"
    script.write_text(RANKS)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]), LORAM_TEST_FSDP_CPU=str(d / "mark"),
               # what `accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP` exports
               ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
               FSDP_TRANSFORMER_CLS_TO_WRAP="LlamaDecoderLayer")
    train, align = argv("fsdp", 2)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                        json.dumps(train), json.dumps(align)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return d, sparse


@gloo
def test_runs_were_sharded(runs):
    d, _ = runs
    marks = [json.loads((d / f"mark.{call}.{rank}.json").read_text()) for call in (1, 2) for rank in (0, 1)]
    for m in marks:  # train (call 1) and align (call 2), both ranks: every parameter a DTensor, each rank half of them
        assert m["params"] > 0 and m["dtensor"] == m["params"], m
        assert m["local_numel"] < m["global_numel"], m


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert diff.max() < LOOSE and (diff > TIGHT).float().mean() < 1e-3, (diff.max(), (diff > TIGHT).sum())


@gloo
def test_fsdp_adapter_equals_one_process(runs, tiny_dir):
    d, _ = runs
    one, fsdp = (load_file(str(d / f"{w}-adapter" / "adapter_model.safetensors")) for w in ("one", "fsdp"))
    layers = json.loads((tiny_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(one) == layers * 7 * 2  # every LoRA A and B of every layer's 7 default targets: none lost as a shard
    assert_close(one, fsdp)
    assert max(v.abs().max().item() for k, v in fsdp.items() if "lora_B" in k) > 10 * LOOSE  # B starts at 0: it trained


@gloo
def test_fsdp_aligned_model_equals_one_process_and_keeps_zeros(runs):
    d, sparse = runs
    src = load_file(str(sparse / "model.safetensors"))
    one, fsdp = (load_file(str(d / f"{w}-aligned" / "model.safetensors")) for w in ("one", "fsdp"))
    assert_close(one, fsdp)
    checked = 0
    for k, w in src.items():
        if ".layers." in k and k.endswith("proj.weight") and 1 <= int(k.split(".")[2]) < 5:
            zero = w == 0
            assert zero.float().mean() > 0.3 and bool((fsdp[k][zero] == 0).all()), k  # exactly zero, on every shard
            assert (fsdp[k][~zero] - w[~zero]).abs().max() > 5 * LOOSE, k  # the kept weights trained (by ~lr)
            checked += 1
    assert checked == 4 * 7
    assert torch.equal(src["model.embed_tokens.weight"], fsdp["model.embed_tokens.weight"])  # frozen, gathered intact
    plan = json.loads((d / "fsdp-aligned" / "loram_plan.json").read_text())
    assert plan["extra"]["aligned"]["sparse_masks"] == 28


# ---- engine combinations refused before anything is loaded ----------------------------------------
@pytest.fixture
def no_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("loaded a model before refusing")

    monkeypatch.setattr(loram.train, "load_base", refuse)
    monkeypatch.setattr(loram.loading, "load_pruned_model", refuse)


def test_qlora_under_fsdp_is_refused(capsys, monkeypatch, no_load, tiny_dir, alpaca_file, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    fails(capsys, "train", tiny_dir, "-o", tmp_path / "a", "--data", alpaca_file, "--quantize", "nf4",
          expect="--quantize nf4` under FSDP is not supported", out=tmp_path / "a")


def test_sparse_align_under_deepspeed_is_refused(capsys, monkeypatch, no_load, tiny_dir, tmp_path):
    sparse = make_sparse(tiny_dir, tmp_path / "sparse")
    (tmp_path / "c.txt").write_text("some text\n")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    fails(capsys, "align", sparse, "-o", tmp_path / "al", "--data", tmp_path / "c.txt",
          expect="of a sparse plan under DeepSpeed cannot keep the pruned zeros", out=tmp_path / "al")


def test_sparse_align_under_fsdp1_flat_params_is_refused(capsys, monkeypatch, no_load, tiny_dir, tmp_path):
    sparse = make_sparse(tiny_dir, tmp_path / "sparse")
    (tmp_path / "c.txt").write_text("some text\n")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "false")  # `accelerate launch --use_fsdp --fsdp_use_orig_params false`
    fails(capsys, "align", sparse, "-o", tmp_path / "al", "--data", tmp_path / "c.txt",
          expect="under FSDP1 needs the original parameters", out=tmp_path / "al")
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_engine("align", sparse=True)  # FSDP2 keeps every parameter by name: accepted


def test_zero3_without_gathering_is_refused(capsys, monkeypatch, no_load, tiny_dir, alpaca_file, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")  # what `accelerate launch --zero_stage 3` exports
    fails(capsys, "train", tiny_dir, "-o", tmp_path / "a", "--data", alpaca_file,
          expect="under DeepSpeed ZeRO-3 could not collect the trained weights", out=tmp_path / "a")
    cfg = tmp_path / "ds.json"  # the same from a --deepspeed_config_file
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(cfg))
    fails(capsys, "train", tiny_dir, "-o", tmp_path / "a", "--data", alpaca_file,
          expect="--zero3_save_16bit_model true", out=tmp_path / "a")
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}))
    check_engine("train")  # gathering on: accepted
