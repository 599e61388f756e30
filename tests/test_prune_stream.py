"""Layer-streamed structured pruning (loram.prune.streamed) equals the in-memory path; wanda-sp."""

import json

import pytest
import torch

from loram.errors import LoramError
from loram.families import decoder_layers, geometry, layer_module
from loram.loading import load_pruned_model
from loram.prune import prune
from loram.prune.streamed import streamed_importance
from loram.prune.structured import calibration_batches, importance, select
from loram.stream import LayerStream
from loram.testing import TINY, save_tiny, tiny_model, tiny_tokenizer
from loram.weights import Weights

LAYERS = range(1, 5)


def _batches(n=3, seq_len=20):
    return calibration_batches(tiny_tokenizer(), None, n, seq_len)[0]


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for i in a:
        for x, y in zip(a[i], b[i]):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("method", ["magnitude", "taylor", "fisher", "wanda-sp"])
def test_streamed_scores_equal_in_memory(tmp_path, family, method):
    """Same scores (rtol 1e-4) and so the same plan, for MHA, GQA, biases (llama-bias, qwen2) and tied heads."""
    folder = save_tiny(tmp_path / family, family)
    model = tiny_model(family)
    batches = _batches() if method != "magnitude" else None
    want = importance(model, method, LAYERS, batches)
    got = streamed_importance(folder, model.config, method, LAYERS, batches)
    _close(want, got)
    g = geometry(model.config)
    assert select(g, method, LAYERS, 0.5, 0.5, 0, got) == select(g, method, LAYERS, 0.5, 0.5, 0, want)
    assert all(s.abs().sum() > 0 for sc in got.values() for s in sc)  # real scores, not zeros


@pytest.mark.parametrize("method", ["random", "magnitude", "taylor", "fisher", "wanda-sp"])
def test_streamed_prune_writes_the_in_memory_folder(tmp_path, method):
    """Same plan (same id), same parameter counts, the same tensors bit for bit (fp32), and it loads."""
    base = save_tiny(tmp_path / "base", "llama-bias")
    kw = dict(method=method, ratio=0.5, calib_samples=2, calib_seq_len=16)
    a = prune(str(base), tmp_path / "mem", stream=False, **kw)
    b = prune(str(base), tmp_path / "str", stream=True, **kw)
    assert b.plan.to_dict() == a.plan.to_dict() and b.plan.id == a.plan.id
    assert (b.params_original, b.params_pruned) == (a.params_original, a.params_pruned)
    wa, wb = Weights(tmp_path / "mem"), Weights(tmp_path / "str", use_index=True)
    assert wa.names == wb.names
    assert all(torch.equal(wa.get(k), wb.get(k)) for k in wa.names)
    assert len(wb.files) == geometry(tiny_model("llama-bias").config).n_layers + 1  # one shard per layer + the outer tensors
    model, plan = load_pruned_model(tmp_path / "str")
    ref, _ = load_pruned_model(tmp_path / "mem")
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert (tmp_path / "str" / "tokenizer.json").exists() and plan.id == a.plan.id


@pytest.mark.parametrize("stream", [True, False])
def test_bf16_checkpoint_gives_bf16_folder(tmp_path, stream):
    """The pruned folder keeps the checkpoint's dtype, streamed or in memory (fp32 compute): its tensors
    are the bf16 originals' kept slices, and its config says bf16 (an fp32 folder would be twice the size)."""
    base = tmp_path / "bf16"
    tiny_model("llama-gqa").to(torch.bfloat16).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    r = prune(str(base), tmp_path / "p", method="taylor", ratio=0.5, calib_samples=2, calib_seq_len=16, stream=stream)
    w = Weights(tmp_path / "p", use_index=True)
    assert {h.dtype for h in w.headers.values()} == {"BF16"}
    assert json.loads((tmp_path / "p" / "config.json").read_text())["dtype"] == "bfloat16"
    i = r.plan.layers[0]
    g = geometry(tiny_model("llama-gqa").config)
    orig = Weights(base).get(f"model.layers.{i}.mlp.up_proj.weight")
    assert torch.equal(w.get(f"model.layers.{i}.mlp.up_proj.weight"), orig[r.plan.kept_index(i, "up", g)])
    model, _ = load_pruned_model(tmp_path / "p")
    assert layer_module(model, i, "up").weight.shape[0] == len(r.plan.pruned[i].mlp_keep)


