"""`loram train --original-offset`: the student is scored through log p_original - log p_pruned. The offset is
exact with k = vocab, at the start of training the combined distribution is the original's (so the first loss is
the original's own loss on the run's rows), the original is gone before training starts, its cache is reused,
and wrong requests fail before anything loads."""

import json

import pytest
import torch

from loram import distill, offset
from loram.cli import main
from loram.configs import TrainConfig
from loram.errors import LoramError
from loram.loss import TEACHER_KEYS, chunked_causal_lm_loss, chunked_offset_loss, offset_log_probs
from loram.prune_plan import PrunePlan
from loram.testing import teacher_watch
from loram.train import train
from test_align import make_sparse, pruned_dir  # noqa: F401  (fixtures shared with the align tests)


def top(t_logits, k):
    logp = torch.log_softmax(t_logits, -1)
    v, i = logp.topk(k, -1)
    return v, i.int(), logp.scatter(-1, i, float("-inf")).logsumexp(-1)


def test_full_vocab_offset_is_exact_and_starts_at_the_original():
    torch.manual_seed(0)
    V = 12
    t, p, s = torch.randn(2, 5, V) * 2, torch.randn(2, 5, V), torch.randn(2, 5, V)
    got = offset_log_probs(s, p, *top(t, V))
    want = torch.log_softmax(torch.log_softmax(s, -1) + torch.log_softmax(t, -1) - torch.log_softmax(p, -1), -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(offset_log_probs(p, p, *top(t, V)), torch.log_softmax(t, -1), rtol=1e-5, atol=1e-5)


def test_topk_offset_keeps_the_originals_topk_and_rest_at_the_start():
    """k < vocab, student = pruned base: the k tokens get the original's log-probs, the rest its leftover mass."""
    torch.manual_seed(1)
    V, k = 20, 4
    t, p = torch.randn(3, 6, V) * 2, torch.randn(3, 6, V)
    v, i, rest = top(t, k)
    got = offset_log_probs(p, p, v, i, rest)
    torch.testing.assert_close(got.gather(-1, i.long()), v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.scatter(-1, i.long(), float("-inf")).logsumexp(-1), rest, rtol=1e-5, atol=1e-5)


def test_chunked_loss_equals_whole_and_only_the_student_gets_gradient():
    torch.manual_seed(2)
    V, d = 16, 8
    head = torch.nn.Linear(d, V, bias=False)
    h = torch.randn(2, 9, d, requires_grad=True)
    hb = torch.randn(2, 9, d, requires_grad=True)
    labels = torch.randint(V, (2, 9))
    labels[0, :3] = -100
    v, i, rest = top(torch.randn(2, 8, V), 5)
    teacher = dict(zip(TEACHER_KEYS, (v, i, rest)))
    whole = chunked_offset_loss(h, hb, head, labels, teacher)
    parts = chunked_offset_loss(h, hb, head, labels, teacher, chunk=3)
    torch.testing.assert_close(whole, parts)
    parts.backward()
    assert h.grad.abs().sum() > 0 and hb.grad is None  # the pruned base is a constant


def rows_file(tmp_path, n=24):
    p = tmp_path / "add.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": f"add {a} and {a * 3}", "output": f"{4 * a}"}) for a in range(n)))
    return p


def ocfg(data, **kw):
    return TrainConfig(**(dict(data=[str(data)], steps=3, micro_batch=2, seq_len=32, lr=1e-3, logging_steps=1,
                               original_offset=True, offset_top_k=8) | kw))


