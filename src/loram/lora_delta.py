"""The update an adapter makes to each base tensor, computed one tensor at a time (no PEFT model).

    linear    (q/k/v/o/gate/up/down_proj, lm_head):  W' = W + s * B @ A
    embedding (embed_tokens):                        W' = W + s * (B @ A)^T     (PEFT's lora_embedding_A/B)
    s = lora_alpha / r,  or lora_alpha / sqrt(r) with use_rslora

in fp32, the result cast back to W's dtype: PEFT's merge_and_unload, applied to a tensor as it is read.
Streamed evaluation folds an adapter into each layer as the layer is loaded (LayerStream's transform);
a streaming merge can write W' shard by shard the same way. Works for every adapter loram writes: a
recovered one on the original (full shapes) and a pruned one on its pruned folder (pruned shapes).

Tied embeddings: PEFT merges an lm_head update into the one tensor lm_head shares with the input
embeddings, so the embeddings change too (loram warns about it at training). ``tied=True`` does the
same: both names receive the sum of both updates, so streamed and in-memory numbers agree.

What PEFT can write but this does not compute (DoRA, LoRA biases, rank / alpha patterns,
fan_in_fan_out, modules_to_save) is refused with one line before anything is loaded.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .adapter import check_adapter_dir, check_config, read_tensors
from .errors import LoramError

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"  # Hugging Face names of the two outer tensors
# base_model.model.<module>.lora_A.weight / lora_B.weight (linear), .lora_embedding_A / _B (embedding)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<kind>A|B|embedding_A|embedding_B)(?:\.weight)?$")
# config switches that change the update's formula: (key, value that is fine, what it is)
_UNSUPPORTED = (("use_dora", False, "DoRA"), ("fan_in_fan_out", False, "fan_in_fan_out"), ("bias", "none", "a LoRA bias"),
                ("lora_bias", False, "a LoRA bias"), ("rank_pattern", {}, "per-module ranks (rank_pattern)"),
                ("alpha_pattern", {}, "per-module alphas (alpha_pattern)"), ("modules_to_save", None, "modules_to_save"))


class LoraDeltas:
    """The per-tensor updates of one adapter folder (see the module docstring).

    ``targets``: the base tensor names an update lands on; ``apply(name, W)`` returns W + update
    (W itself for any other name); ``check_shapes(shapes)`` refuses a base the adapter does not fit."""

    def __init__(self, adapter_dir: str | Path, tied: bool = False):
        self.folder = check_adapter_dir(adapter_dir)
        cfg = check_config(self.folder)
        for key, fine, what in _UNSUPPORTED:
            if cfg.get(key, fine) not in (fine, None, [], {}):
                raise LoramError(f"{self.folder} uses {what} ({key}={cfg[key]!r}), which loram cannot fold into the weights "
                                 "layer by layer: evaluate it in memory (without streaming), or merge it with PEFT first")
        r = cfg["r"]
        self.scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        self.rank = r
        self._factors = self._pair(read_tensors(self.folder))  # base name -> (A, B, is_embedding)
        self.tied = tied
        self.targets = set(self._factors)
        if tied and self.targets & {EMBED, HEAD}:
            self.targets |= {EMBED, HEAD}

    def _pair(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _KEY.match(key)
            if m is None:
                raise LoramError(f"adapter tensor {key} in {self.folder} is not a LoRA factor loram knows (lora_A / lora_B / "
                                 "lora_embedding_A / lora_embedding_B): re-create the adapter with `loram train`")
            parts.setdefault(m["module"] + ".weight", {})[m["kind"]] = t
        out = {}
        for name, p in parts.items():
            emb = "embedding_A" in p or "embedding_B" in p
            a, b = (p.get("embedding_A"), p.get("embedding_B")) if emb else (p.get("A"), p.get("B"))
            if a is None or b is None or len(p) != 2:
                raise LoramError(f"adapter {self.folder} has {sorted(p)} for {name} but needs one A and one B factor: "
                                 "the adapter is incomplete, re-create it")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != self.rank or b.shape[1] != self.rank:
                raise LoramError(f"adapter factors of {name} have shapes {tuple(a.shape)} and {tuple(b.shape)}, not rank "
                                 f"r={self.rank} from adapter_config: the adapter is inconsistent, re-create it")
            out[name] = (a, b, emb)
        return out

    def _own(self, name: str) -> torch.Tensor | None:
        f = self._factors.get(name)
        if f is None:
            return None
        a, b, emb = f
        d = b.float() @ a.float()
        return (d.T if emb else d).mul_(self.scale)

    def delta(self, name: str) -> torch.Tensor | None:
        """The fp32 update of base tensor ``name`` (None where the adapter does not touch it)."""
        names = [EMBED, HEAD] if self.tied and name in (EMBED, HEAD) else [name]
        parts = [d for d in map(self._own, names) if d is not None]
        return None if not parts else parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])

    def shape(self, name: str) -> tuple[int, int]:
        a, b, emb = self._factors[name]
        return (a.shape[1], b.shape[0]) if emb else (b.shape[0], a.shape[1])

    def check_shapes(self, shapes: dict[str, tuple], where: str) -> None:
        """Every update must land on a tensor of ``shapes`` (a checkpoint's header) with its shape:
        checked from headers, before any layer is read."""
        for name in sorted(self._factors):
            if self.tied and name == HEAD and name not in shapes:
                name_in = EMBED  # a tied checkpoint stores the shared tensor once, as the embeddings
            else:
                name_in = name
            if name_in not in shapes:
                raise LoramError(f"adapter {self.folder} updates {name}, which {where} does not have: use the adapter made "
                                 "for this model")
            if tuple(shapes[name_in]) != self.shape(name):
                raise LoramError(f"adapter {self.folder} makes a {self.shape(name)} update for {name}, which is "
                                 f"{tuple(shapes[name_in])} in {where}: use the adapter made for this model (a pruned adapter "
                                 "needs `loram recover` before it fits the original)")

    def apply(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """``w`` + its update, computed in fp32 and returned in ``w``'s dtype and device (``w`` if untouched)."""
        if name not in self.targets:
            return w
        d = self.delta(name)
        return (w.float() + d.to(w.device)).to(w.dtype)

    __call__ = apply  # a LoraDeltas is a LayerStream transform
