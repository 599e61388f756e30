"""The pruned model: shrinking modules by a plan, saving, and loading in one call.

A pruned model folder is a normal HF folder plus the plan:

    config.json                  the *original* config (stock code would refuse the smaller tensors
                                 with a size-mismatch error, never load them silently)
    model*.safetensors           the pruned tensors (smaller q/k/v/o/gate/up/down in pruned layers)
    tokenizer*, generation_config.json
    loram_plan.json              what was removed (see plan.py)

``load_pruned`` builds the model on the meta device (no memory), shrinks the modules the plan
names, then assigns the tensors from the safetensors files: the full-size model never exists.
transformers >= 5 has ``per_layer_config`` on configs, but the Llama/Mistral/Qwen2 modeling code
raises AmbiguousGlobalPerLayerAttributeError when widths vary by layer (checked on 5.24), so the
plan, not the config, carries the widths.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import LoramError
from .families import COL_PRUNED, ROLES, decoder_layers, geometry, is_tied_head, layer_module, MODULE_OF_ROLE, ties_embeddings
from .plan import META_PLAN_DIGEST, META_PLAN_ID, PrunePlan

QUANTIZED_MARK = "loram_quantized"


# ---- binding weights to their plan ------------------------------------------------------------
def bind_plan(files: list[Path], plan: PrunePlan) -> None:
    """Record ``plan``'s id and weights digest in the ``__metadata__`` of each safetensors file (in place)."""
    from .io import write_safetensors_metadata

    for f in files:
        write_safetensors_metadata(f, f, plan.metadata())


def check_plan_binding(files: list[Path], plan: PrunePlan, where: str, fix: str) -> None:
    """Refuse a plan that is not the one the weights in ``files`` were written with.

    Two plans of the same widths give the same tensor shapes, so only the digest recorded at write
    time tells them apart; without this check recovery would scatter the update onto the wrong
    channels. Files written before loram recorded the binding are accepted with a warning.
    """
    from .errors import warn
    from .io import safetensors_metadata

    bound = {(m.get(META_PLAN_ID), m.get(META_PLAN_DIGEST)) for m in map(safetensors_metadata, files)}
    if bound == {(None, None)}:
        warn(f"the weights in {where} record no plan (written by an older loram): loram cannot check that its "
             f"loram_plan.json belongs to them; {fix} to bind them")
        return
    if len(bound) > 1:
        raise LoramError(f"the safetensors files in {where} were written with different plans "
                         f"({', '.join(sorted(str(i) for i, _ in bound))}): the folder was mixed up, {fix}")
    (bound_id, digest), = bound
    if digest != plan.weights_digest():
        raise LoramError(f"{where}/loram_plan.json does not describe the weights in {where} (plan {plan.id}, weights "
                         f"made with plan {bound_id}): restore the folder's own plan or {fix}")


