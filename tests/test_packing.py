"""--packing keeps row boundaries: a packed batch trains exactly as its rows one by one.

The trainer's loss is token-weighted: the sum of every labelled token's next-token NLL over the batch,
divided by the number of labelled tokens (transformers' ForCausalLMLoss and loram.loss both). So the
packed loss must equal sum_r(loss_r * n_r) / sum_r(n_r), where loss_r is row r's loss computed alone
and n_r its count of predicted tokens.
"""

import json

import pytest
import torch

from loram.configs import TrainConfig
from loram.data import IGNORE, ListDataset, build_dataset, collate, encode, pack
from loram.loss import chunked_causal_lm_loss, hidden_states_as_logits
from loram.testing import tiny_model, tiny_tokenizer

ROWS = [{"instruction": "add 1 2", "output": "3"}, {"text": "the cat sat on the mat"},
        {"instruction": "name a colour", "input": "not red", "output": "blue"}, {"text": "x"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
        {"text": "a longer line of plain text to fill a packed sequence"}, {"instruction": "say no", "output": "no"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama-gqa", "mistral", "qwen2"])
def model(request):
    return tiny_model(request.param)  # config.use_cache stays True (the default): the collator must not depend on it


def row_losses(model, examples):
    """(sum of NLL, predicted tokens) of each row run alone, as the stock loss computes them."""
    out = []
    for ids, labels in examples:
        n = sum(x != IGNORE for x in labels[1:])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        out.append((loss.item() * n, n))
    return out


def token_weighted(parts):
    return sum(s for s, _ in parts) / sum(n for _, n in parts)


def test_packed_batch_loss_equals_rows_one_by_one(tok, model):
    examples = [encode(tok, r) for r in ROWS]
    packed = pack(examples, 80)
    assert len(packed) >= 3 and sum(len(p[0]) for p in packed) == sum(len(i) for i, _ in examples)
    ds = ListDataset(packed)
    batch = collate(tok.pad_token_id)([ds[i] for i in range(len(ds))])  # one micro-batch, padded, several rows each
    assert "attention_mask" not in batch and (batch["input_ids"] == tok.pad_token_id).any()
    expected = token_weighted(row_losses(model, examples))
    with torch.no_grad():
        stock = model(**batch).loss.item()
        with hidden_states_as_logits(model) as head:  # --loss-chunk's path
            hidden = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        chunked = chunked_causal_lm_loss(hidden, head, batch["labels"], chunk=16).item()
    assert stock == pytest.approx(expected, abs=1e-5)
    assert chunked == pytest.approx(expected, abs=1e-5)
    # the old packing (rows concatenated under one causal mask, positions running on) is off by far more than
    # the tolerance (random tiny models all score near log(vocab), so losses differ in the 4th decimal)
    naive = {"input_ids": batch["input_ids"], "labels": batch["labels"], "attention_mask": (batch["input_ids"] != -1).long()}
    with torch.no_grad():
        assert abs(model(**naive).loss.item() - expected) > 1e-4


def test_packed_labels_never_cross_a_boundary(tok):
    examples = [encode(tok, r, train_on_inputs=True) for r in ROWS]  # every token labelled: only boundaries are IGNORE
    packed = pack(examples, 80)
    rows = iter(examples)
    for ids, labels, pos in packed:
        assert len(ids) == len(labels) == len(pos) <= 80
        starts = [i for i, p in enumerate(pos) if p == 0]
        ends = starts[1:] + [len(ids)]
        for s, e in zip(starts, ends):
            r_ids, r_labels = next(rows)
            assert ids[s:e] == r_ids and pos[s:e] == list(range(e - s))  # positions restart per row
            assert labels[s] == IGNORE and labels[s + 1:e] == r_labels[1:]  # a row's first token is never a target
    assert next(rows, None) is None


def test_build_dataset_packs_with_boundaries(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ds, _ = build_dataset(tok, TrainConfig(data=[str(f)], seq_len=80, packing=True))
    item = ds[0]
    assert item["position_ids"][0] == 0 and item["position_ids"].count(0) >= 2


def test_train_with_packing_counts_only_real_tokens(tiny_dir, alpaca_file, tmp_path, capsys):
    from loram.io import load_tokenizer
    from loram.train import train

    cfg = TrainConfig(data=[str(alpaca_file)], epochs=1, micro_batch=3, logging_steps=1, seq_len=64, packing=True, loss_chunk=16)
    ds, _ = build_dataset(load_tokenizer(tiny_dir), cfg)
    r = train(tiny_dir, tmp_path / "A", cfg)
    assert r.steps == -(-len(ds) // 3) and all(0 < x["loss"] < 20 for x in r.losses)
    assert r.tokens == sum(len(ds[i]["input_ids"]) for i in range(len(ds)))  # one epoch: every packed token once, no padding
    assert "non-padding" not in capsys.readouterr().err  # the Trainer counted by loram's packed layout, no fallback warning
