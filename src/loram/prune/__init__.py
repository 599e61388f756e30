"""`loram prune`: make the small base model and the plan that records what was removed."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..device import compute_dtype
from ..errors import LoramError
from ..families import geometry
from ..fingerprint import base_fingerprint, check_verify
from ..io import atomic_dir, check_output, load_config, load_tokenizer, releases_locks
from ..loading import can_stream, checkpoint_dtype, load_model
from ..procmem import PeakRSS
from ..prune_plan import SPARSE_METHODS, SPARSE_ONLY, STRUCTURED_METHODS, PrunePlan, kept_mlp_channels, parse_layers
from ..pruned_model import apply_plan, count_params, save_pruned
from ..settings import check_knobs
from ..validate import check_ratio
from .report import PruneReport
from .decide import stream_decision
from .sparse import prune_sparse, sparse_masks  # noqa: F401  (public API)
from .structured import CALIBRATED, check_allocation, importance, select
from .compensate import DAMP, apply_compensation, compensation, plan_calibration



def _check_against_config(model_name: str, ratio: float, layers: str | None) -> None:
    """Fail fast, from config.json alone, on --layers / --ratio that cannot fit the model (before loading weights)."""

    g = geometry(load_config(model_name))
    parse_layers(layers, g.n_layers)
    kept_mlp_channels(g.intermediate, ratio)  # refuses a ratio that keeps no channel


def check_method(method: str, sparsity: str | None = None) -> None:
    """Refuse a --method loram does not know, before anything is loaded (recipes check it at --dry-run).
    With ``sparsity`` the sparse path checks the method against its own list."""
    if sparsity is None and method not in STRUCTURED_METHODS + SPARSE_ONLY:
        raise LoramError(f"unknown --method {method!r}: choose one of {', '.join(STRUCTURED_METHODS)} "
                         f"(structured) or {', '.join(SPARSE_METHODS)} with --sparsity")


@releases_locks
def prune(model_name: str, out: str | Path, method: str = "taylor", ratio: float | None = None, attn_ratio: float | None = None,
          layers: str | None = None, seed: int = 0, calib_data: str | None = None, calib_samples: int = 8,
          calib_seq_len: int = 128, overwrite: bool = False, dtype=torch.float32, sparsity: str | None = None,
          verify_base: str = "sampled", max_memory: float | None = None, stream: bool | None = None,
          device="cpu", precision: str | None = None, compensate: bool = False,
          compensate_damp: float | None = None, allocate: str = "uniform") -> PruneReport:
    """Prune ``model_name`` and write a pruned model folder (HF folder + loram_plan.json) to ``out``.

    ``sparsity`` (unstructured | N:M) selects the non-structured methods (sparse.py); without it
    the pruning is structured (ratio defaults to 0.5). ``verify_base="full"`` records the digest of
    every byte of the base in the plan, for `loram recover/merge --verify-base full`.

    ``stream`` (structured methods): True prunes one decoder layer at a time from the safetensors
    (streamed.py: same scores and plan, the folder written in the checkpoint's dtype, computed in
    ``dtype`` on ``device``); False or None loads the whole model (None: the default decision).
    ``precision`` (--precision auto|bf16|fp16|fp32), when given, sets ``dtype`` for ``device`` (loram.device).
    ``compensate`` (structured, in memory or streamed): refit the kept o/down columns by least squares (compensate.py),
    ridge weight ``compensate_damp`` (default compensate.DAMP). ``allocate`` (structured): "uniform" removes ``ratio``
    of the MLP channels in every layer, "global" the same total ranked across the layers (structured.mlp_widths)."""

    check_verify(verify_base)
    if precision is not None:
        dtype = compute_dtype(precision, device)
    check_knobs("prune", seed=seed, calib_samples=calib_samples, calib_seq_len=calib_seq_len)  # the flags' ranges
    check_method(method, sparsity)
    if compensate_damp is not None and not compensate:
        raise LoramError("--compensate-damp sets the --compensate refit: add --compensate, or drop it")
    damp = DAMP if compensate_damp is None else compensate_damp
    check_allocation(allocate, method, sparsity)
    if sparsity is not None or method in SPARSE_ONLY:
        if compensate:
            raise LoramError("--compensate applies to structured pruning only: drop it (sparsegpt already updates the "
                             "kept weights; for wanda/magnitude --sparsity use sparsegpt)")
        if attn_ratio is not None:
            raise LoramError("--attn-ratio applies to structured pruning only: drop it (sparse methods use --ratio)")
        return prune_sparse(model_name, out, method, sparsity or "unstructured", ratio, layers, seed, calib_data,
                            calib_samples, calib_seq_len, overwrite, dtype, verify_base, max_memory, stream, device)
    ratio = 0.5 if ratio is None else ratio
    attn_ratio = ratio if attn_ratio is None else attn_ratio
    check_ratio("--ratio", ratio, allow_zero=False)
    check_ratio("--attn-ratio", attn_ratio, allow_zero=True)
    check_output(out, overwrite, inputs=(model_name, calib_data))
    if stream:
        from .streamed import check_streamable  # lazily: streamed imports build, which imports this package

        check_streamable(model_name)
    _check_against_config(model_name, ratio, layers)
    if stream is None:  # after the cheap checks: a bad flag fails before the budget is even read
        # a GGUF model is dequantised whole by transformers, so it is pruned in memory whatever the budget
        stream = can_stream(model_name) and stream_decision(model_name, method, ratio, layers, None, calib_samples, calib_seq_len,
                                                            max_memory)
    if stream:
        from .streamed import prune_streamed

        return prune_streamed(model_name, out, method, ratio, attn_ratio, layers, seed, calib_data, calib_samples,
                              calib_seq_len, overwrite, dtype, verify_base, device, compensate, damp, allocate)
    t0 = time.time()
    peak = PeakRSS()
    tok = load_tokenizer(model_name)  # before the weights: a missing tokenizer fails in a second, not after the load
    stored = checkpoint_dtype(model_name)
    model = load_model(model_name, dtype=dtype, device=str(device))
    if stored is not None:
        model.config.dtype = stored  # the plan records the checkpoint as it is on disk, not the compute dtype
    g = geometry(model.config)
    start, end = parse_layers(layers, g.n_layers)
    rng = range(start, end)
    fp = base_fingerprint(model_name, model, verify_base)
    scores = None
    batches, calib, comp = plan_calibration(tok, method, compensate, calib_data, calib_samples, calib_seq_len, damp)
    if method in CALIBRATED:
        scores = importance(model, method, rng, batches)
    elif method == "magnitude":
        scores = importance(model, "magnitude", rng)
    n_orig = count_params(model)
    plan = PrunePlan(
        kind="structured", method=method, layers=(start, end), mlp_ratio=ratio, attn_ratio=attn_ratio, seed=seed,
        calibration=calib, base={"name": str(model_name), "config": model.config.to_dict(), "fingerprint": fp},
        pruned=select(g, method, rng, ratio, attn_ratio, seed, scores, allocate),
        compensation=comp, allocation=allocate,
    )
    refit = compensation(model, plan, batches, damp) if compensate else None  # on the original model, before shrinking
    apply_plan(model, plan)
    if refit is not None:
        apply_compensation(model, refit)
    n_pruned = count_params(model)
    plan.extra = {"params_original": n_orig, "params_pruned": n_pruned}
    if stored is not None:
        model.to(stored)  # kept slices of the stored values: exact, and the streamed path's bytes
    with atomic_dir(out, overwrite, "prune", (model_name, calib_data)) as tmp:
        save_pruned(model, tok, plan, tmp)
    return PruneReport(str(out), plan, n_orig, n_pruned, time.time() - t0, peak.gb())
