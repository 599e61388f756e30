"""`loram train --anchor TEXT`: the loss adds weight x KL(adapter off || adapter on) on general-text blocks. The
term is zero with a zero gradient while the update is zero, chunked equals whole, a strong anchor keeps the
trained model's general-text predictions closer to the base than the same run without it, and wrong
requests fail in one line before anything is written."""

import json

import pytest
import torch

from loram import anchor as anchors
from loram.cli import main
from loram.configs import TrainConfig
from loram.errors import LoramError
from loram.loss import chunked_anchor_kl
from loram.train import train
from test_align import pruned_dir  # noqa: F401  (fixture shared with the align tests)
from test_offset import rows_file


def test_kl_is_zero_with_zero_gradient_at_the_base_and_chunks_add_up():
    torch.manual_seed(0)
    V, d = 16, 8
    head = torch.nn.Linear(d, V, bias=False)
    hb = torch.randn(2, 9, d)
    h = hb.clone().requires_grad_(True)
    kl = chunked_anchor_kl(h, hb, head)
    kl.backward()
    assert abs(kl.item()) < 1e-6 and h.grad.abs().max() < 1e-6
    h2 = (hb + torch.randn_like(hb)).requires_grad_(True)
    whole, parts = chunked_anchor_kl(h2, hb, head), chunked_anchor_kl(h2, hb, head, chunk=4)
    torch.testing.assert_close(whole, parts)
    p, q = torch.log_softmax(head(hb), -1), torch.log_softmax(head(h2), -1)
    torch.testing.assert_close(whole, (p.exp() * (p - q)).sum(-1).mean())
    parts.backward()
    assert whole > 0 and h2.grad.abs().sum() > 0


def test_blocks_cycle_and_ranks_read_different_blocks():
    a = anchors.Anchor(torch.arange(5)[:, None].repeat(1, 3), 1.0, 2, "x")
    assert a.batch_at(0)[:, 0].tolist() == [0, 1] and a.batch_at(2)[:, 0].tolist() == [4, 0]
    assert a.batch_at(0, rank=0, world=2)[:, 0].tolist() == [0, 1] and a.batch_at(0, rank=1, world=2)[:, 0].tolist() == [2, 3]


def general_file(tmp_path):
    p = tmp_path / "general.txt"
    p.write_text("\n".join(f"the {w} sat on the {v} near the river in the morning light" for w in ("cat", "dog", "bird", "fox")
                           for v in ("mat", "log", "wall", "hill")))
    return p


def acfg(data, **kw):
    return TrainConfig(**(dict(data=[str(data)], steps=6, micro_batch=2, seq_len=32, lr=1e-2, logging_steps=1) | kw))


def general_kl(model_dir, adapter, text_blocks):
    """Mean KL(base || base + adapter) on the anchor blocks: how far the update moved general-text predictions."""
    from peft import PeftModel

    from loram.loading import load_pruned_model
    from loram.loss import hidden_states_as_logits

    pm = PeftModel.from_pretrained(load_pruned_model(model_dir)[0], str(adapter)).eval()
    with torch.no_grad(), hidden_states_as_logits(pm.get_base_model()) as head:
        h = pm(input_ids=text_blocks).logits
        with pm.disable_adapter():
            hb = pm(input_ids=text_blocks).logits
        return float(chunked_anchor_kl(h, hb, head))


def test_anchor_keeps_general_predictions_and_is_recorded(tiny_dir, pruned_dir, tmp_path):
    from loram.io import load_tokenizer

    data, text = rows_file(tmp_path), general_file(tmp_path)
    plain = train(pruned_dir, tmp_path / "plain", acfg(data))
    anchored = train(pruned_dir, tmp_path / "anch", acfg(data, anchor=str(text), anchor_weight=50.0, anchor_batch=2))
    assert plain.steps == anchored.steps == 6
    blocks = anchors.load(load_tokenizer(pruned_dir), acfg(data, anchor=str(text), anchor_batch=2)).blocks
    free, kept = general_kl(pruned_dir, tmp_path / "plain", blocks), general_kl(pruned_dir, tmp_path / "anch", blocks)
    assert free > 0 and kept < 0.5 * free, (free, kept)
    rec = json.loads((tmp_path / "anch" / "loram_adapter.json").read_text())["anchor"]
    assert rec["source"] == str(text) and rec["weight"] == 50.0 and rec["batch"] == 2 and rec["blocks"] == len(blocks) > 1
    assert "anchor" not in json.loads((tmp_path / "plain" / "loram_adapter.json").read_text())
    # an adapter trained with the anchor is an ordinary one: it recovers onto the original
    assert main(["recover", str(tmp_path / "anch"), "--base", str(tiny_dir), "-o", str(tmp_path / "rec")]) == 0


