"""Adapter folders: PEFT's format plus loram's metadata.

    adapter_config.json          PEFT LoraConfig (stock PEFT reads it)
    adapter_model.safetensors    lora_A / lora_B tensors, keys like
                                 base_model.model.model.layers.{i}.mlp.down_proj.lora_A.weight
    loram_plan.json              the plan of the pruned base it was trained on (or recovered from)
    loram_adapter.json           {"stage": "pruned" | "recovered", "plan_id", "base_fingerprint",
                                  "base_name", "fill", ...}

A *pruned* adapter (written by `loram train` on a pruned model) fits only the pruned model; a
*recovered* one (written by `loram recover`) fits the original model and loads with stock PEFT.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import LoramError, warn
from .families import ROLE_OF_PROJ, UNPRUNED_MODULES
from .io import read_json, write_json
from .weights import safetensors_headers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "loram_adapter.json"
STAGE_PRUNED, STAGE_RECOVERED = "pruned", "recovered"
# modules a LoRA may target in the model families loram supports (PEFT matches them by name suffix)
LORA_MODULES = (*ROLE_OF_PROJ, *UNPRUNED_MODULES)


def warn_lm_head_serving(names, merge_cmd: str) -> bool:
    """One warning line when ``lm_head`` is a LoRA target (``names``: --targets or adapter tensor keys): vLLM
    serves LoRA on the decoder's projections but refuses lm_head, so such an adapter is served merged."""
    if not any("lm_head" in str(n).split(".") for n in names):
        return False
    warn(f"lm_head is a LoRA target: vLLM does not serve LoRA on lm_head, so this adapter cannot be served there as a "
         f"LoRA: merge it first ({merge_cmd}) and serve the merged folder (vllm serve MERGED); docs/serving.md")
    return True


def check_adapter_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise LoramError(f"adapter folder {p} does not exist: check the path")
    if not (p / ADAPTER_CONFIG).exists():
        raise LoramError(f"{p} is not a PEFT adapter folder (no {ADAPTER_CONFIG}): pass the folder written by `loram train`")
    if not (p / ADAPTER_WEIGHTS).exists():
        if (p / "adapter_model.bin").exists():
            raise LoramError(f"{p} holds a pickle adapter (adapter_model.bin), which loram never loads: re-save it with "
                             "PEFT's save_pretrained(safe_serialization=True)")
        raise LoramError(f"{p} has no {ADAPTER_WEIGHTS}: the adapter folder is incomplete")
    check_config(p)
    return p


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_config(folder: Path) -> dict:
    """adapter_config.json of an adapter folder, refused (one line) if it cannot be what loram or PEFT
    wrote: every reader of an adapter folder goes through here (via check_adapter_dir), so an edited
    config fails the same way in recover, merge, generate, eval and inspect, before any model loads."""
    f = folder / ADAPTER_CONFIG
    cfg = read_json(f)
    if not isinstance(cfg, dict):
        raise LoramError(f"{f} is not a JSON object: the file is corrupt, re-create the adapter")
    r, alpha, targets = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("target_modules")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoramError(f"{f} has r={r!r}: the LoRA rank must be a positive integer, restore the file or re-create the adapter")
    if not _is_number(alpha):
        raise LoramError(f"{f} has lora_alpha={alpha!r}: it must be a finite number, restore the file or re-create the adapter")
    if isinstance(targets, str):
        targets = None if targets == "all-linear" else [targets]  # PEFT's one shorthand; other strings are regexes
    if targets is not None:
        names = targets if isinstance(targets, list) else [targets]
        unknown = [t for t in names if t not in LORA_MODULES]
        if unknown or not names:
            what = f"unknown module {unknown[0]!r}" if unknown else "no module"
            raise LoramError(f"{f} has target_modules {cfg['target_modules']!r} ({what}): list modules from "
                             f"{', '.join(LORA_MODULES)}, or restore the file")
    meta = read_meta(folder)
    train = meta.get("train") if isinstance(meta, dict) else None
    if isinstance(train, dict):  # what `loram train` used: the config must still say the same
        for key, recorded in (("lora_alpha", train.get("alpha")), ("r", train.get("rank"))):
            if recorded is not None and recorded != cfg[key]:
                raise LoramError(f"{f} has {key}={cfg[key]!r} but {ADAPTER_META} records {recorded!r} from training: "
                                 f"the config was edited, restore {key}={recorded!r} (scaling is lora_alpha / r)")
    return cfg


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file


    p = check_adapter_dir(path) / ADAPTER_WEIGHTS
    safetensors_headers([p])  # headers first: a non-float dtype would be read as integers
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise LoramError(f"{p} is truncated or corrupt ({str(e).splitlines()[0]}): re-create it") from None


