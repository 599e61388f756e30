"""Structured pruning, the plan format, the pruned folder and the fingerprint."""

import json
import math

import pytest
import torch

from loram.families import geometry, layer_module
from loram.fingerprint import fingerprint_model, fingerprint_safetensors, same_model
from loram.loading import load_pruned
from loram.prune import prune
from loram.prune_plan import PLAN_FILE, PrunePlan, kept_kv_groups, kept_mlp_channels, parse_layers
from loram.pruned_model import count_params
from loram.testing import TINY, save_tiny, tiny_model
from loram.weights import safetensors_files


def test_rounding_follows_the_paper():
    # LLaMA-3.1-70B at 0.85: 28672 channels -> keep 28672 - ceil(24371.2) = 4300; 8 KV heads -> 8 - 6 = 2
    assert kept_mlp_channels(28672, 0.85) == 28672 - math.ceil(28672 * 0.85) == 4300
    assert kept_kv_groups(8, 0.85) == 2
    assert kept_kv_groups(3, 0.5) == 2 and kept_kv_groups(2, 0.99) == 1
    assert parse_layers(None, 80) == (4, 78)
    assert parse_layers("2:5", 6) == (2, 5)


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("method", ["random", "magnitude", "taylor"])
def test_prune_save_reload_same_logits(tmp_path, family, method):
    base = save_tiny(tmp_path / "base", family)
    r = prune(str(base), tmp_path / "p", method=method, ratio=0.5, attn_ratio=0.5, calib_samples=2, calib_seq_len=32)
    plan = PrunePlan.load(tmp_path / "p")
    g = geometry(plan.base_config())
    # plan records what the paper's rounding keeps, for every pruned layer
    assert set(plan.pruned) == set(range(*plan.layers))
    for lp in plan.pruned.values():
        assert len(lp.mlp_keep) == kept_mlp_channels(g.intermediate, 0.5)
        assert len(lp.kv_keep) == kept_kv_groups(g.n_kv_heads, 0.5)
    m = load_pruned(tmp_path / "p")
    assert count_params(m) == r.params_pruned == plan.extra["params_pruned"] < r.params_original
    # in-memory pruned model (the one prune saved) == reloaded model
    from transformers import AutoModelForCausalLM

    from loram.pruned_model import apply_plan

    ref = apply_plan(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), plan).eval()
    x = torch.randint(3, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(ref(input_ids=x).logits, m(input_ids=x).logits)
    # each pruned module holds exactly the original's kept rows/cols
    i = plan.layers[0]
    w0 = layer_module(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), i, "q").weight
    assert torch.equal(layer_module(m, i, "q").weight, w0[plan.kept_index(i, "q", g)])


def test_nf4_reload_within_quantisation_tolerance(tmp_path):
    base = save_tiny(tmp_path / "base", "llama-gqa", hidden_size=96, intermediate_size=128)
    prune(str(base), tmp_path / "p", method="magnitude", ratio=0.5)
    m = load_pruned(tmp_path / "p")
    q = load_pruned(tmp_path / "p", quantize="nf4")
    assert "Linear4bit" in type(layer_module(q, 2, "gate")).__name__
    assert count_params(q) == count_params(m)
    # quantisation tolerance: per weight NF4 error is ~9 % on Gaussian weights; the NF4 model must compute
    # exactly what the model with its dequantised weights computes (up to bf16 compute)
    import bitsandbytes.functional as F

    from loram.families import ROLES

    ref = load_pruned(tmp_path / "p")
    with torch.no_grad():
        for i in range(ref.config.num_hidden_layers):
            for role in ROLES:
                lq = layer_module(q, i, role)
                w = F.dequantize_4bit(lq.weight.data, lq.weight.quant_state).float()
                w0 = layer_module(m, i, role).weight
                assert ((w - w0).norm() / w0.norm()) < 0.12
                layer_module(ref, i, role).weight.copy_(w)
    x = torch.randint(3, 256, (1, 24))
    with torch.no_grad():
        a, b = ref(input_ids=x).logits, q(input_ids=x).logits
    assert ((a - b).norm() / a.norm()) < 0.03


def test_taylor_and_magnitude_keep_important_units(tmp_path):
    """Channels/groups whose weights are all zero carry no importance: both scorers drop them first."""
    model = tiny_model("llama-gqa")
    g = geometry(model.config)
    dead_ch, dead_grp = [0, 5, 7], [1]
    with torch.no_grad():
        for i in range(g.n_layers):
            for role in ("gate", "up"):
                layer_module(model, i, role).weight[dead_ch] = 0
            layer_module(model, i, "down").weight[:, dead_ch] = 0
            w = g.head_dim
            for role in ("k", "v"):
                layer_module(model, i, role).weight[1 * w:2 * w] = 0
            gw = g.group * g.head_dim
            layer_module(model, i, "q").weight[1 * gw:2 * gw] = 0
            layer_module(model, i, "o").weight[:, 1 * gw:2 * gw] = 0
    from loram.testing import tiny_tokenizer

    model.save_pretrained(tmp_path / "b")
    tiny_tokenizer().save_pretrained(tmp_path / "b")
    for method in ("magnitude", "taylor", "fisher"):
        prune(str(tmp_path / "b"), tmp_path / method, method=method, ratio=0.25, attn_ratio=0.34, calib_samples=2,
              calib_seq_len=32)
        plan = PrunePlan.load(tmp_path / method)
        for lp in plan.pruned.values():
            assert not set(dead_ch) & set(lp.mlp_keep), method
            assert not set(dead_grp) & set(lp.kv_keep), method


def test_plan_json_is_readable_and_roundtrips(tmp_path, tiny_dir):
    prune(str(tiny_dir), tmp_path / "p", method="random", ratio=0.3, attn_ratio=0.0, seed=7)
    text = (tmp_path / "p" / PLAN_FILE).read_text()
    d = json.loads(text)
    assert d["format"] == "loram-plan" and d["method"] == "random" and d["seed"] == 7
    assert d["base"]["fingerprint"]["id"] and d["base"]["config"]["model_type"] == "llama"
    assert all("kv_keep" not in v for v in d["pruned"].values())  # attn-ratio 0 keeps attention whole
    plan = PrunePlan.from_dict(d)
    assert plan.to_dict() == PrunePlan.from_dict(json.loads(plan.to_json())).to_dict()
    assert not any(ln.strip().rstrip(",").isdigit() for ln in text.splitlines())  # index lists on one line each
    # random with the same seed reproduces the plan
    prune(str(tiny_dir), tmp_path / "p2", method="random", ratio=0.3, attn_ratio=0.0, seed=7)
    assert PrunePlan.load(tmp_path / "p2").id == plan.id


def test_fingerprint_file_and_memory_agree_and_detect_changes(tmp_path):
    from transformers import AutoModelForCausalLM

    a = save_tiny(tmp_path / "a", "llama-gqa", seed=0)
    b = save_tiny(tmp_path / "b", "llama-gqa", seed=1)
    m = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    fa = fingerprint_safetensors(safetensors_files(a), m.config.to_dict())
    assert same_model(fa, fingerprint_model(m))
    assert same_model(fa, fingerprint_model(AutoModelForCausalLM.from_pretrained(a, dtype=torch.bfloat16)))
    mb = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
    assert not same_model(fa, fingerprint_safetensors(safetensors_files(b), mb.config.to_dict()))
    with torch.no_grad():
        layer_module(m, 3, "up").weight[0, 0] += 1.0  # a sampled coordinate
    assert not same_model(fa, fingerprint_model(m))
