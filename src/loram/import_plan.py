"""`loram import-plan`: bring a model pruned by another tool; get a plan + pruned model folder.

(a) sparse (SparseGPT, Wanda, ... run elsewhere)

        loram import-plan SPARSE --base ORIGINAL -o OUT

    SPARSE: an HF safetensors folder with the original's architecture and every shape unchanged.
    The mask is its exact zeros: a targeted linear (q,k,v,o,gate,up,down) of layer i counts as
    pruned where SPARSE is 0 and ORIGINAL is not. The plan's layer range is the smallest one
    covering every layer with such zeros; its pattern is N:M when every row of every targeted
    linear in that range has at most N non-zeros per group of M consecutive inputs (M in 4, 8;
    the smallest N/M wins), else unstructured. Non-zero values may differ from the original
    (SparseGPT updates the weights it keeps).

(b) structured (LLM-Pruner, ... run elsewhere)

        loram import-plan PRUNED --base ORIGINAL --kept-index KEPT.json -o OUT

    KEPT.json holds, per pruned layer, the kept MLP channels and KV groups in increasing order
    (the "pruned" section of a loram plan; a whole plan-like {"pruned": {...}} is accepted too):

        {"4": {"mlp_keep": [0, 3, 7, ...], "kv_keep": [0, 2]}, "5": {"mlp_keep": [...]}, ...}

    A KV group is one KV head with its query heads (for multi-head attention: one head).
    Validation against the two checkpoints: every tensor of PRUNED must have exactly the shape
    the plan gives (index arithmetic in prune_plan.py), and must equal the original's kept rows/columns
    (every other tensor the original's), within the rounding of the coarser dtype. A model
    retrained after pruning fails the value check: --allow-retrained checks the shapes only.

Both read safetensors headers and one tensor at a time (never a pickle), copy the weight files
unchanged, and write the original's config plus the plan (base fingerprint = the original's),
so `loram.load_pruned`, `loram train` and `loram recover --base ORIGINAL` work as after `loram prune`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from .errors import LoramError
from .families import ROLES, geometry, is_tied_head, module_name, ties_embeddings, weight_name
from .fingerprint import base_fingerprint, check_verify, config_digest
from .io import atomic_dir, check_output, load_config, refuse_pickle_only, releases_locks, resolve_model, write_tokenizer
from .loading import load_model
from .progress import track
from .prune_plan import LayerPlan, PrunePlan
from .pruned_model import skeleton_shapes
from .weights import Weights, mismatch, write_safetensors_metadata

NM_GROUPS = (4, 8)


# ---- reading checkpoints one tensor at a time --------------------------------------------------
def open_weights(name: str | Path, need_config: bool = True) -> Weights:
    """A checkpoint's tensors: lazily from a local safetensors folder, else (GGUF, hub) from the loaded model."""
    p = Path(str(name))
    if p.is_dir() and not need_config:
        refuse_pickle_only(p)
        return Weights(p)
    path, gguf = resolve_model(name)  # refuses pickles with a conversion hint
    if gguf is None and Path(path).is_dir():
        return Weights(path)
    return Weights.from_state_dict(load_model(name).state_dict(), str(name))


def _check_names(have: dict, want: dict, where: str, tied: bool) -> None:
    m = mismatch(have, want, tied)
    missing, unexpected = m.missing, m.unexpected
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise LoramError(f"the tensors of {where} do not match the original's architecture ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, e.g. {what}): pass a checkpoint of the same model family with "
                         "Hugging Face tensor names (model.layers.N...)")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within the rounding of the coarser of the two dtypes (a bf16 copy of fp32 weights passes)."""
    if a.shape != b.shape:
        return False
    eps = max(torch.finfo(a.dtype).eps if a.is_floating_point() else 0.0, torch.finfo(b.dtype).eps if b.is_floating_point() else 0.0)
    return torch.allclose(a.float(), b.float(), rtol=eps, atol=1e-12)


def _write_folder(tmp: Path, src: Weights, config, tokenizer_from: list[str | Path], plan: PrunePlan) -> None:
    """Copy the weight files (tensor bytes unchanged, the plan binding added to their header); write the
    original config, a tokenizer and the plan."""
    for f in src.files:
        write_safetensors_metadata(f, tmp / f.name, plan.metadata())
    idx = Path(src.files[0]).parent / "model.safetensors.index.json"
    if idx.exists():
        shutil.copy(idx, tmp / idx.name)
    d = {k: v for k, v in config.to_dict().items() if k != "quantization_config"}  # GGUF originals carry it
    (tmp / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    write_tokenizer(tmp, tokenizer_from)
    plan.save(tmp)


def _base_record(base, config, verify_base: str = "sampled") -> dict:
    d = {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    return {"name": str(base), "config": d, "fingerprint": base_fingerprint(base, verify=verify_base)}


def _verify_loadable(out: Path, plan: PrunePlan, config) -> None:
    """Every tensor name and shape of the written folder matches the plan's model (headers only)."""
    want = skeleton_shapes(config, plan)
    have = Weights(out).shapes
    _check_names(have, want, str(out), ties_embeddings(config))
    wrong = [f"{k} {have[k]} vs {want[k]}" for k in mismatch(have, want, False).wrong]
    if wrong:
        raise LoramError(f"{len(wrong)} tensors do not have the shape the plan gives (e.g. {wrong[0]}): the kept-index "
                         "lists do not describe this checkpoint")


