"""Loading models: an original (folder, .gguf, alias, hub id) or a pruned model folder.

Sits above pruned_model.py (it builds pruned skeletons) and below every command. Loaders return what they
loaded: ``load_pruned_model`` gives ``PrunedModel(model, plan)``, so no caller has to find the
plan on the model. ``load_pruned`` (``loram.load_pruned``, the public one-call loader) returns the
model alone and, for users, also hangs the plan on it as ``model.loram_plan``; loram itself never
reads that attribute.

Every local folder's safetensors headers are checked against its config (+ plan) before a weight
is read (``check_checkpoint``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .device import default_device
from .errors import LoramError
from .families import family_of, geometry, ties_embeddings
from .hub import MODEL_FILES, download, is_repo_id
from .io import SMOLLM2_ALIAS, _gguf_hint, load_config, read_json, resolve_model
from .nf4 import QUANTIZED_MARK, nf4_stream_transform, quantize_block_nf4, require_bnb
from .prune_plan import PLAN_FILE, PrunePlan, has_plan
from .pruned_model import check_plan_binding, load_state_into, materialize_buffers, skeleton, skeleton_shapes
from .weights import Weights, mismatch

PLAN_ATTR = "loram_plan"  # set by the public load_pruned only, for users (see module doc)


class PrunedModel(NamedTuple):
    model: nn.Module
    plan: PrunePlan


def check_checkpoint(folder: str | Path, config, plan=None) -> Weights:
    """Refuse a local folder whose safetensors do not match its config.json (and plan, for a pruned
    folder): names, shapes and float dtypes. Returns the folder's ``Weights`` (headers already read).

    Reads headers only, before any weight is used. Without this, transformers fails with a long
    report on a shape mismatch and, worse, initialises *missing* tensors randomly with only a warning.
    """
    want = skeleton_shapes(config, plan)
    weights = Weights(folder)
    have = weights.shapes
    m = mismatch(have, want, ties_embeddings(config))
    if m:
        wrong = [f"{k} {have[k]} vs config {want[k]}" for k in m.wrong]
        detail = "; ".join(x for x in (f"wrong shape: {wrong[0]}" if wrong else "", f"missing: {m.missing[0]}" if m.missing else "",
                                       f"unexpected: {m.unexpected[0]}" if m.unexpected else "") if x)
        what = "config.json and loram_plan.json" if plan is not None else "config.json"
        raise LoramError(f"{what} and the weights in {folder} disagree ({len(wrong)} wrong shape, {len(m.missing)} missing, "
                         f"{len(m.unexpected)} unexpected tensors; {detail}): the folder is inconsistent, re-create or re-download it")
    return weights


# ---- an original model ------------------------------------------------------------------------
def _strip_gguf_quantization(model) -> None:
    # a GGUF load dequantises to a plain model but keeps quantization_config, which save_pretrained refuses
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, None)
    with contextlib.suppress(AttributeError):
        model.is_quantized = False


def load_model(name: str | Path, dtype=None, trust_remote_code: bool = False, device: str | None = None):
    """Load an original (unpruned) causal LM from a folder, a .gguf, the `smollm2` alias or a hub id."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    config = load_config(name, trust_remote_code)
    family_of(config)  # refuse unsupported architectures before loading weights
    path, gguf = resolve_model(name)
    if gguf is None and Path(path).is_dir():
        check_checkpoint(path, config)
    dtype = dtype or torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, gguf_file=gguf, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=None if gguf else True,
        )
    except ImportError as e:
        raise _gguf_hint(e) from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoramError(f"cannot load model {name} ({msg}): check that the folder or file is complete, or re-download it") from None
    if gguf:
        _strip_gguf_quantization(model)
        model.config.name_or_path = str(name) if str(name) == SMOLLM2_ALIAS else str(Path(path) / gguf)
    if device:
        model.to(device)
    model.eval()
    return model


