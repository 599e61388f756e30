"""The layer stream (loram.stream): a model run one decoder layer at a time equals the model."""

import pytest
import torch

from loram.stream import LayerStream
from loram.testing import TINY, save_tiny, tiny_model


def _streamed_logits(ls, ids, mask=None):
    xs = ls.inputs([ids], None if mask is None else [mask])
    for _i, block in ls.layers():
        xs = [ls.run(block, x) for x in xs]
        assert sum(p.numel() for b in ls.blocks for p in b.parameters() if not p.is_meta) == \
            sum(p.numel() for p in block.parameters())  # one layer resident at a time
    with torch.no_grad():
        return ls.head(xs[0].hidden)


@pytest.mark.parametrize("name", sorted(TINY))
def test_streamed_forward_equals_model(tmp_path, name):
    folder = save_tiny(tmp_path / name, name)
    model = tiny_model(name)
    ls = LayerStream(folder, model.config)
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a right-padded row: the mask the model builds must reach every layer
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    got = _streamed_logits(ls, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(p.is_meta for b in ls.blocks for p in b.parameters())  # every layer dropped after its turn


def test_transform_rewrites_tensors_as_loaded(tmp_path):
    folder = save_tiny(tmp_path / "m")
    model = tiny_model()
    seen = []
    ls = LayerStream(folder, model.config, transform=lambda n, t: (seen.append(n), t * 0 if "mlp.down_proj" in n else t)[1])
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.testing.assert_close(_streamed_logits(ls, ids), want, rtol=1e-5, atol=1e-5)
    assert "model.layers.0.mlp.down_proj.weight" in seen and "model.embed_tokens.weight" in seen


def test_streamed_pruned_folder_equals_loaded(tmp_path, tiny_dir):
    from loram.loading import load_pruned_model
    from loram.prune import prune
    from loram.prune_plan import PrunePlan

    out = prune(str(tiny_dir), tmp_path / "p", method="magnitude", ratio=0.5, layers="1:5").out
    model, plan = load_pruned_model(out)
    ls = LayerStream(out, model.config, PrunePlan.load(out))
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.testing.assert_close(_streamed_logits(ls, ids), want, rtol=1e-5, atol=1e-5)


def test_nf4_pruned_load_streams_and_equals_whole_model_quantisation(tmp_path, tiny_dir):
    pytest.importorskip("bitsandbytes")
    from loram.loading import load_pruned_model
    from loram.nf4 import quantize_nf4
    from loram.prune import prune

    out = prune(str(tiny_dir), tmp_path / "p", method="magnitude", ratio=0.5, layers="1:5").out
    streamed, _ = load_pruned_model(out, quantize="nf4")
    whole = quantize_nf4(load_pruned_model(out)[0], torch.float32)  # the fp32 model first, then every linear (the old way)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(streamed(input_ids=ids).logits, whole(input_ids=ids).logits, rtol=0, atol=0)


def test_without_head_and_dropped_outer(tmp_path):
    """head=False never loads the final norm / lm_head; drop_outer releases the embeddings too."""
    folder = save_tiny(tmp_path / "m", "llama-mha")  # untied: lm_head is a tensor of its own
    model = tiny_model("llama-mha")
    ls = LayerStream(folder, model.config, head=False)
    assert ls.model.lm_head.weight.is_meta and ls.model.model.norm.weight.is_meta
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.model(input_ids=ids).last_hidden_state
    xs = ls.inputs([ids])
    ls.drop_outer()
    assert all(p.is_meta for p in ls.model.parameters())
    for _i, block in ls.layers():
        xs = [ls.run(block, x) for x in xs]
    torch.testing.assert_close(model.model.norm(xs[0].hidden), want, rtol=1e-5, atol=1e-5)  # the layers still run
