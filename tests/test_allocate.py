"""`loram prune --allocate global`: the removed MLP channels ranked across the layer range.

The same number of channels leaves as with --allocate uniform (so the same parameter count and the
planner's prediction still hold), but each layer loses what the scores say it can spare."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from loram.families import geometry
from loram.loading import load_pruned
from loram.prune import prune
from loram.prune.structured import mlp_widths, select
from loram.prune_plan import PrunePlan, kept_mlp_channels
from loram.pruned_model import apply_plan, count_params
from loram.recover import recover_tensors
from loram.testing import prune_tensors, save_tiny, tiny_model
from loram.errors import LoramError


def _geometry(intermediate=100, n_kv=2):
    from types import SimpleNamespace

    return SimpleNamespace(intermediate=intermediate, n_kv_heads=n_kv)


def test_global_removes_the_same_total_from_the_least_important_layers():
    g = _geometry()
    layers = range(2, 5)
    # layer 2's channels score low, layer 4's high: a global ranking takes from layer 2 first
    scores = {2: (torch.linspace(0, 1, 100), torch.ones(2)), 3: (torch.linspace(1, 2, 100), torch.ones(2)),
              4: (torch.linspace(5, 6, 100), torch.ones(2))}
    uniform = mlp_widths(g, "taylor", layers, 0.5, "uniform")
    assert uniform == {i: kept_mlp_channels(100, 0.5) for i in layers} == {2: 50, 3: 50, 4: 50}
    w = mlp_widths(g, "taylor", layers, 0.5, "global", scores)
    assert sum(100 - k for k in w.values()) == sum(100 - k for k in uniform.values())  # the same total
    # no layer loses more than halfway from the ratio to all of it (0.75 of 100): the rest comes from layer 3
    assert w == {2: 25, 3: 25, 4: 100}
    # a ratio near 1 still leaves every layer a channel (the cap is at most n - 1)
    assert min(mlp_widths(g, "taylor", layers, 0.98, "global", scores).values()) >= 1
    plans = select(g, "taylor", layers, 0.5, 0.0, 0, scores, "global")
    assert plans[4].mlp_keep is None  # untouched layers keep their MLP whole
    assert plans[2].mlp_keep == list(range(75, 100))  # the highest-scored channels are the kept ones


def test_global_ranking_follows_the_scores_and_ties_stay_reproducible():
    g = _geometry()
    gen = torch.Generator().manual_seed(0)
    scores = {i: (torch.rand(100, generator=gen) * (i + 1), torch.ones(2)) for i in range(4)}
    w = mlp_widths(g, "taylor", range(4), 0.3, "global", scores)
    # the threshold is global: every removed channel scores below every kept one, within the cap
    removed = torch.cat([scores[i][0].sort().values[: 100 - w[i]] for i in range(4)])
    kept = torch.cat([scores[i][0].sort().values[100 - w[i]:] for i in range(4)])
    assert removed.max() <= kept.min()
    assert w[0] < w[3]  # the layer with the smallest scores loses the most
    flat = {i: (torch.ones(100), torch.ones(2)) for i in range(4)}  # all ties: lower layers first, same every time
    assert mlp_widths(g, "taylor", range(4), 0.3, "global", flat) == mlp_widths(g, "taylor", range(4), 0.3, "global", flat)
    with pytest.raises(LoramError, match="random has none"):
        mlp_widths(g, "random", range(4), 0.3, "global")
    with pytest.raises(LoramError, match="unknown --allocate"):
        mlp_widths(g, "taylor", range(4), 0.3, "layerwise", flat)


@pytest.mark.parametrize("stream", [False, True])
def test_prune_global_writes_a_loadable_folder_with_the_uniform_parameter_count(tmp_path, stream):
    base = save_tiny(tmp_path / "base", "llama-gqa")
    kw = dict(method="taylor", ratio=0.5, attn_ratio=0.0, calib_samples=2, calib_seq_len=32, stream=stream)
    u = prune(str(base), tmp_path / "u", **kw)
    r = prune(str(base), tmp_path / "g", allocate="global", **kw)
    plan = PrunePlan.load(tmp_path / "g")
    assert plan.allocation == "global" and u.plan.allocation is None and "allocation" not in u.plan.to_dict()
    widths = [len(lp.mlp_keep) if lp.mlp_keep is not None else geometry(plan.base_config()).intermediate
              for lp in plan.pruned.values()]
    assert len(set(widths)) > 1  # the widths differ per layer
    assert r.params_pruned == u.params_pruned == count_params(load_pruned(tmp_path / "g"))  # same total removed
    assert PrunePlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


def test_streamed_and_in_memory_global_plans_agree(tmp_path):
    base = save_tiny(tmp_path / "base", "llama-bias")
    kw = dict(method="taylor", ratio=0.5, calib_samples=2, calib_seq_len=16, allocate="global")
    a = prune(str(base), tmp_path / "mem", stream=False, **kw)
    b = prune(str(base), tmp_path / "str", stream=True, **kw)
    assert a.plan.id == b.plan.id


def test_recovery_is_exact_on_a_global_plan():
    """pruned model + adapter == original with the pruned rows/cols zeroed + recovered adapter, per-layer widths."""
    from loram.testing import zero_pruned

    original = tiny_model("llama-gqa", seed=1)
    g = geometry(original.config)
    layers = range(1, g.n_layers - 1)
    gen = torch.Generator().manual_seed(3)
    scores = {i: (torch.rand(g.intermediate, generator=gen) * (i + 1), torch.rand(g.n_kv_heads, generator=gen)) for i in layers}
    plan = PrunePlan(kind="structured", method="taylor", layers=(layers.start, layers.stop), mlp_ratio=0.5, attn_ratio=0.5,
                     base={"name": "tiny", "config": original.config.to_dict()}, allocation="global",
                     pruned=select(g, "taylor", layers, 0.5, 0.5, 0, scores, "global"))
    assert len({len(lp.mlp_keep) for lp in plan.pruned.values()}) > 1
    pruned = apply_plan(copy.deepcopy(original), plan)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(pruned, cfg).eval()
    sd = get_peft_model_state_dict(pm)
    full = recover_tensors(sd, plan, original.config)
    ref = get_peft_model(zero_pruned(copy.deepcopy(original), plan), copy.deepcopy(cfg))
    from peft import set_peft_model_state_dict

    assert not set_peft_model_state_dict(ref, full).unexpected_keys
    x = torch.randint(3, 256, (2, 16))
    with torch.no_grad():
        assert (pm(input_ids=x).logits - ref.eval()(input_ids=x).logits).abs().max().item() < 1e-4
    back = prune_tensors(full, plan, original.config)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_a_plan_with_an_unknown_allocation_is_refused(tmp_path):
    base = save_tiny(tmp_path / "base", "llama-gqa")
    prune(str(base), tmp_path / "p", method="magnitude", ratio=0.5, allocate="global")
    d = PrunePlan.load(tmp_path / "p").to_dict()
    d["allocation"] = "per-layer"
    with pytest.raises(LoramError, match="field allocation"):
        PrunePlan.from_dict(d)


def test_cli_prints_the_widths_and_the_card_names_the_allocation(tmp_path, capsys):
    from loram.cli import main

    base = save_tiny(tmp_path / "base", "llama-gqa")
    assert main(["prune", str(base), "-o", str(tmp_path / "p"), "--method", "magnitude", "--allocate", "global", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "MLP allocation" in out and "channels kept per layer" in out
    assert "global allocation over the layers" in (tmp_path / "p" / "README.md").read_text()


def test_build_from_a_global_plan_equals_the_pruned_folder(tmp_path):
    """`loram build` (the pruned model built from the original, one tensor at a time) reads the per-layer widths."""
    import loram.build as B

    base = save_tiny(tmp_path / "base", "qwen2")
    prune(str(base), tmp_path / "p", method="wanda-sp", ratio=0.5, calib_samples=2, calib_seq_len=16, allocate="global")
    plan = PrunePlan.load(tmp_path / "p")
    ref = load_pruned(tmp_path / "p")
    built = B.build_pruned(None, plan, source=base, dtype=torch.float32)
    sa, sb = ref.state_dict(), built.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
