"""`loram train --original-offset`: train the LoRA update as it will act on the ORIGINAL model.

Why: an adapter trained on a pruned model learns two things, the task and a repair of the pruning. On
the original, which lacks nothing, the repair is wrong (issue 18's dev split: LoRAM updates are 1.1-1.4x
as large as full LoRA's, and scaling the recovered update down cut the out-of-domain damage). Here the
repair is given instead of learned: the loss scores the student (pruned + LoRA, q) through the
original's next-token distribution,

    log p_combined = log q + (log p_original - log p_pruned)        (renormalised over the vocabulary)

where p_pruned is the same pruned model with the adapter switched off. At step 0 (q = p_pruned) the
combined distribution is the original's, so the gradient asks the update only for what the original
still gets wrong on the task: the update's effect on the pruned model's output (q - p_pruned in
log space) is what is trained, and that is what recovery transplants onto the original. This is
proxy-tuning's logit arithmetic (Liu et al. 2024) turned around, at training time instead of decoding.

The original is never in memory with the student. It runs ONCE before training, over exactly the
examples the run trains on (in memory, or layer by layer when its pass does not fit the budget), and
its top-k at temperature 1 is cached on disk by loram.distill's machinery (same cache format, same
key rules: a repeated or resumed run reuses it). The examples are:

    --steps N   a seeded random N x micro-batch x accumulation of the mixture (all of it when it has
                fewer); the run trains on exactly these (without the flag the Trainer samples them)
    --epochs    all of the mixture

Each example is padded on the right to the longest example for the teacher pass (causal attention:
the padding changes no earlier position); batches read their rows and cut them to the batch's length.

The top-k approximation: the original is kept as its k most likely tokens and one bucket for the rest;
outside its top-k the offset is the ratio of the two models' bucket masses (the pruned model's shape
is kept there). With k = vocab the offset is exact. Cost: the teacher pass, plus one forward of the
pruned model without the adapter per training step (no gradient: ~1/3 of a step). Not with --packing
(the teacher pass does not see row boundaries), an lm_head target (the offset needs the head without
the adapter) or torchrun (the teacher pass is one process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distill
from .errors import LoramError
from .loss import chunked_offset_loss
from .settings import refuse_without


@dataclass(frozen=True)
class PassSpec:
    """What loram.distill's teacher pass and cache read (the names AlignConfig gives them): temperature 1, as
    the offset is between the two models' own distributions."""

    distill_top_k: int
    seq_len: int
    micro_batch: int
    max_memory: float | None
    distill_temperature: float = 1.0


@dataclass(frozen=True)
class OffsetLoss:
    """The Trainer's loss under --original-offset (training.fit's ``distill``): needs the pruned base's forward."""

    evals: dict = field(default_factory=dict)  # no held-out KL: --eval reports the student's own perplexity
    needs_base = True  # the Trainer runs the pruned base (adapter off) beside the student

    def __call__(self, hidden, base_hidden, head, labels, teacher, chunk, num_items):
        return chunked_offset_loss(hidden, base_hidden, head, labels, teacher, chunk, num_items=num_items)


def check_request(cfg, plan, model) -> distill.Teacher | None:
    """Refuse a wrong --original-offset request from configs and headers alone, before anything is loaded."""
    if not cfg.original_offset:
        refuse_without(cfg, ("teacher", "offset_top_k", "offset_cache", "offset_at"), "--original-offset", "--original-offset")
        return None
    if plan is None or plan.kind == "sparse":
        raise LoramError(f"--original-offset needs a structurally pruned model folder (from `loram prune`); {model} is "
                         + ("an original model, whose offset is zero: drop --original-offset" if plan is None else
                            "sparse (same shapes as the original): train it without --original-offset"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LoramError("--original-offset runs the original's pass in one process: run it without torchrun / accelerate launch")
    if cfg.packing:
        raise LoramError("--original-offset scores rows one by one, not packed: drop --packing")
    if cfg.offset_at == "layers" and cfg.offset_top_k != 32:
        raise LoramError("--offset-top-k sets the logit offset's top-k; --offset-at layers needs none: drop --offset-top-k")
    if "lm_head" in cfg.targets:
        raise LoramError("--original-offset needs lm_head without an adapter (the pruned base's logits): drop lm_head "
                         "from --targets")
    return distill.resolve_teacher(plan, model, cfg.teacher, cfg.offset_top_k, "--offset-top-k")


def run_examples(examples: list, cfg) -> list:
    """The examples the run trains on (see the module docstring): a seeded subset under --steps, else all."""
    from .data import examples_needed

    need = examples_needed(cfg)
    if need is None or need >= len(examples):
        return list(examples)
    g = torch.Generator().manual_seed(cfg.seed)
    return [examples[i] for i in sorted(torch.randperm(len(examples), generator=g)[:need].tolist())]


def teacher_rows(examples: list, pad_id: int) -> list:
    """The examples as equal-length blocks for the teacher pass: right-padded to the longest one."""
    n = max(len(e[0]) for e in examples)
    return [(list(e[0]) + [pad_id] * (n - len(e[0])), None) for e in examples]


def prepare(teacher: distill.Teacher, examples: list, cfg, pad_id: int, folder: Path, device="cpu"):
    """(dataset, collator, loss, record) of the run: the original's cache of ``examples`` made or reused."""
    spec = PassSpec(cfg.offset_top_k, cfg.seq_len, cfg.micro_batch, cfg.max_memory)
    cache, how = distill.ensure_cache(teacher, teacher_rows(examples, pad_id), spec, folder, device,
                                      command="train --original-offset")
    data = distill.DistillDataset(examples, cache)
    rec = {"teacher": teacher.name, "teacher_fingerprint": teacher.fingerprint["id"], "top_k": cfg.offset_top_k,
           "cache": str(cache.folder), "cache_key": cache.manifest["key"], "examples": len(examples),
           "loss": "CE of log q + log p_original(top-k + rest) - log p_pruned"} | how
    return data, distill.collate(pad_id), OffsetLoss(), rec

