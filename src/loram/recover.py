"""`loram recover`: scatter a pruned adapter back to the original model's shapes.

For a pruned layer with kept index set K (rows of q/k/v/gate/up, columns of o/down):

    row-pruned W [out, in]:   dW = B A,  B_full[K, :] = B,  B_full[~K, :] = 0,  A_full = A
    col-pruned W [out, in]:   dW = B A,  A_full[:, K] = A,  A_full[:, ~K] = 0   (or N(0, 1/r): --fill normal)
                                         B_full = B

so dW_full = scatter(dW) exactly: the trained update lands on the kept coordinates and nothing
else changes. The --fill normal option (the official `normA`) puts noise in the pruned columns of
A; it only adds B A_noise x for inputs x on pruned channels, which the pruned model never had.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, STAGE_PRUNED, STAGE_RECOVERED, read_meta, read_tensors, warn_lm_head_serving,
                      write_adapter)
from .calibrate import CalibrationRequest, check_fits, read_slice, scale_adapter, tokenizer
from .calibrate import calibrate as calibrate_scales
from .errors import LoramError
from .families import COL_PRUNED, UNPRUNED_MODULES, geometry, parse_name
from .fingerprint import base_fingerprint, check_base_full, check_verify, describe_difference, same_model
from .io import atomic_dir, check_output, read_json, releases_locks
from .loading import pruned_folder
from .prune_plan import PrunePlan
from .pruned_model import check_plan_binding

FILLS = ("zero", "normal")


def _parse(key: str):
    """The LoRA factor a key names, or None (lm_head, embeddings, modules_to_save: never pruned)."""
    t = parse_name(key)
    return t if t is not None and t.lora is not None else None


def recover_tensors(pruned: dict[str, torch.Tensor], plan: PrunePlan, config, fill: str = "zero",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Pure function: pruned-adapter tensors -> full-shape tensors for the original model.

    Tensors that recovery does not change are returned as the same objects (no copy: a 70B-shaped
    adapter has ~50 M of them); the scattered ones are new tensors.
    """
    if fill not in FILLS:
        raise LoramError(f"--fill {fill!r} is unknown: use zero or normal")
    g = geometry(config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in pruned.items():
        p = _parse(key)
        kept = None if p is None else plan.kept_along(p, g)
        if kept is None:
            out[key] = t  # lm_head, embeddings, modules_to_save, unpruned axes: shared with the input, not copied
            continue
        axis, idx = kept
        role = p.role
        full = g.shape(role)[axis]
        if t.shape[axis] != len(idx):
            hint = ("is a plain (unpruned) LoRA adapter: it already fits the original, use it directly"
                    if t.shape[axis] == full else "was trained on another plan or model")
            raise LoramError(f"adapter tensor {key} has {t.shape[axis]} entries on its pruned axis but the plan keeps "
                             f"{len(idx)} of {full}: this adapter {hint}")
        shape = list(t.shape)
        shape[axis] = full
        if fill == "normal" and role in COL_PRUNED:
            r = t.shape[0]
            # drawn on the CPU (one generator, the same numbers on every device), then moved to t's device
            dst = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(r ** -0.5).to(t.device, t.dtype)
        else:
            dst = torch.zeros(shape, dtype=t.dtype, device=t.device)
        out[key] = dst.index_copy_(axis, idx.to(t.device), t)
    return out


def check_targets(tensors: dict[str, torch.Tensor], lora_cfg: dict) -> None:
    """Every tensor must belong to a module the plan's model has and adapter_config targets, and
    every listed target must have tensors: otherwise PEFT would load the adapter partially."""
    found = set()
    for key in tensors:
        p = _parse(key)
        if p is not None:
            found.add(f"{p.role}_proj")
            continue
        mod = next((m for m in UNPRUNED_MODULES if f"{m}.lora_" in key), None)
        if mod is None:
            raise LoramError(f"adapter tensor {key} belongs to a module the plan's model does not have: this adapter "
                             "was made for another architecture")
        found.add(mod)
    targets = lora_cfg.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        extra, unused = sorted(found - set(targets)), sorted(set(targets) - found)
        if extra or unused:
            raise LoramError(f"adapter_config target_modules {sorted(targets)} does not match the tensors in the adapter "
                             f"(tensors for {extra or 'none'} not targeted, targets {unused or 'none'} without tensors): "
                             "the adapter is inconsistent, re-create it with `loram train`")


def check_shapes(tensors: dict[str, torch.Tensor], plan: PrunePlan, config, lora_cfg: dict) -> None:
    """The adapter's targets, rank and non-pruned dims must match the plan's model."""
    g = geometry(config)
    check_targets(tensors, lora_cfg)
    rank = lora_cfg.get("r")
    for key, t in tensors.items():
        p = _parse(key)
        if p is None or p.kind != "weight":
            continue
        layer, role, ab = p.layer, p.role, p.lora
        out_f, in_f = plan.pruned_dim(layer, role, g)
        if layer >= g.n_layers:
            raise LoramError(f"adapter targets layer {layer} but the plan's model has {g.n_layers} layers: "
                             "this adapter was made for another model")
        r_axis, other_axis, other = (0, 1, in_f) if ab == "A" else (1, 0, out_f)
        if rank is not None and t.shape[r_axis] != rank and not lora_cfg.get("rank_pattern"):
            raise LoramError(f"adapter tensor {key} has rank {t.shape[r_axis]} but adapter_config says r={rank}: "
                             "the adapter is inconsistent, re-create it with `loram train`")
        # the pruned axis of a pruned layer is checked (with a better hint) by recover_tensors
        on_pruned_axis = plan.kept_along(p, g) is not None
        if t.shape[other_axis] != other and not on_pruned_axis:
            raise LoramError(f"adapter tensor {key} has shape {tuple(t.shape)}, which does not fit the plan's model "
                             f"({role} is {out_f}x{in_f} in layer {layer}): this adapter was trained on another plan or model")


@releases_locks
def recover(adapter: str | Path, base: str | Path, out: str | Path, fill: str = "zero", seed: int = 0,
            overwrite: bool = False, check_base: bool = True, verify_base: str = "sampled", calibrate: str | None = None,
            calibrate_rows: int | None = None, calibrate_scope: str | None = None, seq_len: int | None = None,
            calibrate_general: str | None = None, calibrate_tolerance: float | None = None,
            calibrate_general_rows: int | None = None, max_memory: float | None = None) -> Path:
    """Write a standard PEFT adapter for the original model ``base`` from a pruned adapter folder.

    verify_base="full": also compare every byte of ``base`` with the digest the plan recorded.
    calibrate=DATA: lora_B x the scale chosen on DATA's first ``calibrate_rows`` rows (loram.calibrate),
    recorded under "calibration" in loram_adapter.json; without it the output is the plain recovery.
    calibrate_general=GENERAL: only scales that keep the perplexity of GENERAL's first ``calibrate_general_rows``
    rows within ``calibrate_tolerance`` percent of the base's."""
    calib = CalibrationRequest(calibrate, calibrate_rows, calibrate_scope, seq_len, calibrate_general, calibrate_tolerance,
                               calibrate_general_rows)
    adapter = Path(adapter)
    check_output(out, overwrite, inputs=(adapter, base))
    check_verify(verify_base)
    calib.check()
    tensors = read_tensors(adapter)
    meta = read_meta(adapter)
    if meta is None or meta.get("stage") not in (STAGE_PRUNED, STAGE_RECOVERED):
        raise LoramError(f"{adapter} is a plain LoRA adapter, not one trained on a loram pruned "
                         "model: it already fits its base, use it directly (or train with `loram train` on a pruned model)")
    if meta.get("stage") == STAGE_RECOVERED:
        raise LoramError(f"{adapter} is already recovered for the original model: use it directly with `loram merge`")
    plan = PrunePlan.load(adapter)
    if meta.get("plan_id") != plan.id:
        raise LoramError(f"{adapter} was trained on plan {meta.get('plan_id')} but carries plan {plan.id}: "
                         "the folder was mixed up, re-train or restore its loram_plan.json")
    lora_cfg = read_json(adapter / ADAPTER_CONFIG)
    config = plan.base_config()
    check_shapes(tensors, plan, config, lora_cfg)
    # same widths, other kept indices: shapes cannot tell, the digest written at training time can
    check_plan_binding([adapter / ADAPTER_WEIGHTS], plan, str(adapter), "re-train it with `loram train`")
    fp = plan.base["fingerprint"]
    # a pruned base by its hub id too (its repo holds loram_plan.json): only the plan is downloaded to tell
    if check_base and pruned_folder(base, fetch=False) is not None:
        raise LoramError(f"--base {base} is a loram pruned model: pass the original model the plan was made from "
                         f"({plan.base.get('name')})")
    if check_base:
        got = base_fingerprint(base)
        if not same_model(fp, got):
            raise LoramError(f"base {base} is not the model this adapter's plan was made from ({describe_difference(fp, got)}): "
                             f"pass the original model ({plan.base.get('name')})")
        if verify_base == "full":
            check_base_full(fp, base, "this adapter's plan", "was made from")
    sl = _calibration_slices(base, meta, config, calib, max_memory) if calibrate is not None else None  # (rows, streamed?)
    if plan.kind == "structured":
        full = recover_tensors(tensors, plan, config, fill=fill, seed=seed)
    else:  # sparse plans keep shapes: recovery is the identity on the tensors
        full = {k: v.clone() for k, v in tensors.items()}
    lora_cfg = dict(lora_cfg, base_model_name_or_path=str(base))
    new_meta = dict(meta, stage=STAGE_RECOVERED, fill=fill, base_name=str(base), base_fingerprint=fp,
                    recovered_from=str(adapter))
    with atomic_dir(out, overwrite, "recover", (adapter, base)) as tmp:
        write_adapter(tmp, full, lora_cfg, new_meta, plan)
        if sl is not None:  # scored on the adapter just written, then written again with lora_B x its scale
            got = calibrate_scales(base, tmp, full, sl[0], calib, stream_hidden_bytes=sl[1])
            write_adapter(tmp, scale_adapter(full, got.scales), lora_cfg, dict(new_meta, calibration=got.record()), plan)
    warn_lm_head_serving(full, f"`loram merge {base} {out} -o MERGED`")
    return Path(out)


def _calibration_slices(base, meta: dict, config, calib, max_memory: float | None):
    """(the encoded rows: {"domain": --calibrate's, "general": --calibrate-general's if given}, None in memory or the
    streamed evaluation's hidden-state bytes per wave), read and checked (memory budget, enough rows) before
    recovery's work."""
    hidden = check_fits(base, config, calib, max_memory)
    tok = tokenizer(base, meta)
    parts = ("domain", "general") if calib.general is not None else ("domain",)
    return {part: read_slice(tok, calib, part) for part in parts}, hidden
