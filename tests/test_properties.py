"""Property tests (hypothesis) for recovery over random families, widths, GQA geometries, plans and ranks.

For any plan P (random kept MLP channels and KV groups per layer, random layer range) and any
pruned adapter (random non-zero lora_A and lora_B, random rank and targets):

    pruned model + pruned adapter  ==  zero_pruned(original) + recover(adapter)     (logits, < 1e-4 fp32)
    prune_tensors(recover_tensors(adapter)) == adapter                              (bit for bit)

Examples are derandomized (same examples every run, so CI is stable) and few, so the file runs in
seconds; raise max_examples locally to search harder.
"""

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from loram.families import COL_PRUNED, ROLES, geometry, is_tied_head, parse_name, weight_name
from loram.prune_plan import LayerPlan, PrunePlan
from loram.pruned_model import apply_plan
from loram.recover import recover_tensors
from loram.testing import TINY, prune_tensors, tiny_config, tiny_model, zero_pruned

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def subset(draw, n: int):
    """A sorted, non-empty subset of range(n), or None (kept whole)."""
    if draw(st.booleans()):
        return None
    keep = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    return sorted(keep)


@st.composite
def cases(draw):
    family = draw(st.sampled_from(sorted(TINY)))
    n_kv = draw(st.integers(1, 4))
    group = draw(st.integers(1, 3))
    geo = dict(num_key_value_heads=n_kv, num_attention_heads=n_kv * group, head_dim=draw(st.sampled_from([4, 8])),
               # transformers 5 requires hidden % n_heads == 0 (head_dim itself is free)
               hidden_size=n_kv * group * draw(st.sampled_from([2, 4, 6])), intermediate_size=draw(st.integers(4, 40)),
               num_hidden_layers=draw(st.integers(1, 4)), vocab_size=64,
               initializer_range=0.3)  # O(1) logits (0.02 gives ~0.05): adapter effects well above the tolerance
    n_layers = geo["num_hidden_layers"]
    start = draw(st.integers(0, n_layers - 1))
    end = draw(st.integers(start + 1, n_layers))
    pruned = {i: LayerPlan(mlp_keep=draw(subset(geo["intermediate_size"])), kv_keep=draw(subset(n_kv)))
              for i in range(start, end)}
    config = tiny_config(family, **geo)
    plan = PrunePlan(kind="structured", method="random", layers=(start, end), mlp_ratio=0.5, attn_ratio=0.5,
                     base={"name": "tiny", "config": config.to_dict()}, pruned=pruned)
    targets = draw(st.lists(st.sampled_from(ROLES), min_size=1, max_size=len(ROLES), unique=True))
    return dict(family=family, geo=geo, plan=plan, config=config, rank=draw(st.integers(1, 6)),
                targets=[f"{t}_proj" for t in targets], fill=draw(st.sampled_from(["zero", "normal"])),
                seed=draw(st.integers(0, 2**16)))


