"""The one weight reader (loram.weights), its shard writer, the NF4 module's bitsandbytes check, and
loaders that return what they loaded (loram.loading)."""

import pytest
import torch
from safetensors.torch import load_file

from loram import nf4
from loram.errors import LoramError
from loram.testing import tiny_model
from loram.weights import INDEX_FILE, ShardWriter, Weights, safetensors_metadata


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights") / "m"
    m = tiny_model("llama-bias")
    m.save_pretrained(str(folder), max_shard_size="40KB")  # several shards + the index
    return folder, m.state_dict()


def test_reader_gives_every_tensor_and_one_layer_at_a_time(sharded):
    folder, sd = sharded
    w = Weights(folder, use_index=True)
    assert len(w.files) > 1
    assert set(w.names) == set(load_file_all(w.files))
    for k in w.names:
        assert torch.equal(w.get(k), sd[k]) and w.shapes[k] == tuple(sd[k].shape)
    layer = w.layer(1)
    assert layer and all(".layers.1." in k for k in layer)
    assert set(layer) == {k for k in sd if k.startswith("model.layers.1.")}  # not layers 10, 11, ...
    assert all(torch.equal(t, sd[k]) for k, t in layer.items())


def load_file_all(files):
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def test_reader_slices_rows_and_columns(sharded, monkeypatch):
    folder, sd = sharded
    w = Weights(folder)
    name = "model.layers.0.mlp.down_proj.weight"
    rows, cols = torch.tensor([0, 1, 2, 5, 7]), torch.tensor([1, 3, 4, 9])
    assert torch.equal(w.read(name, rows=rows), sd[name].index_select(0, rows))
    import loram.weights as W

    monkeypatch.setattr(W, "CHUNK_BYTES", 3 * sd[name].shape[1] * 4)  # 3-row chunks, not dividing the rows
    got = w.read(name, cols=cols, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, sd[name].index_select(1, cols).to(torch.bfloat16))


def test_shard_writer_round_trip_keeps_dtype_and_metadata(sharded, tmp_path):
    folder, sd = sharded
    src = Weights(folder)
    out = tmp_path / "out"
    out.mkdir()
    n_layers = 1 + max(int(k.split(".")[2]) for k in src.names if k.startswith("model.layers."))
    writer = ShardWriter(out, n_layers, {"note": "x"})
    for i in range(n_layers):
        writer.add(src.layer(i, dtype=torch.bfloat16))
    writer.finish(123)
    back = Weights(out, use_index=True)
    assert len(back.files) == n_layers and (out / INDEX_FILE).exists()
    assert set(back.names) == {k for k in sd if k.startswith("model.layers.")}
    for k in back.names:
        assert back.headers[k].dtype == "BF16" and torch.equal(back.get(k), sd[k].to(torch.bfloat16))
    assert safetensors_metadata(back.files[0]) == {"format": "pt", "note": "x"}
    with pytest.raises(ValueError, match="more than"):
        writer.add({"x": torch.zeros(1)})


def test_reader_refuses_a_truncated_tensor(sharded, tmp_path):
    import shutil

    folder, _ = sharded
    copy = tmp_path / "c"
    shutil.copytree(folder, copy)
    w = Weights(copy)
    f = w.headers["model.norm.weight"].file
    f.write_bytes(f.read_bytes()[:-64])  # the header still parses; the data is short
    with pytest.raises(LoramError, match="is truncated or corrupt"):
        Weights(copy).get("model.norm.weight")


# ---- NF4: bitsandbytes is checked once per process before it is used ---------------------------
def test_nf4_round_trip_of_the_installed_bitsandbytes():
    assert 0.05 < nf4.round_trip_error() < nf4.ROUND_TRIP_OK  # NF4 of a Gaussian: ~9 %


def test_nf4_refuses_a_bitsandbytes_that_quantises_wrongly(monkeypatch):
    import bitsandbytes.functional as F

    nf4.check_round_trip.cache_clear()
    monkeypatch.setattr(F, "dequantize_4bit", lambda q, state: torch.zeros(state.shape))  # what a broken build returns
    try:
        with pytest.raises(LoramError) as e:
            nf4.require_bnb()
        msg = str(e.value)
        assert "\n" not in msg and "100% relative error" in msg and msg.endswith("pip install 'bitsandbytes<0.49'")
    finally:
        nf4.check_round_trip.cache_clear()


