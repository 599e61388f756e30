"""Progress bars on stderr when it is a terminal; none with --quiet, --json or a pipe; hidden library warnings.

Two kinds of run: a real `python -m loram` subprocess whose stderr is a pseudo-terminal (pty), for
the claims about terminals, pipes and clean JSON on stdout; and `loram.cli.main` in this process
with sys.stderr replaced by a text buffer that says it is a terminal, to cover every long verb in seconds.
"""

import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from loram import progress
from loram.cli import main

BAR = re.compile(r"\d+/\d+ \[[0-9:]+<")  # tqdm's "k/n [elapsed<ETA": a bar with its count and ETA
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    """main() writes these variables (that is how --quiet reaches child processes): undo them after each test."""
    for name in (progress.QUIET_ENV, "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """`python -m loram ARGS` with stderr on a 120-column pseudo-terminal; returns (rc, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != progress.QUIET_ENV}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a fresh pty is 0 columns wide
    p = subprocess.Popen([sys.executable, "-m", "loram", *args], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    err = b""
    while True:  # read until the child closes the terminal (EIO on Linux)
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        err += chunk
    out = p.stdout.read().decode()
    p.wait(timeout=300)
    os.close(master)
    return p.returncode, out, err.decode(errors="replace")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_main(monkeypatch, capsys, args: list[str]) -> tuple[str, str]:
    """main(ARGS) in this process with a terminal-like stderr; returns (stdout, stderr)."""
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.delenv(progress.QUIET_ENV, raising=False)  # a previous --quiet call in this process (a child inherits it)
    rc = main(args)
    out = capsys.readouterr().out
    assert rc == 0, term.getvalue()[-2000:]
    return out, term.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    (d / "a.json").write_text(json.dumps([{"instruction": f"add {a} {b}", "output": str(a + b)} for a in range(4) for b in range(4)]))
    (d / "mc.jsonl").write_text("".join(json.dumps({"query": f"q {i}", "choices": ["a", "b", "c"], "gold": i % 3}) + "\n"
                                        for i in range(12)))
    (d / "gsm.jsonl").write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"so #### {i + 1}"}) + "\n" for i in range(3)))
    (d / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return d


# ---- a real terminal: subprocess with a pty ---------------------------------------------------------
def test_prune_on_a_terminal_shows_calibration_progress_and_quiet_shows_none(tiny_dir, tmp_path):
    rc, out, err = run_cli(["prune", str(tiny_dir), "-o", str(tmp_path / "p"), "--method", "taylor", "--layers", "1:5"])
    assert rc == 0, err
    line = next((x for x in re.split(r"[\r\n]", err) if "taylor: calibration sequences" in x and "8/8" in x), None)
    assert line is not None and BAR.search(line) and "seq/s" in line, err  # count, ETA and rate
    assert "loram prune" in out  # the summary table stays on stdout

    rc, out, err = run_cli(["prune", str(tiny_dir), "-o", str(tmp_path / "q"), "--method", "taylor", "--layers", "1:5", "--quiet"])
    assert rc == 0, err
    assert not BAR.search(err) and "%|" not in err, err  # neither loram's nor transformers' weight-loading bar
    assert "peak RSS" in out


def test_eval_json_on_a_terminal_prints_no_bar_and_stdout_parses(tiny_dir, files):
    rc, out, err = run_cli(["eval", str(tiny_dir), "--mc", f"mc={files / 'mc.jsonl'}", "--json"])
    assert rc == 0, err
    assert not BAR.search(err) and "%|" not in err, err
    res = json.loads(out)
    assert {(r["task"], r["metric"]) for r in res["results"]} == {("mc", "acc"), ("mc", "acc_norm")}


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch, capsys, tiny_dir, files):
    log = io.StringIO()  # a log file or a pipe: isatty() is False
    monkeypatch.setattr(sys, "stderr", log)
    assert main(["eval", str(tiny_dir), "--mc", f"mc={files / 'mc.jsonl'}"]) == 0
    assert not BAR.search(log.getvalue()) and "%|" not in log.getvalue(), log.getvalue()  # no carriage-return bars in logs
    assert "acc_norm" in capsys.readouterr().out


