"""`loram demo --smoke`: the whole demo pipeline (prune -> LoRA -> recover -> evaluate -> plots) on a tiny
random model, in seconds. Its numbers mean nothing; the wiring, files and table are what is checked."""

import json

from loram.demo_task import make_splits


def test_task_splits_are_disjoint_and_deterministic():
    a, b = make_splits(300, 40, 40, seed=0), make_splits(300, 40, 40, seed=0)
    assert a == b
    q = {s: {r["instruction"] for r in getattr(a, s)} for s in ("train", "dev", "test")}
    assert not (q["train"] & q["test"]) and not (q["train"] & q["dev"]) and not (q["dev"] & q["test"])
    r = a.test[0]
    words = r["instruction"].split(": ", 1)[1].split()
    assert r["output"].split() == words[::-1] and 3 <= len(words) <= 5


def test_demo_smoke(tmp_path, capsys):
    from loram.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--smoke", "--with-baseline", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LoRAM (recovered to original)" in printed and "served pruned" in printed
    d = json.loads((out / "demo.json").read_text())
    assert d["status"] == "done"
    names = [r["name"] for r in d["rows"]]
    assert len(names) == 4 and names[0].startswith("base") and names[3].startswith("plain LoRA")
    base, pruned, loram, plain = d["rows"]
    assert pruned["train_params"] < plain["train_params"] == loram["served_params"] == base["served_params"]
    assert loram["train_params"] == pruned["train_params"] and pruned["served_params"] == pruned["train_params"]
    assert all(r["ppl"] > 1 and 0 <= r["exact_match"] <= 1 for r in d["rows"])
    for f in ("loss_curves.png", "inspect-loram/attn_heads.png", "inspect-loram/mlp_layers.png", "results.md",
              "adapter-recovered/adapter_model.safetensors", "data/test.jsonl"):
        assert (out / f).exists(), f
    # running it again into the same folder replaces the previous demo
    assert main(["demo", "--smoke", "--out", str(out), "--json"]) == 0
    assert len(json.loads((out / "demo.json").read_text())["rows"]) == 3
    assert '"timings"' in capsys.readouterr().out
