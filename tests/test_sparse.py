"""Non-structured pruning: patterns, SparseGPT vs magnitude/Wanda, layer streaming, folders, recovery, merge."""

import copy
import gc

import pytest
import torch

from loram.errors import LoramError
from loram.families import ROLES, layer_module
from loram.prune import sparse
from loram.prune.pattern import parse_pattern
from loram.prune.sparse import layer_errors, sparse_masks, sparsify
from loram.testing import tiny_model

METHODS = ["sparsegpt", "wanda", "magnitude"]


def batches(n, seed, length=48):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (1, length), generator=g) for _ in range(n)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_unstructured_reaches_the_ratio_in_every_module(method, ratio):
    m = tiny_model("llama-bias")
    achieved = sparsify(m, method, parse_pattern("unstructured", ratio), range(1, 5), batches(4, 0))
    assert len(achieved) == 4 * len(ROLES)
    for i in range(1, 5):
        for role in ROLES:
            w = layer_module(m, i, role).weight
            frac = float((w == 0).float().mean())
            assert abs(frac - ratio) <= 0.01, (method, i, role, frac)
            assert achieved[sparse.module_name(i, role)] == pytest.approx(frac)
    assert not (layer_module(m, 0, "q").weight == 0).any()  # outside the range: untouched


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nm", ["2:4", "1:4", "3:8"])
def test_n_m_keeps_at_most_n_of_every_m_inputs(method, nm):
    n, m_ = (int(x) for x in nm.split(":"))
    model = tiny_model("qwen2")
    sparsify(model, method, parse_pattern(nm, None), range(0, 6), batches(3, 1))
    for i in range(6):
        for role in ROLES:
            w = layer_module(model, i, role).weight
            full = w.shape[1] - w.shape[1] % m_
            nz = (w[:, :full] != 0).reshape(w.shape[0], -1, m_).sum(2)
            assert int(nz.max()) <= n, (method, nm, i, role)
            assert float((nz == n).float().mean()) > 0.99  # exactly M - N removed (random weights have no zeros)


def test_sparsegpt_reconstructs_layers_better_than_magnitude_and_wanda():
    """Layer-output error on held-out sequences, same sparsity, a tiny random model."""
    dense = tiny_model("llama-gqa", seed=2)
    calib, held = batches(16, 10, 64), batches(4, 11, 64)
    for pat in ("unstructured", "2:4"):
        err = {}
        for method in METHODS:
            p = copy.deepcopy(dense)
            sparsify(p, method, parse_pattern(pat, 0.5 if pat == "unstructured" else None), range(0, 6), calib)
            e = layer_errors(dense, p, range(0, 6), held)
            err[method] = sum(e.values()) / len(e)
        assert err["sparsegpt"] < 0.85 * err["magnitude"], (pat, err)
        assert err["sparsegpt"] < 0.85 * err["wanda"], (pat, err)


def test_sparsegpt_with_identity_hessian_is_magnitude():
    """No input correlation: OBS has nothing to compensate, the mask is the smallest |w| of each block."""
    from loram.prune.sparsegpt import sparsegpt

    torch.manual_seed(0)
    w = torch.randn(16, 40)
    out = sparsegpt(w, torch.eye(40), parse_pattern("unstructured", 0.5), block=40, damp=0.0)
    k = w.abs().flatten().kthvalue(320).values
    assert torch.equal(out, torch.where(w.abs() <= k, torch.zeros_like(w), w))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_streaming_holds_one_layers_statistics_at_a_time(method):
    seen = []

    def probe(layer):
        gc.collect()
        seen.append((layer, sorted({s.layer for s in sparse.LIVE_STATS})))

    sparsify(tiny_model("mistral"), method, parse_pattern("unstructured", 0.5), range(0, 6), batches(3, 2), observer=probe)
    assert seen == [(i, [i]) for i in range(6)]


def test_pattern_errors():
    with pytest.raises(LoramError, match="contradicts"):
        parse_pattern("2:4", 0.3)
    with pytest.raises(LoramError, match="0 < N < M"):
        parse_pattern("4:4", None)
    with pytest.raises(LoramError, match="unstructured or N:M"):
        parse_pattern("half", None)
    assert parse_pattern("1:4", None).ratio == 0.75


