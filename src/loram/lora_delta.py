"""Which base tensors an adapter changes and by how much, one tensor at a time (no model in memory):
the one implementation `loram merge` (merge.py) and the streamed evaluation (eval/streamed.py) share.

    linear    (q/k/v/o/gate/up/down_proj, lm_head):  W' = W + s * B @ A
    embedding (embed_tokens):                        W' = W + s * (B @ A)^T     (PEFT's lora_embedding_A/B)
    s = PEFT's scaling of that module: lora_alpha / r (alpha / sqrt(r) with use_rslora; rank_pattern and
        alpha_pattern give a module its own r and alpha)

Which weights an adapter touches, with which scaling, is PEFT's own decision: PEFT wraps the base's
skeleton (config + prune plan) on the meta device (no memory), so target_modules, rank_pattern,
alpha_pattern and rslora mean here what they mean to PEFT, and the adapter must fit that skeleton
exactly (adapter.check_fit, as when it is attached). The update is computed in fp32 with PEFT's
operations in PEFT's order (B @ A, * s, W + delta), so an fp32 result has the bits of PEFT's
merge_and_unload; it is cast back to W's dtype. Works for every adapter loram writes: a recovered
one on the original (full shapes) and a pruned one on its pruned folder (pruned shapes).

Tied embeddings: the adapter's function is PEFT's, attached and unmerged. There an lm_head update
changes the output projection only and an embed_tokens update the input embeddings only, although
the base stores one tensor E0 for both (PEFT's merge_and_unload would fold an lm_head update into
that shared tensor and so change the embeddings too). ``untie`` is True when the config ties them
and the adapter changes either end: lm_head is then its own tensor E0 (+ its update), read from the
embeddings (``origin``), and embed_tokens is E0 (+ its update). Merge writes the two apart
(tie_word_embeddings false); the streamed evaluation loads them apart.

Variants whose update is not W + s B A (DoRA, LoRA bias, modules_to_save, trainable tokens,
fan_in_fan_out, tied LoRA weights) are refused with one line before any weight is read.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import check_adapter_dir, check_fit, embedding_copies, lora_shapes
from .errors import LoramError
from .families import TIED_HEAD, ties_embeddings
from .weights import Weights

HEAD = f"{TIED_HEAD}.weight"

# who folds the adapter, and what to do instead when it cannot (the refusals name both)
FOR_MERGE = ("loram merge", "merge it with PEFT's merge_and_unload yourself, or use it unmerged (loram generate --adapter)")
FOR_STREAMING = ("the streamed evaluation", "evaluate it in memory (a --max-memory above the in-memory peak), where PEFT applies it")

# LoraConfig fields whose update is not W + s B A: (field, what the user reads)
_UNSUPPORTED = (("use_dora", "DoRA (use_dora)"), ("lora_bias", "a LoRA bias (lora_bias)"),
                ("modules_to_save", "modules_to_save"), ("trainable_token_indices", "trainable tokens"),
                ("target_parameters", "target_parameters"), ("fan_in_fan_out", "fan_in_fan_out"),
                ("ensure_weight_tying", "tied LoRA weights (ensure_weight_tying)"))


@dataclass(frozen=True)
class Update:
    """W = W0 + scaling * B A (transposed for an embedding) for one base tensor; a, b are adapter keys.
    ``w0``: the adapter's own copy of the base weight (PEFT's save_embedding_layers), which PEFT loads in
    place of the base's, or None."""

    a: str
    b: str
    scaling: float
    embedding: bool
    w0: str | None = None


