"""`loram run RECIPE.yaml`: shipped recipes validate with --dry-run; a tiny recipe runs end to end
and a second run skips every up-to-date stage, re-running only what a changed knob affects."""

import json
import re
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


@pytest.mark.parametrize("name", ["smollm2-loram.yaml", "smollm2-loram-quality.yaml"])
def test_smollm2_recipe_dry_run(name, tmp_path, alpaca_file, capsys):
    """The shipped SmolLM2 recipes validate. Their data paths (benchmark data outside the repo) are
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

    shipped = yaml.safe_load((RECIPES / name).read_text())
    r = local(shipped)
    r["workdir"] = str(tmp_path / "w")
    p = tmp_path / name
    p.write_text(yaml.safe_dump(r))
    steps = run_recipe(p, dry_run=True)
    out = capsys.readouterr().out
    if name == "smollm2-loram.yaml":
        assert [s.stage for s in steps] == ["prune", "align", "train", "recover", "merge", "eval"]
    else:  # the benchmark's best setting reaches the stage commands; no alignment: the layer offset needs none
        assert [s.stage for s in steps] == ["prune", "train", "recover", "merge", "eval"]
        assert "--allocate global" in out and "--original-offset" in out and "--offset-at layers" in out
        assert shipped["prune"]["layers"] == "0:30" and shipped["train"]["lr"] == 2.0e-3
        assert "--method fisher" in out and "--calib-data" in out and "--anchor" in out  # stop 19's setting


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
    last = "rerun" if (w / "eval").exists() else "run"
    assert [s.status for s in run_recipe(p2, dry_run=True)] == ["skip", "rerun", "rerun", "rerun", last]
    run_recipe(p2)
    assert json.loads((w / "adapter" / "train_report.json").read_text())["steps"] == 4


@pytest.mark.parametrize("body, match", [
    ("base: x\nworkdir: w\n", "no `train`"),
    ("base: x\nworkdir: w\ntrain: {data: [a.jsonl]}\nfinetune: {}\n", "unknown section"),
    ("base: x\nworkdir: w\ntrain: {data: [a.jsonl], rnak: 8}\n", "unknown train knob"),
    ("base: x\nworkdir: w\ntrain: {data: [missing.jsonl]}\n", "does not exist"),
    ("base: x\nworkdir: w\ntrain: {data: [owner/set], lr: fast}\n", "train.lr 'fast' is not a number: use a number > 0"),
    ("base: x\nworkdir: w\nalign: {data: [c.txt]}\ntrain: {data: [owner/set]}\n", "align needs a prune"),
    ("base: x\nworkdir: w\nprune: {ratio: 1.5}\ntrain: {data: [owner/set]}\n", "prune.ratio 1.5"),
    ("[1, 2", "not valid YAML"),
])
def test_bad_recipes_fail_clearly(tmp_path, body, match):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(LoramError, match=match):
        run_recipe(p, dry_run=True)


# ---- bounded YAML, and every knob checked like its flag (issue 13, item 9) -------------------------
LAUGHS = "base: x\nworkdir: w\ntrain: {data: [owner/set]}\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefghi", "bcdefghij"))


def write(tmp_path, body: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(body)
    return p


def test_nested_aliases_refused_at_once(tmp_path, capsys):
    """A billion-laughs recipe (9^10 'lol's if expanded) fails in milliseconds, as one line."""
    import time

    from loram.cli import main

    p = write(tmp_path, LAUGHS)
    assert len(LAUGHS) < 700
    t = time.perf_counter()
    assert main(["run", str(p), "--dry-run"]) == 2
    assert time.perf_counter() - t < 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "uses a YAML alias (*name): write the values out" in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("body, match", [
    ("base: x\nworkdir: w\ntrain: {data: [owner/set]}\nx: " + "[" * 40 + "]" * 40 + "\n", "nests deeper than 16 levels"),
    ("base: x\nworkdir: w\ntrain: {data: [owner/set]}\n" + "# padding\n" * 120_000, "larger than 1 MB"),
    ("base: x\nworkdir: w\ntrain: &t {data: [owner/set]}\nalign: *t\n", "uses a YAML alias"),
    (b"base: x\nworkdir: w\ntrain: {data: [owner/\xff]}\n", "is not UTF-8"),
])
def test_yaml_is_bounded(tmp_path, body, match):
    p = tmp_path / "r.yaml"
    p.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(LoramError, match=re.escape(match)):
        load_recipe(p)


def test_unquoted_layers_stay_text(tmp_path):
    """YAML 1.1 reads 1:4 as the base-60 integer 64; a recipe reads the text "1:4" (and 1e-4 as a float)."""
    r = load_recipe(write(tmp_path, "base: x\nworkdir: w\nprune: {layers: 1:4}\ntrain: {data: [owner/set], lr: 1e-4}\n"))
    assert r.stages["prune"]["layers"] == "1:4" and r.stages["train"]["lr"] == 1e-4


def test_layers_as_a_number_is_refused(tmp_path):
    with pytest.raises(LoramError, match=re.escape('prune.layers 4 is not START:END text: write e.g. layers: "4:28"')):
        load_recipe(write(tmp_path, "base: x\nworkdir: w\nprune: {layers: 4}\ntrain: {data: [owner/set]}\n"))


def test_layers_outside_the_base_fail_the_dry_run(tiny_dir, tmp_path):
    """--dry-run makes the config check `loram prune` makes first (the tiny base has 6 layers)."""
    p = write(tmp_path, f"base: {tiny_dir}\nworkdir: {tmp_path / 'w'}\nprune: {{layers: 1:40}}\ntrain: {{data: [owner/set]}}\n")
    for dry in (True, False):
        with pytest.raises(LoramError, match="prune.layers: --layers 1:40 is outside the model's 6 layers"):
            run_recipe(p, dry_run=dry, echo=lambda *a: None)
    assert not (tmp_path / "w").exists()


def test_quoted_number_reads_as_the_flag_reads_it(tmp_path):
    """ratio: "0.5" is 0.5, as `--ratio 0.5`; the stage hash of numbers written as numbers is unchanged."""
    from loram.cli import build_parser

    r = load_recipe(write(tmp_path, 'base: x\nworkdir: w\nprune: {ratio: "0.5", calib_samples: "4"}\ntrain: {data: [owner/set]}\n'))
    ns = build_parser().parse_args(["prune", "m", "-o", "o", "--ratio", "0.5", "--calib-samples", "4"])
    assert r.stages["prune"] == {"ratio": ns.ratio, "calib_samples": ns.calib_samples}
    assert type(r.stages["prune"]["ratio"]) is float and type(r.stages["prune"]["calib_samples"]) is int
    r2 = load_recipe(write(tmp_path, "base: x\nworkdir: w\nprune: {ratio: 0.5, calib_samples: 4}\ntrain: {data: [owner/set]}\n"))
    assert r2.stages == r.stages


@pytest.mark.parametrize("section, match", [
    ("prune: {ratio: half}", "prune.ratio 'half' is not a number: use 0 < R < 1"),
    ("prune: {calib_samples: 0}", "prune.calib_samples 0 is out of range: use an integer >= 1"),
    ("train: {data: [owner/set], steps: 0}", "train.steps 0 is out of range: use an integer >= 1"),
    ("train: {data: [owner/set], epochs: 0}", "train.epochs 0 is out of range: use a number > 0"),
    ("train: {data: [owner/set], lr: .nan}", "train.lr nan is not a finite number"),
    ("train: {data: [owner/set], micro_batch: 2.5}", "train.micro_batch 2.5 is not an integer"),
    ("train: {data: [owner/set], steps: true}", "train.steps True is not an integer"),
    ("train: {data: [owner/set], steps: null}", "train.steps is empty: give a value or delete the line"),
    ("train: {data: [owner/set], bf16: 'yes'}", "train.bf16 = 'yes' is not a boolean"),
    ("train: {data: [owner/set], max_grad_norm: 0}", "train.max_grad_norm 0 is out of range"),
    ("train: {data: [owner/set=0]}", "--data owner/set mixture weight 0 is out of range: use a number > 0"),
    ("recover: {fill: noise}", "recover.fill = 'noise' is not one of zero, normal"),
    ("eval: {limit: -2}", "eval.limit -2 is out of range: use an integer >= 1"),
    ("eval: {target: nowhere}", "eval.target 'nowhere' is unknown"),
])
def test_dry_run_checks_what_the_run_checks(tmp_path, section, match):
    """Each bad knob fails the dry run and the real run with the same line, before anything is written."""
    body = f"base: x\nworkdir: {tmp_path / 'w'}\n{section}\n" + ("" if section.startswith("train") else "train: {data: [owner/set]}\n")
    p = write(tmp_path, body)
    msgs = []
    for dry in (True, False):
        with pytest.raises(LoramError, match=re.escape(match)) as e:
            run_recipe(p, dry_run=dry, echo=lambda *a: None)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]
    assert not (tmp_path / "w").exists()


def numeric_knobs():
    """(stage, knob, flag action) for every recipe knob that is a numeric flag: generated like test_cli_numbers."""
    from loram.cli import flag_actions
    from loram.settings import recipe_keys as _allowed
    from loram.validate import Number

    return [(s, k, flag_actions(s)[k]) for s in ("prune", "align", "train", "recover", "eval") for k in sorted(_allowed(s))
            if k in flag_actions(s) and isinstance(flag_actions(s)[k].type, Number)]


def test_recipe_knobs_accept_exactly_what_their_flags_accept(tmp_path):
    """0, -1, .nan, .inf and a quoted "1" in every numeric knob: refused by the recipe iff refused by the flag."""
    knobs = numeric_knobs()
    assert len(knobs) >= 30
    for stage, knob, action in knobs:
        for yaml_value, text in (("0", "0"), ("-1", "-1"), (".nan", "nan"), (".inf", "inf"), ('"1"', "1")):
            section = {"prune": f"prune: {{{knob}: {yaml_value}}}\n",
                       "align": f"prune: {{}}\nalign: {{data: [owner/c], {knob}: {yaml_value}}}\n",
                       "train": "", "recover": f"prune: {{}}\nrecover: {{{knob}: {yaml_value}}}\n",
                       "eval": f"eval: {{{knob}: {yaml_value}}}\n"}[stage]
            train = f"train: {{data: [owner/set], {knob}: {yaml_value}}}\n" if stage == "train" else "train: {data: [owner/set]}\n"
            p = write(tmp_path, f"base: x\nworkdir: w\n{section}{train}")
            try:
                action.type(text)
                flag_ok = True
            except LoramError:
                flag_ok = False
            try:
                load_recipe(p)
                recipe_ok = True
            except LoramError as e:
                recipe_ok = False
                assert f"{stage}.{knob} " in str(e), str(e)
            assert recipe_ok == flag_ok, (stage, knob, yaml_value)
