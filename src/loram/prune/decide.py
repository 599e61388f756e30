"""Whether `loram prune` streams: the predicted in-memory peak against the memory budget."""

from __future__ import annotations

from ..io import load_config

STREAMING = "streamed pruning"  # the stage's name in loading.streamable_source's messages (structured and sparse)


def stream_decision(model_name, method: str, ratio: float | None, layers: str | None, sparsity: str | None,
                    calib_samples: int, calib_seq_len: int, max_memory: float | None) -> bool:
    """Stream when the predicted in-memory peak (planner.stages, "prune") does not fit the memory budget
    (``max_memory`` GB, else what the cgroup / MemAvailable leave: loram.budget). The caller has checked
    that ``model_name`` can stream at all (a safetensors folder or a hub id: loading.can_stream)."""
    from ..budget import memory_budget
    from ..planner.params import PruneSpec
    from ..planner.stages import StageInputs, must_stream

    budget = memory_budget(max_memory)  # checks --max-memory first
    spec = PruneSpec(method, ratio or 0.5, layers=layers, sparsity=sparsity or "unstructured")
    return must_stream("prune", load_config(model_name), spec, StageInputs(calib_samples=calib_samples, calib_seq_len=calib_seq_len),
                       budget)