def test_nf4_check_runs_once_per_process(monkeypatch):
    calls = []
    real = nf4.round_trip_error
    nf4.check_round_trip.cache_clear()
    monkeypatch.setattr(nf4, "round_trip_error", lambda: calls.append(1) or real())
    lin = torch.nn.Linear(64, 8, bias=False)
    nf4.nf4_linear(lin.weight.data, None)
    nf4.nf4_linear(lin.weight.data, None)
    assert calls == [1]


@pytest.mark.parametrize("shape", [(96, 64), (37, 70), (5, 26)])  # whole blocks; partial last blocks (bitsandbytes needs an even count)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_nf4_equals_bitsandbytes_whole_tensor(shape, dtype):
    """Quantising in chunks of whole blocks (bounded memory) gives bitsandbytes' own codes, absmax and
    double-quant state for the whole tensor, so the layer dequantises to the same values."""
    import bitsandbytes.functional as F

    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    want, st = F.quantize_4bit(w.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
    for chunk in (64, 128, 1 << 20):
        got, qs = nf4.quantize_codes(w, chunk=chunk)
        assert torch.equal(got, want)
        assert torch.equal(qs.absmax, st.absmax) and torch.equal(qs.state2.absmax, st.state2.absmax)
        assert torch.equal(qs.offset, st.offset) and qs.shape == st.shape and qs.dtype == st.dtype
        assert torch.equal(F.dequantize_4bit(got, qs), F.dequantize_4bit(want, st))
    lin = nf4.nf4_linear(w, None, torch.float32)
    x = torch.randn(3, shape[1])
    assert torch.equal(lin(x), x @ F.dequantize_4bit(want, st).t())


@pytest.mark.parametrize("seed", range(3))
def test_nf4_codes_equal_bitsandbytes_on_hard_values(seed):
    """Zero blocks (bitsandbytes scales them to NaN and reads code 0), values exactly on the codes and on
    the midpoints between them (ties), huge and tiny scales: the same bytes as bitsandbytes' argmin."""
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(seed)
    table = nf4.nf4_table()
    w = torch.randn(64 * 300, generator=g) * torch.logspace(-6, 3, 64 * 300)[torch.randperm(64 * 300, generator=g)]
    w[64:128] = 0  # a block of zeros
    w[128:192] = table[torch.randint(16, (64,), generator=g)] * 0.37  # on the codes
    mid = (table[1:] + table[:-1]) / 2
    w[192:256] = torch.cat([mid, mid, mid, mid, mid[:4]]) * 2.5  # on the midpoints: ties
    w[200] = 2.5  # the block's absmax: the midpoints scale back exactly
    want, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    got, qs = nf4.quantize_codes(w, chunk=64 * 7)
    assert torch.equal(got, want) and torch.equal(qs.absmax, st.absmax)


# ---- loaders return what they loaded -----------------------------------------------------------
def test_loaders_return_the_plan_and_the_fingerprint(tmp_path, tiny_dir):
    from loram.fingerprint import base_fingerprint
    from loram.loading import PLAN_ATTR, load_pruned, load_pruned_model
    from loram.prune import prune
    from loram.prune_plan import PrunePlan
    from loram.train import load_base

    prune(str(tiny_dir), tmp_path / "P", method="random", ratio=0.5)
    model, plan = load_pruned_model(tmp_path / "P")
    assert plan.id == PrunePlan.load(tmp_path / "P").id and not hasattr(model, PLAN_ATTR)
    assert load_pruned(tmp_path / "P").loram_plan.id == plan.id  # the public loader hands it to users
    m, p, fp = load_base(tmp_path / "P", None)
    assert p.id == plan.id and fp == plan.base["fingerprint"] and not hasattr(m, "loram_base_fingerprint")
    m, p, fp = load_base(str(tiny_dir), None)
    assert p is None and fp == base_fingerprint(str(tiny_dir)) and not hasattr(m, "loram_base_fingerprint")
