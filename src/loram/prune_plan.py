"""The prune plan: the single record that links prune -> train -> recover.

On disk it is ``loram_plan.json`` (human-readable JSON, never a pickle):

    {
      "format": "loram-plan", "version": 1,
      "kind": "structured",                 # or "sparse" (same shapes, exact zeros)
      "method": "taylor", "mlp_ratio": 0.5, "attn_ratio": 0.5, "layers": [4, 28], "seed": 0,
      "calibration": {"source": "builtin", "samples": 8, "seq_len": 128, "sha256": "..."},
      "base": {"name": "...", "config": {...full config.json...}, "fingerprint": {...}},
      "pruned": {"4": {"mlp_keep": [0, 3, ...], "kv_keep": [0, 2]}, ...}
    }

Index arithmetic (d = head_dim, G = query heads per KV head). Keeping KV group g keeps

    k_proj, v_proj rows          g*d     ... (g+1)*d - 1
    q_proj rows, o_proj columns  g*G*d   ... (g+1)*G*d - 1      (its G query heads)

and keeping MLP channel c keeps gate/up row c and down column c. Rounding follows the paper's
code so its published sizes reproduce: keep n - ceil(n*r) channels and n - floor(n*r) groups.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import LoramError
from .families import COL_PRUNED, ROLES, Geometry, TensorName, geometry, parse_name, pruned_axis

PLAN_FILE = "loram_plan.json"
PLAN_FORMAT = "loram-plan"
PLAN_VERSION = 1
KINDS = ("structured", "sparse")
# The pruning methods: the one list that `loram prune` (prune/structured.py, prune/sparse.py), the planner and a
# plan's validation read, so a new method is added here once. magnitude is in both: structured unless --sparsity.
STRUCTURED_METHODS = ("random", "magnitude", "taylor", "fisher", "wanda-sp")
SPARSE_METHODS = ("sparsegpt", "wanda", "magnitude")
SPARSE_ONLY = tuple(m for m in SPARSE_METHODS if m not in STRUCTURED_METHODS)  # sparse whether or not --sparsity is given
# every method a plan can record: the two above, and import-plan's "imported"
METHODS = (*STRUCTURED_METHODS, *SPARSE_ONLY, "imported")
ALLOCATIONS = ("uniform", "global")  # structured MLP widths per layer: prune/structured.mlp_widths
# safetensors __metadata__ keys binding a pruned folder's (or adapter's) weights to their plan
META_PLAN_ID, META_PLAN_DIGEST = "loram_plan_id", "loram_plan_digest"


def kept_mlp_channels(n: int, ratio: float) -> int:
    """Channels kept of ``n``; refuses a ratio that keeps none (the ratio's own range check cannot
    see ``n``: 0.999 of 80 channels rounds to removing all)."""
    kept = n - math.ceil(n * ratio)
    if kept < 1:
        raise LoramError(f"--ratio {ratio} would remove all {n} MLP channels: use a smaller ratio")
    return kept


def kept_kv_groups(n: int, ratio: float) -> int:
    return max(1, n - math.floor(n * ratio))


def default_layers(n_layers: int) -> tuple[int, int]:
    """Skip the first 4 and last 2 layers (LLM-Pruner / paper convention), clamped for tiny models."""
    start, end = min(4, n_layers // 4), max(n_layers - 2, 0)
    if end <= start:
        start, end = 0, n_layers
    return start, end


def parse_layers(spec: str | None, n_layers: int) -> tuple[int, int]:
    if spec is None:
        return default_layers(n_layers)
    try:
        a, b = spec.split(":")
        start = int(a) if a else 0
        end = int(b) if b else n_layers
    except ValueError:
        raise LoramError(f"--layers {spec!r} is not START:END: give a Python-style range such as 4:28") from None
    if start < 0 or end > n_layers or start >= end:
        raise LoramError(f"--layers {spec} is outside the model's {n_layers} layers: use a range within 0:{n_layers}")
    return start, end


@dataclass
class LayerPlan:
    mlp_keep: list[int] | None = None  # None: MLP of this layer kept whole
    kv_keep: list[int] | None = None  # None: attention of this layer kept whole


@dataclass
class PrunePlan:
    kind: str
    method: str
    layers: tuple[int, int]
    base: dict  # {"name", "config", "fingerprint"}
    pruned: dict[int, LayerPlan] = field(default_factory=dict)
    mlp_ratio: float = 0.0
    attn_ratio: float = 0.0
    seed: int = 0
    calibration: dict | None = None
    sparse: dict | None = None  # non-structured variants: per-module pattern and sparsity
    extra: dict = field(default_factory=dict)
    # `loram prune --compensate`: o/down kept columns refitted by least squares (prune/compensate.py), so
    # the folder's weights are not slices of the original; in the plan id, not in the weights digest
    compensation: dict | None = None
    # `loram prune --allocate global`: the MLP channels removed were ranked across the layer range, so the
    # widths differ per layer (None: uniform, the same width in every pruned layer; absent keeps old plans' ids)
    allocation: str | None = None

    def __post_init__(self):
        if self.allocation == "uniform":  # the default is not recorded, so uniform plans keep their ids
            self.allocation = None

    # ---- index arithmetic -------------------------------------------------------------
    def pruned_modules(self, g: Geometry):
        """(layer, role, kept indices) of every projection this plan prunes, in layer order."""
        for i in self.pruned:
            for role in ROLES:
                idx = self.kept_index(i, role, g)
                if idx is not None:
                    yield i, role, idx

    def kept_index(self, layer: int, role: str, g: Geometry) -> torch.Tensor | None:
        """Kept rows (q/k/v/gate/up) or columns (o/down) of ``role`` in ``layer``; None if whole."""
        lp = self.pruned.get(layer)
        if lp is None or self.kind != "structured":
            return None
        if role in ("gate", "up", "down"):
            return None if lp.mlp_keep is None else torch.tensor(lp.mlp_keep, dtype=torch.long)
        if lp.kv_keep is None:
            return None
        groups = torch.tensor(lp.kv_keep, dtype=torch.long)
        width = g.head_dim if role in ("k", "v") else g.group * g.head_dim
        return (groups[:, None] * width + torch.arange(width)[None, :]).reshape(-1)

    def kept_along(self, name: TensorName | str, g: Geometry) -> tuple[int, torch.Tensor] | None:
        """(axis, kept indices) of the tensor ``name`` (a checkpoint or LoRA name, or a parsed TensorName)
        on its pruned axis; None when the plan keeps it whole (not a decoder projection, or not pruned)."""
        t = parse_name(name) if isinstance(name, str) else name
        axis = None if t is None else pruned_axis(t)
        idx = None if axis is None else self.kept_index(t.layer, t.role, g)
        return None if idx is None else (axis, idx)

    def pruned_dim(self, layer: int, role: str, g: Geometry) -> tuple[int, int]:
        """(out_features, in_features) of ``role`` in ``layer`` after pruning."""
        full = g.shape(role)
        idx = self.kept_index(layer, role, g)
        if idx is None:
            return full
        return (full[0], len(idx)) if role in COL_PRUNED else (len(idx), full[1])

    def validate(self, g: Geometry, where: str | None = None) -> None:
        """Layers and kept indices fit geometry ``g``. ``where``: the plan file checked against its own
        base config (a misfit means the file is corrupt), else a plan put on another model."""
        start, end = self.layers
        pre, fix = (f"{where}: ", "the plan file is corrupt, re-create it with `loram prune`") if where else ("", "")
        if not (0 <= start < end <= g.n_layers):
            raise LoramError(f"{pre}plan layers {start}:{end} do not fit the model's {g.n_layers} layers: {fix or 'wrong base model?'}")
        for i, lp in sorted(self.pruned.items()):
            if not start <= i < end:
                beyond = f" (the model has {g.n_layers} layers)" if i >= g.n_layers else ""
                raise LoramError(f"{pre}plan prunes layer {i} outside its range {start}:{end}{beyond}: {fix or 'the plan file is corrupt'}")
            for name, keep, n in (("mlp_keep", lp.mlp_keep, g.intermediate), ("kv_keep", lp.kv_keep, g.n_kv_heads)):
                if keep is None:
                    continue
                if not keep or any(not 0 <= k < n for k in keep) or len(set(keep)) != len(keep) or keep != sorted(keep):
                    raise LoramError(f"{pre}plan layer {i} {name} is not a sorted set of indices in [0, {n}): "
                                     f"{fix or 'the plan file is corrupt'}")

    def base_config(self):
        """The original model's config (a transformers PretrainedConfig), rebuilt from the plan."""
        from transformers import AutoConfig

        d = {k: v for k, v in self.base.get("config", {}).items() if k != "transformers_version"}
        mt = d.pop("model_type", None)
        if mt is None:
            raise LoramError("the plan has no base config: re-create it with `loram prune`")
        return AutoConfig.for_model(mt, **d)

    # ---- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "kind": self.kind, "method": self.method,
             "mlp_ratio": self.mlp_ratio, "attn_ratio": self.attn_ratio, "layers": list(self.layers),
             "seed": self.seed, "calibration": self.calibration, "base": self.base,
             "pruned": {str(i): {k: v for k, v in vars(lp).items() if v is not None} for i, lp in sorted(self.pruned.items())}}
        if self.sparse is not None:
            d["sparse"] = self.sparse
        if self.extra:
            d["extra"] = self.extra
        if self.compensation is not None:
            d["compensation"] = self.compensation
        if self.allocation is not None:
            d["allocation"] = self.allocation
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "the plan") -> "PrunePlan":
        """The one way a plan is read: every field is checked here, so no command acts on a bad plan
        (a float index would be truncated, a layer beyond the model silently ignored)."""
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise LoramError("not a loram prune plan (missing \"format\": \"loram-plan\"): pass the plan written by `loram prune`")
        version = d.get("version", 0)
        if not _is_int(version):
            raise LoramError(_bad(where, "version", version, "an integer"))
        if version > PLAN_VERSION:
            raise LoramError(f"plan version {d['version']} is newer than this loram understands ({PLAN_VERSION}): upgrade loram")
        for key in ("kind", "method", "layers", "base"):
            if key not in d:
                raise LoramError(f"{where} has no \"{key}\" field: the plan file is corrupt, re-create it with `loram prune`")
        _check_choice(where, "kind", d["kind"], KINDS)
        _check_choice(where, "method", d["method"], METHODS)
        if d.get("allocation") is not None:
            _check_choice(where, "allocation", d["allocation"], ALLOCATIONS)
        layers = d["layers"]
        if not (isinstance(layers, list) and len(layers) == 2 and all(_is_int(x) for x in layers) and 0 <= layers[0] < layers[1]):
            raise LoramError(_bad(where, "layers", layers, "[START, END] with integers 0 <= START < END"))
        for key in ("mlp_ratio", "attn_ratio"):
            r = d.get(key, 0.0)
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise LoramError(_bad(where, key, r, "a number in [0, 1)"))
        if not _is_int(d.get("seed", 0)):
            raise LoramError(_bad(where, "seed", d.get("seed"), "an integer"))
        for key, need in (("base", dict), ("calibration", (dict, type(None))), ("sparse", (dict, type(None))),
                          ("compensation", (dict, type(None))), ("extra", dict), ("pruned", dict)):
            if not isinstance(d.get(key, {}), need):
                raise LoramError(_bad(where, key, d.get(key), "a JSON object"))
        base = d["base"]
        for key in ("config", "fingerprint"):
            if not isinstance(base.get(key, {}), dict):
                raise LoramError(_bad(where, f"base.{key}", base.get(key), "a JSON object"))
        plan = cls(kind=d["kind"], method=d["method"], layers=tuple(layers), base=base,
                   pruned={_layer_key(where, k): _layer_plan(where, k, v) for k, v in d.get("pruned", {}).items()},
                   mlp_ratio=d.get("mlp_ratio", 0.0), attn_ratio=d.get("attn_ratio", 0.0), seed=d.get("seed", 0),
                   calibration=d.get("calibration"), sparse=d.get("sparse"), extra=d.get("extra", {}),
                   compensation=d.get("compensation"), allocation=d.get("allocation"))
        g = plan._base_geometry(where)
        if g is not None:  # the plan carries its base config: indices and layers must fit that model
            plan.validate(g, where)
        return plan

    def _base_geometry(self, where: str):
        """Geometry of the plan's own base config, or None when the plan has none (hand-made plans)."""
        from types import SimpleNamespace


        cfg = self.base.get("config") or {}
        if not cfg:
            return None
        try:
            return geometry(SimpleNamespace(**cfg))
        except (AttributeError, TypeError, ZeroDivisionError):
            raise LoramError(f"{where} has an incomplete base.config (no usable layer/head/width counts): "
                             "the plan file is corrupt, re-create it with `loram prune`") from None

    def to_json(self) -> str:
        # one index list per line: diff-able and readable, still valid JSON
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False)
        return _compact_int_lists(text)

    def weights_digest(self) -> str:
        """What a pruned folder's weights depend on: kind, base model and the kept indices of every layer.

        Written into the safetensors metadata of every pruned folder and adapter (``META_PLAN_DIGEST``)
        and checked on load, so a plan swapped for another of the same widths is refused instead of
        recovering the update onto the wrong channels. Fields that do not change the weights (method
        name, ratios, calibration, extra) are left out, so e.g. `loram align` keeps the digest; ``compensation``
        (--compensate refits o/down columns: not the sliced weights) is in.
        """
        fp = self.base.get("fingerprint") or {}
        d = {"kind": self.kind, "layers": list(self.layers), "base": fp.get("id"),
             "pruned": {str(i): {"mlp_keep": lp.mlp_keep, "kv_keep": lp.kv_keep} for i, lp in sorted(self.pruned.items())}}
        if self.compensation is not None:  # refitted o/down columns: not the sliced weights (absent: digests unchanged)
            d["compensation"] = self.compensation
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` entries binding weights to this plan."""
        return {META_PLAN_ID: self.id, META_PLAN_DIGEST: self.weights_digest()}

    @property
    def id(self) -> str:
        """Content hash: an adapter records which plan it was trained on."""
        d = self.to_dict()
        d.pop("extra", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, folder: str | Path) -> Path:
        p = Path(folder) / PLAN_FILE
        p.write_text(self.to_json())
        return p

    @classmethod
    def load(cls, folder_or_file: str | Path) -> "PrunePlan":
        p = Path(folder_or_file)
        if p.is_dir():
            p = p / PLAN_FILE
        if not p.exists():
            raise LoramError(f"no {PLAN_FILE} in {p.parent}: this is not a loram pruned model or adapter (run `loram prune` first)")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoramError(f"{p} is not a valid prune plan ({e}): re-create it with `loram prune`") from None
        try:
            return cls.from_dict(d, where=str(p))
        except (KeyError, TypeError, ValueError) as e:  # a field from_dict's checks did not foresee
            raise LoramError(f"{p} is not a valid prune plan ({e!r}): re-create it with `loram prune`") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bad(where: str, field_name: str, value, need: str) -> str:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{where}: field {field_name} is {shown}, not {need}: the plan file is corrupt, re-create it with `loram prune`"


def _check_choice(where: str, field_name: str, value, choices) -> None:
    if value not in choices:
        raise LoramError(_bad(where, field_name, value, "one of " + ", ".join(choices)))


def _layer_key(where: str, key) -> int:
    if not (isinstance(key, str) and key.isdecimal()):
        raise LoramError(f"{where}: pruned layer key {json.dumps(key)} is not a layer number (keys are layer indices such "
                         "as \"4\"): the plan file is corrupt, re-create it with `loram prune`")
    return int(key)


def _layer_plan(where: str, key: str, v) -> LayerPlan:
    """One layer of ``pruned``: sorted, unique, non-negative integer indices (upper bounds: validate)."""
    if not isinstance(v, dict):
        raise LoramError(_bad(where, f"pruned.{key}", v, '{"mlp_keep": [...], "kv_keep": [...]}'))
    unknown = sorted(set(v) - {"mlp_keep", "kv_keep"})
    if unknown:
        raise LoramError(f"{where}: field pruned.{key} has unknown entries {', '.join(unknown)} (a layer has only mlp_keep "
                         "and kv_keep): the plan file is corrupt, re-create it with `loram prune`")
    for name, keep in v.items():
        if keep is None:
            continue
        if not (isinstance(keep, list) and keep and all(_is_int(x) and x >= 0 for x in keep)):
            raise LoramError(_bad(where, f"pruned.{key}.{name}", keep, "a non-empty list of integer indices"))
        if any(b <= a for a, b in zip(keep, keep[1:])):
            raise LoramError(_bad(where, f"pruned.{key}.{name}", keep, "in increasing order without repeats"))
    return LayerPlan(mlp_keep=v.get("mlp_keep"), kv_keep=v.get("kv_keep"))


def _compact_int_lists(text: str) -> str:
    import re

    return re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text)


def has_plan(folder: str | Path) -> bool:
    return (Path(folder) / PLAN_FILE).exists()
