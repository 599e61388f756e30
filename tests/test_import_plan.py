"""`loram import-plan`: plans from a sparse model and from kept-index lists pruned by another tool."""

import json

import pytest
import torch

from loram.errors import LoramError
from loram.families import ROLES, geometry, layer_module
from loram.import_plan import import_sparse, import_structured
from loram.loading import load_pruned
from loram.prune import base_fingerprint
from loram.prune.pattern import parse_pattern
from loram.prune.structured import select
from loram.prune.wanda import magnitude_mask
from loram.prune_plan import PrunePlan
from loram.pruned_model import apply_plan
from loram.testing import tiny_model, tiny_tokenizer


def save_sparse(out, pattern, layers):
    """A model 'pruned elsewhere': magnitude-sparse linears in ``layers``, saved without any loram file."""
    m = tiny_model("llama-gqa")
    with torch.no_grad():
        for i in layers:
            for r in ROLES:
                w = layer_module(m, i, r).weight
                w.masked_fill_(magnitude_mask(w, parse_pattern(pattern, 0.6 if pattern == "unstructured" else None)), 0)
    m.save_pretrained(str(out), safe_serialization=True)
    tiny_tokenizer().save_pretrained(str(out))
    return m


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_import_sparse_model(tmp_path, tiny_dir, pattern):
    m = save_sparse(tmp_path / "ext", pattern, range(2, 5))
    plan = import_sparse(tmp_path / "ext", tiny_dir, tmp_path / "P")
    assert plan.kind == "sparse" and plan.layers == (2, 5) and plan.sparse["pattern"] == pattern
    assert plan.base["fingerprint"] == base_fingerprint(str(tiny_dir)) and plan.base["name"] == str(tiny_dir)
    assert plan.sparse["sparsity"] == pytest.approx(0.5 if pattern == "2:4" else 0.6, abs=0.01)
    loaded = load_pruned(tmp_path / "P")
    assert loaded.loram_plan.id == PrunePlan.load(tmp_path / "P").id
    sd = m.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(LoramError, match="no zeros"):
        import_sparse(tiny_dir, tiny_dir, tmp_path / "same")


def test_import_sparse_refuses_another_architecture(tmp_path, tiny_dir):
    from loram.testing import save_tiny

    save_tiny(tmp_path / "other", "llama-gqa", num_hidden_layers=4)
    with pytest.raises(LoramError, match="architecture"):
        import_sparse(tmp_path / "other", tiny_dir, tmp_path / "P")


def structured_elsewhere(tmp_path, attn_ratio=0.5):
    """A structurally pruned checkpoint (smaller tensors, safetensors) + its kept-index JSON, as another tool writes."""
    from safetensors.torch import save_file

    m = tiny_model("llama-gqa")
    g = geometry(m.config)
    plan = PrunePlan(kind="structured", method="random", layers=(1, 5), base={}, mlp_ratio=0.5, attn_ratio=attn_ratio,
                     pruned=select(g, "random", range(1, 5), 0.5, attn_ratio, seed=3))
    apply_plan(m, plan)
    (tmp_path / "ext").mkdir()
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(sd, str(tmp_path / "ext" / "model.safetensors"))
    kept = {str(i): {k: v for k, v in vars(lp).items() if v is not None} for i, lp in plan.pruned.items()}
    (tmp_path / "kept.json").write_text(json.dumps(kept))
    return m, plan


def test_import_structured_from_kept_lists(tmp_path, tiny_dir):
    m, ref = structured_elsewhere(tmp_path)
    plan = import_structured(tmp_path / "ext", tiny_dir, tmp_path / "kept.json", tmp_path / "P")
    assert plan.kind == "structured" and plan.layers == (1, 5) and plan.pruned == ref.pruned
    assert plan.extra["validated"] == "shapes+values" and plan.extra["params_pruned"] < plan.extra["params_original"]
    loaded = load_pruned(tmp_path / "P")
    x = torch.randint(3, 256, (1, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, m(input_ids=x).logits, atol=1e-5)


def test_import_structured_validates_against_both_checkpoints(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    _, ref = structured_elsewhere(tmp_path)
    kept = json.loads((tmp_path / "kept.json").read_text())
    layer = next(k for k, v in kept.items() if "mlp_keep" in v)
    ch = kept[layer]["mlp_keep"]
    # same shapes, wrong rows: a dropped channel instead of the last kept one
    other = next(c for c in range(80) if c not in ch)
    bad = dict(kept, **{layer: dict(kept[layer], mlp_keep=sorted([other] + ch[:-1]))})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(LoramError, match="not the original's kept rows"):
        import_structured(tmp_path / "ext", tiny_dir, tmp_path / "bad.json", tmp_path / "P")
    # wrong count: shapes disagree
    short = dict(kept, **{layer: dict(kept[layer], mlp_keep=ch[:-1])})
    (tmp_path / "short.json").write_text(json.dumps(short))
    with pytest.raises(LoramError, match="shape"):
        import_structured(tmp_path / "ext", tiny_dir, tmp_path / "short.json", tmp_path / "P")
    unsorted = dict(kept, **{layer: dict(kept[layer], mlp_keep=ch[::-1])})
    (tmp_path / "unsorted.json").write_text(json.dumps(unsorted))
    with pytest.raises(LoramError, match="increasing order"):
        import_structured(tmp_path / "ext", tiny_dir, tmp_path / "unsorted.json", tmp_path / "P")
    # retrained after pruning: values differ, --allow-retrained checks shapes only
    sd = load_file(tmp_path / "ext" / "model.safetensors")
    key = f"model.layers.{layer}.mlp.up_proj.weight"
    sd[key] = sd[key] + 0.01
    save_file(sd, str(tmp_path / "ext" / "model.safetensors"))
    with pytest.raises(LoramError, match="allow-retrained"):
        import_structured(tmp_path / "ext", tiny_dir, tmp_path / "kept.json", tmp_path / "P")
    plan = import_structured(tmp_path / "ext", tiny_dir, tmp_path / "kept.json", tmp_path / "P", allow_retrained=True)
    assert plan.extra["validated"] == "shapes" and plan.pruned == ref.pruned


def test_cli_import_plan_and_pickles_refused(tmp_path, tiny_dir):
    from loram.cli import main

    save_sparse(tmp_path / "ext", "2:4", range(1, 3))
    assert main(["import-plan", str(tmp_path / "ext"), "--base", str(tiny_dir), "-o", str(tmp_path / "P")]) == 0
    assert PrunePlan.load(tmp_path / "P").sparse["pattern"] == "2:4"
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "pytorch_model.bin").write_bytes(b"not loaded")
    (tmp_path / "kept.json").write_text(json.dumps({"1": {"mlp_keep": [0, 1]}}))
    assert main(["import-plan", str(tmp_path / "pk"), "--base", str(tiny_dir), "--kept-index", str(tmp_path / "kept.json"),
                 "-o", str(tmp_path / "Q")]) == 2
    assert not (tmp_path / "Q").exists()
