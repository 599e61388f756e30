"""Causal-LM cross-entropy computed over chunks of the sequence, without ever holding full logits.

The stock loss (transformers' ForCausalLMLoss) materialises logits for every position, upcasts them
to fp32 and takes log-softmax: batch x seq x vocab x 4 bytes for each of logits, log-probabilities
and their two gradients, ~0.26 GB at seq 512 and vocab 32000, ~0.4 GB at vocab 49152. On a model
whose frozen weights are small (a pruned base) that is a large share of the training peak.

``chunked_causal_lm_loss`` computes lm_head + cross-entropy ``chunk`` positions at a time, each
chunk under non-reentrant ``torch.utils.checkpoint``: the forward keeps only the chunk's hidden
states (a view of a tensor that is alive anyway) and the backward recomputes one chunk's logits at
a time. Peak logit memory is chunk/seq of the stock one; the cost is one extra lm_head matmul per
position. The value is the stock loss (sum over non-ignored targets / their count): same
shift (position t predicts label t+1), same ignore_index.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _sum_over_chunks(fn, lm_head, sliced: list, const: tuple = (), chunk: int = 0) -> torch.Tensor:
    """Sum of ``fn(lm_head, *sliced chunks, *const)`` over chunks of ``chunk`` positions (dim 1 of every tensor in
    ``sliced``; 0: one chunk). Chunked, a chunk whose hidden states (``sliced[0]``) need a gradient runs under
    non-reentrant checkpoint, so the backward holds one chunk's logits at a time. Every chunked loss below
    (LM, distillation, offset, anchor) goes through here."""
    n = sliced[0].shape[1]
    step = chunk or max(n, 1)
    total = sliced[0].new_zeros((), dtype=torch.float32)
    for s in range(0, n, step):
        args = (lm_head, *(x[:, s:s + step] for x in sliced), *const)
        if chunk and torch.is_grad_enabled() and args[1].requires_grad:
            total = total + checkpoint(fn, *args, use_reentrant=False)
        else:
            total = total + fn(*args)
    return total


def _chunk_loss_sum(lm_head, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = lm_head(hidden).float()  # fp32 as the stock loss upcasts
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, lm_head, labels: torch.Tensor, chunk: int = 128,
                           ignore_index: int = IGNORE_INDEX, num_items=None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``lm_head(hidden)`` against ``labels``, ``chunk`` positions at a time.

    hidden: [batch, seq, d] final hidden states (after the final norm); labels: [batch, seq], the
    input ids or -100 where ignored (not shifted: the shift is done here, as the stock loss does).
    lm_head: any callable hidden -> logits (nn.Linear, a PEFT-wrapped head, ...).
    num_items: divide the summed loss by this instead of this batch's target count (the Trainer's
    ``num_items_in_batch``: targets in the whole accumulated batch, so gradient accumulation is exact).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    h, y = hidden[:, :-1], labels[:, 1:].to(hidden.device)
    n = (y != ignore_index).sum()
    total = _sum_over_chunks(_chunk_loss_sum, lm_head, [h, y], (ignore_index,), chunk)
    if num_items is not None:
        return total / num_items
    # all targets ignored: 0/0 would be nan, as the stock mean is; keep that behaviour
    return total / n


@contextmanager
def hidden_states_as_logits(causal_lm):
    """Inside: ``causal_lm(...).logits`` are the final hidden states (lm_head replaced by identity);
    yields the real head for ``chunked_causal_lm_loss``. The forward still runs through whatever wraps
    the model (PEFT, DDP), so hooks, gradient checkpointing and gradient sync behave as usual."""
    head = causal_lm.lm_head
    causal_lm.lm_head = torch.nn.Identity()
    try:
        yield head
    finally:
        causal_lm.lm_head = head


# ---- distillation: KL(teacher || student) on the teacher's cached top-k (loram.distill) ----------------
# The teacher's next-token distribution at each position is kept as its k most likely tokens (log-probs,
# token ids) and the log of the mass left outside them ("rest"). The student is compared on k + 1 outcomes:
# the k tokens and one bucket for every other token, so student mass put outside the teacher's top-k is
# penalised (a plain top-k renormalisation would not see it). With k = vocab the bucket is empty and the
# value is the full KL.
TEACHER_KEYS = ("teacher_logprobs", "teacher_indices", "teacher_rest")


def _plogp(logp: torch.Tensor) -> torch.Tensor:
    """p log p of the teacher (a constant), 0 where p underflowed to 0 (no 0 * -inf)."""
    p = logp.exp()
    return torch.where(p > 0, p * logp, torch.zeros_like(p))


def outside_logmass(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass of ``logp`` [..., vocab] outside the tokens ``idx`` [..., k] (-inf when k = vocab):
    the teacher's "rest" when its cache is written (loram.distill) and the student's bucket in the loss below."""
    return logp.scatter(-1, idx, float("-inf")).logsumexp(-1)


def _chunk_distill_sum(lm_head, hidden, labels, t_logp, t_idx, t_rest, temperature: float, lm_weight: float,
                       ignore_index: int) -> torch.Tensor:
    logits = lm_head(hidden).float()
    logq = torch.log_softmax(logits / temperature, dim=-1)
    idx = t_idx.long()
    kl = (_plogp(t_logp) - t_logp.exp() * logq.gather(-1, idx)).sum(-1)  # [b, c]: the k tokens
    if idx.shape[-1] < logq.shape[-1]:  # the bucket: log of the student's mass outside the teacher's top-k
        kl = kl + _plogp(t_rest) - t_rest.exp() * outside_logmass(logq, idx)
    valid = labels != ignore_index
    total = (kl * valid).sum() * temperature ** 2  # T^2 keeps the gradient's scale independent of T (Hinton et al.)
    if lm_weight:
        total = total + lm_weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=ignore_index, reduction="sum")
    return total


