"""Layer-streamed structured pruning: the scores and the pruned folder without the whole model in memory.

    magnitude  each decoder layer of the range read from the safetensors, scored, dropped
               (no embeddings, no lm_head: the decoder layers alone)
    random     the config alone (no weight is read until the pruned folder is written)
    wanda-sp   one streamed forward over the calibration sequences: layer i is loaded, hooks on its
               linears accumulate ||X_j||^2 while every sequence goes through it, it is scored and
               dropped, and its outputs are the next layer's inputs
    taylor     forward layer by layer, keeping the hidden states at the boundaries of the layers the
               backward pass goes through (fp32); the loss from the final norm + lm_head with the
               model's own loss function; then backward from the last layer down to the first scored
               one: reload layer i (its weights require grad only inside the range), recompute its
               forward from the saved input, backprop the incoming gradient, so its weights
               accumulate G = sum_s dL_s/dW over the sequences, score |W * G|, drop the layer
    fisher     taylor's passes; in the backward, layer i's unit sums of W * dL_s/dW are squared after
               each sequence s's backprop (structured.add_fisher) and its .grad cleared

The per-unit arithmetic is structured.py's (``layer_scores`` with ``magnitude_per`` / ``taylor_per``
/ ``wanda_sp_per``, ``add_fisher``) on the same stock decoder-layer modules, so the scores equal the in-memory ones
up to floating-point summation order, and the plans are the same.

Resident: one decoder layer (in the compute dtype, on ``device``) + embeddings / final norm / lm_head
(wanda-sp, taylor) + the hidden states: taylor keeps (layers from the first scored one to the last)
x samples x seq_len x hidden fp32 values, e.g. 76 x 8 x 128 x 8192 x 4 B = 2.5 GB for a 70B.

The pruned folder is written layer by layer by build.write_pruned (kept rows / columns read through
Weights.read, one shard per decoder layer) in the checkpoint's own dtype: a bf16 checkpoint gives a
bf16 pruned folder (the in-memory path writes what it computed in, fp32).

--compensate (compensate.streamed_refits): one more streamed forward over the calibration sequences
through the ORIGINAL layers; layer i's o/down Grams are collected as it runs and its refitted kept
columns replace the slices as write_pruned writes layer i (one layer's Grams resident).

Sources: a local safetensors folder, or a hub id downloaded first (loading.source_folder, hub.download).
A .gguf (and the `smollm2` alias) is pruned in memory only: transformers' GGUF loader dequantises the
whole model in memory before loram sees a tensor, so streaming afterwards would save little; convert
it once to a safetensors folder (load_model + save_pretrained) to stream it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..build import write_pruned
from ..errors import LoramError
from ..families import geometry
from ..fingerprint import base_fingerprint
from ..io import load_config, load_tokenizer
from ..loading import check_checkpoint, source_folder, streamable_source
from ..procmem import PeakRSS
from ..progress import track
from ..prune_plan import PrunePlan, parse_layers
from ..pruned_model import count_params, skeleton
from ..stream import Captured, LayerStream, run_block
from ..weights import Weights
from .compensate import DAMP, plan_calibration, streamed_refits
from .decide import STREAMING
from .report import PruneReport
from .structured import (CALIBRATED, GRADIENT, add_fisher, check_finite, input_norms, layer_scores, magnitude_per, select,
                         taylor_per, wanda_sp_per)

class _LayersOnly(LayerStream):
    """A LayerStream without embeddings, final norm and lm_head: magnitude reads decoder layers only."""

    def _load_outer(self) -> None:
        pass


# ---- where the weights are ------------------------------------------------------------------------
def check_streamable(model_name: str | Path) -> str:
    """``model_name``'s local folder or hub id; refuses a GGUF model (loading.streamable_source) before anything is read."""
    return streamable_source(model_name, STREAMING)


# ---- scores ---------------------------------------------------------------------------------------------
def _load(ls: LayerStream, i: int, requires_grad: bool = False):
    block = ls.load(i, requires_grad)
    check_finite(block, f"model.layers.{i}.")  # NaN scores would still sort into a plan
    return block


def _magnitude(ls: LayerStream, g, layers: range) -> dict:
    scores = {}
    for i in track(layers, "magnitude: layers", unit="layer"):
        scores[i] = layer_scores(_load(ls, i), g, magnitude_per)
        ls.unload(i)
    return scores


def _wanda_sp(ls: LayerStream, g, layers: range, batches: list[torch.Tensor]) -> dict:
    xs, scores = ls.inputs(batches), {}
    for i in track(range(layers.stop), "wanda-sp: forward", unit="layer"):
        block = _load(ls, i)
        if i in layers:
            with input_norms([block]) as norms:
                xs = [ls.run(block, x) for x in xs]
            scores[i] = layer_scores(block, g, wanda_sp_per(norms))
        else:
            xs = [ls.run(block, x) for x in xs]
        ls.unload(i)
    return scores


