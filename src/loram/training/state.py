"""Optimizer, scheduler and RNG state of a checkpoint as safetensors + JSON, never pickled.

    optimizer.safetensors + optimizer.json    every tensor of the optimizer state / the rest (param groups, steps)
    scheduler.json                            the LR scheduler's state dict
    rng_state_<rank>.{safetensors,json}       torch CPU (and CUDA) generators / Python's and NumPy's

transformers' Trainer writes these with torch.save; loading them back would unpickle, so resuming a
checkpoint from anywhere could run code. The Trainer subclass (trainer.py) swaps in these writers
and readers; a state that is not plain JSON (DeepSpeed / FSDP engines) keeps the Trainer's format.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import safetensors.torch  # called as safetensors.torch.save_file: tests stand in a full disk there
import torch

from ..io import write_json

OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_JSON = "optimizer.safetensors", "optimizer.json", "scheduler.json"


def plain(obj) -> bool:
    """Whether ``obj`` is JSON as it is."""
    try:
        json.dumps(obj)
        return True
    except (TypeError, ValueError):
        return False


def save_optimizer_state(sd: dict, folder: Path) -> bool:
    """Optimizer state as optimizer.safetensors (tensors) + optimizer.json (the rest); False if not JSON-able."""
    tensors, state = {}, {}
    for pid, st in sd["state"].items():
        state[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                state[str(pid)][k] = None  # placeholder: the value is in the safetensors file
            else:
                state[str(pid)][k] = v
    meta = {"state": state, "param_groups": sd["param_groups"]}
    if not plain(meta):
        return False
    safetensors.torch.save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    write_json(folder / OPTIMIZER_JSON, meta)
    return True


def load_optimizer_state(folder: Path) -> dict:
    meta, tensors = json.loads((folder / OPTIMIZER_JSON).read_text()), safetensors.torch.load_file(str(folder / OPTIMIZER_TENSORS))
    state = {int(pid): {k: tensors[f"{pid}.{k}"] if v is None else v for k, v in st.items()} for pid, st in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_files(folder: Path, rank: int) -> tuple[Path, Path]:
    return folder / f"rng_state_{rank}.safetensors", folder / f"rng_state_{rank}.json"


def save_rng_state(folder: Path, rank: int) -> None:
    """Python, NumPy, torch CPU (and CUDA) generator states, without pickle."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    t, j = rng_files(folder, rank)
    safetensors.torch.save_file(tensors, str(t))
    write_json(j, {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]})


def load_rng_state(folder: Path, rank: int) -> bool:
    t, j = rng_files(folder, rank)
    if not (t.exists() and j.exists()):
        return False
    meta, tensors = json.loads(j.read_text()), safetensors.torch.load_file(str(t))
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return True
