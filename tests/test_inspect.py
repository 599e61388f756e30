"""`loram inspect`: map shapes, agreement with dense dW = s B A, pruned == recovered maps, zeros excluded."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from loram.adapter import write_adapter
from loram.families import geometry
from loram.inspect_adapter import adapter_norms, inspect, update_norms
from loram.prune.structured import select
from loram.prune_plan import PrunePlan
from loram.pruned_model import apply_plan
from loram.recover import recover_tensors
from loram.testing import tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LCFG = {"r": 4, "lora_alpha": 8}


@pytest.fixture(scope="module")
def setup():
    original = tiny_model("llama-gqa", seed=1)  # 6 query heads, 3 KV heads, head_dim 8, 6 layers
    g = geometry(original.config)
    plan = PrunePlan(kind="structured", method="random", layers=(1, 5), mlp_ratio=0.5, attn_ratio=0.4,
                     base={"name": "tiny", "config": original.config.to_dict()},
                     pruned=select(g, "random", range(1, 5), 0.5, 0.4, 0))
    pruned = apply_plan(copy.deepcopy(original), plan)
    torch.manual_seed(0)
    pm = get_peft_model(pruned, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    full = recover_tensors(sd, plan, original.config)
    return original.config, g, plan, sd, full


def dense(t, layer, proj, s=2.0):
    a = next(v for k, v in t.items() if f"layers.{layer}." in k and proj in k and "lora_A" in k)
    b = next(v for k, v in t.items() if f"layers.{layer}." in k and proj in k and "lora_B" in k)
    return s * b.double() @ a.double()


def test_shapes_and_dense_agreement(setup):
    config, g, plan, sd, full = setup
    n = update_norms(full, LCFG, config, plan, "recovered")
    assert len(n.heads["q"]) == g.n_layers and all(len(r) == g.n_heads for r in n.heads["q"])
    assert all(len(r) == g.n_kv_heads for r in n.heads["k"] + n.heads["v"])
    assert all(len(r) == g.n_heads for r in n.heads["o"])
    assert all(len(n.mlp[r]) == g.n_layers for r in ("gate", "up", "down"))
    # unpruned layer 0: every head present, equal to the dense Frobenius norm of its slice
    dq = dense(full, 0, "q_proj")
    for h in range(g.n_heads):
        assert n.heads["q"][0][h] == pytest.approx(dq[h * 8:(h + 1) * 8].norm().item(), rel=1e-9)
    do = dense(full, 0, "o_proj")
    for h in range(g.n_heads):
        assert n.heads["o"][0][h] == pytest.approx(do[:, h * 8:(h + 1) * 8].norm().item(), rel=1e-9)


def test_zeros_excluded_and_pruned_heads_blank(setup):
    config, g, plan, sd, full = setup
    n = update_norms(full, LCFG, config, plan, "recovered")
    layer = 2
    lp = plan.pruned[layer]
    dg = dense(full, layer, "gate_proj")
    rows = dg.norm(dim=1)
    assert (rows == 0).sum() == g.intermediate - len(lp.mlp_keep)  # recovered: zero rows at pruned channels
    assert n.mlp["gate"][layer] == pytest.approx(rows[lp.mlp_keep].mean().item(), rel=1e-9)
    assert n.mlp["gate"][layer] > rows.mean().item()  # the zeros would have diluted it
    dropped = [k for k in range(g.n_kv_heads) if k not in lp.kv_keep]
    assert dropped and all(n.heads["k"][layer][k] is None for k in dropped)
    q_dropped = [k * g.group + j for k in dropped for j in range(g.group)]
    assert all(n.heads["q"][layer][h] is None for h in q_dropped)
    assert all(n.heads["o"][layer][h] is None for h in q_dropped)
    assert all(n.heads["q"][layer][h] is not None for h in range(g.n_heads) if h not in q_dropped)


def test_pruned_and_recovered_adapters_give_the_same_maps(setup):
    config, g, plan, sd, full = setup
    a = update_norms(sd, LCFG, config, plan, "pruned")
    b = update_norms(full, LCFG, config, plan, "recovered")
    for role in a.heads:
        for ra, rb in zip(a.heads[role], b.heads[role]):
            assert [x is None for x in ra] == [x is None for x in rb]
            assert [x for x in ra if x is not None] == pytest.approx([x for x in rb if x is not None], rel=1e-9)
    for role in a.mlp:
        assert a.mlp[role] == pytest.approx(b.mlp[role], rel=1e-9)


def test_inspect_folder_writes_json_and_pngs(setup, tmp_path):
    config, g, plan, sd, full = setup
    ad = tmp_path / "rec"
    ad.mkdir()
    write_adapter(ad, full, dict(LCFG, peft_type="LORA"), {"stage": "recovered", "plan_id": plan.id}, plan)
    norms, files = inspect(ad, tmp_path / "maps")
    assert {f.name for f in files} == {"update_norms.json", "attn_heads.png", "mlp_layers.png"}
    d = json.loads((tmp_path / "maps" / "update_norms.json").read_text())
    assert d["stage"] == "recovered" and len(d["heads"]["v"]) == g.n_layers
    assert adapter_norms(ad).mlp == norms.mlp


def test_cli_inspect_json_only(setup, tmp_path, capsys):
    from loram.cli import main

    config, g, plan, sd, full = setup
    ad = tmp_path / "pruned"
    ad.mkdir()
    write_adapter(ad, sd, dict(LCFG, peft_type="LORA"), {"stage": "pruned", "plan_id": plan.id}, plan)
    assert main(["inspect", str(ad), "-o", str(tmp_path / "m"), "--no-plots"]) == 0
    assert "pruned adapter" in capsys.readouterr().out
    d = json.loads((tmp_path / "m" / "update_norms.json").read_text())
    assert len(d["heads"]["q"][0]) == g.n_heads and not (tmp_path / "m" / "attn_heads.png").exists()
    assert main(["inspect", str(tmp_path / "nope"), "-o", str(tmp_path / "m2")]) == 2


def test_cli_inspect_refuses_existing_output(setup, tmp_path, capsys):
    """-o EXISTING is refused (the user's file is kept); --overwrite replaces only a folder loram wrote."""
    from loram.cli import main

    config, g, plan, sd, full = setup
    ad = tmp_path / "pruned"
    ad.mkdir()
    write_adapter(ad, sd, dict(LCFG, peft_type="LORA"), {"stage": "pruned", "plan_id": plan.id}, plan)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["inspect", str(ad), "-o", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "already exists: choose another -o or pass --overwrite" in err
    assert (out / "notes.txt").read_text() == "keep me" and not (out / "update_norms.json").exists()
    # --overwrite does not replace a folder loram did not write (the user's notes stay) ...
    assert main(["inspect", str(ad), "-o", str(out), "--no-plots", "--overwrite"]) == 2
    assert "was not written by loram" in capsys.readouterr().err and (out / "notes.txt").read_text() == "keep me"
    # ... but replaces its own earlier output
    mine = tmp_path / "norms"
    assert main(["inspect", str(ad), "-o", str(mine), "--no-plots"]) == 0
    (mine / "update_norms.json").write_text("stale")
    assert main(["inspect", str(ad), "-o", str(mine), "--no-plots", "--overwrite"]) == 0
    assert (mine / "update_norms.json").read_text() != "stale"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".mine.", ".norms."))]