def read_meta(path: str | Path) -> dict | None:
    p = Path(path) / ADAPTER_META
    return read_json(p) if p.exists() else None


def write_adapter(out: Path, tensors: dict, config: dict, meta: dict, plan=None) -> None:
    from safetensors.torch import save_file

    out = Path(out)
    meta_st = {"format": "pt", **(plan.metadata() if plan is not None else {})}  # binds the weights to the plan
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS), metadata=meta_st)
    write_json(out / ADAPTER_CONFIG, config)
    write_json(out / ADAPTER_META, meta)
    if plan is not None:
        plan.save(out)


def attach(model, adapter_dir: str | Path, is_trainable: bool = False):
    """PeftModel over ``model`` with the adapter loaded, refusing any missing/unexpected/mismatched key.

    PEFT itself only warns on unexpected keys and, with ignore_mismatched_sizes, drops tensors:
    loram never lets an adapter load partially.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    adapter_dir = check_adapter_dir(adapter_dir)
    cfg = LoraConfig.from_pretrained(str(adapter_dir))
    cfg.inference_mode = not is_trainable
    sd = read_tensors(adapter_dir)
    pm = get_peft_model(model, cfg)
    check_fit(adapter_dir, lora_shapes(pm), {k: tuple(v.shape) for k, v in sd.items()}, embedding_copies(pm))
    res = set_peft_model_state_dict(pm, sd)
    assert not res.unexpected_keys, res.unexpected_keys
    if not is_trainable:
        pm.eval()
    return pm


def lora_shapes(pm) -> dict[str, tuple]:
    """{adapter file key: shape} of the LoRA tensors a PeftModel expects (PEFT's ".default" left out, as saved)."""
    return {k.replace(".default", ""): tuple(v.shape) for k, v in pm.state_dict().items() if "lora_" in k}


def embedding_copies(pm) -> dict[str, tuple]:
    """{key: shape} of the base weights of LoRA-wrapped embedding layers (embed_tokens, lm_head): PEFT saves
    a copy of them with such an adapter (save_embedding_layers, e.g. for added tokens) and loads it back
    in place of the model's; an adapter may carry them or not."""
    return {k: tuple(v.shape) for k, v in pm.state_dict().items()
            if k.endswith(".base_layer.weight") and k.split(".")[-3] in UNPRUNED_MODULES}


def check_fit(adapter_dir, own: dict[str, tuple], have: dict[str, tuple], optional: dict[str, tuple] | None = None) -> None:
    """Refuse an adapter whose tensors (``have``) are not exactly the ones the model expects (``own``, plus
    any of ``optional``): loram never lets an adapter load or merge partially."""
    every = {**(optional or {}), **own}
    wrong = [f"{k}: adapter {have[k]} vs model {every[k]}" for k in have if k in every and tuple(every[k]) != tuple(have[k])]
    unexpected = [k for k in have if k not in every]
    missing = [k for k in own if k not in have]
    if wrong or unexpected or missing:
        what = wrong[:2] or unexpected[:2] or missing[:2]
        raise LoramError(f"adapter {adapter_dir} does not fit this model ({len(wrong)} mismatched, {len(unexpected)} unexpected, "
                         f"{len(missing)} missing keys, e.g. {what[0]}): use the adapter made for this model "
                         "(a pruned adapter needs `loram recover` before it fits the original)")
