"""The pruned model: shrinking modules by a plan, binding weights to their plan, saving.

A pruned model folder is a normal HF folder plus the plan:

    config.json                  the *original* config (stock code would refuse the smaller tensors
                                 with a size-mismatch error, never load them silently)
    model*.safetensors           the pruned tensors (smaller q/k/v/o/gate/up/down in pruned layers)
    tokenizer*, generation_config.json
    loram_plan.json              what was removed (see prune_plan.py)

``skeleton`` builds the model on the meta device (no memory) and shrinks the modules the plan
names; loading.load_pruned then assigns the tensors from the safetensors files, so the full-size
model never exists.
transformers >= 5 has ``per_layer_config`` on configs, but the Llama/Mistral/Qwen2 modeling code
raises AmbiguousGlobalPerLayerAttributeError when widths vary by layer (checked on 5.24), so the
plan, not the config, carries the widths.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import LoramError, warn
from .families import COL_PRUNED, MODULE_OF_ROLE, decoder_layers, geometry, layer_module, ties_embeddings
from .prune_plan import META_PLAN_DIGEST, META_PLAN_ID, PrunePlan
from .weights import mismatch, safetensors_files, safetensors_metadata, write_safetensors_metadata


# ---- binding weights to their plan ------------------------------------------------------------
def bind_plan(files: list[Path], plan: PrunePlan) -> None:
    """Record ``plan``'s id and weights digest in the ``__metadata__`` of each safetensors file (in place)."""
    for f in files:
        write_safetensors_metadata(f, f, plan.metadata())


def check_plan_binding(files: list[Path], plan: PrunePlan, where: str, fix: str) -> None:
    """Refuse a plan that is not the one the weights in ``files`` were written with.

    Two plans of the same widths give the same tensor shapes, so only the digest recorded at write
    time tells them apart; without this check recovery would scatter the update onto the wrong
    channels. Files written before loram recorded the binding are accepted with a warning.
    """
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
    for i, role, idx in plan.pruned_modules(g):
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


def skeleton_shapes(config, plan: PrunePlan | None) -> dict[str, tuple]:
    """{tensor name: shape} of the (pruned) model, from the meta skeleton: what its weights must hold.
    The skeleton gets a copy of ``config``: from_config would set the caller's config's dtype to its own."""
    import copy

    return {k: tuple(v.shape) for k, v in skeleton(copy.deepcopy(config), plan).state_dict().items()}


def materialize_buffers(model, device="cpu") -> None:
    """Non-persistent buffers (rotary inv_freq) are computed at init; recompute them off meta."""
    inner = model.model
    rot = getattr(inner, "rotary_emb", None)
    if rot is not None and any(b.is_meta for b in rot.buffers()):
        with torch.device(device):
            inner.rotary_emb = type(rot)(config=model.config)


def load_state_into(model, sd: dict, where: str) -> None:
    """Assign tensors into a meta skeleton; every key must match in name and shape."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    tied = ties_embeddings(model.config)
    m = mismatch(have, own, tied, ignore=None)
    missing, unexpected, wrong = m.missing, m.unexpected, [f"{k} {have[k]} vs {own[k]}" for k in m.wrong]
    if m:
        detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "") + \
                 (f" wrong shape {wrong[:3]}" if wrong else "")
        raise LoramError(f"config/plan and weights in {where} disagree ({detail.strip()}): the folder is inconsistent, re-create it")
    model.load_state_dict(sd, strict=False, assign=True)
    if tied:
        model.tie_weights()


def save_pruned(model, tokenizer, plan: PrunePlan, out: str | Path, state_dict: dict | None = None) -> None:
    """Write a pruned model folder (call inside io.atomic_dir). ``state_dict``: the weights when the model's
    own are shards (FSDP / ZeRO-3: training.distributed.gathered_state_dict)."""
    out = Path(out)
    model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
    bind_plan(safetensors_files(out), plan)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    plan.save(out)