def random_lora(pm, seed: int) -> None:
    """Non-zero lora_A and lora_B (a freshly initialised B is zero and would make the test trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))


@settings(max_examples=20, **SETTINGS)
@given(cases())
def test_recovery_is_exact(c):
    plan, config = c["plan"], c["config"]
    original = tiny_model(c["family"], seed=c["seed"], **c["geo"])
    plan.validate(geometry(original.config))
    lcfg = LoraConfig(r=c["rank"], lora_alpha=2 * c["rank"], lora_dropout=0.0, target_modules=c["targets"])
    pm = get_peft_model(apply_plan(copy.deepcopy(original), plan), copy.deepcopy(lcfg))
    random_lora(pm, c["seed"])
    pm.eval()
    sd = get_peft_model_state_dict(pm)

    full = recover_tensors(sd, plan, config, fill=c["fill"], seed=c["seed"])
    ref = get_peft_model(zero_pruned(copy.deepcopy(original), plan), copy.deepcopy(lcfg))
    res = set_peft_model_state_dict(ref, full)
    assert not res.unexpected_keys
    assert not [k for k in res.missing_keys if "lora_" in k]  # every adapter tensor landed
    ref.eval()

    x = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(c["seed"]))
    with torch.no_grad():
        a, b = pm(input_ids=x).logits, ref(input_ids=x).logits
        with pm.disable_adapter():
            plain = pm(input_ids=x).logits
    assert (a - b).abs().max().item() < 1e-4
    # the adapter matters (10x the tolerance): dropping or misplacing it would fail the comparison
    assert (a - plain).abs().max().item() > 1e-3

    # recovery then re-pruning returns the pruned adapter exactly
    back = prune_tensors(full, plan, config)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@settings(max_examples=60, **SETTINGS)
@given(cases())
def test_recover_then_prune_is_identity_and_shapes_are_full(c):
    """Tensor-level (no model): recovered shapes are the original's, the pruned coordinates of a
    zero-filled recovery are exactly zero, and re-pruning is the identity for both fills."""
    plan, config = c["plan"], c["config"]
    g = geometry(config)
    gen = torch.Generator().manual_seed(c["seed"])
    r = c["rank"]
    sd, full_shape = {}, {}
    for i in range(g.n_layers):
        for role in ROLES:
            if f"{role}_proj" not in c["targets"]:
                continue
            out_f, in_f = plan.pruned_dim(i, role, g)
            mod = "self_attn" if role in ("q", "k", "v", "o") else "mlp"
            key = f"base_model.model.model.layers.{i}.{mod}.{role}_proj.lora_{{}}.weight"
            sd[key.format("A")] = torch.randn(r, in_f, generator=gen)
            sd[key.format("B")] = torch.randn(out_f, r, generator=gen)
            fo, fi = _full(role, g)
            full_shape[key.format("A")], full_shape[key.format("B")] = (r, fi), (fo, r)
    full = recover_tensors(sd, plan, config, fill=c["fill"], seed=c["seed"])
    for k, t in full.items():
        assert tuple(t.shape) == full_shape[k]
        layer, role, ab, _ = parse_name(k)
        idx = plan.kept_index(layer, role, g)
        axis = 1 if role in COL_PRUNED else 0
        if idx is not None and (ab == "A") == (role in COL_PRUNED) and (c["fill"] == "zero" or role not in COL_PRUNED):
            mask = torch.ones(t.shape[axis], dtype=torch.bool)
            mask[idx] = False
            assert torch.all(t.index_select(axis, mask.nonzero().squeeze(1)) == 0)
    back = prune_tensors(full, plan, config)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def _full(role: str, g) -> tuple[int, int]:
    return {"q": (g.n_heads * g.head_dim, g.hidden), "k": (g.n_kv_heads * g.head_dim, g.hidden),
            "v": (g.n_kv_heads * g.head_dim, g.hidden), "o": (g.hidden, g.n_heads * g.head_dim),
            "gate": (g.intermediate, g.hidden), "up": (g.intermediate, g.hidden), "down": (g.hidden, g.intermediate)}[role]


@settings(max_examples=8, **SETTINGS)
@given(cases())
def test_names_and_kept_along_describe_the_pruned_model(c):
    """parse_name reads every projection tensor of a model (base and LoRA names) and round-trips with
    weight_name, and the plan's kept_along selects exactly what apply_plan keeps of each tensor."""
    original = tiny_model(c["family"], seed=1, **c["geo"])
    g, plan = geometry(original.config), c["plan"]
    pruned = apply_plan(copy.deepcopy(original), plan).state_dict()
    for key, t in original.state_dict().items():
        name = parse_name(key)
        assert (name is not None) == key.endswith(("_proj.weight", "_proj.bias"))
        if name is not None:
            assert name.lora is None and weight_name(name.layer, name.role, name.kind) == key
        kept = plan.kept_along(key, g)
        assert torch.equal(pruned[key], t if kept is None else t.index_select(*kept))
        assert is_tied_head(key, g.tied) == (g.tied and key == "lm_head.weight")
    pm = get_peft_model(copy.deepcopy(original), LoraConfig(r=2, target_modules=c["targets"]))
    for key in get_peft_model_state_dict(pm):
        name = parse_name(key)
        assert name is not None and name.lora in ("A", "B") and f"{name.role}_proj" in c["targets"]
