"""`loram prune`: make the small base model and the plan that records what was removed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoramError
from ..families import geometry
from ..io import atomic_dir, check_output, load_model, load_tokenizer, releases_locks, resolve_model, safetensors_files
from ..plan import PrunePlan, parse_layers
from ..pruned import apply_plan, count_params, save_pruned
from ..validate import check_knobs, check_ratio
from .structured import METHODS as STRUCTURED_METHODS
from .structured import calibration_batches, importance, select
from .sparse import METHODS as SPARSE_METHODS
from .sparse import prune_sparse, sparse_masks  # noqa: F401  (public API)

SPARSE_ONLY = ("sparsegpt", "wanda")  # magnitude is structured unless --sparsity is given


@dataclass
class PruneReport:
    out: str
    plan: PrunePlan
    params_original: int
    params_pruned: int
    seconds: float
    peak_rss_gb: float
    params_nonzero: int | None = None  # sparse plans: shapes are kept, zeros in the targeted linears are not counted

    @property
    def param_reduction(self) -> float:
        return self.params_original / (self.params_nonzero or self.params_pruned)


def base_fingerprint(name: str | Path, model=None, verify: str = "sampled") -> dict:
    """Fingerprint of an original model: from its safetensors files when it is a local folder
    (no load needed, fast for 70B), else from the loaded tensors (GGUF, hub).
    verify="full" also records the digest of every byte of its weight files (fingerprint["full"])."""
    from ..fingerprint import fingerprint_model, fingerprint_safetensors, full_digest
    from ..io import load_config

    check_verify(verify)
    path, gguf = resolve_model(name)
    if gguf is None and Path(path).is_dir():
        fp = fingerprint_safetensors(safetensors_files(path), load_config(name).to_dict())
    else:
        fp = fingerprint_model(model if model is not None else load_model(name))
    if verify == "full":
        fp["full"] = full_digest(weight_files(name))  # outside fp["id"]: sampled and full plans share their id
    return fp


def check_verify(verify: str) -> None:
    from ..fingerprint import VERIFY_MODES

    if verify not in VERIFY_MODES:
        raise LoramError(f"--verify-base {verify!r} is unknown: use {' or '.join(VERIFY_MODES)}")


def weight_files(name: str | Path) -> list[Path]:
    """The files holding a local model's weights (safetensors shards or the .gguf) for a full digest."""
    path, gguf = resolve_model(name)
    if gguf is not None:
        return [Path(path) / gguf]
    if not Path(path).is_dir():
        raise LoramError(f"--verify-base full hashes local files, and {name} is a hub id: download it and pass the folder")
    return safetensors_files(path)


def check_base_full(expected: dict, base: str | Path, subject: str, made: str) -> None:
    """--verify-base full: every byte of ``base``'s weight files must be the ones recorded in ``expected``
    (``subject`` ``made``: e.g. "this adapter's plan" "was made from", for the messages)."""
    from ..fingerprint import full_digest

    want = expected.get("full")
    if not want:
        raise LoramError(f"{subject} records no full digest of its base (it was made without --verify-base full): "
                         "re-create the plan with `loram prune ... --verify-base full`, or drop --verify-base full "
                         "to check the sampled fingerprint")
    got = full_digest(weight_files(base))
    if got != want:
        raise LoramError(f"base {base} is not byte for byte the model {subject} {made} (full digest {got[:16]}, "
                         f"expected {want[:16]}): pass the original model, unmodified")


def _check_against_config(model_name: str, ratio: float, layers: str | None) -> None:
    """Fail fast, from config.json alone, on --layers / --ratio that cannot fit the model (before loading weights)."""
    from ..io import load_config
    from ..plan import kept_mlp_channels

    g = geometry(load_config(model_name))
    parse_layers(layers, g.n_layers)
    kept_mlp_channels(g.intermediate, ratio)  # refuses a ratio that keeps no channel


@releases_locks
def prune(model_name: str, out: str | Path, method: str = "taylor", ratio: float | None = None, attn_ratio: float | None = None,
          layers: str | None = None, seed: int = 0, calib_data: str | None = None, calib_samples: int = 8,
          calib_seq_len: int = 128, overwrite: bool = False, dtype=torch.float32, sparsity: str | None = None,
          verify_base: str = "sampled") -> PruneReport:
    """Prune ``model_name`` and write a pruned model folder (HF folder + loram_plan.json) to ``out``.

    ``sparsity`` (unstructured | N:M) selects the non-structured methods (sparse.py); without it
    the pruning is structured (ratio defaults to 0.5). ``verify_base="full"`` records the digest of
    every byte of the base in the plan, for `loram recover/merge --verify-base full`."""
    from ..memory import PeakRSS

    check_verify(verify_base)
    check_knobs("prune", seed=seed, calib_samples=calib_samples, calib_seq_len=calib_seq_len)  # the flags' ranges
    if sparsity is not None or method in SPARSE_ONLY:
        if attn_ratio is not None:
            raise LoramError("--attn-ratio applies to structured pruning only: drop it (sparse methods use --ratio)")
        return prune_sparse(model_name, out, method, sparsity or "unstructured", ratio, layers, seed, calib_data,
                            calib_samples, calib_seq_len, overwrite, dtype, verify_base)
    ratio = 0.5 if ratio is None else ratio
    if method not in STRUCTURED_METHODS:
        raise LoramError(f"unknown --method {method!r}: choose one of {', '.join(STRUCTURED_METHODS)} "
                         f"(structured) or {', '.join(SPARSE_METHODS)} with --sparsity")
    attn_ratio = ratio if attn_ratio is None else attn_ratio
    check_ratio("--ratio", ratio, allow_zero=False)
    check_ratio("--attn-ratio", attn_ratio, allow_zero=True)
    check_output(out, overwrite, inputs=(model_name, calib_data))
    _check_against_config(model_name, ratio, layers)
    t0 = time.time()
    peak = PeakRSS()
    tok = load_tokenizer(model_name)  # before the weights: a missing tokenizer fails in a second, not after the load
    model = load_model(model_name, dtype=dtype)
    g = geometry(model.config)
    start, end = parse_layers(layers, g.n_layers)
    rng = range(start, end)
    fp = base_fingerprint(model_name, model, verify_base)
    calib, scores = None, None
    if method == "taylor":
        batches, calib = calibration_batches(tok, calib_data, calib_samples, calib_seq_len)
        scores = importance(model, "taylor", rng, batches)
    elif method == "magnitude":
        scores = importance(model, "magnitude", rng)
    n_orig = count_params(model)
    plan = PrunePlan(
        kind="structured", method=method, layers=(start, end), mlp_ratio=ratio, attn_ratio=attn_ratio, seed=seed,
        calibration=calib, base={"name": str(model_name), "config": model.config.to_dict(), "fingerprint": fp},
        pruned=select(g, method, rng, ratio, attn_ratio, seed, scores),
    )
    apply_plan(model, plan)
    n_pruned = count_params(model)
    plan.extra = {"params_original": n_orig, "params_pruned": n_pruned}
    with atomic_dir(out, overwrite, "prune", (model_name, calib_data)) as tmp:
        save_pruned(model, tok, plan, tmp)
    return PruneReport(str(out), plan, n_orig, n_pruned, time.time() - t0, peak.gb())
