"""Chunked causal-LM loss (loram.loss) equals the stock loss, in value and gradients."""

import pytest
import torch

from loram.loss import chunked_causal_lm_loss
from loram.testing import tiny_model


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["llama-gqa", "llama-bias"])  # tied and untied lm_head
@pytest.mark.parametrize("chunk", [1, 7, 64])  # 7 does not divide the 23 targets; 64 > seq: one chunk
def test_chunked_loss_matches_stock(name, chunk):
    model = tiny_model(name).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt mask, as `loram train` writes it
    labels[1, -3:] = -100
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=ids).last_hidden_state
    loss = chunked_causal_lm_loss(hidden, model.lm_head, labels, chunk=chunk)
    loss.backward()
    g = _grads(model)
    assert abs(loss.item() - ref.item()) < 1e-5
    assert g.keys() == g_ref.keys()
    for n in g:
        assert torch.allclose(g[n], g_ref[n], atol=1e-5, rtol=0), n


def test_chunked_loss_no_grad_and_bad_chunk():
    model = tiny_model("llama-mha").eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss
        got = chunked_causal_lm_loss(model.model(input_ids=ids).last_hidden_state, model.lm_head, ids, chunk=5)
    assert abs(got.item() - ref.item()) < 1e-5
    with pytest.raises(ValueError):
        chunked_causal_lm_loss(torch.zeros(1, 4, 48), model.lm_head, torch.zeros(1, 4, dtype=torch.long), chunk=0)
