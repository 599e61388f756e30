"""Every numeric flag of every verb declares its valid range and refuses the rest at parse time.

Generated from the argparse definitions (``loram.cli.build_parser``): a new flag is covered without
a new test, and a flag added with a bare ``type=int`` / ``type=float`` (no range) fails
``test_every_numeric_flag_declares_a_range``. Each flag gets 0, -1, nan and inf; every value its
range refuses must give exit 2, one ``error:`` line naming the flag, no traceback, nothing written.
Nothing is loaded (the refusal happens while the arguments are parsed), so this runs in seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loram.cli import build_parser, main
from loram.errors import LoramError
from loram.validate import Number

PROBES = ("0", "-1", "nan", "inf")


def verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def flags(p: argparse.ArgumentParser):
    return [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def numeric_flags() -> list[tuple[str, argparse.Action]]:
    return [(verb, a) for verb, p in verbs().items() for a in flags(p) if isinstance(a.type, Number)]


def required_argv(p: argparse.ArgumentParser, root) -> list[str]:
    """The verb's positionals and required options, pointing at paths under ``root`` that do not exist."""
    argv = [str(root / f"in-{a.dest}") for a in p._actions if not a.option_strings]
    for a in flags(p):
        if a.required:
            argv += [a.option_strings[-1], str(root / a.dest)]
    return argv


def refuses(a: argparse.Action, text: str) -> bool:
    try:
        a.type(text)
    except LoramError:
        return True
    return False


def cases():
    out = []
    for verb, a in numeric_flags():
        for v in PROBES:
            if refuses(a, v):
                out.append(pytest.param(verb, a.option_strings[-1], v, id=f"{verb}{a.option_strings[-1]}={v}"))
    return out


def test_every_numeric_flag_declares_a_range():
    """No bare int/float type and no untyped numeric default: every number goes through a validator."""
    bare = [(verb, a.option_strings) for verb, p in verbs().items() for a in flags(p)
            if a.type in (int, float) or a.type is None and a.nargs != 0 and a.const is None
            and isinstance(a.default, (int, float)) and not isinstance(a.default, bool)]
    assert not bare, f"numeric flags without a declared range (use a loram.validate.Number): {bare}"
    assert len(numeric_flags()) >= 50  # the generator really sees the verbs' flags


def test_every_verb_is_probed():
    probed = {verb for verb, _ in numeric_flags()}
    assert probed >= {"prune", "build", "align", "train", "recover", "generate", "eval", "demo", "plan"}


@pytest.mark.parametrize(("verb", "flag", "value"), cases())
def test_refused_at_parse_time(verb, flag, value, tmp_path, capsys):
    p = verbs()[verb]
    argv = [verb, *required_argv(p, tmp_path), f"{flag}={value}"]
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert rc == 2, cap.err
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    assert flag in lines[0] and ": use " in lines[0], lines[0]
    assert "Traceback" not in cap.err and cap.out == ""
    assert list(tmp_path.iterdir()) == []  # nothing written, the -o folder included


@pytest.mark.parametrize(("verb", "flag"), [(v, a.option_strings[-1]) for v, a in numeric_flags()],
                         ids=lambda x: x)
def test_an_in_range_value_parses(verb, flag, tmp_path):
    """The default (or the range's lower end) is accepted and comes back as the flag's kind."""
    p = verbs()[verb]
    a = next(x for x in flags(p) if flag in x.option_strings)
    v = a.type
    value = a.default if a.default is not None else (v.min if v.min is not None and not v.min_open else
                                                     (v.min or 0) + (1 if v.kind is int else 0.5))
    ns = build_parser().parse_args([verb, *required_argv(p, tmp_path), f"{flag}={value}"])
    got = getattr(ns, a.dest)
    assert got == value and type(got) is v.kind


@pytest.mark.parametrize(("verb", "flag"), [("train", "--save-steps"), ("train", "--loss-chunk"), ("train", "--seed"),
                                            ("train", "--eval-steps"), ("prune", "--attn-ratio"), ("build", "--seed"),
                                            ("plan", "--ratio"), ("generate", "--temperature"), ("eval", "--shots")])
