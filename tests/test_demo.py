"""`loram demo --smoke`: the whole demo pipeline (prune -> LoRA -> recover -> evaluate -> plots) on a tiny
random model, in seconds. Its numbers mean nothing; the wiring, files and table are what is checked."""

import json
import math
from fnmatch import fnmatch
from pathlib import Path

import tomllib

from loram.demo import DemoConfig
from loram.demo_general import ANCHOR_SOURCE, ANCHOR_TEXT, CAPITALS, GENERAL_TEXT, capital_quiz, capitals, general_text, standard_error
from loram.demo_task import make_splits
from loram.eval import load_for_eval, multiple_choice, perplexity_text


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
    # the general columns exist for every row, are finite, and are computed: the base row equals a direct
    # evaluation of the base folder on the same text and quiz
    assert all(math.isfinite(r["general_ppl"]) and r["general_ppl"] > 1 for r in d["rows"])
    assert all(0 <= r["quiz_acc"] <= 1 and math.isfinite(r["quiz_se"]) for r in d["rows"])
    cfg = DemoConfig.smoke_config()
    m, tok = load_for_eval(str(out / "base"))
    direct = perplexity_text(m, tok, general_text(cfg.general_lines), seq_len=cfg.general_seq_len)
    assert math.isclose(base["general_ppl"], direct.ppl, rel_tol=1e-5) and d["config"]["general_tokens"] == direct.tokens
    mc = multiple_choice(m, tok, capital_quiz(cfg.quiz_rows, seed=cfg.seed))
    assert base["quiz_acc"] == mc.acc_norm and d["config"]["quiz_n"] == mc.n == cfg.quiz_rows
    assert base["quiz_se"] == standard_error(mc.acc_norm, mc.n)
    flat = " ".join(printed.split())  # the console wraps long lines
    assert "general text ppl" in flat and "What the original kept" in flat and " ".join(d["closing"].split()) in flat
    assert "| general text perplexity | capital quiz acc_norm" in (out / "results.md").read_text()
    for f in ("loss_curves.png", "inspect-loram/attn_heads.png", "inspect-loram/mlp_layers.png", "results.md",
              "adapter-recovered/adapter_model.safetensors", "data/test.jsonl"):
        assert (out / f).exists(), f
    # the adapter was trained through the original (the default), on MLP-only pruning (attention kept whole)
    meta = json.loads((out / "adapter-pruned" / "loram_adapter.json").read_text())
    assert meta["original_offset"]["examples"] > 0 and meta["train"]["original_offset"]
    assert json.loads((out / "pruned" / "loram_plan.json").read_text())["attn_ratio"] == 0
    assert "anchor" not in meta and d["config"]["anchor_text"] is None
    # running it again into the same folder replaces the previous demo; --plain trains the paper's way, and
    # --anchor (independent of it) keeps the adapter from changing the shipped anchor text's predictions
    assert main(["demo", "--smoke", "--out", str(out), "--json", "--plain", "--anchor"]) == 0
    d = json.loads((out / "demo.json").read_text())
    assert len(d["rows"]) == 3 and d["config"]["anchor_text"] == ANCHOR_SOURCE
    meta = json.loads((out / "adapter-pruned" / "loram_adapter.json").read_text())
    assert "original_offset" not in meta and meta["anchor"]["source"] == str(ANCHOR_TEXT) and meta["anchor"]["weight"] == 1.0
    assert '"timings"' in capsys.readouterr().out


def test_general_data_is_shipped_with_its_source_and_license():
    """The general text (a few hundred lines of prose) and the capitals each have their source and license
    beside them, and all four files match the package-data patterns (so a wheel ships them)."""
    lines = GENERAL_TEXT.read_text(encoding="utf-8").splitlines()
    assert 300 <= len(lines) <= 600 and sum(len(x.split()) for x in lines) > 3000
    lic = GENERAL_TEXT.with_name("general_text.LICENSE.md").read_text()
    assert "Persuasion" in lic and "Jane Austen" in lic and "public domain" in lic
    lic = CAPITALS.with_name("capitals.LICENSE.md").read_text()
    assert "bsdgames" in lic and "BSD-3-Clause" in lic and "The Regents of the University of California" in lic
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["loram"]
    lic = ANCHOR_TEXT.with_name("anchor_text.LICENSE.md").read_text()
    assert "Northanger Abbey" in lic and "Jane Austen" in lic and "public domain" in lic
    # the anchor text is another novel: no line of the scored general text is in it
    anchor = set(ANCHOR_TEXT.read_text(encoding="utf-8").splitlines())
    assert len(anchor) > 300 and not {x for x in lines if x.strip()} & anchor
    for f in ("general_text.txt", "general_text.LICENSE.md", "capitals.txt", "capitals.LICENSE.md", "anchor_text.txt",
              "anchor_text.LICENSE.md"):
        assert any(fnmatch(f"data/{f}", p) for p in patterns), f
    # the smoke variant scores a prefix of the same text
    assert general_text(40).splitlines() == lines[:40]


def test_capital_quiz_rows_are_valid_and_deterministic():
    """Every place is asked once; its capital is among 4 distinct choices of its own region, at ``gold``."""
    table = capitals()
    assert len(table) == len({(r, p) for r, p, _ in table}) >= 200
    region_caps = {}
    for region, _, cap in table:
        region_caps.setdefault(region, set()).add(cap)
    quiz = capital_quiz()
    assert quiz == capital_quiz() and len(quiz) == len(table)
    for (region, place, cap), q in zip(table, quiz):
        assert place in q["query"] and q["choices"][q["gold"]] == cap
        assert len(set(q["choices"])) == 4 and set(q["choices"]) <= region_caps[region]
    # the gold position is spread over the 4 slots (a position bias would inflate or deflate acc)
    assert all(sum(q["gold"] == g for q in quiz) > len(quiz) / 8 for g in range(4))
    sample = capital_quiz(8, seed=1)
    assert len(sample) == 8 and sample == capital_quiz(8, seed=1) and sample != capital_quiz(8, seed=2)
    assert math.isclose(standard_error(0.5, 100), 0.05)


def test_demo_never_writes_into_a_folder_it_did_not_write(tmp_path, capsys):
    """A non-empty folder without demo.json is refused, --overwrite or not, before anything is written."""
    from loram.cli import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert main(["demo", "--smoke", "-o", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not a demo folder (no demo.json)" in err
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
