"""Progress bars, `--quiet`, the closing summary line, and the library warnings the CLI hides.

One mechanism for every bar: tqdm, the library transformers already uses for its weight-loading
bar and the Trainer's bar, so loram's own bars (calibration, per-layer pruning, build shards,
evaluation rows) look and behave like those. Bars go to stderr only, so stdout (tables, `--json`)
stays clean. A bar is drawn iff

    stderr is a terminal  and  not --quiet  and  not --json       (enabled())

`--quiet` / `--json` are inherited by child processes (`loram demo` trains in one) through the
LORAM_QUIET environment variable, and switch off transformers', huggingface_hub's and datasets'
bars too. When stderr is not a terminal (a log file, a pipe) no bar is drawn. lm-eval draws its own
tqdm bars that none of those switches reach: library_bars() holds them to the same rule.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager

from .procmem import PeakRSS

QUIET_ENV = "LORAM_QUIET"  # "1": a parent loram process was asked for --quiet or --json
_stages: list[str] = []  # descriptions of the enclosing stages (e.g. "eval arc"), prefixed to bar labels


def quiet() -> bool:
    """--quiet or --json was asked (here or by a parent loram process): no bars, no status lines (demo)."""
    return os.environ.get(QUIET_ENV) == "1"


def enabled() -> bool:
    """Whether bars are drawn now (see the module docstring)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return not quiet() and bool(isatty and isatty())


ENV_VARS = (QUIET_ENV, "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def configure(quiet: bool = False, json: bool = False) -> dict:
    """Called by the CLI before a verb runs. Only ever makes output quieter (a nested call never undoes a
    parent's --quiet). Returns the environment it found, for restore() when the verb is done."""
    saved = {k: os.environ.get(k) for k in ENV_VARS}
    if quiet or json:
        os.environ[QUIET_ENV] = "1"
    if enabled():
        return saved
    # libraries' own bars: the environment variables for those not imported yet (and child processes)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers reads this too, at import
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    switches = _bar_switches()  # those already imported read their variable already
    saved.update({f"{name} bars": is_on() for name, is_on, _off, _on in switches})  # before any is off (they share state)
    for _name, _is_on, off, _on in switches:
        off()
    return saved


def _bar_switches() -> list:
    """(name, is on, off, on) of the in-process bar switch of each library already imported."""
    found = []
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        found.append(("transformers", tlog.is_progress_bar_enabled, tlog.disable_progress_bar, tlog.enable_progress_bar))
    if "datasets" in sys.modules:
        import datasets

        found.append(("datasets", datasets.is_progress_bar_enabled, datasets.disable_progress_bars, datasets.enable_progress_bars))
    if "huggingface_hub" in sys.modules:  # its upload bars (--push-to-hub)
        from huggingface_hub import utils as hub

        found.append(("huggingface_hub", lambda: not hub.are_progress_bars_disabled(), hub.disable_progress_bars,
                      hub.enable_progress_bars))
    return found


def restore(saved: dict) -> None:
    """Put back the environment and the libraries' bar switches configure() found (main() called in-process,
    as tests and `demo` do, leaves no trace: a --quiet run does not silence the next run's bars)."""
    for name, _is_on, _off, on in _bar_switches():
        if saved.pop(f"{name} bars", False):
            on()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _label(desc: str) -> str:
    return ": ".join([*_stages, desc]) if desc else ": ".join(_stages)


def track(iterable, desc: str, total: int | None = None, unit: str = "it"):
    """``iterable``, with a bar (count, rate, ETA) on stderr when enabled(); the iterable itself otherwise."""
    if not enabled():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=_label(desc), total=total, unit=unit, file=sys.stderr, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextmanager
def bar(total: int, desc: str, unit: str = "it"):
    """A bar advanced by hand (``b.update(n)``): for loops whose steps are batches of several items."""
    if not enabled():
        yield _NoBar()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=_label(desc), unit=unit, file=sys.stderr, dynamic_ncols=True) as b:
        yield b


@contextmanager
def stage(desc: str):
    """Label the bars drawn inside (e.g. ``with stage("eval arc"):`` -> "eval arc: scoring 40/200 ...")."""
    _stages.append(desc)
    try:
        yield
    finally:
        _stages.pop()