# ---- every long verb, in this process with a terminal-like stderr -------------------------------------
def test_sparse_prune_and_align_show_bars(monkeypatch, capsys, tiny_dir, files, tmp_path):
    _, err = run_main(monkeypatch, capsys, ["prune", str(tiny_dir), "-o", str(tmp_path / "p"), "--method", "wanda",
                                            "--sparsity", "2:4", "--layers", "1:5"])
    assert re.search(r"wanda: layers: 100%.*4/4 \[", err), err  # one step per decoder layer
    out, err = run_main(monkeypatch, capsys, ["align", str(tmp_path / "p"), "--data", str(files / "corpus.txt"),
                                              "-o", str(tmp_path / "al"), "--steps", "2", "--seq-len", "32"])
    assert re.search(r"2/2 \[", err), err  # the Trainer's bar
    assert "peak RSS" in out


def test_build_shows_a_bar_per_shard(monkeypatch, capsys, tiny_dir, tmp_path):
    out, err = run_main(monkeypatch, capsys, ["build", str(tiny_dir), "-o", str(tmp_path / "b"), "--ratio", "0.5"])
    assert re.search(r"build: shards: 100%.*7/7 \[", err), err  # embeddings + 6 layers
    assert "peak RSS" in out


def test_train_merge_and_eval_show_bars_and_quiet_silences_the_trainer(monkeypatch, capsys, tiny_dir, files, tmp_path):
    ad = tmp_path / "ad"
    out, err = run_main(monkeypatch, capsys, ["train", str(tiny_dir), "--data", str(files / "a.json"), "-o", str(ad),
                                              "--steps", "2", "--logging-steps", "1", "--seq-len", "64"])
    assert re.search(r"2/2 \[", err), err  # the Trainer's own bar
    assert "peak RSS" in out

    out, err = run_main(monkeypatch, capsys, ["train", str(tiny_dir), "--data", str(files / "a.json"), "-o", str(ad),
                                              "--overwrite", "--steps", "2", "--logging-steps", "1", "--seq-len", "64", "--quiet"])
    assert err == "", err  # no bar
    assert "{'loss'" not in out and "adapter written to" in out  # nor the Trainer's per-step log dicts in its place
    assert progress.QUIET_ENV not in os.environ  # main() run in-process leaves no --quiet behind
    from transformers.utils import logging as tlog

    assert tlog.is_progress_bar_enabled()  # nor transformers' bars switched off (the next run on a terminal draws them)

    out, err = run_main(monkeypatch, capsys, ["merge", str(tiny_dir), str(ad), "-o", str(tmp_path / "m")])
    assert re.search(r"merged model written to \S+ \(\d+\.\d s, peak RSS \d+\.\d\d GB\)", out), out  # the summary line
    assert re.search(r"merge: tensors: 100%.*56/56 \[", err), err  # embeddings + 6 layers x 9 + final norm (lm_head tied)

    out, err = run_main(monkeypatch, capsys, ["eval", str(tiny_dir), "--adapter", str(ad), "--ppl", f"alpaca={files / 'a.json'}",
                                              "--mc", f"arc={files / 'mc.jsonl'}", "--gsm8k", str(files / "gsm.jsonl"),
                                              "--max-new-tokens", "4"])
    for label, n in (("eval alpaca (ppl): scoring", 16), ("eval arc (mc): scoring", 36), ("eval gsm8k: generating", 3)):
        assert re.search(re.escape(label) + rf": 100%.*{n}/{n} \[", err), (label, err)


def test_recipe_says_stage_k_of_n_then_the_stage_bars(monkeypatch, capsys, tiny_dir, files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {tiny_dir}\nworkdir: {tmp_path / 'w'}\nprune: {{method: magnitude, layers: '1:5'}}\n"
                      f"train: {{data: [{files / 'a.json'}], steps: 2, seq_len: 64}}\n")
    out, err = run_main(monkeypatch, capsys, ["run", str(recipe)])
    assert [x.split(" running")[0] for x in out.splitlines() if " running: loram " in x] == \
        ["[prune] stage 1/3", "[train] stage 2/3", "[recover] stage 3/3"], out
    assert re.search(r"2/2 \[", err), err  # the train stage's own bar


