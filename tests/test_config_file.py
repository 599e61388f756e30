"""Dotted recipe overrides (`loram run R.yaml train.lr=2e-4`) and `loram train/align --config FILE.yaml`:
both go through the recipe's typed settings, so a value means what it means in a recipe."""

from pathlib import Path

import pytest

from loram.cli import build_parser, main
from loram.cli.common import parse_with_config
from loram.errors import LoramError
from loram.recipe import load_recipe, run_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE = "base: x\nworkdir: w\nprune: {ratio: 0.5, layers: \"1:4\"}\ntrain: {data: [owner/set], lr: 1e-4}\n"


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_overrides_set_typed_knobs(tmp_path):
    r = load_recipe(_write(tmp_path, RECIPE), ["train.lr=2e-4", "prune.ratio=0.65", "prune.layers=2:5", "base=y",
                                               "train.eval.held=c.json"])
    assert r.stages["train"]["lr"] == 2e-4 and isinstance(r.stages["train"]["lr"], float)  # YAML 1.2: a float
    assert r.stages["prune"]["ratio"] == 0.65
    assert r.stages["prune"]["layers"] == "2:5"  # stays text (YAML 1.1 would read 125, base 60)
    assert r.base == "y" and r.stages["train"]["eval"] == {"held": "c.json"}


@pytest.mark.parametrize("override,msg", [
    ("train.lr", "is not KEY=VALUE"),
    ("train..lr=1", "is not KEY=VALUE"),
    ("train.bogus=1", "unknown train knob"),
    ("train.lr=-1", "lr"),
    ("prune.ratio.x=1", "not a mapping"),
])
def test_bad_override_one_line(tmp_path, override, msg):
    with pytest.raises(LoramError, match=msg) as e:
        load_recipe(_write(tmp_path, RECIPE), [override])
    assert "\n" not in str(e.value)


def test_override_reaches_the_stage_commands(capsys):
    run_recipe(RECIPES / "llama2-13b-loram-stru.yaml", dry_run=True, overrides=["prune.ratio=0.6", "train.lr=3e-4"])
    out = capsys.readouterr().out
    assert "--ratio 0.6" in out and "--lr 0.0003" in out


def test_run_cli_takes_overrides(capsys):
    assert main(["run", str(RECIPES / "llama2-13b-loram-stru.yaml"), "train.steps=7", "--dry-run"]) == 0
    assert "--steps 7" in capsys.readouterr().out
    assert main(["run", str(RECIPES / "llama2-13b-loram-stru.yaml"), "train.steps", "--dry-run"]) == 2


def test_config_file_fills_what_flags_leave_out(tmp_path):
    cfg = _write(tmp_path, "data: [a.json=2, b.json=1]\nlr: 1e-3\nsteps: 7\nrank: 4\n", "t.yaml")
    args = parse_with_config(build_parser(), ["train", "M", "-o", "O", "--config", str(cfg)])
    assert args.data == ["a.json=2", "b.json=1"] and args.lr == 1e-3 and args.steps == 7 and args.rank == 4
    # a flag on the command line wins, even when it equals the flag's default
    default_rank = build_parser().parse_args(["train", "M", "-o", "O", "--data", "x"]).rank
    args = parse_with_config(build_parser(), ["train", "M", "-o", "O", "--config", str(cfg), "--lr", "3e-4", "--data", "c.json",
                                              "--rank", str(default_rank)])
    assert args.lr == 3e-4 and args.data == ["c.json"] and args.rank == default_rank and args.steps == 7


def test_config_file_record_equals_flags(tmp_path):
    from loram.settings import from_args

    cfg = _write(tmp_path, "data: [a.json]\nlr: 2e-4\ntargets: [q, v]\neval: {held: h.json}\nseq_len: 64\n", "t.yaml")
    by_file = from_args("train", parse_with_config(build_parser(), ["train", "M", "-o", "O", "--config", str(cfg)]))
    by_flags = from_args("train", build_parser().parse_args(["train", "M", "-o", "O", "--data", "a.json", "--lr", "2e-4",
                                                             "--targets", "q,v", "--eval", "held=h.json", "--seq-len", "64"]))
    assert by_file == by_flags


@pytest.mark.parametrize("text,msg", [
    ("lr: 1e-3\nbogus: 1\n", "unknown train knob"),
    ("- a\n- b\n", "is not a mapping"),
    ("lr: -1\n", "config file"),
    ("a: &x 1\nb: *x\n", "alias"),
])
def test_bad_config_file_one_line(tmp_path, capsys, text, msg):
    cfg = _write(tmp_path, text, "t.yaml")
    assert main(["train", "M", "-o", str(tmp_path / "O"), "--data", "x.json", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and msg in err and "\n" not in err
    assert not (tmp_path / "O").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["align", "P", "-o", str(tmp_path / "O"), "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file" in capsys.readouterr().err and not (tmp_path / "O").exists()


def test_required_data_from_file_or_flag(tmp_path, capsys):
    cfg = _write(tmp_path, "lr: 1e-3\n", "t.yaml")
    with pytest.raises(SystemExit):  # argparse: --data is required, neither the file nor the flags give it
        parse_with_config(build_parser(), ["train", "M", "-o", "O", "--config", str(cfg)])
