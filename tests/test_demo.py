"""`loram demo --smoke`: the whole demo pipeline (prune -> LoRA -> recover -> evaluate -> plots) on a tiny
random model, in seconds. Its numbers mean nothing; the wiring, files and table are what is checked."""

import json
import math
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from loram.demo import GENERAL_TEXT, DemoConfig, general_text
from loram.demo_task import make_splits
from loram.eval import load_for_eval, perplexity_text


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
    # the general text column exists for every row, is finite, and is computed: the base row equals a direct
    # evaluation of the base folder on the same text
    assert all(math.isfinite(r["general_ppl"]) and r["general_ppl"] > 1 for r in d["rows"])
    cfg = DemoConfig.smoke_config()
    m, tok = load_for_eval(str(out / "base"))
    direct = perplexity_text(m, tok, general_text(cfg), seq_len=cfg.general_seq_len)
    assert math.isclose(base["general_ppl"], direct.ppl, rel_tol=1e-5) and d["config"]["general_tokens"] == direct.tokens
    flat = " ".join(printed.split())  # the console wraps long lines
    assert "general text ppl" in flat and "What the original kept" in flat and " ".join(d["closing"].split()) in flat
    assert "| general text perplexity |" in (out / "results.md").read_text()
    for f in ("loss_curves.png", "inspect-loram/attn_heads.png", "inspect-loram/mlp_layers.png", "results.md",
              "adapter-recovered/adapter_model.safetensors", "data/test.jsonl"):
        assert (out / f).exists(), f
    # running it again into the same folder replaces the previous demo
    assert main(["demo", "--smoke", "--out", str(out), "--json"]) == 0
    assert len(json.loads((out / "demo.json").read_text())["rows"]) == 3
    assert '"timings"' in capsys.readouterr().out


def test_general_text_is_shipped_with_its_source_and_license():
    """The general text is a few hundred lines of prose, with its source and license beside it, and both
    files match the package-data patterns (so a wheel ships them)."""
    lines = GENERAL_TEXT.read_text(encoding="utf-8").splitlines()
    assert 300 <= len(lines) <= 600 and sum(len(x.split()) for x in lines) > 3000
    lic = GENERAL_TEXT.with_name("general_text.LICENSE.md").read_text()
    assert "Persuasion" in lic and "Jane Austen" in lic and "public domain" in lic
    patterns = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["loram"]
    for f in ("data/general_text.txt", "data/general_text.LICENSE.md"):
        assert any(fnmatch(f, p) for p in patterns), f
    # the smoke variant scores a prefix of the same text
    assert general_text(DemoConfig.smoke_config()).splitlines() == lines[:40]
