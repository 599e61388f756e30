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
any time. q/k/v share one input (and one Hessian), as do gate/up. Magnitude needs no data.

Two ways to hold the weights, the same per-layer step (``prune_block``), so the same masks:

    in memory (sparsify)          the whole model loaded in ``dtype``; written at the end (in ``dtype``)
    streamed (sparsify_streamed)  a safetensors folder (a hub id: its downloaded snapshot, as for
                                  structured streaming: loading.source_folder) read through a LayerStream: layer i is
                                  loaded (fp32 compute), pruned, run forward, written as its own shard
                                  in the checkpoint's dtype (bf16 in, bf16 out), dropped. Layers below
                                  the range only carry the activations; layers above it and the
                                  embeddings / norm / lm_head are copied tensor by tensor, unchanged.
                                  Peak: one layer + its statistics + the hidden states.

Output: a pruned model folder with the original config and shapes, and a plan with kind "sparse":

    "sparse": {"pattern": "2:4", "ratio": 0.5, "sparsity": 0.4999,
               "modules": {"model.layers.4.self_attn.q_proj": 0.5, ...}}   (achieved zero fraction)

Recovery of an adapter trained on it is the identity on the tensors (recover.py); the zeros are
``sparse_masks(model)``; alignment keeps them zero under any engine (training.distributed.keep_zeros_callback:
masks taken after the engine wraps the model, gradients cleared at the zeros before each optimizer step
and the weights masked after it).
"""

from __future__ import annotations

import shutil
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LoramError
from ..families import (MODULE_OF_ROLE, ROLES, decoder_layers, geometry, is_tied_head, layer_module, module_name,
                        ties_embeddings, weight_name)
from ..fingerprint import base_fingerprint
from ..io import atomic_dir, check_output, load_config, load_tokenizer, releases_locks
from ..loading import PLAN_ATTR, can_stream, check_checkpoint, checkpoint_dtype, load_model, source_folder, streamable_source
from ..procmem import PeakRSS
from ..progress import track
from ..prune_plan import META_PLAN_DIGEST, META_PLAN_ID, SPARSE_METHODS, PrunePlan, parse_layers
from ..pruned_model import bind_plan, count_params, save_pruned
from .decide import STREAMING, stream_decision
from .pattern import Pattern, parse_pattern
from .report import PruneReport
from .sparsegpt import Hessian, sparsegpt
from ..stream import IN_LAYER, Captured, LayerStream, capture_inputs, run_block
from ..weights import IGNORED, ShardWriter, Weights, safetensors_files
from .structured import calibration_batches, check_finite
from .wanda import ColumnNorms, magnitude_mask, wanda_mask

METHODS = SPARSE_METHODS
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


def _plain_linear(lin, name: str) -> nn.Linear:
    lin = getattr(lin, "base_layer", lin)  # through a PEFT LoRA wrapper
    if not isinstance(lin, nn.Linear):
        raise LoramError(f"{name} is not a plain Linear (quantized?): prune or mask the unquantized model")
    return lin


def _linear(model, layer: int, role: str) -> nn.Linear:
    return _plain_linear(layer_module(model, layer, role), module_name(layer, role))


def _block_linear(block, layer: int, role: str) -> nn.Linear:
    """The ``role`` linear of decoder layer ``block`` (layer index ``layer``, for messages)."""
    return _plain_linear(block.get_submodule(MODULE_OF_ROLE[role]), module_name(layer, role))


def collect_stats(block, layer: int, inputs: list[Captured], method: str) -> LayerStats:
    """Run the (still dense) decoder layer ``block`` over every captured input with hooks that accumulate statistics."""
    stats = LayerStats(layer)
    handles = []
    for key in INPUT_GROUPS:
        lin = _block_linear(block, layer, key)
        make = Hessian if method == "sparsegpt" else ColumnNorms
        coll = stats.inputs[key] = make(lin.in_features, lin.weight.device)
        handles.append(lin.register_forward_hook(lambda _m, args, _out, coll=coll: coll.add(args[0].detach())))
    try:
        with torch.no_grad():
            for c in inputs:
                run_block(block, c)
    finally:
        for h in handles:
            h.remove()
    return stats


def prune_linear(lin: nn.Linear, method: str, pattern: Pattern, stat=None, last_use: bool = False) -> float:
    """Prune one linear in place; returns its achieved zero fraction.

    last_use: no other linear will read ``stat`` (SparseGPT may then damp its Hessian in place)."""
    W = lin.weight
    with torch.no_grad():
        if method == "sparsegpt":
            W.copy_(sparsegpt(W, stat.H, pattern, overwrite_h=last_use).to(W.dtype))
        else:
            mask = wanda_mask(W, stat.sq, pattern) if method == "wanda" else magnitude_mask(W, pattern)
            W.masked_fill_(mask, 0.0)
    return float((W == 0).sum()) / W.numel()


def prune_block(block, layer: int, method: str, pattern: Pattern, inputs: list[Captured] | None = None,
                observer=None) -> dict[str, float]:
    """Prune decoder layer ``block`` (index ``layer``) in place from its inputs' statistics (magnitude: none).

    The one step both the in-memory ``sparsify`` and the weight-streamed ``sparsify_streamed`` take
    per layer; its statistics are freed on return, before the next layer's exist."""
    stats = collect_stats(block, layer, inputs, method) if method != "magnitude" else None
    if observer is not None:
        observer(layer)
    achieved = {}
    for key, roles in INPUT_GROUPS.items():
        # popped: an input's statistics are freed once its linears are pruned, before the next factorisation
        stat = stats.inputs.pop(key) if stats is not None else None
        for j, role in enumerate(roles):
            lin = _block_linear(block, layer, role)
            achieved[module_name(layer, role)] = prune_linear(lin, method, pattern, stat, last_use=j == len(roles) - 1)
        del stat
    return achieved


