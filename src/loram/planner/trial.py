"""`loram plan --try`: build a plan with random weights and time a few LoRA steps on it.

What it measures is set beside the planner's prediction (predict.py) for the same settings, so a
user sees how far the memory model is from this machine before committing to a run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..build import build_pruned_report
from ..configs import DEFAULT_TARGETS, TARGET_MODULES
from ..nf4 import QUANTIZED_MARK
from ..procmem import PeakRSS, rss_gb
from ..prune_plan import PrunePlan
from .memory import GB
from .predict import predict


# On CPU the trial computes in fp32 over bf16/NF4 storage: with torch 2.13 on this CPU a bf16 matmul
# of two row-major operands, which is every frozen layer's input gradient (grad_out @ W), runs at
# ~0.1 GFLOP/s against ~10 for fp32 (measured, e.g. 64x4300 @ 4300x8192: bf16 50 s, fp32 0.7 s).
class _ChunkedLinear(torch.autograd.Function):
    """y = x W^T with W frozen in its storage dtype, cast to x's dtype CHUNK rows at a time in
    forward and backward, so no full-size copy of W is ever made or saved."""

    @staticmethod
    def forward(ctx, x, weight, chunk):
        ctx.save_for_backward(weight)
        ctx.chunk = chunk
        out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
        for i in range(0, weight.shape[0], chunk):
            out[..., i : i + chunk] = x @ weight[i : i + chunk].to(x.dtype).t()
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        gx = torch.zeros(*grad.shape[:-1], weight.shape[1], dtype=grad.dtype, device=grad.device)
        for i in range(0, weight.shape[0], ctx.chunk):
            gx += grad[..., i : i + ctx.chunk] @ weight[i : i + ctx.chunk].to(grad.dtype)
        return gx, None, None


class FrozenLinear(nn.Module):
    """A frozen bias-free Linear computing in its input's dtype without copying the whole weight."""

    def __init__(self, weight: nn.Parameter, chunk_rows: int = 8192):
        super().__init__()
        self.weight, self.chunk = weight, chunk_rows
        self.weight.requires_grad_(False)

    def forward(self, x):
        return _ChunkedLinear.apply(x, self.weight, self.chunk)


def fp32_compute(model) -> None:
    """Keep the storage (bf16 embeddings/lm_head, NF4 linears), compute in fp32 (see above)."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.float32
    emb = model.get_input_embeddings()
    if emb.weight.dtype != torch.float32:
        emb.register_forward_hook(lambda mod, inp, out: out.float())
    head = model.get_output_embeddings()
    if head is not None and head.weight.dtype != torch.float32 and getattr(head, "bias", None) is None:
        model.set_output_embeddings(FrozenLinear(head.weight))


@dataclass
class TrialReport:
    batch: int
    seq_len: int
    steps: int
    rank: int
    step_s: list
    losses: list
    peak_rss_gb: float  # process high-water mark during the steps (model + training)
    peak_cuda_gb: float | None
    trainable_params: int

    @property
    def s_per_step(self) -> float:
        # the first step also pays one-time allocations; report the mean of the later ones when there are
        later = self.step_s[1:] or self.step_s
        return sum(later) / len(later)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.seq_len / self.s_per_step


def trial_steps(model, seq_len: int, steps: int = 2, batch: int = 1, rank: int = 8, grad_checkpointing: bool = True,
                lr: float = 1e-4, seed: int = 0, on_step=None) -> TrialReport:
    """Run ``steps`` LoRA steps (r ``rank``, all seven targets, AdamW) on random tokens and measure them.

    Mirrors `loram train`: PEFT LoRA (alpha 2r, dropout 0.05), non-reentrant gradient checkpointing.
    NF4 on CPU: fp32 compute over the model's storage (``fp32_compute``); else bf16 / fp16 autocast for
    bf16 / fp16 models.
    ``on_step(step, seconds, loss, peak_rss_gb)`` is called after each step (progress of long runs).
    """
    from peft import LoraConfig, get_peft_model


    dev = next(p.device for p in model.parameters() if p.device.type != "meta")
    fp32 = dev.type == "cpu" and getattr(model, QUANTIZED_MARK, None) == "nf4"
    if fp32:
        fp32_compute(model)
    model.config.use_cache = False
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, task_type="CAUSAL_LM",
                                          target_modules=[TARGET_MODULES[t] for t in DEFAULT_TARGETS]))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen).to(dev)
    half = model.get_input_embeddings().weight.dtype  # bf16 / fp16 weights: autocast in it, as the Trainer does
    half = None if fp32 or half not in (torch.bfloat16, torch.float16) else half
    pm.train()
    peak, times, losses = PeakRSS(), [], []
    for _ in range(steps):
        t0 = time.time()
        with torch.autocast(dev.type, dtype=half or torch.bfloat16, enabled=half is not None):
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
        losses.append(float(loss.detach()))
        del loss
        if on_step is not None:
            on_step(len(times), times[-1], losses[-1], peak.gb())
    return TrialReport(batch, seq_len, steps, rank, times, losses, peak.gb(), PeakRSS.cuda_gb(), sum(p.numel() for p in params))


def try_plan(config, plan: PrunePlan, settings, quantize: str | None, steps: int = 2) -> dict:
    """`loram plan --try`: build ``plan`` with random weights, run ``steps`` LoRA steps on the device the
    prediction is for (``settings.device``; the CPU when this machine has no CUDA, compared then with the
    CPU prediction), and return the measured peak beside the planner's prediction for the same settings:
    on a GPU torch.cuda.max_memory_allocated (vs the prediction's ``allocated``) and max_memory_reserved
    (vs ``allocated`` + the allocator's reserve); on the CPU the RSS above the RSS before building."""
    from ..device import DTYPES, default_device

    here = "cuda" if settings.device == "cuda" and torch.cuda.is_available() else "cpu"
    s = replace(settings, device=here)
    dtype = DTYPES[s.compute]  # as `loram train`: weights (NF4: everything but the linears) in the compute dtype
    baseline = rss_gb()
    model, built = build_pruned_report(config, plan, source="random", quantize=quantize, dtype=dtype, compute_dtype=dtype)
    if here == "cuda":
        device = default_device()
        torch.cuda.reset_peak_memory_stats(device)
        model.to(device)
    r = trial_steps(model, s.seq_len, steps=steps, batch=s.micro_batch, rank=s.rank, grad_checkpointing=s.grad_checkpointing)
    scheme = "QLoRAM" if quantize == "nf4" else "LoRAM"
    est = predict(config, plan, s).schemes[scheme]
    if here == "cuda":
        measured, pred = torch.cuda.max_memory_allocated(device) / GB, est.allocated / GB
        reserved = {"cuda_reserved_gb": torch.cuda.max_memory_reserved(device) / GB,
                    "predicted_reserved_gb": (est.allocated + est.terms["gpu_allocator_reserve"]) / GB}
    else:  # a tiny trial can peak at the baseline itself (nothing measurable above it): no error then
        measured, pred, reserved = r.peak_rss_gb - baseline, est.gb, {}
    return {"scheme": scheme, "device": here, "precision": s.compute, "build_s": built.seconds, "params": built.params,
            "measured_gb": measured, "predicted_gb": pred, "error": (pred - measured) / measured if measured > 0 else None,
            **reserved, "s_per_step": r.s_per_step,
            "tokens_per_s": r.tokens_per_s, "peak_rss_gb": r.peak_rss_gb, "peak_cuda_gb": r.peak_cuda_gb, "steps": r.steps}
