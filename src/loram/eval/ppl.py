"""Perplexity on instruction data (response tokens only) and on raw text (strided windows).

    ppl = exp( sum of -log p(token) over scored tokens / number of scored tokens )

Instruction rows are formatted exactly as for training (loram.data.encode: chat template,
labels on the assistant turns only), so a model's eval perplexity and its training loss measure
the same thing. Rows longer than ``seq_len`` are cut to their first ``seq_len`` tokens.

Raw text is tokenized once and scored in windows of ``seq_len`` tokens, each ``stride`` tokens
after the previous one; a window scores only the tokens no earlier window scored, so every
token but the first is scored exactly once, with at least seq_len - stride tokens of context
(stride = seq_len, the default: nearly disjoint windows; smaller strides: more context, more
compute). Windows overlap by at least one token, so no token is scored without context.

Training's held-out sets (`loram train/align --eval`) are already encoded examples: they go
through ``perplexity_examples``, the same scoring, in eval mode and the run's precision.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..data import encode
from ..errors import LoramError
from .scoring import IGNORE, score_sequences


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int
    sequences: int
    truncated: int = 0


def _result(scores, truncated: int = 0) -> Perplexity:
    n = sum(s.tokens for s in scores)
    if n == 0:
        raise LoramError("no tokens to score: the evaluation data has no response tokens (or is empty)")
    nll = -sum(s.loglik for s in scores) / n
    return Perplexity(math.exp(nll), nll, n, len(scores), truncated)


def instruction_sequences(tok, rows: list[dict], seq_len: int = 1024) -> tuple[list, int]:
    """(input_ids, labels) of each row as formatted for training, and how many were truncated."""
    seqs, cut = [], 0
    for r in rows:
        ids, labels = encode(tok, r)
        if len(ids) > seq_len:
            ids, labels, cut = ids[:seq_len], labels[:seq_len], cut + 1
        if any(x != IGNORE for x in labels[1:]):
            seqs.append((ids, labels))
    return seqs, cut


def perplexity_rows(model, tok, rows: list[dict], seq_len: int = 1024, batch_size: int = 8) -> Perplexity:
    """Perplexity of the response tokens of instruction / chat rows (text rows: all tokens)."""
    seqs, cut = instruction_sequences(tok, rows, seq_len)
    return _result(score_sequences(model, seqs, batch_size, pad_id(tok)), cut)


def perplexity_of(model, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8) -> Perplexity:
    """Perplexity (and mean nll, scored tokens) of already encoded (input_ids, labels) examples."""
    return _result(score_sequences(model, examples, batch_size, pad_id))


def perplexity_examples(model, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 4,
                        autocast: torch.dtype | None = None) -> float:
    """Perplexity of encoded (input_ids, labels) examples, scored in eval mode (``autocast``: bf16/fp16
    autocast, the training run's precision); the model's train / eval mode is restored after."""
    loglik, tokens = loglik_sums(model, examples, pad_id, batch_size, autocast)
    # a set with no scored token reads as ppl 1 (as it always has) rather than failing a finished run
    return math.exp(-loglik / tokens) if tokens else 1.0


def loglik_sums(model, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 4,
                autocast: torch.dtype | None = None) -> tuple[float, int]:
    """(sum of log p over the scored tokens, scored tokens) of encoded examples: what ranks that each
    scored a share of a held-out set add up (loram.training) before taking exp(-sum / tokens)."""
    with scoring_mode(model, autocast):
        scores = score_sequences(model, examples, batch_size, pad_id)
    return sum(s.loglik for s in scores), sum(s.tokens for s in scores)


@contextmanager
def scoring_mode(model, autocast: torch.dtype | None = None):
    """Inside: ``model`` in eval mode (no dropout) under the training run's autocast; yields its device. The train /
    eval mode is restored after: held-out scoring (perplexity, align --distill's KL) runs in the middle of training."""
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        with torch.autocast(dev.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            yield dev
    finally:
        model.train(was)


def text_windows(ids: list[int], seq_len: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """Windows of <= seq_len tokens over one token stream; each scores only tokens no earlier window scored.

    The first window scores its tokens 1..; every later one ends ``stride`` tokens further and
    keeps the seq_len - stride tokens before its new ones as context. stride is capped at
    seq_len - 1 so each new token has at least one token of context inside its window.
    """
    if seq_len < 2:
        raise LoramError(f"--seq-len {seq_len} is too short: use at least 2")
    if not 0 < stride <= seq_len:
        raise LoramError(f"--stride {stride} must be between 1 and --seq-len {seq_len}")
    stride = min(stride, seq_len - 1)
    end = min(seq_len, len(ids))
    out = [(ids[:end], list(ids[:end]))]
    prev = end
    while prev < len(ids):
        end = min(prev + stride, len(ids))
        start = end - seq_len  # >= 1: the first window was full
        window = ids[start:end]
        out.append((window, [IGNORE] * (prev - start) + window[prev - start:]))
        prev = end
    return out


def perplexity_text(model, tok, text: str, seq_len: int = 512, stride: int | None = None,
                    batch_size: int = 4) -> Perplexity:
    """Perplexity of raw text in strided windows (see the module docstring)."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if len(ids) < 2:
        raise LoramError("the text has fewer than 2 tokens: nothing to score")
    windows = text_windows(ids, seq_len, stride or seq_len)
    return _result(score_sequences(model, windows, batch_size, pad_id(tok)))


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