def _advance(block, inputs: list[Captured]) -> list[Captured]:
    """The next layer's inputs: ``block`` (already pruned: later layers see what they will get) on each."""
    with torch.no_grad():
        return [Captured(run_block(block, c).detach(), c.kwargs) for c in inputs]


def _check_method(method: str, batches) -> None:
    if method not in METHODS:
        raise LoramError(f"unknown sparse --method {method!r}: choose one of {', '.join(METHODS)}")
    if method != "magnitude" and not batches:
        raise LoramError(f"--method {method} needs calibration data: pass --calib-samples >= 1")


def sparsify(model, method: str, pattern: Pattern, layers: range, batches: list[torch.Tensor] | None = None,
             observer=None) -> dict[str, float]:
    """Prune ``model`` in place, streaming its activations layer by layer; {module name: achieved zero fraction}.

    observer(layer) is called after a layer's statistics are collected (tests probe memory there).
    """
    _check_method(method, batches)
    blocks = decoder_layers(model)
    inputs = capture_inputs(model, layers.start, batches) if method != "magnitude" else None
    achieved: dict[str, float] = {}
    for i in track(layers, f"{method}: layers", unit="layer"):
        achieved.update(prune_block(blocks[i], i, method, pattern, inputs, observer))
        if inputs is not None and i + 1 < layers.stop:
            inputs = _advance(blocks[i], inputs)
    return achieved