def test_quiet_switches_off_the_bars_of_libraries_already_imported_and_restore_puts_them_back(monkeypatch):
    import datasets
    from huggingface_hub import utils as hub
    from transformers.utils import logging as tlog

    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    saved = progress.configure(quiet=True)  # they read HF_HUB_/HF_DATASETS_DISABLE_PROGRESS_BARS at import: too late
    try:
        assert hub.are_progress_bars_disabled() and not tlog.is_progress_bar_enabled() and not datasets.is_progress_bar_enabled()
    finally:
        progress.restore(saved)
    assert not hub.are_progress_bars_disabled() and tlog.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()


def test_every_verb_takes_quiet():
    from loram.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for verb in COMMANDS:
        assert "--quiet" in sub.choices[verb]._option_string_actions, verb


# ---- warnings ---------------------------------------------------------------------------------------
def _library_warnings():
    """What putting an adapter on a model makes PEFT and transformers say (loram.adapter.attach does this)."""
    from peft import LoraConfig, get_peft_model

    from loram.testing import tiny_model

    get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path="runs/pruned"))
    warnings.warn("a warning loram does not know stays visible", UserWarning, stacklevel=1)


def test_library_warnings_a_user_cannot_act_on_are_hidden_by_the_cli_filter():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _library_warnings()
    kinds = {(w.category, str(w.message)[:30]) for w in seen}
    # without the filter: PEFT's rename UserWarning and transformers' `is_gradient_checkpointing` FutureWarning
    assert (UserWarning, "The PEFT config's `base_model_") in kinds and any(c is FutureWarning for c, _ in kinds), kinds
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        progress.filter_warnings()  # what the CLI installs (not with --debug)
        _library_warnings()
    assert [str(w.message) for w in seen] == ["a warning loram does not know stays visible"]


