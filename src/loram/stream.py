"""Running a model one decoder layer at a time from its safetensors: models larger than memory.

    ls = LayerStream(weights, config, plan=None, dtype=torch.float32, device="cpu")
    xs = ls.inputs(batches)            # input of decoder layer 0 per batch (embedding, rotary, mask)
    for i in range(ls.n_layers):
        block = ls.load(i)             # decoder layer i, materialised from the weights
        xs = [ls.run(block, x) for x in xs]
        ls.unload(i)                   # back to the meta device: its memory is released
    logits = ls.head(xs[0].hidden)     # final norm + lm_head

The model is the stock transformers architecture built on the meta device (``pruned_model.skeleton``:
no memory); only the embeddings, the final norm, lm_head and the rotary buffers are real from the
start. Each decoder layer is materialised when it is needed and dropped after, so the resident set
is those tensors + one layer (in ``dtype``) + the hidden states the caller keeps. A layer is the
stock module with its real weights, so its forward is the model's own: the streamed numbers equal
the in-memory ones up to floating-point summation order.

The inputs of layer 0 come from the model's own forward, stopped by a pre-hook on layer 0 (the one
way to get exactly the position embeddings and attention mask the model builds for itself, for
every family and transformers version); every later layer gets the same keyword arguments.

``transform(name, tensor)`` (optional) rewrites each tensor as it is loaded: the streamed
evaluation folds an adapter's update into the layer that way.

Works on any device: tensors are read on the CPU (safetensors mmap) and moved to ``device``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import LoramError
from .families import decoder_layers, ties_embeddings
from .pruned_model import materialize_buffers, skeleton
from .weights import Weights

LAYER_MARK = "layers.{}."  # Hugging Face naming: model.layers.{i}.self_attn.q_proj.weight
IN_LAYER = re.compile(r"(^|\.)layers\.\d+\.")
HEAD = re.compile(r"(lm_head|model\.norm)\.")  # what only the logits need (head=False leaves them out)


@dataclass
class Captured:
    """One batch at a decoder layer's input: its hidden states and the layer's other arguments."""

    hidden: torch.Tensor
    kwargs: dict


class _Stop(Exception):
    pass


def capture_inputs(model, layer: int, batches: list[torch.Tensor], masks: list[torch.Tensor | None] | None = None) -> list[Captured]:
    """The input of decoder layer ``layer`` for each batch of token ids (the forward stops there).

    ``masks``: an attention mask per batch (padded batches), None for unpadded ones."""
    block = decoder_layers(model)[layer]
    got: list[Captured] = []

    def grab(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        got.append(Captured(hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    dev = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            for j, ids in enumerate(batches):
                mask = masks[j] if masks is not None else None
                try:
                    model(input_ids=ids.to(dev), attention_mask=None if mask is None else mask.to(dev), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(got) != len(batches):
        raise LoramError("could not capture the decoder-layer inputs of this model: is it a supported family?")
    return got


def run_block(block, c: Captured) -> torch.Tensor:
    """Decoder layer ``block`` on one captured input (the caller chooses no_grad or not)."""
    out = block(c.hidden, **c.kwargs)
    return out[0] if isinstance(out, tuple) else out


class LayerStream:
    """A model whose decoder layers live on disk until asked for (see the module docstring)."""

    def __init__(self, weights: Weights | str | Path, config, plan=None, dtype=torch.float32, device="cpu",
                 transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None, head: bool = True):
        """head=False: the final norm and lm_head stay on the meta device (a stage that needs no logits:
        pruning), which saves the vocabulary x hidden head (4.2 GB in fp32 for Llama-3-70B)."""
        self.weights = weights if isinstance(weights, Weights) else Weights(weights, use_index=True)
        self.config, self.plan, self.dtype, self.with_head = config, plan, dtype, head
        self.device = torch.device(device)
        self.transform = transform
        self.model = skeleton(config, plan, dtype=dtype)
        self.blocks = decoder_layers(self.model)
        self.n_layers = len(self.blocks)
        self._load_outer()

    # ---- the tensors outside the decoder layers: resident for the whole run ------------------------
    def _tensor(self, name: str) -> torch.Tensor:
        t = self.weights.get(name, self.dtype)
        if self.transform is not None:
            t = self.transform(name, t)
        return t.to(self.device)

    def _load_outer(self) -> None:
        own = {k for k in self.model.state_dict() if not IN_LAYER.search(k) and (self.with_head or not HEAD.match(k))}
        tied = ties_embeddings(self.config)
        sd = {k: self._tensor(k) for k in own if k in self.weights and not (tied and k == "lm_head.weight")}
        missing = sorted(k for k in own - set(sd) if not (tied and k == "lm_head.weight"))
        if missing:
            raise LoramError(f"tensor {missing[0]} is not in the checkpoint {self.weights.folder}: the config does not match the weights")
        self.model.load_state_dict(sd, strict=False, assign=True)
        if tied:
            self.model.tie_weights()
        materialize_buffers(self.model, self.device)
        self.model.eval()

    # ---- one decoder layer at a time ----------------------------------------------------------------
    def load(self, i: int, requires_grad: bool = False) -> nn.Module:
        """Decoder layer ``i`` with its weights read from disk (in ``dtype``, on ``device``)."""
        block = self.blocks[i]
        prefix = f"model.{LAYER_MARK.format(i)}"
        own = {k for k, _ in block.named_parameters()} | {k for k, _ in block.named_buffers()}
        sd = {}
        for k in own:
            name = prefix + k
            if name not in self.weights:
                raise LoramError(f"tensor {name} is not in the checkpoint {self.weights.folder}: the config does not match the weights")
            sd[k] = self._tensor(name)
        block.load_state_dict(sd, strict=True, assign=True)
        for p in block.parameters():
            p.requires_grad_(requires_grad)
        return block

    def unload(self, i: int) -> None:
        """Drop decoder layer ``i``'s tensors (the module goes back to the meta device)."""
        self.blocks[i].to_empty(device="meta")

    def inputs(self, batches: list[torch.Tensor], masks: list[torch.Tensor | None] | None = None) -> list[Captured]:
        """The input of decoder layer 0 for each batch of token ids."""
        return capture_inputs(self.model, 0, batches, masks)

    def drop_outer(self) -> None:
        """Send the embeddings, final norm and lm_head back to the meta device: for a stage that, once it
        has the layer-0 inputs, needs neither more inputs nor logits (pruning)."""
        in_layers = {id(p) for b in self.blocks for p in b.parameters()}
        for m in self.model.modules():
            own = list(m.parameters(recurse=False))
            if own and not any(id(p) in in_layers for p in own):
                m.to_empty(device="meta", recurse=False)

    def run(self, block: nn.Module, c: Captured) -> Captured:
        """``block`` on one captured input, without gradients: the next layer's input."""
        with torch.no_grad():
            return Captured(run_block(block, c).detach(), c.kwargs)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last decoder layer's output (final norm + lm_head)."""
        return self.model.lm_head(self.model.model.norm(hidden))

    def layers(self, start: int = 0, stop: int | None = None):
        """Yield (i, block) for i in [start, stop), each loaded before and unloaded after its turn."""
        for i in range(start, self.n_layers if stop is None else stop):
            block = self.load(i)
            try:
                yield i, block
            finally:
                self.unload(i)
