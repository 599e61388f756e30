"""--precision auto|bf16|fp16|fp32: one rule for every command (loram.device), the Trainer's flags it gives,
the old --bf16 switch, NF4's compute and storage dtypes, and NF4 quantised layer by layer on the device."""

import gc

import pytest
import torch

from loram.device import compute_dtype, enable_tf32, trainer_precision
from loram.errors import LoramError
from loram.settings import precision_of


def _gpu(monkeypatch, major: int):
    """A CUDA device of compute capability major.0 (bf16 and TF32 from Ampere, 8.0, on)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (major, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: major >= 8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: f"sm_{major}0")
    # enable_tf32 flips these process-wide switches: monkeypatch puts them back
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("major,auto", [(9, torch.bfloat16), (8, torch.bfloat16), (7, torch.float16)])
def test_auto_by_cuda_capability(monkeypatch, major, auto):
    _gpu(monkeypatch, major)
    assert compute_dtype("auto", "cuda:0") == auto  # Hopper / Ampere: bf16; Volta: fp16 (+ loss scaling)
    assert not torch.backends.cuda.matmul.allow_tf32  # TF32 only for fp32 compute
    assert compute_dtype("fp32", "cuda:0") == torch.float32
    assert torch.backends.cuda.matmul.allow_tf32 == (major >= 8) == torch.backends.cudnn.allow_tf32
    if major < 8:
        with pytest.raises(LoramError, match="no bf16"):
            compute_dtype("bf16", "cuda:0")


def test_cpu_auto_is_fp32_and_no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert compute_dtype("auto", "cpu") == torch.float32  # bf16 backward is 60-150x slower on the CPUs we measured
    assert compute_dtype(None, "cpu") == torch.float32
    assert not enable_tf32(torch.float32, "cpu") and not torch.backends.cuda.matmul.allow_tf32


def test_bf16_switch_is_precision_bf16():
    assert precision_of("auto", bf16=True) == precision_of("bf16", bf16=True) == precision_of("bf16") == "bf16"
    assert precision_of("fp32") == "fp32" and precision_of(None) == "auto"
    with pytest.raises(LoramError, match="--bf16 and --precision fp16 disagree: drop --bf16"):
        precision_of("fp16", bf16=True)


def test_trainer_flags_per_precision():
    cuda = torch.device("cuda:0")  # trainer_precision only reads the device type
    assert trainer_precision(torch.bfloat16, cuda) == {"bf16": True, "fp16": False}
    assert trainer_precision(torch.float16, cuda) == {"bf16": False, "fp16": True}  # fp16: the Trainer's loss scaling
    assert trainer_precision(torch.float32, cuda) == {"bf16": False, "fp16": False}
    assert trainer_precision(torch.bfloat16, "cpu") == {"bf16": True, "fp16": False}
    with pytest.raises(LoramError, match="fp16 trains with loss scaling, which needs a CUDA GPU"):
        trainer_precision(torch.float16, "cpu")


@pytest.mark.parametrize("kw,bf16", [({}, False), ({"precision": "fp32"}, False), ({"precision": "bf16"}, True),
                                     ({"bf16": True}, True)])
def test_train_gets_the_trainer_flags_and_weights_of_its_precision(tiny_dir, alpaca_file, tmp_path, kw, bf16):
    """CPU: auto trains in fp32 (weights fp32, no autocast); bf16 (or the old bf16: true) in bf16."""
    from transformers import TrainerCallback

    from loram.train import TrainConfig, train

    seen = {}

    class Args(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **k):
            seen.update(bf16=args.bf16, fp16=args.fp16,
                        frozen={p.dtype for p in model.parameters() if not p.requires_grad},
                        lora={p.dtype for p in model.parameters() if p.requires_grad})

    train(tiny_dir, tmp_path / "A", TrainConfig(data=[str(alpaca_file)], steps=1, micro_batch=2, seq_len=32, **kw), callbacks=[Args()])
    assert seen["bf16"] is bf16 and seen["fp16"] is False
    assert seen["frozen"] == {torch.bfloat16 if bf16 else torch.float32}
    assert seen["lora"] == {torch.float32}  # the trained matrices stay fp32 (PEFT upcasts them)


def test_cli_bf16_and_other_precision_refused_before_load(tiny_dir, alpaca_file, tmp_path, capsys, monkeypatch):
    import loram.train
    from loram.cli import main

    monkeypatch.setattr(loram.train, "load_base", lambda *a, **k: pytest.fail("the weights were loaded before the error"))
    rc = main(["train", str(tiny_dir), "--data", str(alpaca_file), "-o", str(tmp_path / "A"), "--bf16", "--precision", "fp16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: --bf16 and --precision fp16 disagree: drop --bf16 (it means --precision bf16)"
    assert not (tmp_path / "A").exists()


# ---- NF4: compute dtype and storage ----------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned(tiny_dir, tmp_path_factory):
    from loram.prune import prune

    return prune(str(tiny_dir), tmp_path_factory.mktemp("p") / "P", method="magnitude", ratio=0.5, layers="1:3").out


def _nf4_parts(model):
    """(float parameter dtypes outside NF4, NF4 compute dtypes) of a quantised model."""
    import bitsandbytes as bnb

    q = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    rest = {p.dtype for n, p in model.named_parameters() if not isinstance(p, bnb.nn.Params4bit)}
    return q, rest, {m.compute_dtype for m in q}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nf4_rest_is_stored_in_the_compute_dtype(pruned, tiny_dir, dtype):
    """Embeddings, lm_head and norms in the compute dtype (bf16: not fp32 beside bf16 compute), NF4's
    compute dtype the same, for a pruned folder and for an original (plain QLoRA)."""
    pytest.importorskip("bitsandbytes")
    from loram.train import load_base

    for folder in (pruned, tiny_dir):
        model, _, _ = load_base(folder, "nf4", dtype, "cpu")
        q, rest, compute = _nf4_parts(model)
        assert len(q) == 7 * model.config.num_hidden_layers
        assert rest == {dtype} and compute == {dtype}
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep their precision


def _nf4_bytes(model) -> dict:
    import bitsandbytes as bnb

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            s = m.weight.quant_state
            out[n] = (m.weight.data.clone(), s.absmax.clone(), s.state2.absmax.clone(), s.offset.clone())
    return out


def test_layer_by_layer_nf4_gives_the_same_bytes_and_holds_one_layer_of_fp32(pruned, monkeypatch):
    """The streamed load quantises layer i while only layer i's fp32 linears exist, and the NF4 codes and
    scales are byte for byte those of quantising the whole fp32 model (the old way)."""
    pytest.importorskip("bitsandbytes")
    import loram.loading as loading
    from loram.nf4 import quantize_nf4
    from loram.weights import Weights

    from torch.multiprocessing.reductions import StorageWeakRef

    alive = []  # (weak reference to the storage, bytes) of every fp32 tensor read from the checkpoint
    real_get, real_quantize = Weights.get, loading.quantize_block_nf4

    def get(self, name, *a, **k):
        t = real_get(self, name, *a, **k)
        if t.dtype == torch.float32:
            alive.append((StorageWeakRef(t.untyped_storage()), t.numel() * 4))
        return t

    def fp32_bytes() -> int:
        gc.collect()
        return sum(n for r, n in alive if not r.expired())

    peaks = []

    def quantize(block, *a, **k):
        peaks.append((fp32_bytes(), sum(p.numel() * 4 for p in block.parameters())))
        return real_quantize(block, *a, **k)

    monkeypatch.setattr(Weights, "get", get)
    monkeypatch.setattr(loading, "quantize_block_nf4", quantize)
    streamed, _ = loading.load_pruned_model(pruned, quantize="nf4", dtype=torch.bfloat16, device_map="cpu")
    assert len(peaks) == streamed.config.num_hidden_layers
    # at each layer's quantisation: its own fp32 tensors at most, nothing left over from earlier layers
    assert all(0 < held <= layer for held, layer in peaks), peaks
    assert fp32_bytes() == 0  # and none once loaded: the rest is bf16
    monkeypatch.undo()

    whole = quantize_nf4(loading.load_pruned_model(pruned)[0], torch.bfloat16, device="cpu")  # the whole-model path
    a, b = _nf4_bytes(streamed), _nf4_bytes(whole)
    assert a.keys() == b.keys() and a
    for n in a:
        assert all(torch.equal(x, y) for x, y in zip(a[n], b[n])), n


# ---- the training loop: host syncs and held-out perplexity under several ranks --------------------
def test_non_finite_check_syncs_once_per_logging_step_not_per_micro_step(tiny_dir, alpaca_file, tmp_path, monkeypatch):
    """The loss's finiteness is looked at (a host sync, an all_reduce under torchrun) when the Trainer logs
    or saves and at the last step: 4 optimizer steps x 2 micro-steps, logging every 2 -> 2 checks, not 8."""
    import loram.training.trainer as T
    from loram.train import TrainConfig, train

    checks, micro = [], []
    real = T._trainer_class

    def counting():
        base = real()

        class Counting(base):
            def training_step(self, *a, **k):
                micro.append(self.state.global_step)
                return super().training_step(*a, **k)

            def stop_if_non_finite(self):
                checks.append(self.state.global_step)
                return super().stop_if_non_finite()

        return Counting

    monkeypatch.setattr(T, "_trainer_class", counting)
    train(tiny_dir, tmp_path / "A", TrainConfig(data=[str(alpaca_file)], steps=4, grad_accum=2, logging_steps=2, micro_batch=2,
                                                seq_len=32))
    assert len(micro) == 8 and checks == [2, 4]


def test_rank_share_covers_every_row_once_with_equal_batches():
    from loram.eval.scoring import IGNORE
    from loram.training.trainer import rank_share

    rows = [([i, i + 1, i + 2], [i, i + 1, i + 2]) for i in range(7)]
    for world in (1, 2, 3, 8):
        shares = [rank_share(rows, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # FSDP: every rank runs as many forwards
        scored = [x for s in shares for x in s if any(t != IGNORE for t in x[1])]
        assert sorted(scored) == sorted(rows)  # each row scored by exactly one rank
    assert rank_share([], 0, 2) == []


DDP_EVAL = '''
import json, os, sys
import loram.training.trainer as T
from transformers import TrainerCallback
from loram.data import eval_sets
from loram.eval.ppl import perplexity_examples
from loram.io import load_tokenizer
from loram.train import TrainConfig, train

model, data_file, out, log = sys.argv[1:5]
scored, kept = [], {}
real = T.loglik_sums
T.loglik_sums = lambda m, ex, *a, **k: scored.append(len(ex)) or real(m, ex, *a, **k)

class Keep(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kw):
        kept["model"] = model

cfg = TrainConfig(data=[data_file], steps=2, micro_batch=2, lr=1e-2, seq_len=64, eval={"x": data_file})
r = train(model, out, cfg, callbacks=[Keep()])
full = perplexity_examples(kept["model"], eval_sets(load_tokenizer(model), cfg)[0]["x"], 0, 2)  # this rank alone, every row
json.dump({"ppl": r.eval_ppl["x"], "full": full, "scored": scored}, open(f"{log}.{os.environ['RANK']}.json", "w"))
'''


def test_two_ranks_share_the_held_out_set_and_agree(tiny_dir, alpaca_file, tmp_path):
    """torchrun, 2 CPU ranks: each scores half the --eval rows, and the all-reduced perplexity is the one
    a single process computes over every row with the same weights."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_EVAL)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                        str(tiny_dir), str(alpaca_file), str(tmp_path / "A"), str(tmp_path / "log")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"log.{i}.json").read_text()) for i in (0, 1))
    rows = len(alpaca_file.read_text().splitlines())
    assert r0["scored"] == r1["scored"] == [-(-rows // 2)]  # one evaluation (the last step), half the rows each
    assert r0["ppl"] == r1["ppl"]
    assert abs(r0["ppl"] - r0["full"]) < 1e-5 * r0["full"]


# ---- the planner: GPU terms and the shared default ------------------------------------------------
def test_planner_gpu_terms_only_on_cuda():
    from dataclasses import replace

    from loram.planner import PruneSpec, TrainSettings, predict, preset_config
    from loram.planner.memory import CUBLAS_WORKSPACE, GB, GPU_CONTEXT_GB, GPU_RESERVE_FRACTION, GPU_TERMS

    config, spec = preset_config("Llama-2-7B"), PruneSpec("structured", 0.65)
    s = TrainSettings(seq_len=256, precision="bf16", grad_checkpointing=True)
    gpu, cpu = (predict(config, spec, replace(s, device=d)).schemes["QLoRAM"] for d in ("cuda", "cpu"))
    assert not set(GPU_TERMS) & set(cpu.terms) and cpu.total == cpu.allocated
    assert set(GPU_TERMS) <= set(gpu.terms)
    t = gpu.terms
    assert t["gpu_context"] == GPU_CONTEXT_GB * GB and t["gpu_cublas_workspace"] == CUBLAS_WORKSPACE and t["gpu_nccl"] == 0
    # the tensors are the same on both but the NF4 dequantisation (one CUDA kernel into the compute dtype
    # vs bitsandbytes' three-tensor torch path on a CPU); the GPU adds its workspace to what torch allocates ...
    assert gpu.allocated - gpu.terms["nf4_dequant"] == cpu.allocated - cpu.terms["nf4_dequant"] + CUBLAS_WORKSPACE
    assert cpu.terms["nf4_dequant"] == (4 + 2 * 2) * gpu.terms["nf4_dequant"] // 2  # bf16: 2 bytes vs 4 + 2 * 2
    # ... and the device holds the allocator's reserve on top of that, and the CUDA context outside it
    assert t["gpu_allocator_reserve"] == int(GPU_RESERVE_FRACTION * (gpu.allocated - t["weights"]))
    assert gpu.total == gpu.allocated + t["gpu_allocator_reserve"] + t["gpu_context"]
    ddp = predict(config, spec, replace(s, world=2)).schemes["QLoRAM"]
    assert ddp.terms["gpu_nccl"] > 0.25 * GB and ddp.total > gpu.total  # NCCL buffers + DDP's gradient buckets


def test_plan_and_train_share_the_precision_default(monkeypatch):
    """One default: `loram train`, `loram plan` and the planner's TrainSettings all say auto, and auto means
    the same dtype in the planner and in training on each device."""
    import argparse

    from loram import settings
    from loram.cli import plan as verb
    from loram.configs import TrainConfig
    from loram.device import DTYPES, resolve_precision
    from loram.planner import TrainSettings

    p = argparse.ArgumentParser()
    verb.add(p.add_subparsers())
    a = p.parse_args(["plan", "SmolLM2-135M"])
    assert a.precision == TrainSettings().precision == TrainConfig(data=[]).precision == settings.knobs("train")["precision"].default
    assert a.precision == "auto" and a.device == TrainSettings().device == "cuda"
    assert DTYPES[TrainSettings(device="cpu").compute] == resolve_precision("auto", "cpu") == torch.float32
    _gpu(monkeypatch, 9)
    assert DTYPES[TrainSettings(device="cuda").compute] == resolve_precision("auto", "cuda:0") == torch.bfloat16
    assert TrainSettings(device="cpu").act_bytes == 4 and TrainSettings().act_bytes == 2
    with pytest.raises(LoramError, match="precision 'int8' is not one of auto, bf16, fp16, fp32"):
        _ = TrainSettings(precision="int8").act_bytes


@pytest.mark.parametrize("verb", ["train", "align"])
def test_fp16_on_cpu_refused_before_load(verb, tiny_dir, alpaca_file, tmp_path, capsys, monkeypatch):
    import loram.loading
    import loram.train
    from loram.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 trains there")
    for mod, name in ((loram.train, "load_base"), (loram.loading, "load_pruned_model")):
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("the weights were loaded before the error"))
    rc = main([verb, str(tiny_dir), "--data", str(alpaca_file), "-o", str(tmp_path / "A"), "--precision", "fp16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("error: --precision fp16 trains with loss scaling, which needs a CUDA GPU: "
                               "use --precision fp32 on cpu (or bf16)")
    assert not (tmp_path / "A").exists()
