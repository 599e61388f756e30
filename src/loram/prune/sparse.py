"""Non-structured pruning (the paper's LoRAM-Unst and LoRAM-Semi): zeros inside the weights.

    loram prune MODEL -o OUT --method sparsegpt|wanda|magnitude --sparsity unstructured|N:M [--ratio R]

Every targeted linear (q, k, v, o, gate, up, down) of the plan's layer range keeps its shape and
gets exact zeros (see pattern.py for the patterns, sparsegpt.py and wanda.py for the methods).

Layer streaming (what lets SparseGPT prune a model far larger than its activations would allow):

    X_s  = input of decoder layer `start` for each calibration sequence s   (one forward, stopped there)
    for each layer i in start .. end-1:
        hooks on its linears accumulate the statistics of their inputs over every X_s
            sparsegpt: H = sum x x^T per distinct input   wanda: sum x_j^2 per input feature
        prune the layer's linears from those statistics, drop the statistics
        X_s <- layer_i(X_s) with the *pruned* weights        (later layers see what they will get)

so only one layer's statistics and one set of hidden states [samples, seq, hidden] are alive at
any time; the whole model's weights stay where they were loaded. q/k/v share one input (and one
Hessian), as do gate/up. Magnitude needs no data and no streaming.

Output: a pruned model folder with the original config and shapes, and a plan with kind "sparse":

    "sparse": {"pattern": "2:4", "ratio": 0.5, "sparsity": 0.4999,
               "modules": {"model.layers.4.self_attn.q_proj": 0.5, ...}}   (achieved zero fraction)

Recovery of an adapter trained on it is the identity on the tensors (recover.py); the zeros are
``sparse_masks(model)``, which alignment re-applies after every optimizer step.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LoramError
from ..families import ROLES, decoder_layers, geometry, layer_module, module_name, weight_name
from ..fingerprint import base_fingerprint
from ..io import atomic_dir, check_output, load_config, load_tokenizer, releases_locks
from ..loading import PLAN_ATTR, load_model
from ..procmem import PeakRSS
from ..progress import track
from ..prune_plan import PrunePlan, parse_layers
from ..pruned_model import count_params, save_pruned
from .pattern import Pattern, parse_pattern
from .report import PruneReport
from .sparsegpt import Hessian, sparsegpt
from ..stream import Captured, capture_inputs, run_block
from .structured import calibration_batches, check_finite
from .wanda import ColumnNorms, magnitude_mask, wanda_mask

METHODS = ("sparsegpt", "wanda", "magnitude")
# linears that read the same input share one statistics collector (keyed by the first)
INPUT_GROUPS = {"q": ("q", "k", "v"), "o": ("o",), "gate": ("gate", "up"), "down": ("down",)}
# weak references to every live LayerStats: tests check that only one layer's are alive at once
LIVE_STATS: "weakref.WeakSet[LayerStats]" = weakref.WeakSet()


@dataclass(eq=False)
class LayerStats:
    """The input statistics of one decoder layer's linears (one collector per distinct input)."""

    layer: int
    inputs: dict = field(default_factory=dict)  # input-group role -> Hessian | ColumnNorms

    def __post_init__(self):
        LIVE_STATS.add(self)


def _linear(model, layer: int, role: str) -> nn.Linear:
    lin = layer_module(model, layer, role)
    lin = getattr(lin, "base_layer", lin)  # through a PEFT LoRA wrapper
    if not isinstance(lin, nn.Linear):
        raise LoramError(f"{module_name(layer, role)} is not a plain Linear (quantized?): prune or mask the "
                         "unquantized model")
    return lin


def collect_stats(model, layer: int, inputs: list[Captured], method: str) -> LayerStats:
    """Run the (still dense) layer over every captured input with hooks that accumulate statistics."""
    stats = LayerStats(layer)
    handles = []
    for key in INPUT_GROUPS:
        lin = _linear(model, layer, key)
        make = Hessian if method == "sparsegpt" else ColumnNorms
        coll = stats.inputs[key] = make(lin.in_features, lin.weight.device)
        handles.append(lin.register_forward_hook(lambda _m, args, _out, coll=coll: coll.add(args[0].detach())))
    block = decoder_layers(model)[layer]
    try:
        with torch.no_grad():
            for c in inputs:
                run_block(block, c)
    finally:
        for h in handles:
            h.remove()
    return stats


def prune_linear(lin: nn.Linear, method: str, pattern: Pattern, stat=None) -> float:
    """Prune one linear in place; returns its achieved zero fraction."""
    W = lin.weight
    with torch.no_grad():
        if method == "sparsegpt":
            W.copy_(sparsegpt(W, stat.H, pattern).to(W.dtype))
        else:
            mask = wanda_mask(W, stat.sq, pattern) if method == "wanda" else magnitude_mask(W, pattern)
            W.masked_fill_(mask, 0.0)
    return float((W == 0).sum()) / W.numel()


