"""Structured pruning: score MLP channels and KV groups, keep the most important.

Importance of a unit u (an MLP channel c, or a KV group g), summed over its weights:

    random     a seeded random permutation (LoRAM-Rand)
    magnitude  sum |W|                                       (no gradients)
    taylor     sum |W * dL/dW|  over N calibration sequences (LoRAM-Stru, LLM-Pruner param_first)
    fisher     sum_s (sum_unit W * dL_s/dW)^2: per calibration sequence s, the unit's first-order loss
               change when it is removed, squared, summed over the N sequences (the group Fisher score of
               Molchanov et al. 2019). taylor adds the gradients of all sequences before the product and
               takes |.| weight by weight; fisher keeps each sequence's signed unit sum whole. Which ranks
               better depends on the calibration text (docs/pruning.md, "Calibration data")
    wanda-sp   sum |W_ij| * ||X_j||_2  (X: the linear's input over every calibration token; Wanda-sp
               as in FLAP, An et al. 2024): training-free and activation-aware, one forward pass.
               A bias is a weight on a constant-1 input, so |b_i| * sqrt(tokens)

    channel c : gate row c + up row c + down column c
    group g   : k,v rows of head g + q rows / o columns of its G query heads (+ q/k/v biases)

The per-unit sums (``layer_scores``) take one decoder-layer module and a per-weight score, so the
in-memory path here and the layer-streamed path (streamed.py) share every line of the arithmetic.

Taylor / Fisher memory: one fp32 copy of the model plus gradients of the scored layers only (embeddings,
norms and lm_head frozen), calibration sequences streamed one at a time, graphs freed after each
backward: peak = weights + scored-layer grads + one sequence's activations.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import LoramError
from ..families import ATTN_ROLES, MLP_ROLES, MODULE_OF_ROLE, ROLES, Geometry, decoder_layers, geometry
from ..progress import track
from ..prune_plan import ALLOCATIONS, STRUCTURED_METHODS, LayerPlan, kept_kv_groups, kept_mlp_channels
from .wanda import ColumnNorms

METHODS = STRUCTURED_METHODS
CALIBRATED = ("taylor", "fisher", "wanda-sp")  # the structured methods that read calibration data
GRADIENT = ("taylor", "fisher")  # scored from calibration gradients (a backward pass per sequence)
BUILTIN_CALIBRATION = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"


def calibration_batches(tokenizer, source: str | None, n: int, seq_len: int) -> tuple[list[torch.Tensor], dict]:
    """N token sequences of length <= seq_len from a text / JSONL(text) file or the built-in text."""
    import json

    path = Path(source) if source else BUILTIN_CALIBRATION
    if not path.exists():
        raise LoramError(f"calibration file {path} does not exist: pass --calib-data FILE (.txt, or .jsonl of text or training rows)")
    raw = path.read_text()
    if path.suffix in (".jsonl", ".json"):
        rows = [json.loads(x) for x in raw.splitlines() if x.strip()] if path.suffix == ".jsonl" else json.loads(raw)
        from ..data.rows import row_text

        texts = [t for r in rows if (t := row_text(tokenizer, r))]
        if not texts:
            raise LoramError(f"calibration file {path} has no usable rows: use plain text, {{\"text\": ...}} rows, or "
                             "training rows (instruction/output, messages, prompt/completion)")
        raw = "\n\n".join(texts)
    ids = tokenizer(raw, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < 2:
        raise LoramError(f"calibration file {path} is empty: give it some text")
    # consecutive windows, wrapping around the text when it is shorter than n * seq_len
    seqs = [ids[(i * seq_len) % max(1, ids.numel() - seq_len + 1):][:seq_len] for i in range(n)]
    desc = {"source": "builtin" if source is None else str(source), "samples": n, "seq_len": seq_len,
            "sha256": hashlib.sha256(raw.encode()).hexdigest()[:16]}
    return [s.unsqueeze(0) for s in seqs], desc


def _proj(block, role: str):
    """The nn.Linear of ``role`` in one decoder layer."""
    return block.get_submodule(MODULE_OF_ROLE[role])


def _rows(lin, per) -> torch.Tensor:
    """Score of each output row (its weights, plus its bias where there is one: Qwen2 q/k/v)."""
    s = per(lin, lin.weight).sum(1)
    return s + per(lin, lin.bias) if lin.bias is not None else s


def _cols(lin, per) -> torch.Tensor:
    return per(lin, lin.weight).sum(0)


def _channel_scores(block, per) -> torch.Tensor:
    gate, up, down = (_proj(block, r) for r in MLP_ROLES)
    return _rows(gate, per) + _rows(up, per) + _cols(down, per)


def _group_scores(block, g: Geometry, per) -> torch.Tensor:
    q, k, v, o = (_proj(block, r) for r in ATTN_ROLES)
    per_group = lambda t: t.view(g.n_kv_heads, -1).sum(1)  # noqa: E731  rows of one group are contiguous
    return per_group(_rows(q, per)) + per_group(_rows(k, per)) + per_group(_rows(v, per)) + per_group(_cols(o, per))


def layer_scores(block, g: Geometry, per) -> tuple[torch.Tensor, torch.Tensor]:
    """(channel scores [F], group scores [K]) of one decoder layer; ``per(linear, tensor)`` scores each weight."""
    with torch.no_grad():
        return _channel_scores(block, per), _group_scores(block, g, per)


# ---- per-weight scores ---------------------------------------------------------------------------
def magnitude_per(_lin, p) -> torch.Tensor:
    return p.detach().abs().float()


def taylor_per(_lin, p) -> torch.Tensor:
    """|W * G| with G = the gradient accumulated over every calibration sequence."""
    return (p.detach() * p.grad).abs().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)


def signed_taylor_per(_lin, p) -> torch.Tensor:
    """W * G_s with G_s = one sequence's gradient: summed over a unit, the first-order loss change of removing it."""
    return (p.detach() * p.grad).float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)


