"""loram.settings is the one declaration of each stage's knobs: the verbs' flags, the recipe schema and
the library's checks derive from it, and the library never imports the command line."""

from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from loram import settings
from loram.cli import flag_actions

SRC = Path(settings.__file__).resolve().parent


@pytest.mark.parametrize("stage", settings.STAGES)
def test_flags_are_the_knobs(stage):
    """Every knob with a flag is an option of the verb with the knob's default, validator and choices."""
    actions = flag_actions(stage)
    for name, k in settings.knobs(stage).items():
        if not k.flag:
            assert name not in actions
            continue
        a = actions[name]
        assert a.option_strings[-1] == settings.flag_name(name)
        assert a.default == k.default and a.help == k.help
        assert (a.type.named("x") == k.check.named("x")) if k.check is not None else a.type is None
        assert tuple(a.choices or ()) == tuple(k.choices or ())


@pytest.mark.parametrize("stage", ["train", "align"])
def test_train_align_knobs_match_their_config(stage):
    """The knob tables of TrainConfig / AlignConfig fields carry those dataclasses' defaults, and every field
    a recipe may set has a knob (data_weights comes from --data FILE=WEIGHT, extra is Python-only)."""
    cls = settings.record_class(stage)
    table = settings.knobs(stage)
    by_name = {f.name: f for f in fields(cls)}
    assert set(by_name) - set(table) == {"data_weights", "extra"} & set(by_name)
    assert set(table) - set(by_name) == {"checkpoint_dir", "resume"}  # how a run is carried out: not a config field
    for name, k in table.items():
        f = by_name.get(name)
        if f is None or name in ("data", "eval", "targets"):  # flag text (FILE=W, NAME=FILE, comma list) vs parsed value
            continue
        default = f.default_factory() if f.default is MISSING else f.default
        assert k.default == default, name
    cfg = settings.record(stage, {n: k.default for n, k in table.items() if n != "data"} | {"data": ["d.jsonl"]})
    assert cfg == cls(data=["d.jsonl"])  # the flags' defaults build the dataclass's defaults


def test_record_from_flags_and_from_recipe_agree():
    """A recipe section and the same knobs as flags build the same record."""
    from loram.cli import build_parser

    a = build_parser().parse_args(["train", "M", "-o", "O", "--data", "a.json=0.7", "--data", "b.json=0.3",
                                   "--eval", "h=c.json", "--lr", "1e-3", "--targets", "q,v", "--packing"])
    section = settings.check_recipe_section("train", {"data": ["a.json=0.7", "b.json=0.3"], "eval": {"h": "c.json"},
                                                      "lr": "1e-3", "targets": ["q", "v"], "packing": True})
    assert settings.from_args("train", a) == settings.record("train", section)
    assert settings.argv("train", {"data": ["a.json=0.7"], "packing": True, "lr": 0.001}) == [
        "--data", "a.json=0.7", "--packing", "--lr", "0.001"]
