"""Evaluation of a model larger than memory: every sequence goes through layer i before layer i+1 loads.

    batches = padded_batches(seqs)            (scoring.py: the same batches as in memory)
    for each wave of batches (their hidden states fit max_hidden_bytes):
        xs = input of decoder layer 0 for every batch of the wave
        for i in 0 .. N-1:
            load layer i (adapter folded in: W + s B A, lora_delta)  ->  xs = layer_i(xs)  ->  drop layer i
        log-probabilities of the scored tokens: final norm + lm_head, a few rows at a time

so the resident set is the embeddings, final norm and lm_head, ONE decoder layer, and the hidden
states of one wave (plus their attention masks and rotary tables). A wave is as many batches as
``max_hidden_bytes`` holds (at least one batch); each further wave reads every layer again, so a
larger budget means fewer passes over the weights. The numbers are those of the model in memory
(the same batches, padding and fp32 log-softmax; layer by layer is the model's own forward) up to
floating-point summation order.

An adapter means what PEFT attached (unmerged) computes: on a tied model, an lm_head or
embed_tokens update unties the two ends (lm_head loaded as its own tensor, lora_delta.LoraDeltas.untie),
as `loram merge` writes them and as the in-memory evaluation keeps them.

Only scoring (--ppl, --mc) streams: generation needs every layer for every new token.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import LoramError
from ..families import geometry, ties_embeddings
from ..io import load_tokenizer
from ..progress import bar
from ..stream import LayerStream
from .scoring import Batch, token_logprobs

DEFAULT_HIDDEN_BYTES = 1 << 30  # 1 GiB of hidden states per wave when the caller gives no budget
HEAD_BYTES = 256 << 20  # lm_head's logits are made this many bytes of [rows, vocab] fp32 at a time
STREAMED_TASKS = ("--ppl", "--mc")


def check_budget(max_hidden_bytes: int) -> None:
    if max_hidden_bytes < 1:
        raise LoramError(f"max_hidden_bytes {max_hidden_bytes} must be positive: give the memory the hidden states may use")


class StreamedLM:
    """A model read one decoder layer at a time; ``batch_logprobs`` is what ``score_sequences`` calls."""

    def __init__(self, stream: LayerStream, max_hidden_bytes: int = DEFAULT_HIDDEN_BYTES):
        check_budget(max_hidden_bytes)
        self.stream = stream
        self.max_hidden_bytes = int(max_hidden_bytes)
        self.geometry = geometry(stream.config)
        self.passes = 0  # waves run so far (each one reads every layer): for reports and tests

    # ---- memory: which batches share a pass over the layers ---------------------------------------
    def state_bytes(self, b: Batch) -> int:
        """Bytes a batch keeps between layers: hidden states, rotary cos/sin, attention mask (4-byte worst case)."""
        rows, n = b.ids.shape
        e = torch.empty((), dtype=self.stream.dtype).element_size()
        return rows * n * (self.geometry.hidden * e + 2 * self.geometry.head_dim * e + 4 * n)

    def waves(self, batches: list[Batch]) -> list[list[Batch]]:
        """Consecutive batches grouped while their state fits ``max_hidden_bytes`` (a batch alone may exceed it)."""
        out: list[list[Batch]] = []
        used = 0
        for b in batches:
            size = self.state_bytes(b)
            if out and used + size <= self.max_hidden_bytes:
                out[-1].append(b)
                used += size
            else:
                out.append([b])
                used = size
        return out

    # ---- the LogprobFn ---------------------------------------------------------------------------
    def batch_logprobs(self, batches: list[Batch]):
        """Per batch, in order, the log-probabilities of its scored tokens (scoring.LogprobFn)."""
        for b, hidden in self.final_hidden(batches):
            yield self._head_logprobs(b, hidden)

    def final_hidden(self, batches: list[Batch]):
        """(batch, output of the last decoder layer) per batch, in order, a wave at a time: ``stream.head``
        turns one into logits (the distillation teacher takes its top-k from them, loram.distill)."""
        waves = self.waves(batches)
        for k, wave in enumerate(waves):
            hidden = self._through_layers(wave, "layer" if len(waves) == 1 else f"wave {k + 1}/{len(waves)}: layer")
            for j, b in enumerate(wave):
                h, hidden[j] = hidden[j], None  # type: ignore[call-overload]  # the caller's once yielded: freed after its logits
                yield b, h

    def _through_layers(self, wave: list[Batch], desc: str) -> list:
        ls = self.stream
        xs = ls.inputs([b.ids for b in wave], [b.mask for b in wave])
        with bar(ls.n_layers, desc) as progress:
            for _i, block in ls.layers():
                for j in range(len(xs)):  # in place: one batch's old and new states coexist, not the wave's
                    xs[j] = ls.run(block, xs[j])
                progress.update(1)
        self.passes += 1
        return [x.hidden for x in xs]

    def _head_logprobs(self, b: Batch, hidden: torch.Tensor) -> torch.Tensor:
        dev = hidden.device
        h = hidden[:, :-1][b.scored.to(dev)]  # only the positions that score a token reach lm_head
        tgt = b.targets(dev)
        rows = max(1, min(HEAD_BYTES, self.max_hidden_bytes) // (4 * self.geometry.vocab))
        with torch.no_grad():
            parts = [token_logprobs(self.stream.head(h[s:s + rows]), tgt[s:s + rows]) for s in range(0, len(h), rows)]
        return torch.cat(parts) if parts else torch.zeros(0, device=dev)


def resident_bytes(config, plan=None, dtype=torch.float32) -> tuple[int, int]:
    """(bytes resident for the whole run: embeddings, final norm, lm_head; bytes of the largest decoder
    layer) of a model streamed in ``dtype``, from its config (+ plan) alone. A streamed evaluation's
    peak above the process is about their sum + one wave's hidden states (<= max_hidden_bytes) + one
    lm_head chunk (<= HEAD_BYTES): for a memory budget, and for `loram plan`."""
    from ..pruned_model import skeleton_shapes

    e = torch.empty((), dtype=dtype).element_size()
    tied = ties_embeddings(config)
    outer, layers = 0, {}
    for name, shape in skeleton_shapes(config, plan).items():
        n = e * int(torch.Size(shape).numel())
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if m:
            layers[m[1]] = layers.get(m[1], 0) + n
        elif not (tied and name == "lm_head.weight"):  # a tied head is the embeddings again
            outer += n
    return outer, max(layers.values(), default=0)


def open_streamed(base: str | Path, adapter: str | Path | None = None, dtype=torch.float32, device="cpu",
                  max_hidden_bytes: int = DEFAULT_HIDDEN_BYTES, check_base: bool = True, verify_base: str = "sampled"):
    """(StreamedLM, tokenizer) for a local original or pruned folder (+ an adapter folded into each layer
    as it loads), after the same checks as ``merge.load_with_adapter``, all before any weight is read."""
    from ..lora_delta import FOR_STREAMING, LoraDeltas
    from ..loading import open_checkpoint
    from ..merge import check_adapter_fits, check_adapter_request

    check_budget(max_hidden_bytes)
    check_adapter_request(base, adapter, check_base, verify_base)
    config, plan, weights = open_checkpoint(base, "streamed evaluation")
    deltas = None
    if adapter is not None:
        check_adapter_fits(base, adapter, plan, check_base, verify_base)
        deltas = LoraDeltas(adapter, config, plan, FOR_STREAMING)  # refusals and the exact fit: from headers
    tok = load_tokenizer(base)
    stream = LayerStream(weights, config, plan, dtype=dtype, device=device, transform=deltas, untie=deltas is not None and deltas.untie)
    return StreamedLM(stream, max_hidden_bytes), tok
