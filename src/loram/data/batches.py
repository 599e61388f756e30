"""Encoded rows -> what the Trainer reads: packing with boundaries, padding collator, mixtures of
sources, and a run's training / --eval sets."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from ..errors import LoramError
from .rows import IGNORE, encode_all
from .sources import iter_rows, streamed

if TYPE_CHECKING:  # annotations only: loram.train imports this package
    from ..configs import RunConfig, TrainConfig


def pack(examples, seq_len: int):
    """Rows grouped, in order, into sequences of at most seq_len tokens, with their boundaries kept.

    Each packed sequence is (input_ids, labels, position_ids) as transformers' DataCollatorWithFlattening
    (TRL's padding-free packing) lays rows out: position ids restart at 0 for every row and the label of each
    row's first token is IGNORE, so no token is predicted from the row before it. Given position ids and no
    2-D attention mask, transformers attends within each row only (masking_utils finds the restarts and builds
    a block-diagonal mask for sdpa/eager; flash-attention runs varlen), so a packed sequence trains exactly as
    its rows one by one (tests/test_packing.py) with fewer pad tokens. ``collate`` keeps that layout.
    """
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(return_tensors="np", separator_id=IGNORE)
    groups, cur, n = [], [], 0
    for ids, labels in examples:
        if n + len(ids) > seq_len and cur:
            groups.append(cur)
            cur, n = [], 0
        cur.append({"input_ids": ids, "labels": labels})
        n += len(ids)
    if cur:
        groups.append(cur)
    out = []
    for rows in groups:
        b = flatten(rows)
        out.append(tuple(b[k][0].tolist() for k in ("input_ids", "labels", "position_ids")))
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ids, labels, *positions = self.examples[i]  # packed sequences carry their position ids (``pack``)
        return {"input_ids": ids, "labels": labels} | ({"position_ids": positions[0]} if positions else {})


def collate(pad_id: int):
    """Pad a batch to its longest sequence. Packed sequences (``pack``) keep their position ids and get no
    attention mask: a 2-D mask would turn off transformers' per-row attention (see ``pack``); the padding gets
    positions of its own, 0, 1, ..., so it is a separate (unlabelled) row that no real token attends to.
    """
    def fn(batch):
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        if "position_ids" not in batch[0]:
            return {"input_ids": ids, "labels": labels, "attention_mask": mask}
        pos = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            pos[i, :k] = torch.tensor(b["position_ids"])
            pos[i, k:] = torch.arange(n - k)
        # use_cache=False: with a cache, transformers does not look for row boundaries in the position ids
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False}

    return fn


def packed_padding(input_ids: torch.Tensor, position_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Where ``collate`` padded a batch of packed sequences (bool, same shape): the last row of each sequence
    when it is all pad ids (its positions restart at 0 like a row's). The Trainer counts the other tokens."""
    seg = (position_ids == 0).cumsum(-1)
    last = seg == seg[:, -1:]
    return last & ((input_ids == pad_id) | ~last).all(-1, keepdim=True)


# ---- mixtures ------------------------------------------------------------------------------------
def mix(sources: list[list], weights: list[float] | None, seed: int) -> list:
    """One list drawing from each source in proportion to its weight (total = sum of sizes).

    Source i gets round(total * w_i / sum w) items: a random subset when that is fewer than it
    has, sampled with replacement (upsampling) when more.
    """
    weights = weights or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise LoramError(f"{len(weights)} mixture weights for {len(sources)} datasets: give one weight per --data")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise LoramError(f"mixture weights {weights} must be >= 0 with a positive sum: e.g. --data a.jsonl=0.7 --data b.jsonl=0.3")
    g = torch.Generator().manual_seed(seed)
    total, out = sum(len(s) for s in sources), []
    for s, w in zip(sources, weights):
        n = round(total * w / sum(weights))
        if n == 0:
            continue
        idx = torch.randint(len(s), (n,), generator=g).tolist() if n > len(s) else \
            torch.randperm(len(s), generator=g)[:n].tolist()
        out += [s[i] for i in idx]
    return out


def with_total(skipped: dict[str, int], truncated: int = 0) -> dict[str, int]:
    """A report's ``dropped``: rows skipped by reason, their "total", and "truncated" (rows kept, cut to
    --seq-len; not in the total) when there are any."""
    return dict(skipped) | {"total": sum(skipped.values())} | ({"truncated": truncated} if truncated else {})


def examples_needed(cfg: RunConfig) -> int | None:
    """Sequences a run of --steps draws (steps x micro-batch x accumulation x ranks); None with --epochs (all)."""
    if cfg.epochs is not None:
        return None
    return cfg.steps * cfg.micro_batch * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))


def build_dataset(tok, cfg: TrainConfig):
    """(ListDataset, rows skipped: reason -> count, "total", and "truncated" when rows were cut) of the
    training mixture.

    A streamed source (hub id, folder) is read until it gives the sequences the run needs: that many rows,
    or with --packing that many x --seq-len tokens (packed sequences hold at most --seq-len tokens each, so
    those tokens fill at least that many). Those are its first rows: slice it ("name:train[5000:]") to
    start elsewhere. Local files are read whole (the Trainer samples from all their rows)."""
    need = examples_needed(cfg)
    limits = {} if need is None else {"max_tokens": need * cfg.seq_len} if cfg.packing else {"max_examples": need}
    encoded = [encode_all(tok, iter_rows(src), cfg.seq_len, cfg.train_on_inputs, name=f"--data {src}", long_rows=cfg.long_rows,
                          **(limits if streamed(src) else {})) for src in cfg.data]
    parts = mix([e.examples for e in encoded], cfg.data_weights, cfg.seed)
    if cfg.packing:
        parts = pack(parts, cfg.seq_len)
    skipped: dict[str, int] = {}
    for e in encoded:
        for reason, n in e.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return ListDataset(parts), with_total(skipped, sum(e.truncated for e in encoded))


def eval_sets(tok, cfg: TrainConfig) -> tuple[dict, dict]:
    """(name -> examples of each --eval set, same formatting, masking and --long-rows as training; name -> rows
    skipped and truncated)."""
    enc = {name: encode_all(tok, iter_rows(src), cfg.seq_len, False, name=f"--eval {name}", long_rows=cfg.long_rows)
           for name, src in cfg.eval.items()}
    return {n: e.examples for n, e in enc.items()}, {n: with_total(e.skipped, e.truncated) for n, e in enc.items()}
