"""`loram run RECIPE.yaml`: shipped recipes validate with --dry-run; a tiny recipe runs end to end
and a second run skips every up-to-date stage, re-running only what a changed knob affects."""

import json
from pathlib import Path

import pytest

from loram.errors import LoramError
from loram.recipe import STAGE_FILE, load_recipe, run_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", ["llama2-13b-loram-stru.yaml", "llama31-70b-qloram-stru.yaml"])
def test_paper_recipes_dry_run(name, capsys):
    steps = run_recipe(RECIPES / name, dry_run=True)
    assert [s.stage for s in steps] == ["prune", "align", "train", "recover", "merge", "eval"]
    assert all(s.status == "run" for s in steps)
    out = capsys.readouterr().out
    assert "loram prune meta-llama/" in out and "--targets" in out
    header = [x for x in (RECIPES / name).read_text().splitlines() if x.startswith("#")]
    assert any(f"loram run recipes/{name}" in x for x in header)  # the header holds the exact command


def test_smollm2_recipe_dry_run(tmp_path, alpaca_file):
    """The shipped SmolLM2 recipe validates. Its data paths (benchmark data outside the repo) are
    pointed at a local file, keeping their slices and weights; everything else is as shipped."""
    import re

    import yaml

    def local(x):
        if isinstance(x, dict):
            return {k: local(v) for k, v in x.items()}
        if isinstance(x, list):
            return [local(v) for v in x]
        if isinstance(x, str) and re.search(r"\.(jsonl?|txt)(\[|=|$)", x):
            return re.sub(r"^[^\[=]+", str(alpaca_file), x)
        return x

    r = local(yaml.safe_load((RECIPES / "smollm2-loram.yaml").read_text()))
    r["workdir"] = str(tmp_path / "w")
    p = tmp_path / "smollm2-loram.yaml"
    p.write_text(yaml.safe_dump(r))
    steps = run_recipe(p, dry_run=True, echo=lambda *a: None)
    assert [s.stage for s in steps] == ["prune", "align", "train", "recover", "merge", "eval"]


def write_recipe(tmp_path, tiny_dir, alpaca_file, steps=3):
    p = tmp_path / "r.yaml"
    p.write_text(f"""
base: {tiny_dir}
workdir: {tmp_path / 'w'}
prune: {{method: magnitude, ratio: 0.5}}
train:
  data: ["{alpaca_file}[:48]"]
  eval: {{held: "{alpaca_file}[48:]"}}
  steps: {steps}
  micro_batch: 2
  lr: 1.0e-2
  seq_len: 64
  save_steps: 2
recover: {{fill: zero}}
merge: {{}}
eval:
  ppl: {{held: "{alpaca_file}[48:]"}}
  seq_len: 64
""")
    return p


def test_tiny_recipe_end_to_end_then_skips(tiny_dir, alpaca_file, tmp_path):
    p = write_recipe(tmp_path, tiny_dir, alpaca_file)
    steps = run_recipe(p)
    w = tmp_path / "w"
    assert [s.status for s in steps] == ["run"] * 5
    for d in ("pruned", "adapter", "recovered", "merged"):
        assert (w / d / STAGE_FILE).exists(), d
    if (w / "eval").exists():  # evaluation comes from loram.eval when installed
        res = json.loads((w / "eval" / "results.json").read_text())
        assert res["results"][0]["task"] == "held" and res["results"][0]["value"] > 1
    assert [s.status for s in run_recipe(p, dry_run=True)] == ["skip"] * 4 + ["skip" if (w / "eval").exists() else "run"]
    # a changed train knob re-runs train and everything after it, not prune
    p2 = write_recipe(tmp_path, tiny_dir, alpaca_file, steps=4)
    assert [s.status for s in run_recipe(p2, dry_run=True)] == ["skip", "rerun", "rerun", "rerun", "rerun" if (w / "eval").exists() else "run"]
    run_recipe(p2)
    assert json.loads((w / "adapter" / "train_report.json").read_text())["steps"] == 4


@pytest.mark.parametrize("body, match", [
    ("base: x\nworkdir: w\n", "no `train`"),
    ("base: x\nworkdir: w\ntrain: {data: [a.jsonl]}\nfinetune: {}\n", "unknown section"),
    ("base: x\nworkdir: w\ntrain: {data: [a.jsonl], rnak: 8}\n", "unknown train knob"),
    ("base: x\nworkdir: w\ntrain: {data: [missing.jsonl]}\n", "does not exist"),
    ("base: x\nworkdir: w\ntrain: {data: [owner/set], lr: 1e-4}\n", "is not a float"),
    ("base: x\nworkdir: w\nalign: {data: [c.txt]}\ntrain: {data: [owner/set]}\n", "align needs a prune"),
    ("base: x\nworkdir: w\nprune: {ratio: 1.5}\ntrain: {data: [owner/set]}\n", "prune.ratio 1.5"),
    ("[1, 2", "not valid YAML"),
])
def test_bad_recipes_fail_clearly(tmp_path, body, match):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(LoramError, match=match):
        run_recipe(p, dry_run=True)