def test_training_rows_as_anchor_are_rendered_as_train_renders_them(pruned_dir, tmp_path):
    """--anchor on instruction rows reads the blocks it would read from those rows rendered by the chat template
    (what `loram train` feeds the model), as prune --calib-data does: one renderer, loram.data.rows.row_text."""
    from loram.data import encode
    from loram.io import load_tokenizer

    tok = load_tokenizer(pruned_dir)
    rows = rows_file(tmp_path, n=40)
    rendered = tmp_path / "rendered.jsonl"
    rendered.write_text("".join(json.dumps({"text": tok.decode(encode(tok, json.loads(x))[0])}) + "\n"
                                for x in rows.read_text().splitlines()))
    a = anchors.load(tok, acfg(rows, anchor=str(rows), steps=4))
    b = anchors.load(tok, acfg(rows, anchor=str(rendered), steps=4))
    assert len(a.blocks) == 4 and torch.equal(a.blocks, b.blocks)
    assert tok.apply_chat_template([{"role": "user", "content": "add 0 and 0"}], tokenize=False)[:12] in tok.decode(a.blocks[0])


def test_anchor_with_original_offset_and_accumulation(pruned_dir, tmp_path):
    r = train(pruned_dir, tmp_path / "ad", acfg(rows_file(tmp_path), steps=2, grad_accum=2, anchor=str(general_file(tmp_path)),
                                               original_offset=True, offset_top_k=8, loss_chunk=8))
    assert r.steps == 2 and all(torch.isfinite(torch.tensor(x["loss"])) for x in r.losses)
    meta = json.loads((tmp_path / "ad" / "loram_adapter.json").read_text())
    assert meta["anchor"]["blocks"] == 2 * 2 * 1 and meta["original_offset"]["examples"] == 8


@pytest.mark.parametrize("flags, msg", [
    (["--anchor-weight", "2"], "--anchor-weight only applies with --anchor: add --anchor TEXT or drop --anchor-weight"),
    (["--anchor-batch", "3"], "--anchor-batch only applies with --anchor"),
    (["--anchor", "MISSING.txt"], "does not exist"),
    (["--anchor", "SHORT.txt"], "fewer than one block of --seq-len"),
    (["--anchor", "NOFORMAT.jsonl"], "row 0 is neither a {\"text\": ...} row nor a training row"),
    (["--anchor", "GENERAL", "--anchor-weight", "-1"], "--anchor-weight -1 is out of range"),
    (["--anchor", "GENERAL", "--targets", "q,lm_head"], "--anchor needs lm_head without an adapter"),
])
def test_wrong_requests_fail_in_one_line(pruned_dir, tmp_path, capsys, flags, msg):
    (tmp_path / "SHORT.txt").write_text("too short\n")
    subst = {"MISSING.txt": str(tmp_path / "missing.txt"), "SHORT.txt": str(tmp_path / "SHORT.txt"),
             "GENERAL": str(general_file(tmp_path)), "NOFORMAT.jsonl": str(tmp_path / "NOFORMAT.jsonl")}
    (tmp_path / "NOFORMAT.jsonl").write_text(json.dumps({"body": "a row in no known format"}) + "\n")
    flags = [subst.get(f, f) for f in flags]
    capsys.readouterr()
    rc = main(["train", str(pruned_dir), "--data", str(rows_file(tmp_path)), "-o", str(tmp_path / "ad"), "--seq-len", "64", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "ad").exists()


def test_python_callers_get_the_same_refusal(pruned_dir, tmp_path):
    with pytest.raises(LoramError, match="--anchor-batch only applies with --anchor"):
        train(pruned_dir, tmp_path / "ad", acfg(rows_file(tmp_path), anchor_batch=2))
    assert not (tmp_path / "ad").exists()


def test_a_resumed_run_continues_with_the_anchor_blocks_it_stopped_at(pruned_dir, tmp_path):
    """Stopped after step 2 and resumed, the run logs the same losses (task + anchor) and ends with the same adapter as
    one that never stopped: the anchor blocks continue from the restored step, not from the first block."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:  # checkpoint-2 is written
                raise KeyboardInterrupt

    c = acfg(rows_file(tmp_path), steps=4, save_steps=2, anchor=str(general_file(tmp_path)), anchor_weight=5.0)
    ref = train(pruned_dir, tmp_path / "ref", c)
    with pytest.raises(LoramError, match="continue with --resume"):
        train(pruned_dir, tmp_path / "A", c, callbacks=[Stop()])
    r = train(pruned_dir, tmp_path / "A", c, resume=True)
    assert r.resumed_from and r.resumed_from.endswith("checkpoint-2")
    la, lb = [x["loss"] for x in ref.losses], [x["loss"] for x in r.losses]
    assert len(la) == len(lb) == 4 and max(abs(a - b) for a, b in zip(la, lb)) < 1e-5, (la, lb)
    A, B = load_file(str(tmp_path / "ref" / "adapter_model.safetensors")), load_file(str(tmp_path / "A" / "adapter_model.safetensors"))
    assert max((A[k] - B[k]).abs().max().item() for k in A) < 1e-5
