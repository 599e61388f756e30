"""Where a config comes from: a bundled preset, a config.json, a model folder, a pruned folder or a hub id.

Presets (src/loram/presets/*.json) are the published config.json files of public models, so a
plan needs no download. Only configs are ever read here, never weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoramError
from ..io import SMOLLM2_ALIAS, load_config, read_json
from ..prune_plan import PLAN_FILE, PrunePlan
from ..validate import Number

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


# Sizes a decoder config must have, with bounds far above any published model (Llama-3.1-405B:
# 126 layers, hidden 16384, MLP 53248, 128 heads; vocabularies up to ~256k) that still keep the
# planner's per-layer arithmetic instant: 10**9 layers would loop for minutes.
SIZE_LIMITS = {"num_hidden_layers": 4096, "hidden_size": 1 << 18, "intermediate_size": 1 << 21,
               "num_attention_heads": 8192, "vocab_size": 1 << 23}
OPTIONAL_SIZE_LIMITS = {"num_key_value_heads": 8192, "head_dim": 8192}


def check_sizes(d: dict, where: str = "config.json") -> None:
    """Positive integer sizes within SIZE_LIMITS, heads dividing hidden, KV heads dividing heads (one line each)."""

    for key, limit in {**SIZE_LIMITS, **OPTIONAL_SIZE_LIMITS}.items():
        if key not in d or d[key] is None and key in OPTIONAL_SIZE_LIMITS:
            if key in SIZE_LIMITS:
                raise LoramError(f"{where} has no {key}: pass the config.json of a Llama, Mistral or Qwen2 model")
            continue
        Number(int, min=1, max=limit).named(f"{where}: {key}").check(d[key])
    heads, kv = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
    if d.get("head_dim") is None and d["hidden_size"] % heads:
        raise LoramError(f"{where}: hidden_size {d['hidden_size']} is not a multiple of num_attention_heads {heads}: fix the config")
    if heads % kv:
        raise LoramError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}: fix the config")


def config_from_dict(d: dict, where: str = "config.json"):
    from transformers import AutoConfig

    d = {k: v for k, v in d.items() if k not in ("transformers_version", "architectures", "_name_or_path")}
    mt = d.pop("model_type", None)
    if mt is None:
        raise LoramError("the config has no model_type: pass a config.json of a Llama, Mistral or Qwen2 model")
    check_sizes(d, where)  # before transformers builds per-layer lists from them
    return AutoConfig.for_model(mt, **d)


def preset_config(name: str):
    for p in PRESET_DIR.glob("*.json"):
        if p.stem.lower() == name.lower():
            return config_from_dict(json.loads(p.read_text()))
    raise LoramError(f"no preset {name!r}: choose one of {', '.join(preset_names())}")


@dataclass
class Source:
    """A resolved MODEL argument: its config, and the plan when it names a pruned folder."""

    name: str
    config: object
    plan: PrunePlan | None = None


def resolve(model: str) -> Source:
    """Config (and plan) of MODEL without loading any weight."""

    lower = {n.lower(): n for n in preset_names()}
    if model.lower() in lower:
        return Source(lower[model.lower()], preset_config(model))
    p = Path(model)
    if p.is_file() and p.suffix == ".json":
        return Source(str(p), config_from_dict(read_json(p), str(p)))
    if p.is_dir() and (p / PLAN_FILE).exists():
        plan = PrunePlan.load(p)
        return Source(str(p), plan.base_config(), plan)
    if p.is_dir() and (p / "config.json").exists():
        return Source(str(p), config_from_dict(read_json(p / "config.json"), str(p / "config.json")))
    if model == SMOLLM2_ALIAS or p.suffix == ".gguf" or p.is_dir():
        return Source(model, load_config(model))
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise LoramError(f"{model} is not a preset, a config.json, a model folder or a hub id (owner/name): "
                         f"presets are {', '.join(preset_names())}")
    from transformers import AutoConfig

    try:  # a hub id: the config only, never the weights
        return Source(model, AutoConfig.from_pretrained(model))
    except (OSError, ValueError) as e:
        raise LoramError(f"cannot read the config of {model} from the hub ({str(e).splitlines()[0]}): "
                         "check the id and network, or pass a local config.json or a preset") from None