def chunked_distill_loss(hidden: torch.Tensor, lm_head, labels: torch.Tensor, teacher: dict, temperature: float = 1.0,
                         lm_weight: float = 0.0, chunk: int = 0, ignore_index: int = IGNORE_INDEX, num_items=None) -> torch.Tensor:
    """T^2 x KL(teacher || student) + lm_weight x cross-entropy, each a mean over the positions that predict a
    label (the same positions and count as ``chunked_causal_lm_loss``, so gradient accumulation stays exact).

    teacher: TEACHER_KEYS -> [batch, seq-1, k] log-probs (at temperature T), [batch, seq-1, k] token ids and
    [batch, seq-1] log of the remaining mass, for the positions 0..seq-2 (position t predicts token t+1).
    chunk: positions per lm_head call, each under checkpoint as in the LM loss (0: all at once, no checkpoint:
    the full logits and their gradient are kept, as transformers' own loss keeps them)."""
    h, y = hidden[:, :-1], labels[:, 1:].to(hidden.device)
    t = [teacher[k].to(hidden.device) for k in TEACHER_KEYS]
    total = _sum_over_chunks(_chunk_distill_sum, lm_head, [h, y, *t], (temperature, lm_weight, ignore_index), chunk)
    return total / (num_items if num_items is not None else (y != ignore_index).sum())


# ---- the original's offset: train the update as it acts on the original (loram.offset) ----------------
# log p_combined = log q + (log p_original - log p_pruned): the student q (pruned + LoRA) is scored through the
# original's next-token distribution. The original is kept as its cached top-k + rest bucket; the pruned
# base (adapter off, no gradient) is compared on the same k + 1 outcomes, and the tokens outside the top-k
# share the rest bucket's ratio. With k = vocab the offset is exact, and at the start of training (q = the
# pruned base) the combined distribution IS the original's.
def offset_log_probs(logits: torch.Tensor, base_logits: torch.Tensor, t_logp, t_idx, t_rest) -> torch.Tensor:
    """log_softmax(logits) + (log p_original - log p_pruned base) [..., vocab], normalised over the vocabulary."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        logp = torch.log_softmax(base_logits.float(), dim=-1)
        idx = t_idx.long()
        rest = torch.where(torch.isinf(t_rest), torch.zeros_like(t_rest), t_rest - outside_logmass(logp, idx))  # k = vocab: none
        off = rest.unsqueeze(-1).expand_as(logp).clone()
        off.scatter_(-1, idx, t_logp - logp.gather(-1, idx))
    return torch.log_softmax(logq + off, dim=-1)  # renormalised: exact with k = vocab, the bucket's approximation otherwise


def _chunk_offset_sum(lm_head, hidden, base_hidden, labels, t_logp, t_idx, t_rest, ignore_index: int) -> torch.Tensor:
    with torch.no_grad():
        base_logits = lm_head(base_hidden)
    logc = offset_log_probs(lm_head(hidden), base_logits, t_logp, t_idx, t_rest)
    return F.nll_loss(logc.reshape(-1, logc.shape[-1]), labels.reshape(-1), ignore_index=ignore_index, reduction="sum")


def chunked_offset_loss(hidden: torch.Tensor, base_hidden: torch.Tensor, lm_head, labels: torch.Tensor, teacher: dict,
                        chunk: int = 0, ignore_index: int = IGNORE_INDEX, num_items=None) -> torch.Tensor:
    """Mean next-token cross-entropy of the combined distribution (offset_log_probs) against ``labels``: the same
    positions, count and gradient-accumulation rule as ``chunked_causal_lm_loss``.

    hidden / base_hidden: [batch, seq, d] final hidden states of the student and of the pruned base (adapter off);
    teacher: TEACHER_KEYS -> the original's top-k at temperature 1 for positions 0..seq-2 (``chunked_distill_loss``).
    chunk: positions per lm_head call, each under checkpoint (0: all at once)."""
    h, hb, y = hidden[:, :-1], base_hidden[:, :-1], labels[:, 1:].to(hidden.device)
    t = [teacher[k].to(hidden.device) for k in TEACHER_KEYS]
    total = _sum_over_chunks(_chunk_offset_sum, lm_head, [h, hb, y, *t], (ignore_index,), chunk)
    return total / (num_items if num_items is not None else (y != ignore_index).sum())


# ---- the anchor: keep the update from moving the model on general text (loram.anchor) ------------------
# KL(p_base || p_adapted) over the full vocabulary at every position of an anchor block: p_base is the same
# model with the adapter off (no gradient). It is 0, with a zero gradient, while the update is zero, and it
# grows only as the update changes what the model predicts on text that is not the task.
def _chunk_anchor_sum(lm_head, hidden, base_hidden) -> torch.Tensor:
    logq = torch.log_softmax(lm_head(hidden).float(), dim=-1)
    with torch.no_grad():
        logp = torch.log_softmax(lm_head(base_hidden).float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum()


def chunked_anchor_kl(hidden: torch.Tensor, base_hidden: torch.Tensor, lm_head, chunk: int = 0) -> torch.Tensor:
    """Mean over positions of KL(base || adapted): hidden / base_hidden [batch, seq, d] final hidden states of the
    adapted model and of the same model with its adapter off. chunk: positions per lm_head call, each under
    checkpoint (0: all at once)."""
    total = _sum_over_chunks(_chunk_anchor_sum, lm_head, [hidden, base_hidden], (), chunk)
    return total / (hidden.shape[0] * hidden.shape[1])