def test_magnitude_and_random_read_no_more_than_they_need(tmp_path, monkeypatch):
    """magnitude scores read only the scored layers (no embeddings, no lm_head); random reads no weight
    before writing, and neither loads the model."""
    import loram.prune as pr

    folder = save_tiny(tmp_path / "b", "llama-mha")
    monkeypatch.setattr(pr, "load_model", lambda *a, **k: pytest.fail("the streamed path loaded the whole model"))
    read = []
    real = Weights.read
    monkeypatch.setattr(Weights, "read", lambda self, name, *a, **k: (read.append(name), real(self, name, *a, **k))[1])
    streamed_importance(folder, tiny_model("llama-mha").config, "magnitude", range(2, 4))
    assert read and all(".layers.2." in n or ".layers.3." in n for n in read)
    read.clear()
    import loram.prune.streamed as st

    monkeypatch.setattr(st, "write_pruned", lambda *a, **k: None)  # stop before the folder is written
    prune(str(folder), tmp_path / "r", method="random", stream=True)
    assert read == []


@pytest.mark.parametrize("method", ["taylor", "fisher", "wanda-sp"])
def test_one_decoder_layer_resident_at_a_time(tmp_path, monkeypatch, method):
    folder = save_tiny(tmp_path / "b", "llama-gqa")
    loaded, real = [], LayerStream.load

    def load(self, i, requires_grad=False):
        loaded.append(i)
        assert all(p.is_meta for b in self.blocks for p in b.parameters())  # the previous layer was dropped
        return real(self, i, requires_grad)

    monkeypatch.setattr(LayerStream, "load", load)
    streamed_importance(folder, tiny_model("llama-gqa").config, method, LAYERS, _batches(2, 12))
    # taylor / fisher: forward 0..5, backward 5..1; wanda-sp: forward up to the last scored layer only
    assert loaded == ([0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1] if method != "wanda-sp" else [0, 1, 2, 3, 4])


def test_progress_per_layer(tmp_path, monkeypatch):
    import loram.prune.streamed as st

    labels = []
    monkeypatch.setattr(st, "track", lambda it, desc, **k: (labels.append(desc), it)[1])
    folder = save_tiny(tmp_path / "b", "llama-gqa")
    streamed_importance(folder, tiny_model("llama-gqa").config, "taylor", LAYERS, _batches(1, 8))
    assert labels == ["taylor: forward", "taylor: backward"]


def test_wanda_sp_sees_activations_magnitude_does_not():
    """Scaling one input feature of the MLP (its norm weight: no MLP weight changes) leaves the magnitude
    scores as they are but changes wanda-sp's ranking: the channels reading that feature most move to the top."""
    batches, layer, j = _batches(), 2, 7
    base = tiny_model("llama-mha")
    loud = tiny_model("llama-mha")
    with torch.no_grad():
        decoder_layers(loud)[layer].post_attention_layernorm.weight[j] = 100.0
    rng = range(layer, layer + 1)
    assert torch.equal(importance(base, "magnitude", rng)[layer][0], importance(loud, "magnitude", rng)[layer][0])
    quiet_sc, loud_sc = importance(base, "wanda-sp", rng, batches)[layer][0], importance(loud, "wanda-sp", rng, batches)[layer][0]
    reads_j = layer_module(loud, layer, "gate").weight[:, j].abs() + layer_module(loud, layer, "up").weight[:, j].abs()
    top = set(torch.topk(reads_j, 10).indices.tolist())
    assert top <= set(torch.topk(loud_sc, 40).indices.tolist())  # kept at ratio 0.5 (80 channels)
    assert not top <= set(torch.topk(quiet_sc, 40).indices.tolist())  # without the loud feature they were not all kept
    g = geometry(base.config)
    mag = select(g, "magnitude", rng, 0.5, 0.5, 0, importance(loud, "magnitude", rng))
    assert select(g, "wanda-sp", rng, 0.5, 0.5, 0, {layer: (loud_sc, loud_sc[:4])})[layer].mlp_keep != mag[layer].mlp_keep