def _shrunk_linear(lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    b = lin.bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight = nn.Parameter(w.contiguous(), requires_grad=lin.weight.requires_grad)
    if b is not None:
        bd = b.data if rows is None else b.data.index_select(0, rows.to(b.device))
        new.bias = nn.Parameter(bd.contiguous(), requires_grad=b.requires_grad)
    return new


def apply_plan(model, plan: PrunePlan) -> nn.Module:
    """Shrink the structured-pruned modules of ``model`` in place (works on real and meta tensors)."""
    if plan.kind != "structured":
        return model
    g = geometry(model.config)
    plan.validate(g)
    layers = decoder_layers(model)
    for i in plan.pruned:
        for role in ROLES:
            idx = plan.kept_index(i, role, g)
            if idx is None:
                continue
            lin = layer_module(model, i, role)
            new = _shrunk_linear(lin, None if role in COL_PRUNED else idx, idx if role in COL_PRUNED else None)
            parent, proj = MODULE_OF_ROLE[role].split(".")
            setattr(getattr(layers[i], parent), proj, new)
    return model


def count_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        # bitsandbytes Params4bit stores 2 weights per byte; count logical weights
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        n += int(torch.Size(shape).numel()) if shape is not None else p.numel()
    return n


def skeleton(config, plan: PrunePlan | None, dtype=torch.float32):
    """The pruned architecture on the meta device: no memory is allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if plan is not None:
        apply_plan(model, plan)
    return model


def materialize_buffers(model, device="cpu") -> None:
    """Non-persistent buffers (rotary inv_freq) are computed at init; recompute them off meta."""
    inner = model.model
    rot = getattr(inner, "rotary_emb", None)
    if rot is not None and any(b.is_meta for b in rot.buffers()):
        with torch.device(device):
            inner.rotary_emb = type(rot)(config=model.config)


def _read_state_dict(folder: Path, dtype) -> dict:
    from safetensors import SafetensorError, safe_open

    from .io import safetensors_files

    sd = {}
    for f in safetensors_files(folder):
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    t = h.get_tensor(k)
                    sd[k] = t.to(dtype) if t.is_floating_point() else t
        except (SafetensorError, OSError, RuntimeError) as e:
            raise LoramError(f"{f} is truncated or corrupt ({str(e).splitlines()[0]}): re-create or re-download it") from None
    return sd


def load_state_into(model, sd: dict, where: str) -> None:
    """Assign tensors into a meta skeleton; every key must match in name and shape."""
    own = model.state_dict()
    tied = ties_embeddings(model.config)
    missing = [k for k in own if k not in sd and not is_tied_head(k, tied)]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "") + \
                 (f" wrong shape {wrong[:3]}" if wrong else "")
        raise LoramError(f"config/plan and weights in {where} disagree ({detail.strip()}): the folder is inconsistent, re-create it")
    model.load_state_dict(sd, strict=False, assign=True)
    if tied:
        model.tie_weights()


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LoramError("--quantize nf4 needs bitsandbytes: pip install 'loram[nf4]' (or pip install bitsandbytes)") from None
    return bnb


def nf4_linear(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype=torch.bfloat16, device="cpu") -> nn.Module:
    """A bitsandbytes NF4 (+ double quant) Linear4bit holding ``weight`` [out, in] (quantised from fp32)."""
    bnb = _bnb()
    with torch.device("meta"):  # no full-size fp32 init: the weight is replaced below
        q = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(weight.to("cpu", torch.float32).contiguous(), requires_grad=False,
                                 compress_statistics=True, quant_type="nf4")
    if bias is not None:
        q.bias = nn.Parameter(bias.to("cpu", compute_dtype), requires_grad=False)
    q = q.to(device)  # .to() performs the quantisation
    if not getattr(q.weight, "bnb_quantized", False):
        q.weight = q.weight._quantize(q.weight.device) if hasattr(q.weight, "_quantize") else q.weight
    return q


def quantize_block_nf4(block, compute_dtype=torch.bfloat16, skip=("lm_head",)) -> None:
    """Replace the nn.Linear modules of one decoder layer by NF4 Linear4bit, one at a time."""
    for parent_name in ("self_attn", "mlp"):
        parent = getattr(block, parent_name)
        for name, lin in list(parent.named_children()):
            if not isinstance(lin, nn.Linear) or name in skip:
                continue
            dev = lin.weight.device
            q = nf4_linear(lin.weight.data, None if lin.bias is None else lin.bias.data, compute_dtype,
                           dev if dev.type != "meta" else "cpu")
            setattr(parent, name, q)


def quantize_nf4(model, compute_dtype=torch.bfloat16, skip=("lm_head",)) -> nn.Module:
    """Replace every decoder-layer nn.Linear by a bitsandbytes NF4 (+ double quant) Linear4bit."""
    _bnb()
    for block in decoder_layers(model):
        quantize_block_nf4(block, compute_dtype, skip)
    setattr(model, QUANTIZED_MARK, "nf4")
    return model


def _resolve_device(device_map) -> str:
    if device_map in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, str):
        return device_map
    raise LoramError("device_map must be 'auto', 'cpu', 'cuda' or 'cuda:N' for pruned models")


def load_pruned(path: str | Path, quantize: str | None = None, dtype=torch.float32, device_map="cpu"):
    """Load a pruned model folder written by `loram prune` (or `loram align`) in one call.

    quantize: None or "nf4" (bitsandbytes NF4 + double quant on the decoder linears, QLoRAM).
    Returns a stock transformers model (LlamaForCausalLM, ...) with smaller modules.
    """
    from transformers import AutoConfig

    from .io import check_checkpoint, read_json, safetensors_files

    path = Path(path)
    if quantize not in (None, "nf4"):
        raise LoramError(f"--quantize {quantize!r} is not supported: use nf4")
    if quantize == "nf4":
        _bnb()  # fail fast with the install hint, before reading any weights
    if not path.is_dir():
        raise LoramError(f"pruned model folder {path} does not exist: check the path (create it with `loram prune`)")
    if not (path / "config.json").exists():
        raise LoramError(f"{path} is not a model folder (no config.json): pass a folder written by `loram prune`")
    read_json(path / "config.json")
    plan = PrunePlan.load(path)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise LoramError(f"cannot read {path / 'config.json'} ({str(e).splitlines()[0]}): re-create the folder with `loram prune`") from None
    geometry(config)
    # headers only, before any weight is read: names, shapes and dtypes fit config + plan, and the
    # plan is the one these weights were written with
    check_checkpoint(path, config, plan)
    check_plan_binding(safetensors_files(path), plan, str(path), "re-run `loram prune`")
    model = skeleton(config, plan, dtype=dtype)
    load_state_into(model, _read_state_dict(path, dtype), str(path))
    device = _resolve_device(device_map)
    materialize_buffers(model, "cpu")
    if quantize == "nf4":
        quantize_nf4(model, compute_dtype=torch.bfloat16 if dtype == torch.float32 else dtype)
    elif quantize is not None:
        raise LoramError(f"--quantize {quantize!r} is not supported: use nf4")
    model.to(device)
    model.eval()
    model.loram_plan = plan
    return model


def save_pruned(model, tokenizer, plan: PrunePlan, out: str | Path) -> None:
    """Write a pruned model folder (call inside io.atomic_dir)."""
    out = Path(out)
    from .io import safetensors_files

    model.save_pretrained(str(out), safe_serialization=True)
    bind_plan(safetensors_files(out), plan)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    plan.save(out)