def _updates(config, plan, adapter, adapter_weights: Weights, user: tuple[str, str]) -> tuple[dict[str, Update], str]:
    """({base tensor name: update}, name of the input embedding weight), from PEFT wrapping the meta
    skeleton of the base (no memory); the adapter's tensors must be exactly the ones PEFT expects."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Embedding as LoraEmbedding
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    from .pruned_model import skeleton

    who, remedy = user
    cfg = LoraConfig.from_pretrained(str(adapter))
    cfg.inference_mode = True
    used = [what for field, what in _UNSUPPORTED if getattr(cfg, field, None)]
    if used:
        raise LoramError(f"adapter {adapter} uses {used[0]}, which {who} does not fold into the weights (only plain "
                         f"LoRA factors): {remedy}")
    model = skeleton(copy.deepcopy(config), plan)  # a copy: from_config sets the config's dtype to the skeleton's
    emb = next(n for n, m in model.named_modules() if m is model.get_input_embeddings()) + ".weight"
    with warnings.catch_warnings(), torch.device("meta"):  # PEFT's warnings concern a model that never runs
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, cfg)
    check_fit(adapter, lora_shapes(pm), adapter_weights.shapes, embedding_copies(pm))
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        key = f"base_model.model.{name}."
        if isinstance(mod, LoraEmbedding):
            a, b, embedding = key + "lora_embedding_A", key + "lora_embedding_B", True
        elif isinstance(mod, LoraLinear):
            a, b, embedding = key + "lora_A.weight", key + "lora_B.weight", False
        else:
            raise LoramError(f"adapter {adapter} puts a {type(mod).__name__} LoRA on {name}, which {who} cannot fold: {remedy}")
        w0 = key + "base_layer.weight"
        out[f"{name}.weight"] = Update(a, b, float(mod.scaling["default"]), embedding, w0 if w0 in adapter_weights else None)
    return out, emb


class LoraDeltas:
    """The per-tensor updates of one adapter on one base (see the module docstring).

    ``targets``: the base tensor names an update lands on; ``apply(name, W)`` returns the adapted W
    (W itself for any other name; a LayerStream transform); ``untie``/``origin``: tied embeddings.
    ``user``: FOR_MERGE or FOR_STREAMING, which the refusals name. Everything is checked here, from the
    adapter's headers and the base's config, before any weight is read."""

    def __init__(self, adapter_dir: str | Path, config, plan=None, user: tuple[str, str] = FOR_MERGE):
        self.folder = check_adapter_dir(adapter_dir)
        self.weights = Weights(self.folder)  # adapter_model.safetensors, read one factor at a time
        self.updates, self.embedding = _updates(config, plan, self.folder, self.weights, user)
        self.targets = set(self.updates)
        self.untie = ties_embeddings(config) and bool(self.targets & {HEAD, self.embedding})

    def origin(self, name: str) -> str:
        """The base tensor output tensor ``name`` starts from: an untied lm_head starts from the embeddings."""
        return self.embedding if self.untie and name == HEAD else name

    def delta(self, name: str, dtype=torch.float32, device="cpu") -> torch.Tensor | None:
        """s * B A (transposed for an embedding) of base tensor ``name`` in ``dtype`` (None where the adapter does not touch it)."""
        u = self.updates.get(name)
        if u is None:
            return None
        a, b = (self.weights.get(k, dtype).to(device) for k in (u.a, u.b))
        d = b @ a
        return (d.T if u.embedding else d).mul_(u.scaling)

    def apply(self, name: str, w: torch.Tensor, keep_zeros: bool = False, dtype=torch.float32, device=None) -> torch.Tensor:
        """``w`` + its update, computed in ``dtype`` on ``device`` (default: ``w``'s) and returned in ``w``'s
        dtype there (``w`` itself if untouched); ``keep_zeros``: masked to ``w``'s non-zeros (--keep-sparse)."""
        u = self.updates.get(name)
        if u is None:
            return w
        if u.w0 is not None:  # PEFT loads the adapter's copy of this weight in place of the base's
            w = self.weights.get(u.w0, w.dtype).to(w.device)
        device = w.device if device is None else device
        delta = self.delta(name, dtype, device)
        out = w.to(device=device, dtype=dtype, copy=True)  # a copy: w may be a loaded model's own tensor
        out.add_(delta)
        del delta
        if keep_zeros:
            out.mul_(w.to(device) != 0)
        return out.to(w.dtype)

    __call__ = apply  # a LoraDeltas is a LayerStream transform


def untie_adapted_ends(pm) -> bool:
    """Give lm_head its own copy of the shared tensor in a PeftModel (in place) whose tied model has a LoRA
    on lm_head or embed_tokens, so that merge_and_unload folds each update into its own end (the module
    docstring: the adapter's function is PEFT's unmerged one). True when it untied."""
    from peft.tuners.lora import LoraLayer

    inner = pm.base_model.model
    ends = (inner.get_input_embeddings(), inner.get_output_embeddings())
    if not ties_embeddings(inner.config) or not any(isinstance(e, LoraLayer) for e in ends):
        return False
    head = ends[1].base_layer if isinstance(ends[1], LoraLayer) else ends[1]
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    inner.config.tie_word_embeddings = False  # nothing re-ties them (merge_and_unload, save_pretrained)
    return True
