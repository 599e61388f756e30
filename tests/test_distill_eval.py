"""`loram align --distill --eval NAME=FILE`: each held-out set also reports its KL to the teacher, computed from
rows of the one teacher pass (cached with the training rows), equal to the KL of the real models' logits."""

import json
import math
import re
import shutil
from dataclasses import fields

import pytest
import torch

from loram import distill, load_pruned
from loram.align import AlignConfig, align
from loram.data import chunk_tokens, read_texts
from loram.io import load_tokenizer
from loram.training import TrainReport
from test_align import corpus, pruned_dir  # noqa: F401  (fixtures shared with the align tests)
from test_distill import dcfg, full_kl


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """Held-out text of the training corpus's kind (other numbers), and another held-out file."""
    d = tmp_path_factory.mktemp("held")
    (d / "held.txt").write_text("\n".join(f"the river {i} runs to the sea and back {i * 7}" for i in range(100, 130)))
    (d / "other.txt").write_text("\n".join(f"the sea {i} runs to the river {i * 5}" for i in range(30)))
    return d


def test_eval_kl_is_the_full_kl_to_the_original_and_drops(tiny_dir, pruned_dir, corpus, held, tmp_path, capsys, monkeypatch):
    from loram.loading import load_model

    monkeypatch.setattr(distill, "EVAL_CHUNK", 5)  # blocks of 32 tokens: lm_head in several chunks, as on long blocks
    T = 1.5  # k = vocab: the bucket is empty, the reported value is T^2 x the full KL at T, per position
    cfg = dcfg(corpus, steps=8, lr=3e-3, eval_steps=4, distill_top_k=256, distill_temperature=T,
               eval={"held": str(held / "held.txt")})
    r = align(pruned_dir, tmp_path / "al", cfg)
    blocks = chunk_tokens(load_tokenizer(pruned_dir), read_texts(str(held / "held.txt")), cfg.seq_len)
    ids = torch.tensor([b[0] for b in blocks])
    with torch.no_grad():
        t, s = load_model(tiny_dir).eval()(input_ids=ids).logits, load_pruned(tmp_path / "al").eval()(input_ids=ids).logits
    want = (full_kl(t.float(), s.float(), T).mean() * T * T).item()
    assert r.eval_kl["held"] == pytest.approx(want, rel=1e-4)
    # the perplexity comes from the same forward as the KL: it is the one the plain --eval path computes
    from loram.eval.ppl import loglik_sums

    loglik, tokens = loglik_sums(load_pruned(tmp_path / "al"), blocks, 0, 4)
    assert r.eval_ppl["held"] == pytest.approx(math.exp(-loglik / tokens), rel=1e-5)
    # reported where perplexity is: the report, its history, the plan's record, the printed line
    assert set(r.eval_ppl) == {"held"} and [set(h) for h in r.eval_history] == [{"step", "held", "held_kl"}] * 2
    assert r.eval_history[-1]["held_kl"] == r.eval_kl["held"]
    rep = json.loads((tmp_path / "al" / "align_report.json").read_text())
    assert rep["eval_kl"] == r.eval_kl and rep["eval_ppl"] == r.eval_ppl
    rec = load_pruned(tmp_path / "al").loram_plan.extra["aligned"]["distill"]
    assert rec["eval_kl"] == r.eval_kl and rec["eval_blocks"] == {"held": len(blocks)} and rec["blocks"] == 16
    assert re.search(r"eval held ppl [\d.]+ kl [\d.e+-]+ \(step 8\)", capsys.readouterr().out)
    # a weak sanity property: training on the teacher's distribution brings held-out text of its kind closer to it
    assert r.eval_history[-1]["held_kl"] < r.eval_history[0]["held_kl"], r.eval_history


def test_eval_rows_share_the_pass_and_key_of_the_cache(pruned_dir, corpus, held, tmp_path, monkeypatch):
    cache_dir = tmp_path / "topk"

    def run(out, f):
        return align(pruned_dir, tmp_path / out, dcfg(corpus, distill_cache=str(cache_dir), eval={"held": str(f)}))

    run("a1", held / "held.txt")
    m1 = json.loads((cache_dir / distill.MANIFEST).read_text())
    assert m1["blocks"] == 6 and set(m1["eval_blocks"]) == {"held"}
    real, calls = distill.teacher_pass, []

    def counted(teacher, rows, *a, **kw):
        calls.append(len(rows))
        return real(teacher, rows, *a, **kw)

    monkeypatch.setattr(distill, "teacher_pass", counted)
    r2 = run("a2", held / "held.txt")  # same data and eval file: the cache is reused, no teacher runs
    assert calls == [] and "held" in r2.eval_kl
    run("a3", held / "other.txt")  # only the eval file changed: recomputed, training + eval rows in one pass
    m3 = json.loads((cache_dir / distill.MANIFEST).read_text())
    assert m3["key"] != m1["key"] and m3["blocks"] == 6 and calls == [6 + m3["eval_blocks"]["held"]]


def test_resume_restores_eval_kl_without_the_teacher(pruned_dir, corpus, held, tmp_path, monkeypatch):
    c = dcfg(corpus, steps=4, save_steps=2, eval_steps=2, eval={"held": str(held / "held.txt")})
    full = align(pruned_dir, tmp_path / "full", c)
    shutil.copytree(tmp_path / "full-checkpoints", tmp_path / "part-checkpoints")
    shutil.rmtree(tmp_path / "part-checkpoints" / "checkpoint-4")
    monkeypatch.setattr(distill, "teacher_pass", lambda *a, **kw: pytest.fail("the teacher ran again on --resume"))
    part = align(pruned_dir, tmp_path / "part", c, resume=True)
    # step 2's row comes back from the Trainer's log history (eval_held_ppl, eval_held_kl), step 4's is computed again
    assert [set(h) for h in part.eval_history] == [{"step", "held", "held_kl"}] * 2
    for a, b in zip(full.eval_history, part.eval_history):
        assert a["step"] == b["step"] and a["held_kl"] == pytest.approx(b["held_kl"], rel=1e-4)


def test_reports_unchanged_without_distill_or_without_eval(pruned_dir, corpus, held, tmp_path, capsys):
    plain = AlignConfig(data=[str(corpus / "a.txt")], steps=2, seq_len=32, micro_batch=2, eval={"held": str(held / "held.txt")})
    r = align(pruned_dir, tmp_path / "plain", plain)
    rep = json.loads((tmp_path / "plain" / "align_report.json").read_text())
    assert set(rep) == {f.name for f in fields(TrainReport)} - {"eval_kl"} and r.eval_kl == {}
    assert [set(h) for h in rep["eval_history"]] == [{"step", "held"}] and " kl " not in capsys.readouterr().out
    align(pruned_dir, tmp_path / "noeval", dcfg(corpus, steps=2))  # --distill without --eval: no eval rows anywhere
    assert "eval_kl" not in json.loads((tmp_path / "noeval" / "align_report.json").read_text())
    assert "eval_blocks" not in json.loads((tmp_path / "noeval-checkpoints" / "teacher-topk" / distill.MANIFEST).read_text())
    assert "eval_kl" not in load_pruned(tmp_path / "noeval").loram_plan.extra["aligned"]["distill"]