@contextmanager
def library_bars():
    """Inside, the bars a library draws with tqdm itself (lm-eval's "Running loglikelihood requests" and its
    per-document bar) follow loram's rule: drawn only when enabled().

    Why tqdm's constructor is patched for the call and not something else: TQDM_DISABLE is read once, when
    tqdm is imported (transformers imported it long before lm-eval runs); lm-eval's model bars pass
    ``disable=False`` explicitly, which beats any default; and simple_evaluate has no switch to pass down.
    Redirecting stderr instead would also swallow lm-eval's warnings and a real error's message. Forcing
    ``disable=True`` hides the bars and nothing else, and only until the call returns."""
    if enabled():
        yield
        return
    from tqdm import std

    saved = vars(std.tqdm)["__init__"]  # the raw attribute (tqdm wraps it with its environment defaults)
    init = std.tqdm.__init__

    def without_bar(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "disable": True})

    std.tqdm.__init__ = without_bar  # subclasses (tqdm.auto, tqdm.asyncio) call it through super()
    try:
        yield
    finally:
        std.tqdm.__init__ = saved


def trainer_quiet(trainer) -> None:
    """With --quiet / --json the Trainer prints neither a bar (disable_tqdm) nor, in its place, the
    dict of each log step on stdout (its PrinterCallback)."""
    if quiet():
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)


class Measure:
    """Time and peak RSS of a long stage, for its closing line: ``print(m.line("merged model written to X"))``."""

    def __init__(self):

        self.t0, self.peak = time.time(), PeakRSS()

    def seconds(self) -> float:
        return time.time() - self.t0

    def line(self, what: str) -> str:
        return summary(what, self.seconds(), self.peak.gb())

    def rows(self) -> list[tuple[str, str]]:
        """The same two numbers as rows of a verb's closing table (the prune and build tables' "time", "peak RSS")."""
        return [("time", f"{self.seconds():.1f} s"), ("peak RSS", f"{self.peak.gb():.2f} GB")]


def summary(what: str, seconds: float, peak_rss_gb: float) -> str:
    """One closing line: what was written, wall time, peak RSS (the prune table's "time" / "peak RSS")."""
    return f"{what} ({seconds:.1f} s, peak RSS {peak_rss_gb:.2f} GB)"


# ---- library warnings a user cannot act on -------------------------------------------------------
# (category, message regex, module regex, why it is hidden). Installed by the CLI only (a library
# user keeps Python's defaults); `loram --debug` shows every warning.
LIBS = r"(loram|transformers|peft|accelerate|torch|datasets|huggingface_hub|tokenizers|safetensors|bitsandbytes|lm_eval)(\.|$)"
HIDDEN_WARNINGS = [
    (FutureWarning, "", LIBS,
     ("deprecations inside loram's dependencies (e.g. transformers' `is_gradient_checkpointing` is deprecated): "
      "they concern the code calling the library, which a newer loram fixes; a user of the CLI cannot act on them")),
    (UserWarning, r"The PEFT config's `base_model_name_or_path` was renamed", r"peft(\.|$)",
     ("PEFT records the base model's path in the adapter and warns when it differs from the model it is put on; "
      "loram matches an adapter to its base by weight fingerprint (adapter.attach, recover), never by this name")),
]


# library warnings that do ask something of the user: (category, message regex, the one loram line said instead)
REWORDED = [
    (UserWarning, r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter",
     ("this model ties lm_head to its input embeddings and the adapter targets lm_head: `loram merge` will write "
      "lm_head untied from them (one more vocab x hidden matrix); leave lm_head out of --targets to keep the model tied")),
]


# log lines (not Python warnings) a user cannot act on: (logger, message regex, why it is hidden)
HIDDEN_LOG_LINES = [
    ("lm_eval.models.huggingface", r"`pretrained` model kwarg is not of type `str`",
     ("lm-eval warns that a model object (not a hub name) was passed to it: that is how `loram eval --lm-eval` "
      "evaluates a pruned or merged model in memory, and its advice (accelerate, parallelize) does not apply")),
    ("lm_eval.models.huggingface", r"Passed an already-initialized model through `pretrained`",
     ("the same fact said a second time (single-process evaluation of the model object loram loaded)")),
]


class _HideLogLines(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(re.search(p, record.getMessage()) for p in self.patterns)


def _hide_log_lines() -> None:
    """One filter per logger of HIDDEN_LOG_LINES (installed once however often the CLI runs in a process)."""
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _why in HIDDEN_LOG_LINES:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _HideLogLines) for f in log.filters):
            log.addFilter(_HideLogLines(patterns))


def filter_warnings() -> None:
    """Hide HIDDEN_WARNINGS and HIDDEN_LOG_LINES, say REWORDED ones as `warning: <loram line>` (the CLI installs all)."""
    for category, message, module, _why in HIDDEN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    _hide_log_lines()
    if getattr(warnings.showwarning, "loram", False):
        return
    show = warnings.showwarning

    def reworded(message, category, filename, lineno, file=None, line=None):
        for cat, pattern, text in REWORDED:
            if issubclass(category, cat) and re.search(pattern, str(message)):
                print(f"warning: {text}", file=sys.stderr)
                return
        show(message, category, filename, lineno, file, line)

    reworded.loram = True
    warnings.showwarning = reworded