def sparsify(model, method: str, pattern: Pattern, layers: range, batches: list[torch.Tensor] | None = None,
             observer=None) -> dict[str, float]:
    """Prune ``model`` in place, streaming layer by layer; {module name: achieved zero fraction}.

    observer(layer) is called after a layer's statistics are collected (tests probe memory there).
    """
    if method not in METHODS:
        raise LoramError(f"unknown sparse --method {method!r}: choose one of {', '.join(METHODS)}")
    achieved: dict[str, float] = {}
    if method == "magnitude":  # no data: each linear on its own
        for i in track(layers, "magnitude: layers", unit="layer"):
            for role in ROLES:
                achieved[module_name(i, role)] = prune_linear(_linear(model, i, role), method, pattern)
        return achieved
    if not batches:
        raise LoramError(f"--method {method} needs calibration data: pass --calib-samples >= 1")
    inputs = capture_inputs(model, layers.start, batches)
    blocks = decoder_layers(model)
    for i in track(layers, f"{method}: layers", unit="layer"):
        stats = collect_stats(model, i, inputs, method)
        if observer is not None:
            observer(i)
        for key, roles in INPUT_GROUPS.items():
            for role in roles:
                achieved[module_name(i, role)] = prune_linear(_linear(model, i, role), method, pattern, stats.inputs[key])
        del stats  # before the next layer's: one layer's statistics at a time
        if i + 1 < layers.stop:
            with torch.no_grad():
                inputs = [Captured(run_block(blocks[i], c), c.kwargs) for c in inputs]
    return achieved


def sparse_masks(model, plan=None) -> dict[str, torch.Tensor]:
    """{"model.layers.{i}.{attn|mlp}.{proj}.weight": weight != 0} for the targeted linears of the plan's layers.

    loram passes ``plan``; the default, for users of ``loram.load_pruned``, is the plan that loader
    hangs on the model. Works through PEFT wrappers; the model must not be quantized (an NF4 weight
    has no element-wise zeros to read).
    """
    plan = plan if plan is not None else getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise LoramError("no prune plan for this model: load it with loram.load_pruned or pass plan=")
    return {name: _linear(model, i, r).weight.detach() != 0 for name, (i, r) in sparse_mask_names(plan).items()}


def sparse_mask_names(plan) -> dict[str, tuple[int, str]]:
    """{weight name: (layer, role)} of the linears whose zeros --keep-sparse keeps: every targeted
    projection of the plan's layers."""
    start, end = plan.layers
    return {weight_name(i, r): (i, r) for i in range(start, end) for r in ROLES}


def layer_errors(dense, pruned, layers: range, batches: list[torch.Tensor]) -> dict[int, float]:
    """Relative reconstruction error of each pruned decoder layer on the dense model's inputs:

        err_i = || f_i^pruned(X_i) - f_i(X_i) ||^2 / || f_i(X_i) - X_i ||^2

    (X_i: the dense model's input to layer i; the denominator is the layer's own contribution,
    without the residual stream that both outputs share)."""
    inputs = capture_inputs(dense, layers.start, batches)
    db, pb = decoder_layers(dense), decoder_layers(pruned)
    errs = {}
    with torch.no_grad():
        for i in layers:
            num = den = 0.0
            nxt = []
            for c in inputs:
                yd, yp = run_block(db[i], c), run_block(pb[i], c)
                num += float((yp - yd).double().pow(2).sum())
                den += float((yd - c.hidden).double().pow(2).sum())
                nxt.append(Captured(yd, c.kwargs))
            errs[i] = num / max(den, 1e-30)
            inputs = nxt
    return errs


@releases_locks
def prune_sparse(model_name: str, out: str | Path, method: str, sparsity: str, ratio: float | None = None,
                 layers: str | None = None, seed: int = 0, calib_data: str | None = None, calib_samples: int = 8,
                 calib_seq_len: int = 128, overwrite: bool = False, dtype=torch.float32, verify_base: str = "sampled",
                 max_memory: float | None = None):
    """`loram prune --sparsity ...`: write a sparse pruned model folder; returns a PruneReport."""

    if method not in METHODS:
        raise LoramError(f"--sparsity needs a sparse --method: choose one of {', '.join(METHODS)}")
    pattern = parse_pattern(sparsity, ratio)
    check_output(out, overwrite, inputs=(model_name, calib_data))
    start, end = parse_layers(layers, geometry(load_config(model_name)).n_layers)  # fail before loading weights
    t0, peak = time.time(), PeakRSS()
    tok = load_tokenizer(model_name)
    model = load_model(model_name, dtype=dtype)
    check_finite(model)  # NaN scores would still sort into a mask
    fp = base_fingerprint(model_name, model, verify_base)
    batches, calib = (None, None)
    if method != "magnitude":
        batches, calib = calibration_batches(tok, calib_data, calib_samples, calib_seq_len)
    achieved = sparsify(model, method, pattern, range(start, end), batches)
    weights = [_linear(model, i, r).weight for i in range(start, end) for r in ROLES]
    zeros, targeted = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    n_params = count_params(model)
    plan = PrunePlan(
        kind="sparse", method=method, layers=(start, end), mlp_ratio=pattern.ratio, attn_ratio=pattern.ratio, seed=seed,
        calibration=calib, base={"name": str(model_name), "config": model.config.to_dict(), "fingerprint": fp},
        sparse={"pattern": pattern.name, "ratio": pattern.ratio, "sparsity": round(zeros / targeted, 6),
                "modules": {n: round(f, 6) for n, f in achieved.items()}},
    )
    plan.extra = {"params_original": n_params, "params_pruned": n_params, "params_nonzero": n_params - zeros}
    with atomic_dir(out, overwrite, "prune", (model_name, calib_data)) as tmp:
        save_pruned(model, tok, plan, tmp)
    return PruneReport(str(out), plan, n_params, n_params, time.time() - t0, peak.gb(), params_nonzero=n_params - zeros)