def test_first_loss_is_the_originals_own_loss(tiny_dir, pruned_dir, tmp_path):
    """k = vocab, adapter at its start (B = 0): the loss on a batch read through the cache, padding and collator
    is the ORIGINAL model's LM loss on those rows, though only the pruned model runs."""
    from peft import get_peft_model

    from loram.data import build_dataset
    from loram.io import load_tokenizer
    from loram.loading import load_model, load_pruned_model
    from loram.loss import hidden_states_as_logits
    from loram.train import lora_config

    vocab = load_model(tiny_dir).config.vocab_size
    cfg = ocfg(rows_file(tmp_path), offset_top_k=vocab)
    teacher = offset.check_request(cfg, PrunePlan.load(pruned_dir), pruned_dir)
    tok = load_tokenizer(pruned_dir)
    examples = offset.run_examples(build_dataset(tok, cfg)[0].examples, cfg)
    assert len(examples) == 6  # steps x micro-batch of the 24 rows
    data, fn, loss, rec = offset.prepare(teacher, examples, cfg, tok.pad_token_id, tmp_path / "cache")
    batch = fn([data[j] for j in (0, 3, 5)])  # rows of different lengths: padded, teacher rows cut to the batch
    pm = get_peft_model(load_pruned_model(pruned_dir)[0], lora_config(cfg)).eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), hidden_states_as_logits(pm.get_base_model()) as head:
        h = pm(**inputs).logits
        with pm.disable_adapter():
            hb = pm(**inputs).logits
        got = loss(h, hb, head, batch["labels"], {k: batch[k] for k in TEACHER_KEYS}, 0, None)
    original = load_model(tiny_dir).eval()
    with torch.no_grad(), hidden_states_as_logits(original) as head:
        want = chunked_causal_lm_loss(original(**inputs).logits, head, batch["labels"])
        pruned_loss = chunked_causal_lm_loss(hb, pm.get_base_model().lm_head, batch["labels"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert abs(float(pruned_loss - want)) > 1e-3  # the pruned model alone scores otherwise: the offset did it
    assert rec["examples"] == 6 and rec["top_k"] == vocab and rec["computed"]


def test_train_end_to_end_without_the_original_in_memory(tiny_dir, pruned_dir, tmp_path, monkeypatch):
    watch, seen = teacher_watch()
    data = rows_file(tmp_path)
    r = train(pruned_dir, tmp_path / "ad", ocfg(data, steps=4, offset_cache=str(tmp_path / "c")), callbacks=[watch])
    assert r.steps == 4 and seen == [0] * 4 and all(torch.isfinite(torch.tensor(x["loss"])) for x in r.losses)
    meta = json.loads((tmp_path / "ad" / "loram_adapter.json").read_text())
    rec = meta["original_offset"]
    assert rec["examples"] == 8 and rec["top_k"] == 8 and rec["computed"] and meta["train"]["original_offset"]
    # a standard adapter of the original
    assert main(["recover", str(tmp_path / "ad"), "--base", str(tiny_dir), "-o", str(tmp_path / "rec")]) == 0
    assert (tmp_path / "rec" / "adapter_model.safetensors").exists()
    monkeypatch.setattr(distill, "teacher_pass", lambda *a, **kw: pytest.fail("the original ran again for the same rows"))
    train(pruned_dir, tmp_path / "ad2", ocfg(data, steps=4, offset_cache=str(tmp_path / "c")))
    assert not json.loads((tmp_path / "ad2" / "loram_adapter.json").read_text())["original_offset"]["computed"]


@pytest.mark.parametrize("kw, msg", [
    (dict(original_offset=False, teacher="x"), "--teacher only applies with --original-offset"),
    (dict(original_offset=False, offset_top_k=4), "--offset-top-k only applies with --original-offset"),
    (dict(packing=True), "drop --packing"),
    (dict(targets=("q", "lm_head")), "drop lm_head"),
    (dict(offset_top_k=10 ** 7), "more than the vocabulary"),
])
def test_wrong_requests_fail_before_loading(pruned_dir, tmp_path, kw, msg):
    with pytest.raises(LoramError, match=msg):
        train(pruned_dir, tmp_path / "ad", ocfg(rows_file(tmp_path), **kw))
    assert not (tmp_path / "ad").exists()


def test_original_or_sparse_model_is_refused(tiny_dir, tmp_path, capsys):
    data = rows_file(tmp_path)
    with pytest.raises(LoramError, match="an original model, whose offset is zero"):
        train(tiny_dir, tmp_path / "ad", ocfg(data))
    sparse = make_sparse(tiny_dir, tmp_path / "sparse")
    with pytest.raises(LoramError, match="sparse"):
        train(sparse, tmp_path / "ad", ocfg(data))
    capsys.readouterr()
    rc = main(["train", str(tiny_dir), "--data", str(data), "-o", str(tmp_path / "ad"), "--original-offset"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--original-offset needs a structurally pruned model folder" in err[0]
    assert not (tmp_path / "ad").exists()


def test_wrong_teacher_and_torchrun(tiny_dir, pruned_dir, tmp_path, monkeypatch):
    from loram.testing import save_tiny

    other = save_tiny(tmp_path / "other", "llama-gqa", seed=1)
    cfg = ocfg(rows_file(tmp_path), teacher=str(other))
    with pytest.raises(LoramError, match="is not the model the plan was made from"):
        train(pruned_dir, tmp_path / "ad", cfg)
    assert not (tmp_path / "ad").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LoramError, match="runs the original's pass in one process"):
        offset.check_request(ocfg(rows_file(tmp_path)), PrunePlan.load(pruned_dir), pruned_dir)
