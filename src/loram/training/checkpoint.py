"""Checkpoint folders of `loram train` / `loram align`: which checkpoints are complete, what --resume
may change, and what a full disk leaves behind.

    OUT-checkpoints/checkpoint-N/     Trainer checkpoint (weights, state.py's pickle-free optimizer /
                                      scheduler / RNG files, trainer_state.json) and
                                      loram_checkpoint.json, written last: a checkpoint without it
                                      (killed mid-write) is ignored by --resume and deleted.

Each marker records the settings that define the run (run_settings: knobs, data names and content
digests, model fingerprint); --resume with other values is refused, listing them (only RESUME_SAFE
may change: the step budget, saving, logging, evaluation).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from ..configs import RunConfig
from ..data import source_digest
from ..errors import LoramError
from ..fingerprint import base_fingerprint
from ..io import DiskFull, disk_full, resolve_model
from .tracking import report_targets

CHECKPOINT_MARK = "loram_checkpoint.json"


def is_main() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or a single process): the one that writes and deletes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


# ---- complete checkpoints -----------------------------------------------------------------------
def complete_checkpoints(ckpt: Path) -> list[Path]:
    """Checkpoints whose save finished (marker written last), oldest first."""
    if not ckpt.is_dir():
        return []
    found = [p for p in ckpt.glob("checkpoint-*") if p.is_dir() and (p / CHECKPOINT_MARK).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def last_checkpoint(ckpt: Path) -> Path | None:
    done = complete_checkpoints(ckpt)
    return done[-1] if done else None


def _fsync_dir(d: Path) -> None:
    for f in d.iterdir():
        if f.is_file():
            with open(f, "rb") as h:
                os.fsync(h.fileno())
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(d: Path, step: int, settings: dict | None) -> None:
    """Write ``d``'s completion marker once everything else in it is on disk."""
    (d / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody reads on resume
    _fsync_dir(d)
    mark = {"step": step, "complete": True, "settings": settings}
    # written to a temporary name and renamed: a kill -9 mid-write must leave no marker (the checkpoint
    # counts as incomplete and resume takes the one before), never a half-written, "corrupt" one
    tmp = d / f".{CHECKPOINT_MARK}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(mark) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / CHECKPOINT_MARK)
    _fsync_dir(d)


def prepare_checkpoint_dir(ckpt: Path, resume: bool, overwrite: bool, is_main: bool) -> Path | None:
    """The checkpoint to resume from (None: fresh start); refuses to mix two runs in one folder."""
    if resume:
        last = last_checkpoint(ckpt)
        if last is None:
            raise LoramError(f"--resume: no complete checkpoint in {ckpt}: start without --resume (and use --save-steps)")
        if is_main:  # partial checkpoints (killed mid-save) newer than the last good one
            for p in ckpt.glob("checkpoint-*"):
                if p.is_dir() and not (p / CHECKPOINT_MARK).exists():
                    shutil.rmtree(p, ignore_errors=True)
        return last
    if ckpt.exists() and any(ckpt.glob("checkpoint-*")):
        if not overwrite:
            raise LoramError(f"{ckpt} holds checkpoints of an earlier run: pass --resume to continue it or --overwrite to start over")
        if is_main:
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


# ---- what --resume may change ------------------------------------------------------------------
# Safe: these extend the run or change what is saved, logged or evaluated, not the path the weights
# take. Everything else (lr, schedule, data, rank, seed, ...) must equal the checkpoint's run: a
# resume with other values is neither run, and its adapter would record settings it was not trained with.
RESUME_SAFE = ("steps", "epochs", "tokens", "save_steps", "logging_steps", "eval", "eval_steps", "grad_checkpointing",
               "report_to", "teacher", "distill_cache", "offset_cache", "max_memory")  # the cache key checks the teacher


def model_identity(model: str | Path) -> str:
    """Fingerprint id of a local model folder (pruned or original; sampled rows, no load), else its name."""
    path, gguf = resolve_model(model)
    return base_fingerprint(model)["id"] if gguf is None and Path(path).is_dir() else str(model)


def run_settings(cfg: RunConfig, model: str | Path) -> dict:
    """The settings that define a run's trajectory, as JSON (recorded in every checkpoint)."""
    d = {k: v for k, v in asdict(cfg).items() if k not in RESUME_SAFE and k != "extra"}
    d["data_sha256"] = [source_digest(src) for src in cfg.data]
    # a local file is known by its name (with any [a:b] slice) and content: moving it is fine
    d["data"] = [src if digest is None else Path(src).name for src, digest in zip(cfg.data, d["data_sha256"])]
    d["model"] = model_identity(model)
    return json.loads(json.dumps(d))  # tuples become lists, as they read back from the checkpoint


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def settings_differences(old: dict, new: dict) -> list[str]:
    """["--lr 0.0002 -> 0.001", ...] for every recorded setting that changed."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "data_sha256":
            names = [n for n, x, y in zip(new.get("data") or [], a or [], b or []) if x != y]
            out.append(f"content of {', '.join(names)} changed" if names else "data file content changed")
        elif k == "model":
            out.append(f"model fingerprint {a} -> {b}")
        else:
            out.append(f"--{k.replace('_', '-')} {_show(a)} -> {_show(b)}")
    return out


def check_resume_settings(ckpt: Path, settings: dict) -> None:
    """Refuse --resume when the run's defining settings differ from those the last checkpoint recorded."""
    last = last_checkpoint(ckpt)
    if last is None:  # prepare_checkpoint_dir explains
        return
    try:
        old = json.loads((last / CHECKPOINT_MARK).read_text()).get("settings")
    except (ValueError, AttributeError):
        raise LoramError(f"{last / CHECKPOINT_MARK} is corrupt: delete {last} to resume from the one before, "
                         "or start over with --overwrite") from None
    if old is None:  # written before checkpoints recorded their settings: nothing to compare
        return
    diffs = settings_differences(old, settings)
    if diffs:
        safe = ", ".join(f"--{k.replace('_', '-')}" for k in RESUME_SAFE)
        raise LoramError(f"--resume with other settings than {last.name} was trained with ({'; '.join(diffs)}): give the "
                         f"original values (only {safe} and --checkpoint-dir may change), "
                         "or start a new run (no --resume, with --overwrite)")


# ---- a full disk ---------------------------------------------------------------------------------
def disk_full_in_checkpoint(ckpt: Path, step: int) -> DiskFull:
    if is_main():  # the half-written checkpoint (no completion mark) is useless: give its space back
        for p in ckpt.glob("checkpoint-*"):
            if p.is_dir() and not (p / CHECKPOINT_MARK).exists():
                shutil.rmtree(p, ignore_errors=True)
    return disk_full(ckpt, what=f"the checkpoint of step {step} was not saved, {_kept(ckpt)}")


def _kept(ckpt: Path) -> str:
    last = last_checkpoint(ckpt)
    return (f"the last good checkpoint {last} is kept: continue with --resume once space is freed" if last
            else "no checkpoint was saved, the training is lost (--save-steps keeps checkpoints)")


def save_final(ckpt: Path, save) -> None:
    """Write the final output; on a full disk the error says which checkpoint survives."""
    try:
        save()
    except DiskFull as e:
        if is_main() and ckpt.is_dir() and not any(ckpt.glob("checkpoint-*")):  # nothing to resume from: leave nothing
            shutil.rmtree(ckpt, ignore_errors=True)
        raise DiskFull(f"{e}; {_kept(ckpt)}") from None


def claim_run(cfg: RunConfig, model: str | Path, out: str | Path, overwrite: bool, checkpoint_dir, resume: bool):
    """What train and align settle before loading anything: the output and checkpoint folders (ownership
    rules, locks) and --resume's settings check. Returns (inputs, checkpoint folder, run settings or None)."""
    from ..io import check_checkpoint_dir, check_output

    report_targets(cfg.report_to)  # an unknown tracker or a missing package fails now, not after the load
    inputs = (model, *cfg.data, *(cfg.eval or {}).values())
    check_output(out, overwrite, inputs)
    ckpt = check_checkpoint_dir(checkpoint_dir or f"{out}-checkpoints", resume, overwrite, inputs)
    settings = run_settings(cfg, model) if resume or cfg.save_steps else None  # only checkpoints need them
    if resume:
        check_resume_settings(ckpt, settings)
    return inputs, ckpt, settings
