"""`loram align --distill`: the teacher's cached top-k is its real top-k (in memory and streamed alike),
the loss is the KL it claims to be, alignment lowers the KL to the teacher without the teacher in memory,
and the cache is reused or recomputed by its key."""

import gc
import json

import pytest
import torch

from loram import distill, load_pruned
from loram.align import AlignConfig, align
from loram.data import chunk_tokens, read_texts
from loram.io import load_tokenizer
from loram.loss import TEACHER_KEYS, chunked_causal_lm_loss, chunked_distill_loss
from loram.prune_plan import PrunePlan
from test_align import corpus, make_sparse, pruned_dir  # noqa: F401  (fixtures shared with the align tests)


def dcfg(corpus, **kw):
    base = dict(data=[str(corpus / "a.txt")], steps=3, seq_len=32, micro_batch=2, lr=1e-3, logging_steps=1, distill=True,
                distill_top_k=8)
    return AlignConfig(**(base | kw))


def teacher_topk(tiny_dir, blocks, k, temperature=1.0):
    """The teacher's top-k from its full logits, computed here without loram.distill."""
    from loram.loading import load_model

    m = load_model(tiny_dir).eval()
    with torch.no_grad():
        logp = torch.log_softmax(m(input_ids=torch.tensor([b[0] for b in blocks])).logits[:, :-1].float() / temperature, -1)
    v, i = logp.topk(k, -1)
    rest = torch.log1p(-v.exp().sum(-1).clamp(max=1 - 1e-7))
    return v, i, rest


def the_blocks(pruned_dir, cfg):
    blocks = chunk_tokens(load_tokenizer(pruned_dir), read_texts(cfg.data[0]), cfg.seq_len)
    return distill.teacher_blocks(blocks, cfg)


@pytest.mark.parametrize("streamed", [False, True])
def test_cache_is_the_teachers_topk(tiny_dir, pruned_dir, corpus, tmp_path, streamed):
    cfg = dcfg(corpus, distill_temperature=1.5, max_memory=1e-6 if streamed else None)  # 1 kB: the teacher must stream
    teacher = distill.check_request(cfg, PrunePlan.load(pruned_dir), pruned_dir)
    blocks = the_blocks(pruned_dir, cfg)
    cache, how = distill.ensure_cache(teacher, blocks, cfg, tmp_path / "cache")
    assert how["computed"] and how["streamed"] is streamed and cache.blocks == len(blocks) == 6
    v, i, rest = teacher_topk(tiny_dir, blocks, 8, 1.5)
    got = [cache.row(j) for j in range(len(blocks))]
    torch.testing.assert_close(torch.stack([g["teacher_logprobs"] for g in got]), v, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.stack([g["teacher_indices"] for g in got]).long(), i)
    torch.testing.assert_close(torch.stack([g["teacher_rest"] for g in got]), rest, rtol=1e-3, atol=1e-4)
    m = json.loads((tmp_path / "cache" / distill.MANIFEST).read_text())
    assert m["top_k"] == 8 and m["blocks"] == 6 and m["teacher_fingerprint"] == teacher.fingerprint["id"]


def soft_targets(t_logits, k, temperature=1.0):
    logp = torch.log_softmax(t_logits[:, :-1] / temperature, -1)
    v, i = logp.topk(k, -1)
    return {"teacher_logprobs": v, "teacher_indices": i.int(), "teacher_rest": logp.scatter(-1, i, float("-inf")).logsumexp(-1)}


def full_kl(t_logits, s_logits, temperature=1.0):
    p = torch.log_softmax(t_logits[:, :-1] / temperature, -1)
    q = torch.log_softmax(s_logits[:, :-1] / temperature, -1)
    return (p.exp() * (p - q)).sum(-1)  # [b, seq-1]


def test_loss_is_the_kl_and_mixes_the_lm_loss():
    torch.manual_seed(0)
    V, b, n = 16, 2, 7
    t, s = torch.randn(b, n, V) * 2, torch.randn(b, n, V, requires_grad=True)
    labels = torch.randint(V, (b, n))
    labels[1, 4] = -100  # an ignored target: its position counts in neither loss
    head = torch.nn.Identity()
    valid = labels[:, 1:] != -100
    for T in (1.0, 2.0):
        kl = (full_kl(t, s, T) * valid).sum() / valid.sum() * T * T
        full = chunked_distill_loss(s, head, labels, soft_targets(t, V, T), T)  # k = vocab: the full KL
        torch.testing.assert_close(full, kl, rtol=1e-5, atol=1e-6)
        # k < vocab: the teacher's k tokens + one bucket for the rest, computed by hand
        p, q = torch.log_softmax(t[:, :-1] / T, -1), torch.log_softmax(s[:, :-1] / T, -1)
        top = p.topk(5, -1).indices
        keep = torch.zeros_like(p, dtype=torch.bool).scatter(-1, top, True)
        pr, qr = (p.exp() * ~keep).sum(-1), (q.exp() * ~keep).sum(-1)
        by_hand = ((p.exp() * (p - q) * keep).sum(-1) + pr * (pr.log() - qr.log())) * valid
        got = chunked_distill_loss(s, head, labels, soft_targets(t, 5, T), T, chunk=3)  # in chunks too
        torch.testing.assert_close(got, by_hand.sum() / valid.sum() * T * T, rtol=1e-5, atol=1e-6)
    ce = chunked_causal_lm_loss(s, head, labels)
    mixed = chunked_distill_loss(s, head, labels, soft_targets(t, 5), lm_weight=0.3)
    torch.testing.assert_close(mixed, chunked_distill_loss(s, head, labels, soft_targets(t, 5)) + 0.3 * ce)
    mixed.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_loss_gradient_finite_at_full_support_and_underflow():
    torch.manual_seed(1)
    V = 8
    t = torch.randn(1, 5, V) * 200  # probabilities that underflow to 0 inside the top-k
    s = torch.randn(1, 5, V, requires_grad=True)
    labels = torch.randint(V, (1, 5))
    for k in (V, 4):
        loss = chunked_distill_loss(s, torch.nn.Identity(), labels, soft_targets(t, k))
        g, = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def kl_to_teacher(model_dir, cache, blocks):
    m = load_pruned(model_dir).eval()
    batch = distill.collate(0)([distill.DistillDataset(blocks, cache)[j] for j in range(len(blocks))])
    with torch.no_grad():
        logits = m(input_ids=batch["input_ids"]).logits
    return chunked_distill_loss(logits, torch.nn.Identity(), batch["labels"], {k: batch[k] for k in TEACHER_KEYS}).item()