# ---- streaming the weights too: one decoder layer in memory, read from and written to disk ---------
def sparsify_streamed(ls: LayerStream, method: str, pattern: Pattern, layers: range, emit,
                      batches: list[torch.Tensor] | None = None, observer=None) -> dict[str, float]:
    """Prune the checkpoint behind ``ls`` layer by layer; {module name: achieved zero fraction}.

    For each decoder layer i, in order, ``emit(i, tensors)`` is called once: ``tensors`` are the
    pruned weights of layer i (in their stored dtype), {} for a layer left as it is on disk. Layers
    below ``layers.start`` are loaded only to carry the calibration activations forward (magnitude,
    which needs none, loads no layer outside the range); layers from ``layers.stop`` on are never
    loaded. One decoder layer is materialised at a time (``ls.load`` / ``ls.unload``); ``ls`` is used
    up (its embeddings are dropped once they have given the layer-0 inputs).
    observer(layer) is called while layer ``layer`` is loaded (after its statistics are collected).
    """
    _check_method(method, batches)
    needs_data = method != "magnitude"
    check_finite(ls.model)  # the resident tensors (embeddings, norm, lm_head); each layer is checked when loaded
    inputs = ls.inputs(batches) if needs_data else None
    ls.drop_outer()  # not needed past layer 0's inputs: the peak is one decoder layer, not the embeddings + one
    achieved: dict[str, float] = {}
    for i in track(range(ls.n_layers), f"{method}: layers (streamed)", unit="layer"):
        if i not in layers and not (needs_data and i < layers.start):
            emit(i, {})
            continue
        block = ls.load(i)
        try:
            check_finite(block, f"model.layers.{i}.")  # per layer: the whole model is never in memory at once
            written = {}
            if i in layers:
                prune_block(block, i, method, pattern, inputs, observer)
                written = _stored(ls.weights, block, i)
                achieved.update({n[: -len(".weight")]: float((t == 0).sum()) / t.numel() for n, t in written.items()})
            elif observer is not None:
                observer(i)
            if needs_data and i + 1 < layers.stop:
                inputs = _advance(block, inputs)
            emit(i, written)
            del written
        finally:
            ls.unload(i)
    return achieved


def _stored(weights: Weights, block, layer: int) -> dict[str, torch.Tensor]:
    """The pruned linears' weights of ``block`` as they will be written: in the checkpoint's dtype.

    The zero fractions are counted on these (a value that rounds to 0 in bf16/fp16 is a zero there)."""
    out = {}
    for role in ROLES:
        name = weight_name(layer, role)
        out[name] = _block_linear(block, layer, role).weight.detach().to(weights.dtype(name))
    return out


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
                 max_memory: float | None = None, stream: bool | None = None, device: str = "cpu"):
    """`loram prune --sparsity ...`: write a sparse pruned model folder; returns a PruneReport.

    stream: True reads, prunes and writes one decoder layer at a time (a safetensors folder or a hub id,
    downloaded first; not a GGUF model; the output keeps the checkpoint's dtype); False loads the whole model in ``dtype``; None
    streams when the predicted in-memory peak does not fit the memory budget (``max_memory`` GB, else
    the cgroup's limit / MemAvailable: prune.stream_decision). ``dtype`` is the compute dtype,
    ``device`` where the model (streamed: the one resident layer) is computed."""

    if method not in METHODS:
        raise LoramError(f"--sparsity needs a sparse --method: choose one of {', '.join(METHODS)}")
    pattern = parse_pattern(sparsity, ratio)
    check_output(out, overwrite, inputs=(model_name, calib_data))
    if stream:
        streamable_source(model_name, STREAMING)  # a GGUF model is refused before anything is read
    config = load_config(model_name)
    start, end = parse_layers(layers, geometry(config).n_layers)  # fail before loading weights
    if stream is None:  # after the cheap checks; a GGUF model is dequantised whole, so in memory whatever the budget
        stream = can_stream(model_name) and stream_decision(model_name, method, pattern.ratio, layers, sparsity, calib_samples,
                                                            calib_seq_len, max_memory)
    # a hub id is downloaded first, as structured streaming does; then headers only
    weights = check_checkpoint(source_folder(model_name, STREAMING), config) if stream else None
    t0, peak = time.time(), PeakRSS()
    tok = load_tokenizer(model_name)
    job = _Job(model_name, method, pattern, range(start, end), seed, verify_base)
    if weights is not None:
        if method != "magnitude":
            job.batches, job.calib = calibration_batches(tok, calib_data, calib_samples, calib_seq_len)
        with atomic_dir(out, overwrite, "prune", (model_name, calib_data)) as tmp:
            plan, counts = _write_streamed(job, weights, config, tok, Path(tmp), dtype, device)
    else:
        model = load_model(model_name, dtype=dtype, device=device)
        check_finite(model)  # NaN scores would still sort into a mask
        fp = base_fingerprint(model_name, model, verify_base)
        if method != "magnitude":
            job.batches, job.calib = calibration_batches(tok, calib_data, calib_samples, calib_seq_len)
        achieved = sparsify(model, method, pattern, job.layers, job.batches)
        counts = _Counts(count_params(model))
        counts.add([_linear(model, i, r).weight for i in job.layers for r in ROLES])
        stored = checkpoint_dtype(model_name)
        if stored is not None:  # written in the checkpoint's dtype, as the streamed path writes it (zeros stay zeros)
            model.to(stored)
            model.config.dtype = stored
        plan = job.plan(model.config.to_dict(), fp, achieved, counts)
        with atomic_dir(out, overwrite, "prune", (model_name, calib_data)) as tmp:
            save_pruned(model, tok, plan, tmp)
    nonzero = counts.params - counts.zeros
    return PruneReport(str(out), plan, counts.params, counts.params, time.time() - t0, peak.gb(), params_nonzero=nonzero)