# ---- a pruned model folder ----------------------------------------------------------------------
def _resolve_device(device_map) -> str:
    if device_map in (None, "auto"):
        return str(default_device())  # cuda:LOCAL_RANK: under torchrun each rank on its own GPU
    if isinstance(device_map, str):
        return device_map
    raise LoramError("device_map must be 'auto', 'cpu', 'cuda' or 'cuda:N' for pruned models")


def open_pruned(path: str | Path) -> tuple:
    """(config, plan, Weights) of a pruned model folder, checked as ``load_pruned_model`` checks it
    (config, plan, headers, plan binding) without reading a weight: also for the layer-streamed stages."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise LoramError(f"pruned model folder {path} does not exist: check the path (create it with `loram prune`)")
    if not (path / "config.json").exists():
        raise LoramError(f"{path} is not a model folder (no config.json): pass a folder written by `loram prune`")
    read_json(path / "config.json")
    plan = PrunePlan.load(path)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise LoramError(f"cannot read {path / 'config.json'} ({str(e).splitlines()[0]}): "
                         "re-create the folder with `loram prune`") from None
    geometry(config)
    # headers only, before any weight is read: names, shapes and dtypes fit config + plan, and the
    # plan is the one these weights were written with
    weights = check_checkpoint(path, config, plan)
    check_plan_binding(weights.files, plan, str(path), "re-run `loram prune`")
    return config, plan, weights


def safetensors_folder(name: str | Path) -> Path | None:
    """The local safetensors folder ``name`` names, or None (a .gguf file, the smollm2 alias, a hub id):
    what can be read tensor by tensor here and now (``streamable_source`` also takes hub ids)."""
    path, gguf = resolve_model(name)
    return Path(path) if gguf is None and Path(path).is_dir() else None


def checkpoint_dtype(model_name: str):
    """The dtype ``model_name`` stores its weights in, or None where that is not known (GGUF: dequantised).

    Folders derived from a checkpoint are written in this dtype whatever the compute dtype: a bf16
    model gives a bf16 pruned folder (not one twice its size in fp32), and an in-memory and a
    streamed prune write the same bytes."""
    folder = safetensors_folder(model_name)
    if folder is not None:
        return Weights(folder).stored_dtype()
    d = getattr(load_config(model_name), "dtype", None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else None


def streamable_source(name: str | Path, what: str) -> str:
    """The local safetensors folder or hub id ``name`` names, for a stage that reads safetensors layer by
    layer (``what``, e.g. "streamed pruning"; ``source_folder`` then gives the folder to read).
    Refuses a GGUF model (a .gguf, the smollm2 alias) before anything is read: transformers dequantises
    it whole in memory before loram sees a tensor, so streaming afterwards would save little."""
    if not can_stream(name):
        raise LoramError(f"{what} reads safetensors shards and {name} is a GGUF model, which transformers "
                         "dequantises whole in memory: run it in memory (stream=False), or convert it once to a "
                         "safetensors folder (load_model + save_pretrained) and stream that")
    return resolve_model(name)[0]


def can_stream(name: str | Path) -> bool:
    """Whether ``name`` can be read layer by layer (``streamable_source`` accepts it): anything but a GGUF model."""
    return resolve_model(name)[1] is None


def source_folder(name: str | Path, what: str) -> Path:
    """The local safetensors folder to read ``name`` from (``streamable_source``): a hub id is downloaded
    first (weights, config, tokenizer: hub.download), from the cache when it is there."""
    path = streamable_source(name, what)
    return Path(path) if Path(path).is_dir() else download(path, MODEL_FILES)


def pruned_folder(name: str | Path, fetch: bool = True) -> Path | None:
    """The local folder of the loram pruned model ``name`` names, or None when it names another model.

    A local folder counts when it holds loram_plan.json; a hub id when its repo does (a pruned base
    loram pushed: `loram prune/align --push-to-hub`): the plan alone is downloaded to tell, then, with
    ``fetch``, the files the loaders read (hub.download; the cache's snapshot folder is then read
    exactly as a local pruned folder). A .gguf, the smollm2 alias or a missing local path: None."""
    p = Path(str(name))
    if p.is_dir():
        return p if has_plan(p) else None
    if not is_repo_id(name):
        return None
    probe = download(str(name), [PLAN_FILE])
    if not has_plan(probe):
        return None  # an ordinary hub model: the loaders read it through transformers as before
    return download(str(name), MODEL_FILES) if fetch else probe


def open_checkpoint(name: str | Path, what: str) -> tuple:
    """(config, plan or None, Weights) of a local safetensors folder, original or pruned, checked as the
    loaders check it, no weight read: for the stages that read a model layer by layer (``what`` names
    the stage in the message that refuses a GGUF file or hub id, which cannot be read that way)."""
    if Path(str(name)).is_dir() and has_plan(name):
        return open_pruned(name)
    path = safetensors_folder(name)
    if path is None:
        raise LoramError(f"{what} reads the model layer by layer from safetensors, and {name} is not a local safetensors "
                         "folder (a GGUF file or a hub id): pass a local model folder (convert or download it first)")
    config = load_config(name)
    family_of(config)
    return config, None, check_checkpoint(path, config)


def load_pruned_model(path: str | Path, quantize: str | None = None, dtype=torch.float32, device_map="cpu") -> PrunedModel:
    """(model, plan) of a pruned model folder written by `loram prune` (or align, build, import-plan).

    The model is built on the meta device with the plan's smaller modules, then the tensors are
    assigned: the full-size model never exists. quantize: None or "nf4" (bitsandbytes NF4 + double
    quant on the decoder linears, QLoRAM; quantised layer by layer on the device, with ``dtype`` as
    their compute dtype and the dtype of everything else).
    """
    if quantize not in (None, "nf4"):
        raise LoramError(f"--quantize {quantize!r} is not supported: use nf4")
    if quantize == "nf4":
        require_bnb()  # fail fast with the install hint, before reading any weights
    config, plan, weights = open_pruned(path)
    device = _resolve_device(device_map)
    if quantize == "nf4":
        model = _load_nf4(weights, config, plan, compute_dtype=dtype, device=device)
    else:
        model = skeleton(config, plan, dtype=dtype)
        load_state_into(model, weights.state_dict(dtype), str(Path(path)))
        materialize_buffers(model, "cpu")
    model.to(device)
    model.eval()
    return PrunedModel(model, plan)


def _load_nf4(weights: Weights, config, plan: PrunePlan | None, compute_dtype, device="cpu") -> nn.Module:
    """The (pruned) model with NF4 decoder linears, read and quantised one decoder layer at a time on
    ``device``: the fp32 model never exists (a 0.5-pruned 13B would be 28 GB in fp32, 3.5 GB in NF4),
    one layer's fp32 linears at most (nf4_stream_transform: the rest arrives in ``compute_dtype``)."""
    from .progress import track
    from .stream import LayerStream

    ls = LayerStream(weights, config, plan, dtype=torch.float32, device=device, transform=nf4_stream_transform(compute_dtype))
    for i in track(range(ls.n_layers), "loading + NF4", unit="layer"):
        quantize_block_nf4(ls.load(i), compute_dtype)
    setattr(ls.model, QUANTIZED_MARK, "nf4")
    return ls.model


def load_original_nf4(name: str | Path, compute_dtype=torch.float32, device="cpu") -> nn.Module:
    """An original model from a local safetensors folder with NF4 decoder linears (plain QLoRA), read and
    quantised layer by layer on ``device`` as a pruned one is: never the fp32 model in host RAM."""
    require_bnb()
    config, _, weights = open_checkpoint(name, "--quantize nf4")
    model = _load_nf4(weights, config, None, compute_dtype, device)
    model.eval()
    return model


def load_pruned(path: str | Path, quantize: str | None = None, dtype=torch.float32, device_map="cpu"):
    """Load a pruned model folder in one call: a stock transformers model (LlamaForCausalLM, ...)
    with smaller modules, its plan at ``model.loram_plan`` (see ``load_pruned_model``)."""
    model, plan = load_pruned_model(path, quantize, dtype, device_map)
    setattr(model, PLAN_ATTR, plan)
    return model
