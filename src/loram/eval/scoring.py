"""Scoring primitives: summed log-likelihood of labelled tokens, and batched greedy generation.

A scored sequence is (input_ids, labels) with labels[t] = input_ids[t] where token t is scored
and -100 elsewhere (the training convention of loram.data). Token t is predicted from the
logits at position t-1, so

    loglik(seq) = sum_{t >= 1, labels[t] != -100} log softmax(logits[t-1])[labels[t]]

Batches are right-padded (attention mask 0 on pads, which never carry labels) and sorted by
length so padding stays small; the log-softmax runs in fp32 on the scored positions only, so
the full [batch, seq, vocab] probabilities never exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..progress import bar

IGNORE = -100


@dataclass(frozen=True)
class SeqScore:
    loglik: float  # sum of log-probabilities of the scored tokens (natural log)
    tokens: int  # number of scored tokens


def _device(model) -> torch.device:
    return next(model.parameters()).device


def score_sequences(model, seqs: list[tuple[list[int], list[int]]], batch_size: int = 8,
                    pad_id: int = 0) -> list[SeqScore]:
    """SeqScore of every (input_ids, labels) pair, in the order given."""
    dev = _device(model)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list[SeqScore | None] = [None] * len(seqs)
    with torch.no_grad(), bar(len(seqs), "scoring", unit="seq") as b:
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
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
            tgt = lab[:, 1:].to(dev)
            keep = tgt != IGNORE
            lp = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)
            tok_lp = lp.gather(1, tgt[keep].unsqueeze(1)).squeeze(1)
            row_of = keep.nonzero()[:, 0]
            sums = torch.zeros(len(chunk), dtype=torch.float64, device=dev).index_add_(0, row_of, tok_lp.double())
            counts = keep.sum(1)
            for j, i in enumerate(chunk):
                out[i] = SeqScore(float(sums[j]), int(counts[j]))
            b.update(len(chunk))
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