def test_distill_align_lowers_kl_without_the_teacher_in_memory(pruned_dir, corpus, tmp_path):
    from transformers import TrainerCallback

    seen = []

    class NoTeacher(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            gc.collect()
            seen.append(len(distill.LIVE))

    cfg = dcfg(corpus, steps=8, lr=3e-3)
    r = align(pruned_dir, tmp_path / "al", cfg, callbacks=[NoTeacher()])
    assert len(seen) == 8 and seen == [0] * 8  # the teacher was released before the first step
    rec = load_pruned(tmp_path / "al").loram_plan.extra["aligned"]["distill"]
    assert rec["top_k"] == 8 and rec["lm_weight"] == 0 and rec["temperature"] == 1 and rec["computed"] and rec["blocks"] == 16
    cache = distill.open_cache(tmp_path / "al-checkpoints" / "teacher-topk", rec["cache_key"])
    blocks = the_blocks(pruned_dir, cfg)
    before, after = kl_to_teacher(pruned_dir, cache, blocks), kl_to_teacher(tmp_path / "al", cache, blocks)
    assert after < 0.8 * before, (before, after)
    assert r.steps == 8
    p0, p1 = PrunePlan.load(pruned_dir), PrunePlan.load(tmp_path / "al")
    assert p1.id == p0.id and p1.pruned == p0.pruned


def test_cache_reused_and_recomputed_when_data_or_k_change(pruned_dir, corpus, tmp_path, monkeypatch):
    cache_dir = tmp_path / "topk"
    align(pruned_dir, tmp_path / "a1", dcfg(corpus, distill_cache=str(cache_dir)))
    key = json.loads((cache_dir / distill.MANIFEST).read_text())["key"]
    real, calls = distill.teacher_pass, []

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(distill, "teacher_pass", counted)
    align(pruned_dir, tmp_path / "a2", dcfg(corpus, distill_cache=str(cache_dir)))
    assert calls == [] and not load_pruned(tmp_path / "a2").loram_plan.extra["aligned"]["distill"]["computed"]
    align(pruned_dir, tmp_path / "a3", dcfg(corpus, distill_cache=str(cache_dir), distill_top_k=4))
    key_k = json.loads((cache_dir / distill.MANIFEST).read_text())["key"]
    align(pruned_dir, tmp_path / "a4", dcfg(corpus, distill_cache=str(cache_dir), distill_top_k=4, data=[str(corpus / "b.jsonl")]))
    key_data = json.loads((cache_dir / distill.MANIFEST).read_text())["key"]
    assert calls == [1, 1] and len({key, key_k, key_data}) == 3


def test_resume_reuses_the_default_cache(pruned_dir, corpus, tmp_path, monkeypatch):
    import shutil

    c = dcfg(corpus, steps=4, save_steps=2)
    full = align(pruned_dir, tmp_path / "full", c)
    shutil.copytree(tmp_path / "full-checkpoints", tmp_path / "part-checkpoints")
    shutil.rmtree(tmp_path / "part-checkpoints" / "checkpoint-4")
    monkeypatch.setattr(distill, "teacher_pass", lambda *a, **kw: pytest.fail("the teacher ran again on --resume"))
    part = align(pruned_dir, tmp_path / "part", c, resume=True)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(full.losses, part.losses)) < 1e-5 and len(part.losses) == 4


def test_sparse_plan_keeps_zeros_under_distill(tiny_dir, corpus, tmp_path):
    from safetensors.torch import load_file

    src = make_sparse(tiny_dir, tmp_path / "sparse")
    align(src, tmp_path / "al", dcfg(corpus, lr=1e-2))
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "al" / "model.safetensors"))
    for k in a:
        if ".layers.1." in k and k.endswith("proj.weight"):
            zero = a[k] == 0
            assert zero.any() and bool((b[k][zero] == 0).all()) and not torch.equal(a[k], b[k]), k


def test_hub_teacher_is_checked_once_loaded(tiny_dir, pruned_dir, corpus, tmp_path, offline_hub):
    """A teacher that is not a local folder (hub id, GGUF) has no headers to fingerprint: it is checked right
    after it loads, before its pass; the right model aligns, another one is refused with nothing cached."""
    from loram.errors import LoramError
    from loram.testing import save_tiny

    offline_hub("me/original", tiny_dir)
    offline_hub("me/other", save_tiny(tmp_path / "other", "llama-gqa", seed=1))
    r = align(pruned_dir, tmp_path / "al", dcfg(corpus, teacher="me/original"))
    assert r.steps == 3 and load_pruned(tmp_path / "al").loram_plan.extra["aligned"]["distill"]["teacher"] == "me/original"
    with pytest.raises(LoramError, match="teacher me/other is not the model the plan was made from"):
        align(pruned_dir, tmp_path / "bad", dcfg(corpus, teacher="me/other", distill_cache=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists() and not (tmp_path / "bad").exists()
