"""Building a pruned model directly from a config + plan, one decoder layer at a time.

    skeleton(config, plan) on meta            (no memory: the pruned shapes, nothing allocated)
    embeddings, final norm, lm_head           materialised from the source
    for each decoder layer i, each module:    materialise its pruned tensors, quantise a linear to
                                              NF4 right away when asked, move on

so the peak while building is the result plus one linear (plus its fp32 copy while it is quantised);
the full model is never built. Weight sources:

    checkpoint folder   safetensors shards read through weights.Weights (the index json when there
                        is one): only the kept rows / columns of each tensor are read, one tensor
                        per shard handle. The plan's base fingerprint must match the checkpoint's.
    "random"            N(0, initializer_range) linears and embeddings, ones for norms, zeros for
                        biases (the transformers init). With quantize="nf4" the decoder linears are
                        drawn as NF4 directly (nf4.random_nf4_linear): same tensors, dtypes and
                        kernels as a quantised checkpoint; bitsandbytes' CPU quantiser would take
                        ~20 min for a 70B-geometry model whose weight values do not matter for
                        memory or speed.

Plans without weights come from prune.random_plan; `loram plan --try` (planner/trial.py) builds
one here and times a few LoRA steps on it.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LoramError
from .families import MODULE_OF_ROLE, ROLE_OF_PROJ, decoder_layers, geometry, is_tied_head, ties_embeddings
from .fingerprint import config_digest, describe_difference, fingerprint_safetensors, same_model
from .io import TOKENIZER_FILES, atomic_dir, releases_locks
from .loading import PLAN_ATTR
from .nf4 import QUANTIZED_MARK, nf4_linear, random_nf4_linear
from .procmem import PeakRSS
from .progress import track
from .prune.random_plan import RANDOM_SCHEME
from .prune_plan import PrunePlan
from .pruned_model import count_params, materialize_buffers, skeleton, skeleton_shapes
from .weights import ShardWriter, Weights


@dataclass
class BuildReport:
    source: str
    quantize: str | None
    params: int
    seconds: float
    peak_rss_gb: float


# ---- where each kept tensor comes from ------------------------------------------------------
def kept_indices(plan: PrunePlan, g, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(kept rows, kept columns) of the original tensor ``name``; None = all."""
    kept = plan.kept_along(name, g)  # the plan and the family table know names, axes and indices
    if kept is None:
        return None, None
    axis, idx = kept
    return (idx, None) if axis == 0 else (None, idx)


# ---- materialising tensors ----------------------------------------------------------------
class _Source:
    """Returns the pruned tensor ``name`` of shape ``shape`` (from a checkpoint's ``weights``, or random)."""

    def __init__(self, weights: Weights | None, plan: PrunePlan, config, seed: int):
        self.plan, self.g, self.config = plan, geometry(config), config
        self.full = skeleton_shapes(config, None)
        self.weights = weights
        self.gen = torch.Generator().manual_seed(seed)
        self.std = float(getattr(config, "initializer_range", 0.02))

    def tensor(self, name: str, shape: tuple, dtype) -> torch.Tensor:
        if self.weights is not None:
            return self._read(name, shape, dtype)
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=dtype)
        return torch.empty(shape, dtype=dtype).normal_(0, self.std, generator=self.gen)

    def _read(self, name: str, shape: tuple, dtype) -> torch.Tensor:
        w = self.weights
        if name not in w:
            raise LoramError(f"tensor {name} is not in the checkpoint {w.folder}: the config does not match the weights")
        have, expect = w.headers[name].shape, tuple(self.full[name])
        if have != expect:
            raise LoramError(f"{name} is {list(have)} in {w.folder}, the config says {list(expect)}: "
                             "the config does not match the weights")
        rows, cols = kept_indices(self.plan, self.g, name)
        t = w.read(name, rows, cols, dtype)
        if tuple(t.shape) != tuple(shape):
            raise LoramError(f"{name}: read {list(t.shape)}, the plan needs {list(shape)}: the plan does not match the config")
        return t


def _assign(module: nn.Module, prefix: str, src: _Source, dtype) -> None:
    """Materialise the direct parameters of ``module`` (named ``prefix``) from ``src``."""
    for k, p in list(module.named_parameters(recurse=False)):
        setattr(module, k, nn.Parameter(src.tensor(prefix + k, tuple(p.shape), dtype), requires_grad=p.requires_grad))