def add_fisher(acc: dict, i: int, block, g: Geometry) -> None:
    """Add one sequence's squared unit sums of ``block`` (decoder layer ``i``, its .grad = that sequence's
    gradient) to ``acc[i]``: the per-sequence step of the fisher score, in memory and streamed."""
    ch, grp = (t.square() for t in layer_scores(block, g, signed_taylor_per))
    acc[i] = (ch, grp) if i not in acc else (acc[i][0] + ch, acc[i][1] + grp)


def wanda_sp_per(norms: dict):
    """|W_ij| * ||X_j||_2 from ``norms`` ({linear: ColumnNorms of its input}, see ``input_norms``)."""
    def per(lin, p):
        n = norms[lin]
        scale = n.sq.sqrt()[None, :] if p is lin.weight else torch.tensor(float(n.tokens), dtype=torch.float64).sqrt()
        return (p.detach().abs().double() * scale.to(p.device)).float()
    return per


@contextmanager
def input_stats(linears: dict, make):
    """{key: make(in_features, device)} for each linear of ``linears`` ({key: nn.Linear}), fed the linear's
    input (``.add(x)``) by a forward hook on every forward run while the context is open."""
    stats, handles = {}, []
    for key, lin in linears.items():
        coll = stats[key] = make(lin.in_features, lin.weight.device)
        handles.append(lin.register_forward_hook(lambda _m, args, _out, coll=coll: coll.add(args[0].detach())))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def input_norms(blocks):
    """{linear: ColumnNorms} for the seven projections of each decoder layer in ``blocks``, accumulated
    by forward hooks from every forward run while the context is open."""
    return input_stats({lin: lin for block in blocks for lin in (_proj(block, role) for role in ROLES)}, ColumnNorms)


def _grads(model, layers: range, batches: list[torch.Tensor], method: str, after_each=None) -> None:
    """Backpropagate the LM loss of each calibration sequence into the scored layers' weights (.grad accumulates
    unless ``after_each``, called after every sequence's backward, consumes and clears it)."""
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = decoder_layers(model)
    for i in layers:
        for p in blocks[i].parameters():
            if p.dim() >= 1:
                p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    dev = next(model.parameters()).device
    for ids in track(batches, f"{method}: calibration sequences", unit="seq"):  # stream: one sequence's graph at a time
        ids = ids.to(dev)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        if not torch.isfinite(out.loss):
            raise LoramError("calibration loss is not finite: check the model weights or --calib-data")
        out.loss.backward()
        del out
        if after_each is not None:
            after_each()


def _gradient_scores(model, g: Geometry, layers: range, batches: list[torch.Tensor], method: str) -> dict:
    """taylor: |W * G| of the gradient summed over the sequences; fisher: per sequence, squared unit sums."""
    blocks, fisher = decoder_layers(model), {}

    def per_sequence():
        for i in layers:
            add_fisher(fisher, i, blocks[i], g)
        model.zero_grad(set_to_none=True)

    _grads(model, layers, batches, method, per_sequence if method == "fisher" else None)
    scores = fisher if method == "fisher" else {i: layer_scores(blocks[i], g, taylor_per) for i in layers}
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return scores