def test_prune_folder_loads_with_zeros_nf4_and_masks(tmp_path, tiny_dir):
    from loram.loading import load_pruned
    from loram.prune import base_fingerprint, prune
    from loram.prune_plan import PrunePlan

    r = prune(str(tiny_dir), tmp_path / "P", method="sparsegpt", sparsity="2:4", layers="1:5", calib_samples=4, calib_seq_len=32)
    plan = PrunePlan.load(tmp_path / "P")
    assert plan.kind == "sparse" and plan.sparse["pattern"] == "2:4" and plan.layers == (1, 5)
    assert set(plan.sparse["modules"]) == {sparse.module_name(i, ro) for i in range(1, 5) for ro in ROLES}
    assert plan.base["fingerprint"] == base_fingerprint(str(tiny_dir))
    assert r.params_pruned == r.params_original > r.params_nonzero
    m = load_pruned(tmp_path / "P")
    orig = tiny_model("llama-gqa")
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in orig.state_dict().items()}
    masks = sparse_masks(m)
    assert len(masks) == 4 * len(ROLES)
    for name, keep in masks.items():
        assert abs(float(keep.float().mean()) - 0.5) < 0.01
        assert plan.sparse["modules"][name[: -len(".weight")]] == pytest.approx(1 - float(keep.float().mean()), abs=1e-6)
    with pytest.raises(LoramError, match="contradicts"):
        prune(str(tiny_dir), tmp_path / "X", method="wanda", sparsity="2:4", ratio=0.3)
    with pytest.raises(LoramError, match="structured pruning only"):
        prune(str(tiny_dir), tmp_path / "X", method="wanda", attn_ratio=0.5)

    import bitsandbytes.functional as F

    q = load_pruned(tmp_path / "P", quantize="nf4")
    lin = layer_module(q, 2, "down")
    deq = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    keep = masks["model.layers.2.mlp.down_proj.weight"]
    assert (deq[~keep] == 0).all()  # NF4 has an exact 0 code: pruned weights stay exactly zero


def test_train_recover_identity_fingerprint_and_merges(tmp_path, tiny_dir, alpaca_file):
    from safetensors.torch import load_file

    from loram.adapter import read_meta
    from loram.loading import load_pruned
    from loram.merge import merge
    from loram.prune import base_fingerprint, prune
    from loram.recover import recover
    from loram.train import TrainConfig, train

    prune(str(tiny_dir), tmp_path / "P", method="wanda", sparsity="unstructured", ratio=0.5, layers="1:5",
          calib_samples=2, calib_seq_len=32)
    train(tmp_path / "P", tmp_path / "A", TrainConfig(data=[str(alpaca_file)], steps=3, lr=1e-2, micro_batch=2))
    with pytest.raises(LoramError, match="pruned model"):
        recover(tmp_path / "A", tmp_path / "P", tmp_path / "bad")
    recover(tmp_path / "A", tiny_dir, tmp_path / "R")
    a, rec = load_file(tmp_path / "A" / "adapter_model.safetensors"), load_file(tmp_path / "R" / "adapter_model.safetensors")
    assert a.keys() == rec.keys() and all(torch.equal(a[k], rec[k]) for k in a)
    meta = read_meta(tmp_path / "R")
    assert meta["stage"] == "recovered" and meta["base_name"] == str(tiny_dir)
    assert meta["base_fingerprint"] == base_fingerprint(str(tiny_dir))

    # default: full update on the dense original; --keep-sparse: masked update on the sparse model
    merge(tiny_dir, tmp_path / "R", tmp_path / "M")
    with pytest.raises(LoramError, match="sparse pruned model as BASE"):
        merge(tiny_dir, tmp_path / "R", tmp_path / "bad", keep_sparse=True)
    merge(tmp_path / "P", tmp_path / "A", tmp_path / "MS", keep_sparse=True)
    p, dense, ms = load_pruned(tmp_path / "P"), load_file(tmp_path / "M" / "model.safetensors"), load_pruned(tmp_path / "MS")
    orig = load_file(tiny_dir / "model.safetensors")
    masks = sparse_masks(p)
    for name, keep in masks.items():
        w_p, w_ms = p.get_parameter(name), ms.get_parameter(name)
        assert torch.equal(w_ms == 0, ~keep)  # the zeros are kept exactly
        delta_dense = dense[name] - orig[name]  # the full update dW, as merged into the original
        assert (delta_dense[~keep] != 0).any()
        assert torch.allclose(w_ms - w_p, delta_dense * keep, atol=1e-6)