def _head_grad(ls: LayerStream, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """dL/d(last hidden state) of one sequence, L computed as the model's forward with labels computes it."""
    h = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = ls.head(h)
        loss = ls.model.loss_function(logits=logits, labels=ids.to(h.device), vocab_size=ls.config.vocab_size)
        if not torch.isfinite(loss):
            raise LoramError("calibration loss is not finite: check the model weights or --calib-data")
        loss.backward()
    return h.grad


def _backprop(block, c: Captured, grad_out: torch.Tensor, need_input: bool) -> torch.Tensor | None:
    """Recompute ``block`` on its saved input and backprop ``grad_out``: its weights' .grad accumulate,
    the gradient at its input (for the layer below) is returned when asked for."""
    x = c.hidden.detach().requires_grad_(need_input)
    with torch.enable_grad():
        run_block(block, Captured(x, c.kwargs)).backward(grad_out)
    return x.grad if need_input else None


def _gradient(ls: LayerStream, g, layers: range, batches: list[torch.Tensor], method: str) -> dict:
    """taylor / fisher: a streamed forward keeping the layer inputs, then a streamed backward."""
    for p in ls.model.parameters():  # embeddings, norm, lm_head: frozen, as in the in-memory path
        p.requires_grad_(False)
    xs, saved = ls.inputs(batches), {}
    for i in track(range(ls.n_layers), f"{method}: forward", unit="layer"):
        if i >= layers.start:
            saved[i] = xs  # the backward pass recomputes layer i from these
        block = _load(ls, i)
        xs = [ls.run(block, x) for x in xs]
        ls.unload(i)
    grads = [_head_grad(ls, x.hidden, ids) for x, ids in zip(xs, batches)]
    del xs
    scores = {}
    for i in track(range(ls.n_layers - 1, layers.start - 1, -1), f"{method}: backward", unit="layer"):
        block = _load(ls, i, requires_grad=i in layers)  # above the range only the input needs a gradient
        below = []
        for c, gr in zip(saved.pop(i), grads):
            below.append(_backprop(block, c, gr, need_input=i > layers.start))
            if method == "fisher" and i in layers:  # this sequence's gradient alone is in .grad
                add_fisher(scores, i, block, g)
                block.zero_grad(set_to_none=True)
        grads = below
        if method == "taylor" and i in layers:
            scores[i] = layer_scores(block, g, taylor_per)
        block.zero_grad(set_to_none=True)
        ls.unload(i)
    return scores


def streamed_importance(weights: Weights | str | Path, config, method: str, layers: range, batches=None,
                        dtype=torch.float32, device="cpu") -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (channel scores [F], group scores [K])} for magnitude / taylor / fisher / wanda-sp, one decoder
    layer resident at a time (computed in ``dtype`` on ``device``); equal to structured.importance."""
    g = geometry(config)
    if method == "magnitude":
        return _magnitude(_LayersOnly(weights, config, dtype=dtype, device=device), g, layers)
    ls = LayerStream(weights, config, dtype=dtype, device=device)
    check_finite(ls.model)  # embeddings, final norm, lm_head (the decoder layers are checked as they load)
    if method == "wanda-sp":
        return _wanda_sp(ls, g, layers, batches)
    if method in GRADIENT:
        return _gradient(ls, g, layers, batches, method)
    raise LoramError(f"streamed scores exist for magnitude, taylor, fisher and wanda-sp, not {method!r}")


# ---- the whole `loram prune`, streamed -------------------------------------------------------------------
def prune_streamed(model_name: str, out: str | Path, method: str, ratio: float, attn_ratio: float, layers: str | None,
                   seed: int, calib_data: str | None, calib_samples: int, calib_seq_len: int, overwrite: bool,
                   dtype=torch.float32, verify_base: str = "sampled", device="cpu", compensate: bool = False,
                   damp: float = DAMP, allocate: str = "uniform") -> PruneReport:
    """Structured `loram prune` (arguments checked by prune()) with one decoder layer in memory at a time."""
    t0, peak = time.time(), PeakRSS()
    tok = load_tokenizer(model_name)  # before any weight: a missing tokenizer fails in a second
    folder = source_folder(model_name, STREAMING)
    config = load_config(folder)
    weights = check_checkpoint(folder, config)  # headers against the config before a weight is read
    g = geometry(config)
    start, end = parse_layers(layers, g.n_layers)
    rng = range(start, end)
    fp = base_fingerprint(folder, verify=verify_base)
    scores = None
    batches, calib, comp = plan_calibration(tok, method, compensate, calib_data, calib_samples, calib_seq_len, damp)
    if method in CALIBRATED:
        scores = streamed_importance(weights, config, method, rng, batches, dtype, device)
    elif method == "magnitude":
        scores = streamed_importance(weights, config, method, rng, dtype=dtype, device=device)
    plan = PrunePlan(
        kind="structured", method=method, layers=(start, end), mlp_ratio=ratio, attn_ratio=attn_ratio, seed=seed,
        calibration=calib, base={"name": str(model_name), "config": config.to_dict(), "fingerprint": fp},
        pruned=select(g, method, rng, ratio, attn_ratio, seed, scores, allocate),
        compensation=comp, allocation=allocate,
    )
    n_orig, n_pruned = count_params(skeleton(config, None)), count_params(skeleton(config, plan))  # shapes, no weights
    plan.extra = {"params_original": n_orig, "params_pruned": n_pruned}
    refit = streamed_refits(weights, config, plan, batches, dtype, device, damp) if compensate else None  # layer by layer, as written
    write_pruned(config, plan, folder, out, dtype=weights.stored_dtype(), overwrite=overwrite, inputs=(calib_data,), command="prune",
                 refit=refit)
    return PruneReport(str(out), plan, n_orig, n_pruned, time.time() - t0, peak.gb())
