"""Random structured plans from a config alone (capacity planning, `loram build --plan-only`,
`loram plan --try`): no weights are read.

The plan's method is "random" and, without a checkpoint, its base fingerprint is marked
{"scheme": "random-init"}, so it can never be recovered onto (or built from) a real model.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..families import geometry, is_tied_head, ties_embeddings
from ..fingerprint import config_digest
from ..prune_plan import PrunePlan, parse_layers
from ..pruned_model import skeleton_shapes
from ..validate import check_ratio
from .structured import select

RANDOM_SCHEME = "random-init"


def random_fingerprint(config, seed: int) -> dict:
    """Fingerprint of a randomly initialised base: never equal to a real checkpoint's."""
    fp = {"scheme": RANDOM_SCHEME, "config": config_digest(config), "seed": seed}
    fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


def random_plan(config, ratio: float, attn_ratio: float | None = None, layers: str | None = None, seed: int = 0,
                name: str = "random", fingerprint: dict | None = None) -> PrunePlan:
    """A structured plan (method random) made from a config alone: no weights are read."""
    attn_ratio = ratio if attn_ratio is None else attn_ratio
    check_ratio("--ratio", ratio, allow_zero=False)
    check_ratio("--attn-ratio", attn_ratio, allow_zero=True)
    g = geometry(config)
    start, end = parse_layers(layers, g.n_layers)
    plan = PrunePlan(kind="structured", method="random", layers=(start, end), mlp_ratio=ratio, attn_ratio=attn_ratio,
                     seed=seed, base={"name": str(name), "config": config.to_dict(),
                                      "fingerprint": fingerprint or random_fingerprint(config, seed)},
                     pruned=select(g, "random", range(start, end), ratio, attn_ratio, seed))
    plan.extra = {"params_original": _numel(skeleton_shapes(config, None), config),
                  "params_pruned": _numel(skeleton_shapes(config, plan), config)}
    return plan


def _numel(shapes: dict, config) -> int:
    tied = ties_embeddings(config)
    return sum(torch.Size(s).numel() for k, s in shapes.items() if not is_tied_head(k, tied))
