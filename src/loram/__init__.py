"""loram: train small, infer large. LoRA on a pruned LLM, recovered exactly to the original model.

    prune   -> pruned model folder + loram_plan.json       loram.prune.prune
    train   -> adapter for the pruned model                loram.train.train
    recover -> standard PEFT adapter for the original      loram.recover.recover / recover_tensors
    merge   -> merged original model                       loram.merge.merge
"""

from ._version import __version__
from .errors import LoramError
from .prune_plan import PrunePlan


def load_pruned(path, quantize=None, dtype=None, device_map="cpu"):
    """Load a pruned model folder in one call (see loram.loading.load_pruned)."""
    import torch

    from .loading import load_pruned as _load

    return _load(path, quantize=quantize, dtype=dtype or torch.float32, device_map=device_map)


__all__ = ["LoramError", "PrunePlan", "load_pruned", "__version__"]
