"""Experiment trackers (`--report-to`): transformers' Trainer integrations, checked before anything loads.

The Trainer logs the training loss, learning rate and grad norm every --logging-steps, and loram's
callback logs each --eval set's perplexity as ``eval/NAME_ppl``, to every tracker named. TensorBoard
writes its event files under the checkpoint folder (``OUT-checkpoints/runs/<date>_<host>``, the Trainer's
default place under its output folder); wandb and mlflow follow their own settings (WANDB_PROJECT,
WANDB_MODE=offline, MLFLOW_TRACKING_URI, ...). Default "none": nothing leaves the machine.
"""

from __future__ import annotations

from importlib.util import find_spec

from ..errors import LoramError

# tracker -> the packages that provide it (either one; tensorboardX is the Trainer's fallback writer)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def report_targets(value: str | list | None) -> list[str]:
    """``--report-to`` (comma text or a list) -> the Trainer's ``report_to`` list; a name loram does not know or
    a tracker whose package is not installed is a one-line error."""
    names = [x.strip() for x in (value.split(",") if isinstance(value, str) else value or []) if x.strip()]
    if names in ([], ["none"]):
        return []
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise LoramError(f"--report-to {bad[0]!r} is not a tracker loram knows: use none, {', '.join(TRACKERS)} "
                         "(a comma list for several)")
    missing = [n for n in names if not any(find_spec(m) for m in TRACKERS[n])]
    if missing:
        raise LoramError(f"--report-to {missing[0]} needs the {missing[0]} package, which is not installed: "
                         f"pip install {missing[0]}, or drop --report-to")
    return names