def test_a_library_warning_that_asks_for_action_is_one_loram_line(monkeypatch):
    from peft import LoraConfig, get_peft_model

    from loram.testing import tiny_model

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        progress.filter_warnings()
        # the tiny llama-gqa ties lm_head to the embeddings: PEFT warns about weight tying when lm_head is targeted
        get_peft_model(tiny_model("llama-gqa"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert log.getvalue() == ("warning: this model ties lm_head to its input embeddings and the adapter targets lm_head: "
                              "`loram merge` will write lm_head untied from them (one more vocab x hidden matrix); "
                              "leave lm_head out of --targets to keep the model tied\n")


def test_every_hidden_warning_says_why():
    for category, _message, module, why in progress.HIDDEN_WARNINGS:
        assert issubclass(category, Warning) and module and len(why) > 40
    for logger, message, why in progress.HIDDEN_LOG_LINES:
        assert logger and message and len(why) > 40


# ---- every verb of the CLI, enumerated from its argparse tree ------------------------------------------
@dataclass
class Verb:
    """How the progress tests run one verb on the tiny model: ``args(work, out)`` -> argv (``work`` holds the
    shared inputs, ``out`` is a fresh folder); ``progress``: regex of its progress line on a terminal (stderr,
    or stdout for recipe stage lines); ``None`` for a verb that never runs long, ``why`` saying why;
    ``summary``: it ends with the time and peak RSS (a closing line or table rows)."""

    args: Callable[[Path, Path], list[str]]
    progress: str | None
    why: str = ""
    summary: bool = True


def _recipe(w: Path, o: Path) -> list[str]:
    (o.parent / "r.yaml").write_text(f"base: {w / 'base'}\nworkdir: {o}\nprune: {{method: magnitude, layers: '1:5'}}\n"
                                     f"train: {{data: [{w / 'a.json'}], steps: 2, seq_len: 64}}\n")
    return ["run", str(o.parent / "r.yaml")]


VERBS = {
    "prune": Verb(lambda w, o: ["prune", f"{w}/base", "-o", str(o), "--method", "taylor", "--layers", "1:5"],
                  r"taylor: calibration sequences: 100%.*8/8 \["),
    "import-plan": Verb(lambda w, o: ["import-plan", f"{w}/sparse", "--base", f"{w}/base", "-o", str(o)],
                        r"import-plan: layers: 100%.*6/6 \["),
    "build": Verb(lambda w, o: ["build", f"{w}/base", "-o", str(o), "--ratio", "0.5"], r"build: shards: 100%.*7/7 \["),
    "align": Verb(lambda w, o: ["align", f"{w}/pruned", "--data", f"{w}/corpus.txt", "-o", str(o), "--steps", "2",
                                "--seq-len", "32"], r"100%.*2/2 \["),  # the Trainer's bar
    "train": Verb(lambda w, o: ["train", f"{w}/pruned", "--data", f"{w}/a.json", "-o", str(o), "--steps", "2",
                                "--seq-len", "64"], r"100%.*2/2 \["),
    "recover": Verb(lambda w, o: ["recover", f"{w}/adapter", "--base", f"{w}/base", "-o", str(o)], None,
                    "reads the adapter and the base's sampled fingerprint (8 rows per tensor) and scatters the LoRA "
                    "matrices: seconds even for a 70B base"),
    "merge": Verb(lambda w, o: ["merge", f"{w}/base", f"{w}/recovered", "-o", str(o)],
                  r"merg\w*\b.*: 100%"),  # PEFT's "Unloading and merging model" (or a streamed merge's own bar)
    "generate": Verb(lambda w, o: ["generate", f"{w}/base", "--adapter", f"{w}/recovered", "--prompt", "hi",
                                   "--max-new-tokens", "4"],
                     r"Loading weights: 100%", summary=False),  # loading is its long part; stdout is the text
    "eval": Verb(lambda w, o: ["eval", f"{w}/base", "--mc", f"mc={w}/mc.jsonl"], r"eval mc \(mc\): scoring: 100%.*36/36 \["),
    "inspect": Verb(lambda w, o: ["inspect", f"{w}/adapter", "-o", str(o), "--no-plots"], None,
                    "norms of one adapter's LoRA matrices (rank r, not the model's weights): under a few seconds", summary=False),
    "demo": Verb(lambda w, o: ["demo", "--smoke", "--no-isolate", "-o", str(o)],
                 r"\[demo +\d+\.\ds\]", summary=False),  # its status lines; it ends with its own table
    "run": Verb(_recipe, r"\[train\] stage 2/3 running"),
    "plan": Verb(lambda w, o: ["plan", f"{w}/base", "--ratio", "0.5"], None, "arithmetic on a config: instant", summary=False),
}


def _subparsers() -> dict:
    from loram.cli import build_parser

    return next(a for a in build_parser()._actions if a.dest == "command").choices


def test_every_verb_has_a_progress_case():
    """A new verb fails here until VERBS says how it shows progress (or why it needs none)."""
    assert set(VERBS) == set(_subparsers()), "add the missing verb to VERBS in tests/test_progress.py"
    assert all(v.progress or len(v.why) > 20 for v in VERBS.values())


@pytest.fixture(scope="module")
def work(tiny_dir, files, tmp_path_factory):
    """Inputs every verb case reads: base, pruned, trained adapter, recovered adapter, a 2:4 sparse model."""
    w = tmp_path_factory.mktemp("verbs")
    for f in files.iterdir():
        os.symlink(f, w / f.name)
    os.symlink(tiny_dir, w / "base")
    for argv in (["prune", f"{w}/base", "-o", f"{w}/pruned", "--method", "magnitude", "--layers", "1:5"],
                 ["prune", f"{w}/base", "-o", f"{w}/sparse", "--method", "wanda", "--sparsity", "2:4", "--layers", "1:5"],
                 ["train", f"{w}/pruned", "--data", f"{w}/a.json", "-o", f"{w}/adapter", "--steps", "1", "--seq-len", "64"],
                 ["recover", f"{w}/adapter", "--base", f"{w}/base", "-o", f"{w}/recovered"]):
        assert main([*argv, "--quiet"]) == 0, argv
    return w


def _no_progress(verb: str, out: str, err: str) -> None:
    assert not BAR.search(err) and "%|" not in err, err  # neither loram's bars nor the libraries'
    if VERBS[verb].progress:
        assert not re.search(VERBS[verb].progress, ANSI.sub("", out + err)), out + err  # nor status lines (demo, recipe stages)


def _library_warnings_seen(seen) -> list[str]:
    return [f"{w.category.__name__}: {w.message} ({w.filename})" for w in seen if issubclass(w.category, (FutureWarning, UserWarning))]


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_verb_on_a_terminal_shows_progress_and_no_library_warning(verb, monkeypatch, capsys, work, tmp_path):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # a warning an earlier test triggered is seen again
        for quiet_by_python in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", quiet_by_python)  # what Python itself hides outside __main__
        out, err = run_main(monkeypatch, capsys, VERBS[verb].args(work, tmp_path / "out"))
    if VERBS[verb].progress:
        assert re.search(VERBS[verb].progress, ANSI.sub("", out + err)), (out, err)  # rich colours demo's status lines
    if VERBS[verb].summary:  # "(1.2 s, peak RSS 0.61 GB)", the train report, or the table's rows
        assert re.search(r"\d+\.\d s\b.*peak RSS\W+\d+\.\d\d GB", out.replace("\n", " ")), out
    assert _library_warnings_seen(seen) == []  # what the CLI entry filters (progress.HIDDEN_WARNINGS) is gone


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_verb_with_quiet_prints_no_progress(verb, monkeypatch, capsys, work, tmp_path):
    out, err = run_main(monkeypatch, capsys, [*VERBS[verb].args(work, tmp_path / "out"), "--quiet"])
    _no_progress(verb, out, err)


@pytest.mark.parametrize("verb", sorted(v for v, p in _subparsers().items() if "--json" in p._option_string_actions))
def test_verb_with_json_prints_no_progress_and_stdout_parses(verb, monkeypatch, capsys, work, tmp_path):
    out, err = run_main(monkeypatch, capsys, [*VERBS[verb].args(work, tmp_path / "out"), "--json"])
    _no_progress(verb, out, err)
    assert isinstance(json.loads(out), dict), out


# ---- lm-eval draws its own tqdm bars ------------------------------------------------------------------
def test_library_bars_off_hides_a_library_bar_and_nothing_else(monkeypatch):
    from tqdm import tqdm

    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setenv(progress.QUIET_ENV, "1")  # --quiet
    with progress.library_bars():
        list(tqdm(range(3), desc="lib", disable=False))  # lm-eval passes disable=False explicitly
        print("a message from the library", file=sys.stderr)
    assert term.getvalue() == "a message from the library\n"
    list(tqdm(range(3), desc="after"))  # tqdm is itself again once the call is over
    assert "after: 100%" in term.getvalue()
    monkeypatch.delenv(progress.QUIET_ENV)
    with progress.library_bars():  # bars enabled: a library's bars are drawn as usual
        list(tqdm(range(3), desc="lib"))
    assert "lib: 100%" in term.getvalue()


@pytest.fixture(scope="module")
def lm_task(tmp_path_factory):
    pytest.importorskip("lm_eval")
    from loram.testing import lm_eval_task

    rows = [{"query": f"Item {i}: which word?\nAnswer:", "choices": ["red", "green", "blue"], "gold": i % 3} for i in range(6)]
    return lm_eval_task(tmp_path_factory.mktemp("lm_eval"), rows)


def test_lm_eval_bars_follow_quiet_and_its_warnings_stay(tiny_dir, lm_task):
    rc, out, err = run_cli(["eval", str(tiny_dir), "--lm-eval", "loram_mini", "--lm-eval-include", str(lm_task), "--quiet"])
    assert rc == 0, err
    assert not BAR.search(err) and "%|" not in err, err  # no "Running loglikelihood requests" bar
    assert "metric acc is defined, but aggregation is not" in err  # lm-eval's word on the user's task file still shows
    assert "`pretrained` model kwarg is not of type `str`" not in err  # progress.HIDDEN_LOG_LINES: nothing to act on
    assert "loram_mini" in out


def test_lm_eval_bars_on_a_terminal(monkeypatch, capsys, tiny_dir, lm_task):
    _, err = run_main(monkeypatch, capsys, ["eval", str(tiny_dir), "--lm-eval", "loram_mini", "--lm-eval-include", str(lm_task)])
    assert re.search(r"Running loglikelihood requests: 100%.*18/18 \[", err), err