def _materialise_block(block: nn.Module, prefix: str, src: _Source, dtype, quantize: str | None, compute_dtype) -> None:
    for mname, mod in list(block.named_modules()):
        if not any(True for _ in mod.parameters(recurse=False)):
            continue
        full = f"{prefix}{mname}."
        parent_name, _, child = mname.rpartition(".")
        is_proj = isinstance(mod, nn.Linear) and child in ROLE_OF_PROJ
        if quantize == "nf4" and is_proj:
            shape, has_bias = tuple(mod.weight.shape), mod.bias is not None
            if src.weights is None:
                q = random_nf4_linear(shape, has_bias, compute_dtype, src.std, src.gen)
            else:
                w = src.tensor(full + "weight", shape, torch.float32)
                b = src.tensor(full + "bias", (shape[0],), torch.float32) if has_bias else None
                q = nf4_linear(w, b, compute_dtype)
                del w, b
            setattr(block.get_submodule(parent_name), child, q)
        else:
            _assign(mod, full, src, dtype)


def _replace_weights(block: nn.Module, new: dict[str, torch.Tensor]) -> None:
    """Put ``new`` ({role: weight}) in place of the sliced weights of decoder layer ``block``'s projections."""
    from .prune.compensate import write_refit

    for role, w in new.items():
        write_refit(block.get_submodule(MODULE_OF_ROLE[role]), w)


def _check_source(plan: PrunePlan, config, source, refit: bool = False) -> Weights | None:
    """The checkpoint's weights (None for random) once config, plan and checkpoint are known to agree.
    ``refit``: the caller supplies the refitted o/down columns of a --compensate plan (the streamed prune)."""
    if config_digest(config) != config_digest(plan.base.get("config", {})):
        raise LoramError("the config differs from the one the plan was made for: pass the plan's own base config")
    fp = plan.base.get("fingerprint") or {}
    if source == "random":
        return None
    if fp.get("scheme") == RANDOM_SCHEME:
        raise LoramError("this plan was made for random weights: make a plan from the checkpoint "
                         "(`loram build CHECKPOINT --ratio R --plan-only`, or `loram prune`)")
    if plan.compensation is not None and not refit:  # its o/down columns were refitted on calibration data: slicing gives other weights
        raise LoramError("this plan was made with `loram prune --compensate`, whose weights are not slices of the original: "
                         "use the pruned folder it wrote, or re-run the same `loram prune --compensate`")
    weights = Weights(source, use_index=True)
    got = fingerprint_safetensors(weights.files, config.to_dict())
    if not same_model(fp, got):
        raise LoramError(f"the checkpoint {source} is not the model the plan was made for ({describe_difference(fp, got)}): "
                         "pass the original checkpoint the plan was made from")
    return weights


def build_pruned_report(config, plan: PrunePlan, source: str | Path = "random", quantize: str | None = None,
                        dtype=torch.bfloat16, seed: int = 0, compute_dtype=None) -> tuple[nn.Module, BuildReport]:
    """(model, BuildReport): the pruned model ``plan`` describes, built layer by layer without the full model.

    config: the base config (None: the plan's). source: "random" or a safetensors checkpoint folder.
    quantize: None or "nf4" (decoder linears; embeddings, norms and lm_head stay in ``dtype``), NF4's
    compute dtype ``compute_dtype`` (default ``dtype``: one dtype for everything not NF4, as the loaders do).
    The model is a stock transformers model with smaller modules.
    """
    compute_dtype = dtype if compute_dtype is None else compute_dtype
    if quantize not in (None, "nf4"):
        raise LoramError(f"--quantize {quantize!r} is not supported: use nf4")
    if plan.kind != "structured":
        raise LoramError(f"build makes structured plans only (this one is {plan.kind!r}): use `loram prune` for it")
    t0, peak = time.time(), PeakRSS()
    config = config if config is not None else plan.base_config()
    source = source if source == "random" else str(source)
    if source != "random" and not Path(source).is_dir():
        raise LoramError(f"weight source {source} is not a folder: pass a safetensors checkpoint folder or 'random'")
    weights = _check_source(plan, config, source)
    model = skeleton(config, plan, dtype=dtype)
    src = _Source(weights, plan, config, seed)
    layers, pre = decoder_layers(model), _layers_prefix(model)
    tied = ties_embeddings(config)
    for mname, mod in list(model.named_modules()):  # embeddings, final norm, lm_head
        if mname.startswith(pre) or not any(True for _ in mod.parameters(recurse=False)):
            continue
        if not is_tied_head(mname, tied):
            _assign(mod, mname + ".", src, dtype)
    for i, block in enumerate(track(layers, "build: layers", unit="layer")):
        _materialise_block(block, f"{pre}{i}.", src, dtype, quantize, compute_dtype)
    if tied:
        model.tie_weights()
    materialize_buffers(model, "cpu")
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise LoramError(f"build left {left[:3]} unset: this architecture has tensors loram does not know")
    if quantize:
        setattr(model, QUANTIZED_MARK, quantize)
    model.eval()
    return model, BuildReport(str(source), quantize, count_params(model), time.time() - t0, peak.gb())


