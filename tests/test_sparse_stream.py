"""Weight-streamed sparse pruning (SparseGPT / Wanda / magnitude): one decoder layer read, pruned and
written at a time gives the masks and weights of the in-memory path, in the checkpoint's dtype."""

import gc

import pytest
import torch

from loram.errors import LoramError
from loram.families import ROLES, layer_module, weight_name
from loram.prune import sparse
from loram.prune.pattern import parse_pattern
from loram.prune.sparse import prune_sparse, sparsify, sparsify_streamed
from loram.stream import LayerStream
from loram.testing import TINY, save_tiny, tiny_model
from loram.weights import Weights, safetensors_metadata, write_safetensors_metadata

CASES = [("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("wanda", "unstructured"), ("magnitude", "2:4")]
LAYERS = range(2, 5)  # neither the first nor the last layer: below it is carried forward, above it copied


def batches(n=3, seed=0, length=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (1, length), generator=g) for _ in range(n)]


def _pattern(spec):
    return parse_pattern(spec, 0.5 if spec == "unstructured" else None)


def _streamed(folder, config, method, spec, layers=LAYERS, observer=None):
    """{layer: emitted tensors} and the achieved fractions of sparsify_streamed over the saved folder."""
    ls = LayerStream(folder, config)
    emitted = {}
    achieved = sparsify_streamed(ls, method, _pattern(spec), layers, lambda i, t: emitted.__setitem__(i, t), batches(),
                                 observer=observer and (lambda i: observer(ls, i)))
    return emitted, achieved, ls


def _assert_same_sparse(streamed: torch.Tensor, dense: torch.Tensor, what):
    assert torch.equal(streamed == 0, dense == 0), what  # the very same zero positions
    torch.testing.assert_close(streamed.float(), dense.float(), rtol=1e-4, atol=1e-5, msg=what)


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("method,spec", CASES)
def test_streamed_equals_in_memory(tmp_path, family, method, spec):
    folder = save_tiny(tmp_path / family, family)
    model = tiny_model(family)
    want = sparsify(model, method, _pattern(spec), LAYERS, batches())
    emitted, achieved, _ = _streamed(folder, model.config, method, spec)
    assert sorted(emitted) == list(range(6))  # every layer handed to the writer once, in order
    assert all(emitted[i] == {} for i in range(6) if i not in LAYERS)  # left as they are on disk
    assert achieved.keys() == want.keys()
    for i in LAYERS:
        assert set(emitted[i]) == {weight_name(i, r) for r in ROLES}
        for r in ROLES:
            _assert_same_sparse(emitted[i][weight_name(i, r)], layer_module(model, i, r).weight, (family, method, i, r))
    assert achieved == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_one_layer_and_one_layers_statistics_at_a_time(tmp_path, method):
    folder = save_tiny(tmp_path / "m", "mistral")
    seen = []

    def probe(ls, i):
        gc.collect()
        resident = [j for j, b in enumerate(ls.blocks) if any(not p.is_meta for p in b.parameters())]
        devices = {p.device.type for p in ls.blocks[i].parameters()}
        assert all(p.is_meta for p in ls.model.lm_head.parameters()) and ls.model.model.embed_tokens.weight.is_meta
        seen.append((i, resident, sorted({s.layer for s in sparse.LIVE_STATS}), devices))

    _streamed(folder, tiny_model("mistral").config, method, "unstructured", observer=probe)
    carried = [] if method == "magnitude" else [(i, [i], [], {"cpu"}) for i in range(LAYERS.start)]  # magnitude needs no activations
    stats = (lambda i: []) if method == "magnitude" else (lambda i: [i])
    assert seen == carried + [(i, [i], stats(i), {"cpu"}) for i in LAYERS]  # nothing above the range is loaded


def _prune(folder, out, stream, method="sparsegpt", spec="2:4", **kw):
    return prune_sparse(str(folder), out, method, spec, layers="1:4", calib_samples=3, calib_seq_len=24, stream=stream, **kw)


@pytest.mark.parametrize("family", ["llama-gqa", "llama-bias"])  # tied embeddings; biases
def test_streamed_folder_equals_in_memory_folder(tmp_path, family):
    from safetensors.torch import load_file

    from loram.loading import load_pruned
    from loram.prune_plan import PrunePlan

    folder = save_tiny(tmp_path / family, family)
    r_mem, r_str = _prune(folder, tmp_path / "mem", False), _prune(folder, tmp_path / "str", True)
    a, b = PrunePlan.load(tmp_path / "mem"), PrunePlan.load(tmp_path / "str")
    assert b.to_dict() == a.to_dict() and b.id == a.id  # the same plan: config, fingerprint, achieved sparsity per module, counts
    assert (r_str.params_original, r_str.params_nonzero) == (r_mem.params_original, r_mem.params_nonzero)
    m_mem, m_str = load_pruned(tmp_path / "mem"), load_pruned(tmp_path / "str")  # the plan binding is checked here
    sd_mem, sd_str, orig = m_mem.state_dict(), m_str.state_dict(), load_file(folder / "model.safetensors")
    assert sd_mem.keys() == sd_str.keys()
    for k in sd_mem:
        _assert_same_sparse(sd_str[k], sd_mem[k], k)
        if k in orig and not any(f"layers.{i}." in k for i in range(1, 4)):
            assert torch.equal(sd_str[k], orig[k]), k  # outside the range: copied bit for bit
    shards = Weights(tmp_path / "str", use_index=True)
    assert len(shards.files) == 7  # one for the embeddings / norm / head, one per decoder layer
    assert all(safetensors_metadata(f) == {"format": "pt", **b.metadata()} for f in shards.files)  # bound, placeholders gone
    assert (tmp_path / "str" / "tokenizer.json").exists()


def test_same_length_metadata_is_rewritten_in_place(tmp_path):
    """How the streamed writer binds its plan at the end without copying every shard again."""
    from safetensors.torch import load_file, save_file

    f, t = tmp_path / "a.safetensors", {"x": torch.randn(4, 3), "y": torch.randn(5)}
    save_file(t, str(f), metadata={"format": "pt", "id": "0" * 16})
    inode = f.stat().st_ino
    write_safetensors_metadata(f, f, {"id": "1" * 16})
    assert f.stat().st_ino == inode and safetensors_metadata(f) == {"format": "pt", "id": "1" * 16}  # the header only
    write_safetensors_metadata(f, f, {"id": "longer than before"})  # another length: a new file
    assert f.stat().st_ino != inode and safetensors_metadata(f)["id"] == "longer than before"
    assert all(torch.equal(v, t[k]) for k, v in load_file(str(f)).items())


def test_bf16_checkpoint_gives_bf16_output(tmp_path):
    """Streamed or in memory (fp32 compute), a bf16 checkpoint gives a bf16 folder: the same fp32 result
    rounded once, the same bytes either way (an fp32 folder would be twice the size)."""
    folder = tmp_path / "bf16"
    tiny_model("qwen2").to(torch.bfloat16).save_pretrained(str(folder))
    from loram.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(str(folder))
    _prune(folder, tmp_path / "mem", False, method="wanda", spec="unstructured")
    _prune(folder, tmp_path / "str", True, method="wanda", spec="unstructured")
    w, m = Weights(tmp_path / "str", use_index=True), Weights(tmp_path / "mem")
    assert {h.dtype for h in w.headers.values()} == {h.dtype for h in m.headers.values()} == {"BF16"}
    assert w.names == m.names and all(torch.equal(w.get(k), m.get(k)) for k in w.names)


def test_stream_refuses_a_gguf_before_reading_it(tmp_path):
    pytest.importorskip("gguf")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not read")
    with pytest.raises(LoramError, match="streamed pruning reads safetensors shards and .* is a GGUF model"):
        prune_sparse(str(fake), tmp_path / "out", "magnitude", "2:4", stream=True)
    assert not (tmp_path / "out").exists()


def test_nan_in_a_streamed_layer_leaves_nothing(tmp_path):
    folder = tmp_path / "nan"
    model = tiny_model("llama-mha")
    with torch.no_grad():
        layer_module(model, 2, "up").weight[0, 0] = float("nan")
    model.save_pretrained(str(folder))
    from loram.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(str(folder))
    with pytest.raises(LoramError, match=r"weight model\.layers\.2\.mlp\.up_proj\.weight of the model contains NaN"):
        _prune(folder, tmp_path / "out", True)
    assert not (tmp_path / "out").exists()  # the layers already written went with the temporary folder


# ---- SparseGPT's Hessian in float32 ------------------------------------------------------------------
def _hard_hessian(cols=256, tokens=96):
    """Fewer tokens than inputs (H singular before dampening), correlated inputs, a few 1000x outlier features."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols**0.5)
    x[:, :3] *= 1000
    return x.t() @ x


@pytest.mark.parametrize("spec", ["unstructured", "2:4"])
def test_float32_factor_gives_the_float64_masks(monkeypatch, spec):
    from loram.prune import sparsegpt as sg

    H, W = _hard_hessian(), torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    got = sg.sparsegpt(W, H, _pattern(spec))
    real_cholesky = torch.linalg.cholesky
    monkeypatch.setattr(torch.linalg, "cholesky", lambda A, **kw: real_cholesky(A.double(), **kw))  # float64 reference
    want = sg.sparsegpt(W, H, _pattern(spec))
    assert torch.equal(got == 0, want == 0)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_float64_retry_when_the_float32_cholesky_fails(monkeypatch):
    from loram.prune import sparsegpt as sg

    real_cholesky, dtypes = torch.linalg.cholesky, []

    def fp32_fails(A, **kw):  # what an ill-conditioned float32 H does
        dtypes.append(A.dtype)
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("not positive-definite")
        return real_cholesky(A, **kw)

    H, W = _hard_hessian(), torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    want = sg.sparsegpt(W, H, _pattern("2:4"))
    monkeypatch.setattr(torch.linalg, "cholesky", fp32_fails)
    got = sg.sparsegpt(W, H, _pattern("2:4"))
    assert dtypes[0] == torch.float32 and torch.float64 in dtypes
    assert torch.equal(got == 0, want == 0) and got.dtype == torch.float32


def test_streamed_sparse_prune_of_a_hub_id_reads_the_snapshot(tmp_path, offline_hub):
    """A hub id streams as structured pruning streams it (loading.source_folder: its snapshot in a hub cache,
    here offline): the same masks, tensors and fingerprint as the local folder, the hub id recorded as the base."""
    from loram.prune_plan import PrunePlan

    src = save_tiny(tmp_path / "src", "llama-gqa")
    offline_hub("me/tiny", src)
    _prune("me/tiny", tmp_path / "hub", True, method="wanda")
    _prune(src, tmp_path / "local", True, method="wanda")
    a, b = PrunePlan.load(tmp_path / "hub"), PrunePlan.load(tmp_path / "local")
    assert a.base["name"] == "me/tiny" and a.base["fingerprint"] == b.base["fingerprint"]
    assert a.sparse == b.sparse and a.weights_digest() == b.weights_digest()
    wa, wb = Weights(tmp_path / "hub"), Weights(tmp_path / "local")
    assert wa.names == wb.names and all(torch.equal(wa.get(k), wb.get(k)) for k in wb.names)
