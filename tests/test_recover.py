"""Exactness of recovery, for every family, with and without attention pruning.

pruned model + pruned adapter  ==  original with pruned rows/cols zeroed + recovered adapter
"""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from loram.families import geometry
from loram.prune.structured import select
from loram.prune_plan import PrunePlan
from loram.pruned_model import apply_plan
from loram.recover import recover_tensors
from loram.testing import TINY, prune_tensors, tiny_model, zero_pruned

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_plan(model, attn_ratio, seed=0, method="random"):
    g = geometry(model.config)
    layers = range(1, g.n_layers - 1)
    return PrunePlan(kind="structured", method=method, layers=(1, g.n_layers - 1), mlp_ratio=0.5, attn_ratio=attn_ratio,
                     base={"name": "tiny", "config": model.config.to_dict()},
                     pruned=select(g, method, layers, 0.5, attn_ratio, seed))


def train_a_little(pm, steps=3, seed=0):
    """A few real LoRA steps so lora_B is non-zero and A moved."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        x = torch.randint(3, 256, (2, 12))
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    return pm


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("attn_ratio", [0.0, 0.5])
@pytest.mark.parametrize("fill", ["zero", "normal"])
def test_recovered_adapter_on_zeroed_original_matches_pruned(family, attn_ratio, fill):
    original = tiny_model(family, seed=1)
    plan = make_plan(original, attn_ratio)
    pruned = apply_plan(copy.deepcopy(original), plan)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    pm = train_a_little(get_peft_model(pruned, cfg))
    sd = get_peft_model_state_dict(pm)
    full = recover_tensors(sd, plan, original.config, fill=fill)

    ref = get_peft_model(zero_pruned(copy.deepcopy(original), plan), copy.deepcopy(cfg))
    res = set_peft_model_state_dict(ref, full)
    assert not res.unexpected_keys
    ref.eval()
    x = torch.randint(3, 256, (2, 16))
    with torch.no_grad():
        a, b = pm(input_ids=x).logits, ref(input_ids=x).logits
    assert (a - b).abs().max().item() < 1e-4
    # non-trivial: the adapter changed the pruned model's output
    with torch.no_grad(), pm.disable_adapter():
        assert (pm(input_ids=x).logits - a).abs().max().item() > 1e-4
    # recovery then re-pruning returns the pruned adapter exactly
    back = prune_tensors(full, plan, original.config)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_recovered_zero_outside_kept():
    original = tiny_model("llama-gqa")
    plan = make_plan(original, 0.5)
    g = geometry(original.config)
    pm = train_a_little(get_peft_model(apply_plan(copy.deepcopy(original), plan),
                                       LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    full = recover_tensors(get_peft_model_state_dict(pm), plan, original.config)
    i = next(iter(plan.pruned))
    keep = plan.kept_index(i, "down", g)
    a = full[f"base_model.model.model.layers.{i}.mlp.down_proj.lora_A.weight"]
    dropped = torch.ones(a.shape[1], dtype=torch.bool)
    dropped[keep] = False
    assert a[:, dropped].abs().sum() == 0 and a[:, keep].abs().sum() > 0
    qb = full[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"]
    qkeep = plan.kept_index(i, "q", g)
    assert qb.shape[0] == g.n_heads * g.head_dim and len(qkeep) == g.group * g.head_dim * len(plan.pruned[i].kv_keep)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
def test_cli_chain_stock_peft_and_merge(tmp_path, family, alpaca_file):
    """prune -> train -> recover -> stock PeftModel.from_pretrained -> merge, via the library functions."""
    from transformers import AutoModelForCausalLM

    from loram.merge import merge
    from loram.prune import prune
    from loram.recover import recover
    from loram.testing import save_tiny
    from loram.train import TrainConfig, train

    base = save_tiny(tmp_path / "base", family, seed=3)
    prune(str(base), tmp_path / "pruned", method="taylor", ratio=0.5, calib_samples=2, calib_seq_len=32)
    train(tmp_path / "pruned", tmp_path / "adapter",
          TrainConfig(data=[str(alpaca_file)], steps=4, lr=1e-2, micro_batch=2, logging_steps=1))
    recover(tmp_path / "adapter", base, tmp_path / "rec")
    merge(base, tmp_path / "rec", tmp_path / "merged")

    orig = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns on missing/unexpected keys: fail on any
        pm = PeftModel.from_pretrained(copy.deepcopy(orig), tmp_path / "rec")
    from safetensors.torch import load_file

    file_sd = load_file(tmp_path / "rec" / "adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}
    assert set(loaded) == set(file_sd)
    assert all(torch.equal(loaded[k], file_sd[k]) for k in file_sd)

    # merged original differs from the original only at kept coordinates of targeted modules
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    plan = PrunePlan.load(tmp_path / "pruned")
    g = geometry(orig.config)
    from loram.families import COL_PRUNED, ROLES, layer_module

    changed_any = False
    for i in range(g.n_layers):
        for role in ROLES:
            w0, w1 = layer_module(orig, i, role).weight, layer_module(merged, i, role).weight
            diff = (w0 - w1).abs() > 0
            changed_any |= bool(diff.any())
            idx = plan.kept_index(i, role, g)
            if idx is None:
                continue
            outside = torch.ones(w0.shape[1 if role in COL_PRUNED else 0], dtype=torch.bool)
            outside[idx] = False
            sl = diff[:, outside] if role in COL_PRUNED else diff[outside]
            assert not sl.any(), f"layer {i} {role} changed outside the kept coordinates"
    assert changed_any
    on = dict(orig.named_parameters())
    for n, p in merged.named_parameters():
        if not any(t in n for t in TARGETS):
            assert torch.equal(p, on[n]), n


def test_plain_lora_adapter_records_the_original_fingerprint_and_merges(tmp_path, tiny_dir, alpaca_file):
    """A plain (unpruned) QLoRA adapter records the fingerprint of the original weights (taken
    before NF4 quantisation), so loram's own merge accepts it on that base."""
    from loram.adapter import read_meta
    from loram.fingerprint import same_model
    from loram.merge import merge
    from loram.prune import base_fingerprint
    from loram.train import TrainConfig, train

    train(tiny_dir, tmp_path / "plain", TrainConfig(data=[str(alpaca_file)], steps=2, micro_batch=2, quantize="nf4"))
    meta = read_meta(tmp_path / "plain")
    assert meta["stage"] == "original"
    assert same_model(meta["base_fingerprint"], base_fingerprint(tiny_dir))
    merge(tiny_dir, tmp_path / "plain", tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").exists()


@pytest.mark.parametrize("fill", ["zero", "normal"])
def test_recovered_tensors_stay_on_their_device(fill):
    """Recovery builds each output on its input's device (a GPU-trained adapter stays on the GPU);
    the meta device stands in for a GPU here: a CPU-built output could not take a meta input."""
    original = tiny_model("llama-gqa")
    plan = make_plan(original, 0.5)
    pm = get_peft_model(apply_plan(copy.deepcopy(original), plan), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    sd = {k: v.to("meta") for k, v in get_peft_model_state_dict(pm).items()}
    full = recover_tensors(sd, plan, original.config, fill=fill)
    assert all(t.is_meta for t in full.values())
    g = geometry(original.config)
    i = next(iter(plan.pruned))
    assert full[f"base_model.model.model.layers.{i}.mlp.down_proj.lora_A.weight"].shape[1] == g.intermediate