def test_zero_is_accepted_where_it_means_something(verb, flag, tmp_path):
    p = verbs()[verb]
    ns = build_parser().parse_args([verb, *required_argv(p, tmp_path), f"{flag}=0"])
    assert getattr(ns, flag.lstrip("-").replace("-", "_")) == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["prune", "M", "-o", "O", "--calib-samples", "0"], "error: --calib-samples 0 is out of range: use an integer >= 1"),
    (["train", "M", "-o", "O", "--data", "d.jsonl", "--epochs", "0"], "error: --epochs 0 is out of range: use a number > 0"),
    (["eval", "M", "--limit", "0"], "error: --limit 0 is out of range: use an integer >= 1"),
    (["eval", "M", "--limit=-2"], "error: --limit -2 is out of range: use an integer >= 1"),
    (["train", "M", "-o", "O", "--data", "d.jsonl", "--lr", "nan"], "error: --lr nan is not a finite number: use a number > 0"),
    (["train", "M", "-o", "O", "--data", "d.jsonl", "--dropout", "1"],
     "error: --dropout 1 is out of range: use a number >= 0 and < 1"),
    (["train", "M", "-o", "O", "--data", "d.jsonl", "--micro-batch", "2.5"],
     "error: --micro-batch '2.5' is not an integer: use an integer >= 1"),
    (["eval", "M", "--seq-len", "1"], "error: --seq-len 1 is out of range: use an integer >= 2"),
    (["train", "M", "-o", "O", "--data", "d.jsonl", "--save-steps=-1"],
     "error: --save-steps -1 is out of range: use an integer >= 0 (0: off)"),
])
def test_meaningless_number_message(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err == message + "\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "inf", "x"])
def test_mixture_weight_must_be_finite_and_positive(weight, tmp_path, capsys):
    """--data FILE=W: W goes through the same validator (checked before the model is loaded)."""
    d = tmp_path / "d.jsonl"
    d.write_text('{"instruction": "a", "output": "b"}\n')
    capsys.readouterr()
    rc = main(["train", str(tmp_path / "model"), "-o", str(tmp_path / "o"), "--data", f"{d}=0.5", "--data", f"{d}={weight}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --data {d} mixture weight ") and "use a number > 0" in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d.jsonl"]


@pytest.mark.parametrize("argv", [
    ["train", "M", "-o", "O", "--data", "d.jsonl", "--lr", "nan"],
    ["eval", "M", "--limit=-2"],
    ["prune", "M", "-o", "O", "--calib-samples", "0"],
    ["plan", "Llama-2-7B", "--gpu-gb", "inf"],
])
def test_subprocess_one_line(argv, tmp_path):
    """A real `python -m loram`: exit 2, the single error line, no traceback, nothing written."""
    import loram

    src = str(Path(loram.__file__).resolve().parents[1])  # the loram under test, from any cwd
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "loram", *argv], capture_output=True, text=True, env=env, timeout=120, check=False,
                       cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ")
    assert list(tmp_path.iterdir()) == []


# ---- the library checks with the same validators (Python callers, before anything is loaded) -------
@pytest.mark.parametrize(("call", "message"), [
    (lambda t: __import__("loram.train", fromlist=["x"]).train(t / "no-model", t / "o", _train_cfg(lr=float("nan"))),
     "--lr nan is not a finite number: use a number > 0"),
    (lambda t: __import__("loram.train", fromlist=["x"]).train(t / "no-model", t / "o", _train_cfg(epochs=0)),
     "--epochs 0 is out of range: use a number > 0"),
    (lambda t: __import__("loram.train", fromlist=["x"]).train(t / "no-model", t / "o", _train_cfg(data_weights=[0.0])),
     "mixture weight 0 is out of range: use a number > 0"),
    (lambda t: __import__("loram.align", fromlist=["x"]).align(t / "no-model", t / "o", _align_cfg(grad_accum=0)),
     "--grad-accum 0 is out of range: use an integer >= 1"),
    (lambda t: __import__("loram.prune", fromlist=["x"]).prune(str(t / "no-model"), t / "o", calib_samples=0),
     "--calib-samples 0 is out of range: use an integer >= 1"),
    (lambda t: __import__("loram.eval.runner", fromlist=["x"]).EvalRequest(limit=-2),
     "--limit -2 is out of range: use an integer >= 1"),
])
def test_library_uses_the_same_validators(call, message, tmp_path):
    with pytest.raises(LoramError) as e:
        call(tmp_path)
    assert str(e.value) == message
    assert list(tmp_path.iterdir()) == []


def _train_cfg(**kw):
    from loram.train import TrainConfig

    return TrainConfig(data=["d.jsonl"], **kw)


def _align_cfg(**kw):
    from loram.align import AlignConfig

    return AlignConfig(data=["c.txt"], **kw)