# ---- (a) sparse ------------------------------------------------------------------------------------
def group_max(w: torch.Tensor, m: int) -> int:
    """Most non-zeros in any group of m consecutive inputs of any row (m + 1 when no full group exists)."""
    full = w.shape[1] - w.shape[1] % m
    if full == 0:
        return m + 1
    return int((w[:, :full] != 0).reshape(w.shape[0], full // m, m).sum(2).max())


def nm_pattern(group_maxima: list[dict[int, int]]) -> tuple[int, int] | None:
    """(N, M) with N < M holding for every weight (the smallest N/M), from each weight's {M: group_max}."""
    best = None
    for m in NM_GROUPS:
        n = max(gm[m] for gm in group_maxima)
        if n < m and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return best


@releases_locks
def import_sparse(model: str | Path, base: str | Path, out: str | Path, overwrite: bool = False,
                  verify_base: str = "sampled") -> PrunePlan:
    check_output(out, overwrite, inputs=(model, base))
    check_verify(verify_base)
    config = load_config(base)
    g = geometry(config)
    if config_digest(load_config(model)) != config_digest(config):
        raise LoramError(f"{model} does not have the architecture of {base} (config differs): a sparse model keeps the "
                         "original's shapes; for a structurally pruned model pass --kept-index")
    src, orig = open_weights(model), open_weights(base)
    if src.files is None:
        raise LoramError(f"{model} is not a local safetensors folder: save the sparse model with save_pretrained first")
    _check_names(src.shapes, orig.shapes, str(model), g.tied)
    wrong = mismatch(src.shapes, orig.shapes, g.tied).wrong
    if wrong:
        raise LoramError(f"{model} changes the shape of {wrong[0]}: a sparse model keeps every shape; for a structurally "
                         "pruned model pass --kept-index")
    stats = {}  # (layer, role) -> (zeros, numel, {M: group max}, pruned here?): one tensor pair in memory at a time
    for i in track(range(g.n_layers), "import-plan: layers", unit="layer"):
        for role in ROLES:
            key = weight_name(i, role)
            w, w0 = src.get(key), orig.get(key)
            stats[(i, role)] = (int((w == 0).sum()), w.numel(), {m: group_max(w, m) for m in NM_GROUPS},
                                bool(((w == 0) & (w0 != 0)).any()))
    pruned_layers = sorted({i for (i, _), st in stats.items() if st[3]})
    if not pruned_layers:
        raise LoramError(f"{model} has no zeros where {base} has non-zeros: it is not a sparse version of that model")
    start, end = pruned_layers[0], pruned_layers[-1] + 1
    inside = [((i, r), stats[(i, r)]) for i in range(start, end) for r in ROLES]
    modules = {module_name(i, r): round(st[0] / st[1], 6) for (i, r), st in inside}
    sparsity = sum(st[0] for _, st in inside) / sum(st[1] for _, st in inside)
    nm = nm_pattern([st[2] for _, st in inside])
    pattern = f"{nm[0]}:{nm[1]}" if nm else "unstructured"
    ratio = 1 - nm[0] / nm[1] if nm else round(sparsity, 6)
    plan = PrunePlan(kind="sparse", method="imported", layers=(start, end), mlp_ratio=ratio, attn_ratio=ratio,
                     base=_base_record(base, config, verify_base),
                     sparse={"pattern": pattern, "ratio": ratio, "sparsity": round(sparsity, 6), "modules": modules},
                     extra={"imported_from": str(model)})
    with atomic_dir(out, overwrite, "import-plan", (model, base)) as tmp:
        _write_folder(tmp, src, config, [model, base], plan)
        _verify_loadable(tmp, plan, config)
    return plan


# ---- (b) structured ----------------------------------------------------------------------------------
def read_kept(path: str | Path) -> dict[int, LayerPlan]:
    """Per-layer kept lists from KEPT.json (see the module docstring)."""
    p = Path(path)
    if p.suffix in (".pkl", ".pt", ".bin", ".pth"):
        raise LoramError(f"{p} is a pickle, which loram never loads: write the kept indices as JSON lists")
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise LoramError(f"kept-index file {p} does not exist: check the path") from None
    except json.JSONDecodeError as e:
        raise LoramError(f"{p} is not valid JSON ({e}): write {{\"LAYER\": {{\"mlp_keep\": [...], \"kv_keep\": [...]}}}}") from None
    d = d.get("pruned", d) if isinstance(d, dict) else d
    if not isinstance(d, dict) or not d:
        raise LoramError(f"{p} has no layers: write {{\"LAYER\": {{\"mlp_keep\": [...], \"kv_keep\": [...]}}}}")
    out = {}
    for k, v in d.items():
        try:
            i = int(k)
        except ValueError:
            raise LoramError(f"{p}: key {k!r} is not a layer number: use the layer index as the key, e.g. \"4\"") from None
        if not isinstance(v, dict) or set(v) - {"mlp_keep", "kv_keep"} or not v:
            raise LoramError(f"{p}: layer {k} must be {{\"mlp_keep\": [...], \"kv_keep\": [...]}} (either may be left out)")
        for name, keep in v.items():
            if not isinstance(keep, list) or not all(isinstance(x, int) for x in keep):
                raise LoramError(f"{p}: layer {k} {name} is not a list of integers")
            if keep != sorted(set(keep)):
                raise LoramError(f"{p}: layer {k} {name} is not in increasing order without repeats: list the kept "
                                 "indices in the order their rows appear in the pruned checkpoint (increasing)")
        out[i] = LayerPlan(mlp_keep=v.get("mlp_keep"), kv_keep=v.get("kv_keep"))
    return out


def _expected(orig: Weights, key: str, plan: PrunePlan, g) -> torch.Tensor:
    """The original's tensor restricted to the plan's kept rows/columns."""
    t = orig.get(key)
    kept = plan.kept_along(key, g)
    return t if kept is None else t.index_select(*kept)


@releases_locks
def import_structured(pruned: str | Path, base: str | Path, kept: str | Path, out: str | Path,
                      allow_retrained: bool = False, overwrite: bool = False, verify_base: str = "sampled") -> PrunePlan:
    check_output(out, overwrite, inputs=(pruned, base, kept))
    check_verify(verify_base)
    config = load_config(base)
    g = geometry(config)
    layers = read_kept(kept)
    plan = PrunePlan(kind="structured", method="imported", layers=(min(layers), max(layers) + 1),
                     base=_base_record(base, config, verify_base), pruned=layers, extra={"imported_from": str(pruned)})
    plan.validate(g)
    kept_ch = [len(lp.mlp_keep) for lp in layers.values() if lp.mlp_keep is not None]
    kept_gr = [len(lp.kv_keep) for lp in layers.values() if lp.kv_keep is not None]
    plan.mlp_ratio = round(1 - sum(kept_ch) / (g.intermediate * len(kept_ch)), 6) if kept_ch else 0.0
    plan.attn_ratio = round(1 - sum(kept_gr) / (g.n_kv_heads * len(kept_gr)), 6) if kept_gr else 0.0
    src, orig = open_weights(pruned, need_config=False), open_weights(base)
    want, have = skeleton_shapes(config, plan), src.shapes
    _check_names(have, want, str(pruned), g.tied)
    wrong = [f"{k} {have[k]} vs {want[k]}" for k in mismatch(have, want, g.tied).wrong]
    if wrong:
        raise LoramError(f"{len(wrong)} tensors of {pruned} do not have the shape the kept-index lists give (e.g. "
                         f"{wrong[0]}): the lists do not describe this checkpoint")
    if not allow_retrained:
        for key in track(sorted(src.shapes), "import-plan: comparing with the original", unit="tensor"):
            if key.endswith("rotary_emb.inv_freq"):
                continue
            if not _close(src.get(key), _expected(orig, key, plan, g)):
                raise LoramError(f"{key} of {pruned} is not the original's kept rows/columns: the kept-index lists do "
                                 "not match the checkpoint (or it was retrained after pruning: pass --allow-retrained "
                                 "to check the shapes only)")
    plan.extra["params_original"] = sum(math.prod(s) for k, s in orig.shapes.items() if not is_tied_head(k, g.tied))
    plan.extra["params_pruned"] = sum(math.prod(s) for k, s in want.items() if not is_tied_head(k, g.tied))
    plan.extra["validated"] = "shapes" if allow_retrained else "shapes+values"
    with atomic_dir(out, overwrite, "import-plan", (pruned, base, kept)) as tmp:
        _write_folder(tmp, src, config, [pruned, base], plan)
        _verify_loadable(tmp, plan, config)
    return plan