def test_stream_refuses_gguf(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    try:
        import gguf  # noqa: F401
    except ImportError:
        pytest.skip("the gguf package is not installed: resolve_model refuses .gguf before the streamed check")
    with pytest.raises(LoramError, match="streamed pruning reads safetensors shards and .* is a GGUF model"):
        prune(str(f), tmp_path / "o", method="magnitude", stream=True)
    assert not (tmp_path / "o").exists()


def test_wanda_sp_from_the_cli_and_recipes(tmp_path, tiny_dir, capsys):
    """`loram prune --method wanda-sp` writes a plan of that method; a recipe's unknown prune.method fails at --dry-run."""
    import json

    from loram.cli import main
    from loram.recipe import run_recipe

    assert main(["prune", str(tiny_dir), "-o", str(tmp_path / "p"), "--method", "wanda-sp", "--calib-samples", "2",
                 "--calib-seq-len", "16"]) == 0
    assert json.loads((tmp_path / "p" / "loram_plan.json").read_text())["method"] == "wanda-sp"
    assert "wanda-sp" in capsys.readouterr().out
    r = tmp_path / "r.yaml"
    r.write_text(f"base: {tiny_dir}\nworkdir: {tmp_path / 'w'}\nprune: {{method: psychic}}\ntrain: {{data: [owner/set]}}\n")
    with pytest.raises(LoramError,
                       match="prune.method: unknown --method 'psychic': choose one of random, magnitude, taylor, fisher, wanda-sp"):
        run_recipe(r, dry_run=True)


def test_streamed_prune_of_a_hub_id_reads_the_snapshot(tmp_path, offline_hub):
    """A hub id is streamed from its snapshot folder (here a hub cache made offline): the same plan and
    tensors as the local folder it was copied from, with the hub id recorded as the base name."""
    src = save_tiny(tmp_path / "src", "llama-gqa")
    offline_hub("me/tiny", src)
    a = prune("me/tiny", tmp_path / "hub", method="magnitude", stream=True)
    b = prune(str(src), tmp_path / "local", method="magnitude", stream=True)
    assert a.plan.base["name"] == "me/tiny" and a.plan.weights_digest() == b.plan.weights_digest()
    wa, wb = Weights(tmp_path / "hub"), Weights(tmp_path / "local")
    assert all(torch.equal(wa.get(k), wb.get(k)) for k in wb.names)


@pytest.mark.parametrize("extra", [["--method", "taylor"], ["--method", "wanda", "--sparsity", "2:4"]])
def test_cli_streams_by_itself_when_the_budget_is_small(tiny_dir, tmp_path, capsys, extra):
    """No streaming flag: a budget below the predicted in-memory peak streams, and the plan is the same."""
    import json

    from loram.cli import main

    plans = {}
    for budget in ("1000", "0.0001"):
        out = tmp_path / f"p{budget}"
        assert main(["prune", str(tiny_dir), "-o", str(out), *extra, "--calib-samples", "2", "--calib-seq-len", "16",
                     "--max-memory", budget]) == 0
        streamed = "streaming layer by layer" in capsys.readouterr().err
        assert streamed == (budget == "0.0001")
        plans[budget] = json.loads((out / "loram_plan.json").read_text())
    assert plans["1000"]["pruned" if "taylor" in extra else "sparse"] == plans["0.0001"]["pruned" if "taylor" in extra else "sparse"]