def check_finite(model, prefix: str = "") -> None:
    """Refuse a model with a NaN/inf weight: scores built from it are NaN, and argsort would still
    turn them into a plan. Such a checkpoint is corrupt anyway (one tensor at a time: no full copy).
    ``prefix`` names the tensors of a decoder layer checked on its own (streamed); meta tensors are skipped."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not p.is_meta and not bool(torch.isfinite(p).all()):
                what = "NaN" if bool(torch.isnan(p).any()) else "inf"
                raise LoramError(f"weight {prefix}{name} of the model contains {what} values, so importance scores would be "
                                 "meaningless: the checkpoint is corrupt, re-download or re-convert it")


def _wanda_norms(model, layers: range, batches: list[torch.Tensor]) -> dict:
    """Input norms of every scored layer's linears from one forward pass per calibration sequence."""
    blocks = decoder_layers(model)
    dev = next(model.parameters()).device
    with input_norms([blocks[i] for i in layers]) as norms, torch.no_grad():
        for ids in track(batches, "wanda-sp: calibration sequences", unit="seq"):
            model(input_ids=ids.to(dev), use_cache=False)
    return norms


def importance(model, method: str, layers: range, batches=None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (channel scores [F], group scores [K])} for magnitude / taylor / fisher / wanda-sp."""
    check_finite(model)
    g = geometry(model.config)
    if method in GRADIENT:
        return _gradient_scores(model, g, layers, batches, method)
    per = wanda_sp_per(_wanda_norms(model, layers, batches)) if method == "wanda-sp" else magnitude_per
    blocks = decoder_layers(model)
    return {i: layer_scores(blocks[i], g, per) for i in layers}


def _top(scores: torch.Tensor, k: int) -> list[int]:
    # stable: ties keep the lower index, so plans are reproducible
    order = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return sorted(order.tolist())


def check_allocation(allocate: str, method: str, sparsity: str | None = None) -> None:
    """Refuse an --allocate that cannot apply (prune() calls it before anything is loaded)."""
    if allocate not in ALLOCATIONS:
        raise LoramError(f"unknown --allocate {allocate!r}: choose one of {', '.join(ALLOCATIONS)}")
    if allocate == "uniform":
        return
    if sparsity is not None or method not in METHODS:
        raise LoramError("--allocate applies to structured pruning only: drop it (sparse methods prune --ratio of every layer)")
    if method == "random":
        raise LoramError("--allocate global ranks channel scores across layers and random has none: use --method taylor "
                         "(or magnitude, wanda-sp), or drop --allocate")


def mlp_widths(g: Geometry, method: str, layers: range, mlp_ratio: float, allocate: str = "uniform",
               scores: dict | None = None) -> dict[int, int]:
    """MLP channels kept in each layer of ``layers``. uniform: ``kept_mlp_channels`` everywhere. global: the
    same total removed, taken as the lowest channel scores of the whole range (LLM-Pruner's global ranking:
    a Taylor score estimates the loss change of removing the channel, so scores of different layers compare),
    with no layer losing more than halfway from ``mlp_ratio`` to all of its channels, so that no layer is
    emptied by a few low scores. Ties go to the lower layer and index, so plans stay reproducible."""
    check_allocation(allocate, method)
    n = g.intermediate
    kept = kept_mlp_channels(n, mlp_ratio)
    if allocate == "uniform":
        return {i: kept for i in layers}
    cap = min(n - 1, math.ceil(n * (1 + mlp_ratio) / 2))  # removed at most; every layer keeps >= 1 channel
    budget = (n - kept) * len(layers)
    order = torch.argsort(torch.cat([scores[i][0].double() for i in layers]), stable=True).tolist()  # least important first
    removed = {i: 0 for i in layers}
    for j in order:
        if budget == 0:
            break
        i = layers[j // n]
        if removed[i] < cap:
            removed[i] += 1
            budget -= 1
    return {i: n - removed[i] for i in layers}


def select(g: Geometry, method: str, layers: range, mlp_ratio: float, attn_ratio: float, seed: int,
           scores: dict | None = None, allocate: str = "uniform") -> dict[int, LayerPlan]:
    widths = mlp_widths(g, method, layers, mlp_ratio, allocate, scores)
    n_grp = kept_kv_groups(g.n_kv_heads, attn_ratio)
    gen = torch.Generator().manual_seed(seed)
    plans = {}
    for i in layers:
        n_ch = widths[i]
        if method == "random":
            ch = sorted(torch.randperm(g.intermediate, generator=gen)[:n_ch].tolist())
            grp = sorted(torch.randperm(g.n_kv_heads, generator=gen)[:n_grp].tolist())
        else:
            ch, grp = _top(scores[i][0], n_ch), _top(scores[i][1], n_grp)
        plans[i] = LayerPlan(
            mlp_keep=ch if mlp_ratio > 0 and n_ch < g.intermediate else None,
            kv_keep=grp if attn_ratio > 0 and n_grp < g.n_kv_heads else None,
        )
    return plans
