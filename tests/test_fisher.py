"""`--method fisher`: per calibration sequence, the squared first-order loss change of removing a unit.

The score is checked against its definition with no autograd in the test: scaling every weight of a
unit by (1 + t) moves sequence s's loss at rate dL_s/dt = sum_unit W * dL_s/dW, so the fisher score is
sum_s (dL_s/dt)^2, measured here by central differences."""

import pytest
import torch

from loram.families import geometry, layer_module
from loram.prune import prune
from loram.prune.structured import calibration_batches, importance
from loram.prune_plan import PrunePlan
from loram.testing import save_tiny, tiny_model, tiny_tokenizer


def _unit_tensors(model, g, i: int, kind: str, u: int) -> list[tuple[torch.Tensor, tuple]]:
    """(parameter, index) of every weight of unit ``u`` of layer ``i``: a channel's gate/up rows and down
    column, or a KV group's k/v rows, its query heads' q rows and o columns (biases included)."""
    out = []
    if kind == "channel":
        for role in ("gate", "up"):
            lin = layer_module(model, i, role)
            out += [(lin.weight, (u,))] + ([(lin.bias, (u,))] if lin.bias is not None else [])
        out.append((layer_module(model, i, "down").weight, (slice(None), u)))
        return out
    kv, q = slice(u * g.head_dim, (u + 1) * g.head_dim), slice(u * g.group * g.head_dim, (u + 1) * g.group * g.head_dim)
    for role, rows in (("q", q), ("k", kv), ("v", kv)):
        lin = layer_module(model, i, role)
        out += [(lin.weight, (rows,))] + ([(lin.bias, (rows,))] if lin.bias is not None else [])
    out.append((layer_module(model, i, "o").weight, (slice(None), q)))
    return out


def _rate(model, ids, tensors, eps=1e-2) -> float:
    """d/dt of the sequence's loss when the unit's weights are scaled by (1 + t), at t = 0. The norms compute in
    fp32 even in a float64 model, so a small step drowns in rounding: 1e-2 leaves ~0.2 % error."""
    def loss(t):
        with torch.no_grad():
            saved = [p[idx].clone() for p, idx in tensors]
            for p, idx in tensors:
                p[idx] *= 1 + t
            logits = model(input_ids=ids, use_cache=False).logits  # the model's own loss casts to fp32: too coarse here
            value = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
            for (p, idx), s in zip(tensors, saved):
                p[idx] = s
        return value
    return (loss(eps) - loss(-eps)) / (2 * eps)


@pytest.mark.parametrize("family", ["llama-gqa", "llama-bias"])
def test_fisher_is_the_summed_square_of_each_sequences_loss_rate(family):
    model = tiny_model(family).double().eval()
    g = geometry(model.config)
    batches = calibration_batches(tiny_tokenizer(), None, 3, 16)[0]
    scores = importance(model, "fisher", range(1, 3), batches)
    for i in (1, 2):
        for kind, which, units in (("channel", 0, (0, 7, g.intermediate - 1)), ("group", 1, range(g.n_kv_heads))):
            for u in units:
                want = sum(_rate(model, ids, _unit_tensors(model, g, i, kind, u)) ** 2 for ids in batches)
                torch.testing.assert_close(scores[i][which][u].item(), want, rtol=1e-2, atol=0)


def test_fisher_adds_over_sequences_and_bounds_by_taylor():
    """fisher is a sum of per-sequence terms (two sequences score the sum of each alone); with one sequence it
    is (sum W G)^2 <= (sum |W G|)^2 = taylor^2, strictly where a unit's terms have mixed signs (they cancel)."""
    model = tiny_model("llama-gqa").eval()
    a, b = calibration_batches(tiny_tokenizer(), None, 2, 16)[0]
    fa, fb, fab = (importance(model, "fisher", range(1, 3), x) for x in ([a], [b], [a, b]))
    ta = importance(model, "taylor", range(1, 3), [a])
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())  # nothing left behind
    for i in (1, 2):
        for k in (0, 1):
            torch.testing.assert_close(fab[i][k], fa[i][k] + fb[i][k], rtol=1e-5, atol=0)
        assert bool((fa[i][0] <= ta[i][0].square() * (1 + 1e-5)).all())
        assert bool((fa[i][0] < ta[i][0].square() * 0.999).any())


def test_cli_fisher_plan_records_the_method(tmp_path):
    from loram.cli import main

    base = save_tiny(tmp_path / "b", "qwen2")
    main(["prune", str(base), "-o", str(tmp_path / "p"), "--method", "fisher", "--ratio", "0.5", "--calib-samples", "2",
          "--calib-seq-len", "16", "--allocate", "global"])
    plan = PrunePlan.load(tmp_path / "p")
    assert plan.method == "fisher" and plan.calibration["samples"] == 2 and plan.allocation == "global"
    taylor = prune(str(base), tmp_path / "t", method="taylor", ratio=0.5, calib_samples=2, calib_seq_len=16, allocate="global")
    assert plan.pruned != taylor.plan.pruned  # a different score, a different plan on the same calibration text


def test_planner_predicts_taylors_memory_for_fisher():
    """fisher runs taylor's passes and keeps two floats per unit more, so the streaming decision treats them alike."""
    from loram.planner import PruneSpec, preset_config
    from loram.planner.stages import StageInputs, predict_stage

    config = preset_config("Llama-2-7B")
    for inputs in (StageInputs(), StageInputs(calib_samples=64, calib_seq_len=256)):
        t, f = (predict_stage("prune", config, PruneSpec(m, 0.5, layers="0:32"), inputs) for m in ("taylor", "fisher"))
        assert (f.in_memory_bytes, f.streamed_bytes) == (t.in_memory_bytes, t.streamed_bytes)
        assert f.detail.startswith("fisher, ")
