"""`loram train --anchor TEXT`: keep the update from changing what the model does on general text.

Why: the original's general ability is what LoRAM serves on top of (the recovered update rides on the
original model), and issue 18's dev split showed that a larger update buys in-domain gain at the price of
out-of-domain perplexity. The anchor makes that price part of the loss: beside each training batch the
model reads ``--anchor-batch`` blocks of general text (``--seq-len`` tokens each, from any raw corpus, as
`loram align --data` reads it, or from training rows such as general instructions, each rendered as `loram train`
renders it) twice, with the adapter on and off, and the loss adds

    --anchor-weight x KL(p_adapter_off || p_adapter_on)        (mean over the block's positions, full vocabulary)

It is zero with a zero gradient while the update is zero, so it never pushes the update anywhere; it
only resists the part of the update that moves general-text predictions (Learning without Forgetting's
KL to the frozen model, Li & Hoiem 2016, with the model's own adapter-off self as the frozen model: no
second model in memory). On a pruned model the adapter-off model is the pruned base, so under
--original-offset the anchor is the KL between the original's distribution and the offset model's
(the offset cancels in their ratio, up to the top-k bucket).

The blocks are read in a fixed order (block i of micro-step i, cycling), so a resumed run continues
where the stopped one was. Cost per micro-step: one forward + backward and one no-grad forward of
``--anchor-batch`` blocks (with --micro-batch 4 and --anchor-batch 1: about a third more per step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import LoramError
from .settings import refuse_without


@dataclass(frozen=True)
class Anchor:
    """The anchor blocks and how they enter the loss (training.fit's ``anchor``)."""

    blocks: torch.Tensor  # [n, seq_len] token ids
    weight: float
    batch: int
    source: str

    def batch_at(self, i: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """The blocks of micro-step ``i`` (of this rank): ``batch`` consecutive blocks, cycling through all."""
        n = len(self.blocks)
        start = (i * world + rank) * self.batch
        return self.blocks[[(start + j) % n for j in range(self.batch)]]

    def record(self) -> dict:
        """What loram_adapter.json keeps of the anchor."""
        return {"source": self.source, "blocks": len(self.blocks), "seq_len": self.blocks.shape[1], "weight": self.weight,
                "batch": self.batch, "loss": "anchor_weight x KL(adapter off || adapter on) on the anchor blocks"}


def check_request(cfg) -> None:
    """Refuse --anchor-weight / --anchor-batch without --anchor, and an lm_head target with it, before anything loads."""
    if cfg.anchor is not None and "lm_head" in cfg.targets:
        raise LoramError("--anchor needs lm_head without an adapter (the adapter-off logits): drop lm_head from --targets")
    if cfg.anchor is None:
        refuse_without(cfg, ("anchor_weight", "anchor_batch"), "--anchor", "--anchor TEXT")


STREAMED_CAP = 4096  # blocks read from a streamed corpus (hub id, folder) when --epochs leaves the need open


def load(tok, cfg) -> Anchor | None:
    """The anchor of a run (None without --anchor): the corpus tokenized into blocks of --seq-len tokens, read only
    as far as the run's micro-steps use them (a local file is read whole; a block is reused once all were).
    ``cfg`` has passed check_request (train does it before anything loads)."""
    if cfg.anchor is None:
        return None
    from .data.corpus import chunk_tokens, read_texts
    from .data.sources import streamed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    need = None if cfg.epochs is not None else cfg.steps * cfg.grad_accum * cfg.anchor_batch * world
    if need is None and streamed(cfg.anchor):
        need = STREAMED_CAP
    blocks = chunk_tokens(tok, read_texts(cfg.anchor, tok), cfg.seq_len, name=f"--anchor {cfg.anchor}", max_blocks=need)
    return Anchor(torch.tensor([b[0] for b in blocks[:need]]), cfg.anchor_weight, cfg.anchor_batch, cfg.anchor)
