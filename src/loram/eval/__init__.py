"""`loram eval`: perplexity, multiple choice, generation tasks and an lm-evaluation-harness bridge.

Library entry points (each takes a loaded model + tokenizer, see the module of each):

    perplexity_rows / perplexity_text    ppl.py         instruction data (response tokens) / raw text
    multiple_choice                      mc.py          {"query","choices","gold"} by log-likelihood
    exact_match / gsm8k                  generation.py  greedy answers vs targets / final numbers
    humaneval                            humaneval.py   pass@k, programs run in a sandboxed subprocess
    lm_eval_tasks                        harness.py     any lm-evaluation-harness task, in memory

``load_for_eval`` loads an original model, a pruned folder or a merged folder (+ an adapter,
merged into the weights for speed; on a tied model an lm_head or embed_tokens update unties the two
ends first, as PEFT attached and `loram merge` do) through loram.merge.load_with_adapter; ``runner.evaluate(...,
stream=True)`` scores (--ppl, --mc) a model larger than memory one decoder layer at a time
(streamed.py: ``open_streamed`` gives a model that perplexity_rows, perplexity_text and multiple_choice accept).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..lora_delta import untie_adapted_ends
from ..merge import load_with_adapter
from .generation import GenResult, exact_match, gsm8k
from .mc import MCResult, multiple_choice
from .ppl import Perplexity, perplexity_rows, perplexity_text


@dataclass
class EvalResult:
    """One number of one task, as printed in the table and written by --json."""

    task: str
    metric: str
    value: float
    n: int
    extra: dict = field(default_factory=dict)


def load_for_eval(model: str, adapter: str | None = None, dtype=torch.float32, merge: bool = True):
    """(model, tokenizer) ready for scoring: the adapter is merged into the weights (same outputs, faster).

    A tied model whose adapter changes lm_head or embed_tokens is untied first (lora_delta.untie_adapted_ends):
    PEFT's merge would fold an lm_head update into the shared tensor and change the embeddings too, while
    the adapter (PEFT attached, `loram merge`, the streamed evaluation) changes only its own end."""

    m, tok = load_with_adapter(model, adapter, dtype=dtype)
    if adapter is not None and merge:
        untie_adapted_ends(m)
        m = m.merge_and_unload()
    m.eval()
    return m, tok


__all__ = ["EvalResult", "GenResult", "MCResult", "Perplexity", "exact_match", "gsm8k", "load_for_eval",
           "multiple_choice", "perplexity_rows", "perplexity_text"]