def build_pruned(config, plan: PrunePlan, source: str | Path = "random", quantize: str | None = None,
                 dtype=torch.bfloat16, seed: int = 0, compute_dtype=None):
    """The model of ``build_pruned_report``; for users it carries ``model.loram_build`` (the BuildReport)
    and ``model.loram_plan``, as ``loram.load_pruned``'s models do (loram itself reads neither)."""
    model, report = build_pruned_report(config, plan, source, quantize, dtype, seed, compute_dtype)
    setattr(model, PLAN_ATTR, plan)
    model.loram_build = report
    return model


def _layers_prefix(model) -> str:
    layers = decoder_layers(model)
    for n, m in model.named_modules():
        if m is layers:
            return n + "."
    raise LoramError("could not find the decoder layers (model.model.layers) in this model")


# ---- writing a pruned folder without the full model ------------------------------------------


@releases_locks
def write_pruned(config, plan: PrunePlan, source: str | Path, out: str | Path, dtype=torch.bfloat16, seed: int = 0,
                 overwrite: bool = False, inputs=(), command: str = "build", refit=None) -> BuildReport:
    """Write the pruned folder (loads with ``load_pruned``) one shard per decoder layer.

    Each layer is materialised, saved, then sent back to the meta device: peak = one layer.
    ``command`` names the writer in the folder's marker (the streamed `loram prune` writes through here).
    ``refit``: an iterator giving, for decoder layer 0, 1, ... in turn, {role: weight} that replaces the
    sliced weight of those projections (`loram prune --compensate`, streamed: prune.compensate.streamed_refits).
    """
    t0, peak = time.time(), PeakRSS()
    config = config if config is not None else plan.base_config()
    source = source if source == "random" else str(source)
    weights = _check_source(plan, config, source, refit=refit is not None)
    model = skeleton(config, plan, dtype=dtype)
    n_params = count_params(model)
    src = _Source(weights, plan, config, seed)
    layers, pre = decoder_layers(model), _layers_prefix(model)
    tied = ties_embeddings(config)
    top = [(n, m) for n, m in model.named_modules() if not n.startswith(pre) and any(True for _ in m.parameters(recurse=False))
           and not is_tied_head(n, tied)]
    n_shards = len(layers) + 1
    with atomic_dir(out, overwrite, command, (source, *inputs)) as tmp:
        writer = ShardWriter(tmp, n_shards, plan.metadata())
        for k in track(range(n_shards), f"{command}: shards", unit="shard"):
            if k == 0:
                tensors = {}
                for n, m in top:
                    _assign(m, n + ".", src, dtype)
                    tensors.update({f"{n}.{p}": t for p, t in m.named_parameters(recurse=False)})
                    m.to("meta")
            else:
                block, prefix = layers[k - 1], f"{pre}{k - 1}."
                _materialise_block(block, prefix, src, dtype, None, dtype)
                if refit is not None:
                    _replace_weights(block, next(refit))
                tensors = {prefix + p: t for p, t in block.state_dict().items()}
            writer.add(tensors)
            del tensors
            if k > 0:
                layers[k - 1].to("meta")
        writer.finish(n_params)
        config.save_pretrained(str(tmp))
        if source != "random":
            for f in TOKENIZER_FILES:
                if (Path(source) / f).exists():
                    shutil.copy(Path(source) / f, Path(tmp) / f)
        plan.save(tmp)
    return BuildReport(str(source), None, n_params, time.time() - t0, peak.gb())
