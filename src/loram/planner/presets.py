"""Where a config comes from: a bundled preset, a config.json, a model folder, a pruned folder or a hub id.

Presets (src/loram/presets/*.json) are the published config.json files of public models, so a
plan needs no download. Only configs are ever read here, never weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoramError
from ..plan import PLAN_FILE, PrunePlan

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def config_from_dict(d: dict):
    from transformers import AutoConfig

    d = {k: v for k, v in d.items() if k not in ("transformers_version", "architectures", "_name_or_path")}
    mt = d.pop("model_type", None)
    if mt is None:
        raise LoramError("the config has no model_type: pass a config.json of a Llama, Mistral or Qwen2 model")
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
    from ..io import SMOLLM2_ALIAS, load_config, read_json

    lower = {n.lower(): n for n in preset_names()}
    if model.lower() in lower:
        return Source(lower[model.lower()], preset_config(model))
    p = Path(model)
    if p.is_file() and p.suffix == ".json":
        return Source(str(p), config_from_dict(read_json(p)))
    if p.is_dir() and (p / PLAN_FILE).exists():
        plan = PrunePlan.load(p)
        return Source(str(p), plan.base_config(), plan)
    if p.is_dir() and (p / "config.json").exists():
        return Source(str(p), config_from_dict(read_json(p / "config.json")))
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