@dataclass
class _Counts:
    """Parameter count of the model and zeros / size of its targeted weights (for the plan and report)."""

    params: int
    zeros: int = 0
    targeted: int = 0

    def add(self, weights) -> None:
        for w in weights:
            self.zeros += int((w == 0).sum())
            self.targeted += w.numel()


@dataclass
class _Job:
    """One `loram prune --sparsity` run: what both paths need to describe their result as a plan."""

    model_name: str
    method: str
    pattern: Pattern
    layers: range
    seed: int
    verify_base: str
    batches: list | None = None
    calib: dict | None = None

    def plan(self, config: dict, fp: dict, achieved: dict[str, float], counts: _Counts) -> PrunePlan:
        pattern, (start, end) = self.pattern, (self.layers.start, self.layers.stop)
        plan = PrunePlan(
            kind="sparse", method=self.method, layers=(start, end), mlp_ratio=pattern.ratio, attn_ratio=pattern.ratio,
            seed=self.seed, calibration=self.calib,
            base={"name": str(self.model_name), "config": config, "fingerprint": fp},
            sparse={"pattern": pattern.name, "ratio": pattern.ratio, "sparsity": round(counts.zeros / counts.targeted, 6),
                    "modules": {n: round(f, 6) for n, f in achieved.items()}},
        )
        plan.extra = {"params_original": counts.params, "params_pruned": counts.params,
                      "params_nonzero": counts.params - counts.zeros}
        return plan


def _write_streamed(job: _Job, weights: Weights, config, tok, tmp: Path, dtype, device) -> tuple[PrunePlan, _Counts]:
    """Prune layer by layer into ``tmp`` (inside atomic_dir): one shard for the tensors outside the
    decoder layers, then one per layer, each tensor in its stored dtype; the plan (whose id depends on
    the achieved sparsity) is bound at the end."""
    fp = base_fingerprint(weights.folder, None, job.verify_base)  # from the safetensors (a hub id's snapshot): no load
    ls = LayerStream(weights, config, dtype=dtype, device=device, head=False)
    counts = _Counts(count_params(ls.model))  # shapes only: the decoder layers are on the meta device
    tied = ties_embeddings(config)
    # placeholders as long as the plan's id and digest: bind_plan then rewrites each header in place
    writer = ShardWriter(tmp, ls.n_layers + 1, {k: "0" * 16 for k in (META_PLAN_ID, META_PLAN_DIGEST)})
    writer.add({k: weights.get(k) for k in weights.names
                if not IN_LAYER.search(k) and not is_tied_head(k, tied) and not IGNORED.search(k)})

    def emit(i: int, pruned: dict[str, torch.Tensor]) -> None:
        counts.add(pruned.values())
        writer.add({k: pruned[k] if k in pruned else weights.get(k) for k in weights.layer_names(i) if not IGNORED.search(k)})

    achieved = sparsify_streamed(ls, job.method, job.pattern, job.layers, emit, job.batches)
    writer.finish(counts.params)
    plan = job.plan(config.to_dict(), fp, achieved, counts)
    bind_plan(safetensors_files(tmp), plan)
    config.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    gen = Path(weights.folder) / "generation_config.json"  # save_pretrained of a loaded model writes one too
    if gen.exists():
        shutil.copy(gen, tmp / gen.name)
    plan.save(tmp)
    return plan, counts
