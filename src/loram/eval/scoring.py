"""Scoring primitives: summed log-likelihood of labelled tokens, and batched greedy generation.

A scored sequence is (input_ids, labels) with labels[t] = input_ids[t] where token t is scored
and -100 elsewhere (the training convention of loram.data). Token t is predicted from the
logits at position t-1, so

    loglik(seq) = sum_{t >= 1, labels[t] != -100} log softmax(logits[t-1])[labels[t]]

Batches are right-padded (attention mask 0 on pads, which never carry labels) and sorted by
length so padding stays small; the log-softmax runs in fp32 on the scored positions only, so
the full [batch, seq, vocab] probabilities never exist.

Everything but the log-probabilities of a padded batch is shared by a model in memory and one
streamed layer by layer (``score_sequences`` takes either): same batches, same padding, same fp32
log-softmax (``token_logprobs``), same sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..progress import bar

IGNORE = -100


@dataclass(frozen=True)
class SeqScore:
    loglik: float  # sum of log-probabilities of the scored tokens (natural log)
    tokens: int  # number of scored tokens


@dataclass
class Batch:
    """Sequences padded to one length: ``rows`` are their indices in the caller's list."""

    rows: list[int]
    ids: torch.Tensor  # [b, n] token ids, right-padded
    labels: torch.Tensor  # [b, n] IGNORE on unscored positions and pads
    mask: torch.Tensor  # [b, n] attention mask, 0 on pads

    @property
    def scored(self) -> torch.Tensor:
        """[b, n-1] bool: whether the logits at position t-1 score label t."""
        return self.labels[:, 1:] != IGNORE

    def targets(self, device) -> torch.Tensor:
        """The scored labels, in the order of ``scored.nonzero()``."""
        return self.labels[:, 1:][self.scored].to(device)


# Given the padded batches, yield per batch the log-probabilities of its scored tokens (in the
# order of Batch.scored.nonzero()). The only part that differs between a model in memory
# (``model_logprobs``) and one streamed layer by layer (eval.streamed.StreamedLM.batch_logprobs).
LogprobFn = Callable[[list[Batch]], Iterator[torch.Tensor]]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def padded_batches(seqs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> list[Batch]:
    """Batches of ``batch_size`` sequences, longest first (little padding), right-padded with ``pad_id``."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out = []
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        n = max(len(seqs[i][0]) for i in chunk)
        ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
        lab = torch.full((len(chunk), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for j, i in enumerate(chunk):
            k = len(seqs[i][0])
            ids[j, :k] = torch.tensor(seqs[i][0])
            lab[j, :k] = torch.tensor(seqs[i][1])
            mask[j, :k] = 1
        out.append(Batch(chunk, ids, lab, mask))
    return out


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, in fp32: [rows, vocab] logits of scored positions only."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp.gather(1, targets.unsqueeze(1)).squeeze(1)


def model_logprobs(model) -> LogprobFn:
    """The LogprobFn of a model in memory: one forward pass per batch."""
    dev = _device(model)

    def run(batches: list[Batch]) -> Iterator[torch.Tensor]:
        for b in batches:
            logits = model(input_ids=b.ids.to(dev), attention_mask=b.mask.to(dev), use_cache=False).logits
            yield token_logprobs(logits[:, :-1][b.scored.to(dev)], b.targets(dev))

    return run


def score_sequences(model, seqs: list[tuple[list[int], list[int]]], batch_size: int = 8,
                    pad_id: int = 0) -> list[SeqScore]:
    """SeqScore of every (input_ids, labels) pair, in the order given.

    ``model``: a model in memory, or any object with a ``batch_logprobs`` LogprobFn (a streamed model)."""
    batches = padded_batches(seqs, batch_size, pad_id)
    logprobs = getattr(model, "batch_logprobs", None) or model_logprobs(model)
    out: list[SeqScore | None] = [None] * len(seqs)
    with torch.no_grad(), bar(len(seqs), "scoring", unit="seq") as b:
        for batch, tok_lp in zip(batches, logprobs(batches)):
            keep = batch.scored
            row_of = keep.nonzero()[:, 0]
            sums = torch.zeros(len(batch.rows), dtype=torch.float64).index_add_(0, row_of, tok_lp.double().cpu())
            counts = keep.sum(1)
            for j, i in enumerate(batch.rows):
                out[i] = SeqScore(float(sums[j]), int(counts[j]))
            b.update(len(batch.rows))
    return out  # type: ignore[return-value]


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt: wrapped in the chat template (as an assistant turn opener) or plain."""
    if chat and getattr(tok, "chat_template", None):
        from ..data import chat_template_ids

        return chat_template_ids(tok, [{"role": "user", "content": prompt}], gen_prompt=True)
    return list(tok(prompt, add_special_tokens=True)["input_ids"])


def generate_texts(model, tok, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16, chat: bool = True,
                   stop: tuple[str, ...] = (), temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Completions of ``prompts`` (greedy unless temperature > 0), cut at the first stop string."""
    dev = _device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = [prompt_ids(tok, p, chat) for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    out: list[str] = [""] * len(enc)
    torch.manual_seed(seed)
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad)
    if temperature > 0:
        kw.update(temperature=temperature, top_p=1.0, top_k=0)
    with torch.no_grad(), bar(len(enc), "generating", unit="prompt") as b:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            n = max(len(enc[i]) for i in chunk)
            # left padding: every prompt ends at the same position, where generation starts
            ids = torch.full((len(chunk), n), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for j, i in enumerate(chunk):
                ids[j, n - len(enc[i]):] = torch.tensor(enc[i])
                mask[j, n - len(enc[i]):] = 1
            gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw)
            for j, i in enumerate(chunk):
                text = tok.decode(gen[j, n:], skip_special_tokens=True)
                out[i] = cut_at_stop(text, stop)
            b.update(len(chunk))
    return out


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]
