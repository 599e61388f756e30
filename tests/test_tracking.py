"""--report-to: the Trainer's tracker integrations get the training loss and the --eval perplexities.

TensorBoard is read back from the event files it wrote (tensorboard's EventAccumulator); the test
skips where tensorboard is not installed (it is in the `test` extra). Bad values fail before any load."""

import importlib.util
import math

import pytest
from transformers import TrainerCallback

from loram.cli import main
from loram.train import TrainConfig, train
from loram.training.tracking import TRACKERS
from test_errors import fails, no_weights  # noqa: F401  (no_weights: loading a model fails the test)

def cfg(data, **kw):
    return TrainConfig(**(dict(data=[str(data)], steps=3, lr=1e-2, micro_batch=2, logging_steps=1, seq_len=64,
                               eval={"held": f"{data}[:8]"}, eval_steps=2) | kw))


def installed(tracker: str) -> bool:
    return any(importlib.util.find_spec(m) for m in TRACKERS[tracker])


@pytest.fixture(scope="module")
def pruned_dir(tiny_dir, tmp_path_factory):
    from loram.prune import prune

    out = tmp_path_factory.mktemp("pr") / "pruned"
    prune(str(tiny_dir), out, method="magnitude", ratio=0.5)
    return out


def test_eval_perplexity_reaches_the_trackers(tiny_dir, alpaca_file, tmp_path):
    """Every integration is a TrainerCallback fed by on_log: the held-out perplexity must arrive there, at
    each --eval-steps and at the last step, with the same value as the report."""
    seen = []

    class Tracker(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append((state.global_step, dict(logs or {})))

    r = train(tiny_dir, tmp_path / "A", cfg(alpaca_file), callbacks=[Tracker()])
    ppl = [(step, logs["eval_held_ppl"]) for step, logs in seen if "eval_held_ppl" in logs]
    assert [s for s, _ in ppl] == [2, 3] and ppl[-1][1] == r.eval_ppl["held"]
    assert [row["step"] for row in r.eval_history] == [2, 3]
    assert [s for s, logs in seen if "loss" in logs] == [1, 2, 3]


@pytest.mark.skipif(not installed("tensorboard"), reason="tensorboard is not installed (pip install tensorboard)")
@pytest.mark.parametrize("verb", ["train", "align"])
def test_report_to_tensorboard_writes_event_files(verb, tiny_dir, pruned_dir, alpaca_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of some plain text for alignment\n" for i in range(64)))
    data = alpaca_file if verb == "train" else corpus
    out = tmp_path / "o"
    argv = [verb, str(tiny_dir if verb == "train" else pruned_dir), "--data", str(data), "-o", str(out), "--steps", "3",
            "--micro-batch", "2", "--seq-len", "64", "--logging-steps", "1", "--eval", f"held={data}", "--eval-steps", "2",
            "--report-to", "tensorboard", "--quiet"]
    assert main(argv) == 0
    runs = list((tmp_path / "o-checkpoints" / "runs").glob("*/events.out.tfevents.*"))
    assert len(runs) == 1, runs
    acc = EventAccumulator(str(runs[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/held_ppl" in tags, tags
    losses = [e.value for e in acc.Scalars("train/loss")]
    ppl = {e.step: e.value for e in acc.Scalars("eval/held_ppl")}
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert sorted(ppl) == [2, 3] and all(1 < v < 1e4 for v in ppl.values())


@pytest.mark.parametrize("verb", ["train", "align"])
def test_report_to_unknown_tracker_is_one_line(verb, tiny_dir, pruned_dir, alpaca_file, tmp_path, capsys, no_weights):
    fails(capsys, verb, tiny_dir if verb == "train" else pruned_dir, "--data", alpaca_file, "-o", tmp_path / "o",
          "--report-to", "tensorbord", expect="--report-to 'tensorbord' is not a tracker loram knows: use none, tensorboard, wandb, mlflow",
          out=tmp_path / "o")


def test_report_to_missing_package_is_one_line(tiny_dir, alpaca_file, tmp_path, capsys, no_weights):
    absent = next((t for t in TRACKERS if not installed(t)), None)
    if absent is None:
        pytest.skip("every tracker is installed here")
    fails(capsys, "train", tiny_dir, "--data", alpaca_file, "-o", tmp_path / "o", "--report-to", absent,
          expect=f"--report-to {absent} needs the {absent} package, which is not installed: pip install {absent}", out=tmp_path / "o")
