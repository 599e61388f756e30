"""`loram align`: continual pre-training keeps the plan and shapes, freezes embeddings/lm_head,
keeps a sparse model's zeros exactly zero, honours token budgets and resumes exactly."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from loram import load_pruned
from loram.align import AlignConfig, align, steps_for_tokens
from loram.errors import LoramError
from loram.prune_plan import PrunePlan


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text("\n".join(f"the river {i} runs to the sea and back {i * 3}" for i in range(60)))
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": f"numbers {i} {i + 1} {i + 2}"}) for i in range(60)))
    return d


@pytest.fixture(scope="module")
def pruned_dir(tiny_dir, tmp_path_factory):
    from loram.prune import prune

    out = tmp_path_factory.mktemp("pr") / "pruned"
    prune(str(tiny_dir), out, method="magnitude", ratio=0.5)
    return out


def acfg(corpus, **kw):
    base = dict(data=[str(corpus / "a.txt"), str(corpus / "b.jsonl")], data_weights=[0.5, 0.5], steps=3, seq_len=32,
                micro_batch=2, lr=1e-3, logging_steps=1)
    return AlignConfig(**(base | kw))


def test_align_keeps_plan_and_shapes_and_freezes_embeddings(pruned_dir, corpus, tmp_path):
    r = align(pruned_dir, tmp_path / "al", acfg(corpus, eval={"a": str(corpus / "a.txt")}))
    assert r.steps == 3 and set(r.eval_ppl) == {"a"}
    before, after = load_pruned(pruned_dir), load_pruned(tmp_path / "al")
    p0, p1 = PrunePlan.load(pruned_dir), after.loram_plan
    assert p1.id == p0.id and p1.pruned == p0.pruned and p1.extra["aligned"]["steps"] == 3
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    assert not torch.equal(a["model.layers.2.mlp.down_proj.weight"], b["model.layers.2.mlp.down_proj.weight"])


def make_sparse(tiny_dir, out):
    """A 'sparse' pruned folder: full shapes, half of each decoder linear in layers 1:5 zeroed."""
    from loram.prune import base_fingerprint
    from loram.testing import tiny_model, tiny_tokenizer

    m = tiny_model("llama-gqa")
    torch.manual_seed(0)
    with torch.no_grad():
        for i in range(1, 5):
            for lin in m.model.layers[i].modules():
                if isinstance(lin, torch.nn.Linear):
                    lin.weight.mul_(torch.rand_like(lin.weight) > 0.5)
    m.save_pretrained(str(out), safe_serialization=True)
    tiny_tokenizer().save_pretrained(str(out))
    PrunePlan(kind="sparse", method="magnitude", layers=(1, 5), mlp_ratio=0.5, attn_ratio=0.5,
              base={"name": str(tiny_dir), "config": m.config.to_dict(), "fingerprint": base_fingerprint(str(tiny_dir))},
              sparse={"pattern": "unstructured", "sparsity": 0.5}).save(out)
    return out


def test_align_keeps_sparse_zeros_exactly_zero(tiny_dir, corpus, tmp_path):
    src = make_sparse(tiny_dir, tmp_path / "sparse")
    align(src, tmp_path / "al", acfg(corpus, steps=3, lr=1e-2, weight_decay=0.1))
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "al" / "model.safetensors"))
    checked = 0
    for k in a:
        if ".layers." in k and k.endswith("proj.weight") and 1 <= int(k.split(".")[2]) < 5:
            zero = a[k] == 0
            assert zero.float().mean() > 0.3 and bool((b[k][zero] == 0).all()), k
            assert not torch.equal(a[k][~zero], b[k][~zero]), k  # the kept weights did train
            checked += 1
    assert checked == 4 * 7
    assert load_pruned(tmp_path / "al").loram_plan.extra["aligned"]["sparse_masks"] == 28


def test_token_budget_sets_steps(pruned_dir, corpus, tmp_path):
    c = acfg(corpus, tokens=300, seq_len=32, micro_batch=2, grad_accum=2)
    assert steps_for_tokens(300, c, world=1) == 3  # ceil(300 / 128)
    r = align(pruned_dir, tmp_path / "al", c)
    assert r.steps == 3 and r.tokens >= 300


def test_align_resume_is_exact(pruned_dir, corpus, tmp_path):
    c = acfg(corpus, steps=5, save_steps=2)
    full = align(pruned_dir, tmp_path / "full", c)
    shutil.copytree(tmp_path / "full-checkpoints" / "checkpoint-2", tmp_path / "part-checkpoints" / "checkpoint-2")
    part = align(pruned_dir, tmp_path / "part", c, resume=True)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(full.losses, part.losses)) < 1e-5 and len(part.losses) == 5
    A, B = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "part" / "model.safetensors"))
    assert max((A[k] - B[k]).abs().max().item() for k in A) < 1e-5


def test_align_refuses_non_pruned_folder_and_bad_corpus(tiny_dir, pruned_dir, corpus, tmp_path):
    with pytest.raises(LoramError, match="not a pruned model folder"):
        align(tiny_dir, tmp_path / "x", acfg(corpus))
    (tmp_path / "short.txt").write_text("hi\n")
    with pytest.raises(LoramError, match="fewer than one block"):
        align(pruned_dir, tmp_path / "y", acfg(corpus, data=[str(tmp_path / "short.txt")], data_weights=None))
