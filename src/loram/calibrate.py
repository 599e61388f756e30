"""`loram recover --calibrate DATA`: the scale of the recovered update, chosen on the original model.

The update learned on the pruned model partly repairs the pruning, and that repair does not transfer
to the original (issue 18). Recovery can measure how much of it helps: on the ORIGINAL model with the
recovered update applied, the loss of a few in-domain rows (forward passes only) is computed for the
update scaled by s, and the best s is kept:

    W' = W + s * (alpha / r) * B A          s in GRID = 0, 0.1, ..., 1.2   (s = 1: the adapter as trained,
                                                                            s = 0: the original model)

    scope global   one s for every module: one pass per candidate (13 passes)
    scope layer    one s per decoder layer, by one round of coordinate descent: every layer starts at the
                   global s*, then layer 0, 1, ... in turn tries every candidate with the others held and
                   keeps the best (the current value among them, so the loss never rises above the global
                   one); lm_head / embed_tokens updates keep the global s. 13 x (1 + layers) passes.

With ``--calibrate-general GENERAL`` the choice is constrained: a candidate is kept only if the loss of the
first rows of GENERAL (text the user wants the original to keep: general instructions, prose) stays within
``--calibrate-tolerance`` percent of perplexity of the base's (s = 0, default 0 %):

    minimise  L_domain(s)   subject to   L_general(s) <= L_general(0) + log(1 + tolerance / 100)

The constraint, not the grid's top, then bounds the update, so the grid runs on to 2.0 (0, 0.1, ..., 1.2, 1.4,
..., 2.0): an update trained small may be scaled up where the general text allows it, and scaled down where it
hurts. Candidates are tried in order of in-domain loss and the first one that keeps the bound is taken (only
those need a pass over GENERAL); s = 0 and, per layer, the value a layer already has always keep it. So GENERAL
is scored a few times where DATA is scored 17 times: ``--calibrate-general-rows`` can give it more rows (a
tighter bound) for little extra time.

The loss is the mean negative log-likelihood per scored token (nats) of the rows as training formats
them (loram.data.encode_all: chat template, loss on the responses), scored by the evaluation's own code
(loram.eval.ppl / eval.scoring). The chosen scale is folded into the written adapter by multiplying
each module's lora_B by its s (in the adapter's dtype): lora_alpha and r are untouched, so it stays a
standard PEFT adapter that any loader (PEFT, vLLM) applies as calibrated. The candidates are scored
with exactly those rounded tensors, so the reported loss is the written adapter's.

Compute: fp32, the original model in memory (PEFT attached, unmerged: a candidate only rewrites the
lora_B tensors). A model whose in-memory evaluation does not fit the memory budget (loram.budget) is
refused before anything is loaded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import ADAPTER_CONFIG, read_meta, write_adapter
from .errors import LoramError
from .families import parse_name

GRID = tuple(i / 10 for i in range(13))  # 0, 0.1, ..., 1.2
GRID_GENERAL = GRID + (1.4, 1.6, 1.8, 2.0)  # with --calibrate-general: the constraint bounds the update
SCOPES = ("global", "layer")
DEFAULT_ROWS = 32
DEFAULT_SEQ_LEN = 512
BATCH = 8  # sequences per forward pass (loram eval's default --batch-size)


@dataclass(frozen=True)
class CalibrationRequest:
    """What `--calibrate` asked; ``check`` refuses a wrong request before anything is loaded."""

    data: str | None = None
    rows: int | None = None
    scope: str | None = None
    seq_len: int | None = None
    general: str | None = None  # --calibrate-general: rows whose loss may not rise above the base's (+ tolerance)
    tolerance: float | None = None  # --calibrate-tolerance: percent of perplexity on those rows (default 0)
    general_rows: int | None = None  # --calibrate-general-rows (default: --calibrate-rows)

    def check(self) -> None:
        from .settings import check_knobs

        if self.data is None:
            given = [f for f, v in (("--calibrate-rows", self.rows), ("--calibrate-scope", self.scope), ("--seq-len", self.seq_len),
                                    ("--calibrate-general", self.general), ("--calibrate-tolerance", self.tolerance),
                                    ("--calibrate-general-rows", self.general_rows))
                     if v is not None]
            if given:
                verb = "apply" if len(given) > 1 else "applies"
                raise LoramError(f"{', '.join(given)} only {verb} with --calibrate DATA: add --calibrate with a few in-domain "
                                 f"rows, or drop {given[0]}")
            return
        check_knobs("recover", calibrate_rows=self.rows, seq_len=self.seq_len, calibrate_tolerance=self.tolerance,
                    calibrate_general_rows=self.general_rows)
        if self.scope is not None and self.scope not in SCOPES:
            raise LoramError(f"--calibrate-scope {self.scope!r} is unknown: use {' or '.join(SCOPES)}")
        for flag, v in (("--calibrate-tolerance", self.tolerance), ("--calibrate-general-rows", self.general_rows)):
            if v is not None and self.general is None:
                raise LoramError(f"{flag} only applies with --calibrate-general GENERAL: add the general-text rows "
                                 f"whose perplexity it bounds, or drop {flag}")

    @property
    def n_rows(self) -> int:
        return self.rows or DEFAULT_ROWS

    @property
    def n_general_rows(self) -> int:
        return self.general_rows or self.n_rows

    @property
    def max_len(self) -> int:
        return self.seq_len or DEFAULT_SEQ_LEN

    @property
    def how(self) -> str:
        return self.scope or "global"

    @property
    def grid(self) -> tuple:
        return GRID if self.general is None else GRID_GENERAL

    @property
    def allowed_rise(self) -> float:
        """The general-text loss (nats per token) the update may add: log(1 + tolerance %)."""
        return math.log1p((self.tolerance or 0.0) / 100)


@dataclass
class Slice:
    """The encoded calibration rows: (input_ids, labels) pairs, as training encodes them."""

    examples: list
    truncated: int

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.examples)


def tokenizer(base: str | Path, meta: dict):
    """The base's tokenizer, with the chat template training used (`loram train --chat-template`, recorded in
    the adapter's metadata), so the rows are formatted as the adapter learned them."""
    from .data import read_chat_template
    from .io import load_tokenizer

    tok = load_tokenizer(base)
    template = (meta.get("train") or {}).get("chat_template")
    if template:
        tok.chat_template = read_chat_template(template)
    return tok


def read_slice(tok, req: CalibrationRequest, part: str = "domain") -> Slice:
    """The first ``req.n_rows`` usable rows of ``req.data`` (part "domain") or ``req.n_general_rows`` of ``req.general``, read
    and encoded by loram.data as `loram train --data` does; fewer usable rows than asked is refused (a loss on a
    handful of tokens picks noise)."""
    from .data import encode_all, iter_rows

    data, flag, n, rows_flag, kind = (req.data, "--calibrate", req.n_rows, "--calibrate-rows", "in-domain") if part == "domain" \
        else (req.general, "--calibrate-general", req.n_general_rows,
              "--calibrate-general-rows" if req.general_rows else "--calibrate-rows", "general-text")
    enc = encode_all(tok, iter_rows(data), req.max_len, name=f"{flag} {data}", max_examples=n)
    if len(enc.examples) < n:
        raise LoramError(f"{flag} {data} has {len(enc.examples)} usable rows but {rows_flag} asks for {n}: "
                         f"give more {kind} rows or lower {rows_flag}")
    return Slice(enc.examples, enc.truncated)


def check_fits(base: str | Path, config, req: CalibrationRequest, max_memory: float | None) -> int | None:
    """How the candidates are scored: None in memory; else the hidden-state bytes per wave of the streamed
    evaluation (eval.streamed), chosen like `loram eval` does (runner.scoring_plan: the in-memory peak against
    the memory budget). A model over the budget that cannot stream (a hub id, a GGUF file) is refused."""
    from .budget import GB, SAFETY_MARGIN, exceeds, memory_budget
    from .eval.runner import scoring_plan
    from .planner.stages import StageInputs, predict_in_memory

    stream, hidden = scoring_plan(str(base), req.max_len, BATCH, max_memory)
    if stream:
        return hidden
    budget = memory_budget(max_memory)
    need = predict_in_memory("eval", config, None, StageInputs(eval_batch=BATCH, eval_seq_len=req.max_len))
    if need is not None and exceeds(need, budget):
        raise LoramError(f"--calibrate evaluates the original model (~{need / GB:.1f} GB in memory, more than "
                         f"{1 - SAFETY_MARGIN:.0%} of the memory budget: {budget.gb:.1f} GB, {budget.source}) and {base} is "
                         "not a local safetensors folder, which could be read layer by layer: pass a local copy of the "
                         "model, or recover without --calibrate")
    return None


def is_lora_b(key: str) -> bool:
    """An adapter key holding a B factor (the factor the scale multiplies): lora_B of a linear, lora_embedding_B."""
    return ".lora_B." in key or key.endswith(".lora_embedding_B")


def layer_of(key: str) -> int | None:
    """The decoder layer an adapter key belongs to; None for lm_head / embed_tokens."""
    t = parse_name(key)
    return None if t is None else t.layer


def scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    """``t`` x s, rounded to t's dtype: the tensor the written adapter holds (and the one calibration scores)."""
    return t if s == 1 else (t.float() * s).to(t.dtype)


def scale_adapter(tensors: dict[str, torch.Tensor], scales: dict[int | None, float]) -> dict[str, torch.Tensor]:
    """The adapter with each lora_B multiplied by the scale of its layer (key None: the modules outside the
    decoder layers); every other tensor is shared with the input, not copied."""
    return {k: scaled(v, scales[layer_of(k)]) if is_lora_b(k) else v for k, v in tensors.items()}


@dataclass
class Outcome:
    """What calibration chose and measured; ``record()`` is what loram_adapter.json keeps."""

    scope: str
    scales: dict  # layer (None: outside the layers) -> s
    losses: dict  # "global": {s: loss}, and per layer {i: {s: loss}} for scope layer
    loss: float  # the written adapter's in-domain loss
    rows: int
    tokens: int
    scored: int
    seconds: float = 0.0
    passes: int = 0
    data: str = ""
    truncated: int = 0
    streamed: bool = False
    grid: tuple = field(default=GRID)
    general: dict | None = None  # --calibrate-general: the bound and every general-text loss scored (see search)

    def record(self) -> dict:
        g = self.losses["global"]
        out = {"scope": self.scope, "data": self.data, "rows": self.rows, "tokens": self.tokens, "scored_tokens": self.scored,
               "truncated": self.truncated, "grid": list(self.grid), "scale": self.scales[None], "loss": self.loss,
               "loss_at_1": g[1.0], "loss_at_0": g[0.0], "losses": {str(s): v for s, v in g.items()},
               "passes": self.passes, "seconds": round(self.seconds, 2), "streamed": self.streamed,
               "loss_unit": "mean nll per scored token (nats)"}
        if self.scope == "layer":
            out["layer_scales"] = {str(i): s for i, s in self.scales.items() if i is not None}
            out["layer_losses"] = {str(i): {str(s): v for s, v in c.items()} for i, c in self.losses["layers"].items()}
        if self.general is not None:
            out["general"] = self.general
        return out


def summary(rec: dict) -> str:
    """One line for the user: loss at s=1 (as trained), at s* (written) and s* itself; with a general-text bound,
    that text's loss as written against the base's."""
    s = f"s*={rec['scale']:g}" if rec["scope"] == "global" else f"per-layer s in [{min(rec['layer_scales'].values()):g}, " \
        f"{max(rec['layer_scales'].values()):g}] (global s*={rec['scale']:g})"
    g = rec.get("general")
    kept = "" if g is None else (f"; general text {g['loss']:.4f} vs base {g['loss_at_0']:.4f} (bound {g['bound']:.4f}, "
                                 f"+{g['tolerance_pct']:g} % ppl{', binding' if g['binding'] else ''})")
    return (f"calibrated on {rec['rows']} rows ({rec['scored_tokens']} scored tokens): loss {rec['loss_at_1']:.4f} at s=1, "
            f"{rec['loss']:.4f} with {s}, {rec['loss_at_0']:.4f} at s=0 (base){kept}; {rec['passes']} passes"
            f"{' streamed' if rec.get('streamed') else ''}, {rec['seconds']:.0f} s")


class Scorer:
    """The original model with an adapter attached (PEFT, unmerged) whose lora_B can be re-scaled per layer;
    ``slices``: part ("domain", "general") -> the rows that part's loss is scored on."""

    def __init__(self, base: str | Path, adapter: str | Path, tensors: dict[str, torch.Tensor], slices: dict[str, Slice]):
        from .eval.ppl import pad_id
        from .merge import load_with_adapter

        self.pm, tok = load_with_adapter(base, adapter, dtype=torch.float32, check_base=False)  # recover checked the base
        self.pm.eval()
        self.pad = pad_id(tok)
        self.examples = {part: sl.examples for part, sl in slices.items()}
        params = {n.replace(".default", ""): p for n, p in self.pm.named_parameters()}
        self.b = {k: (params[k], v) for k, v in tensors.items() if is_lora_b(k)}  # key -> (model tensor, adapter's B)
        self.passes = 0

    def loss(self, scales: dict[int | None, float], part: str = "domain") -> tuple[float, int]:
        """(mean nll per scored token, scored tokens) of ``part``'s rows with each lora_B scaled by its layer's s."""
        from .eval.ppl import perplexity_of

        with torch.no_grad():
            for k, (p, b) in self.b.items():
                p.copy_(scaled(b, scales[layer_of(k)]).to(p.dtype))
        self.passes += 1
        r = perplexity_of(self.pm, self.examples[part], self.pad, BATCH)
        return r.nll, r.tokens


class StreamedScorer:
    """The same losses for an original larger than memory: each candidate adapter (scale_adapter, the tensors
    that would be written) is saved to a scratch folder beside ``adapter`` and scored by the streamed
    evaluation (eval.streamed.open_streamed: one decoder layer in memory, the update folded in as it loads)."""

    def __init__(self, base: str | Path, adapter: Path, tensors: dict[str, torch.Tensor], slices: dict[str, Slice],
                 max_hidden_bytes: int, device="cpu"):
        from .io import read_json
        from .prune_plan import PrunePlan

        self.base, self.tensors = base, tensors
        self.examples = {part: sl.examples for part, sl in slices.items()}
        self.cfg, self.meta, self.plan = read_json(adapter / ADAPTER_CONFIG), read_meta(adapter), PrunePlan.load(adapter)
        self.scratch = adapter / ".calibrate"  # inside recover's temporary output folder; removed by ``close``
        self.scratch.mkdir()
        self.hidden, self.device = max_hidden_bytes, device
        self.b = {k: v for k, v in tensors.items() if is_lora_b(k)}
        self.passes = 0

    def loss(self, scales: dict[int | None, float], part: str = "domain") -> tuple[float, int]:
        from .eval.ppl import pad_id, perplexity_of
        from .eval.streamed import open_streamed

        write_adapter(self.scratch, scale_adapter(self.tensors, scales), self.cfg, self.meta, self.plan)
        lm, tok = open_streamed(self.base, self.scratch, device=self.device, max_hidden_bytes=self.hidden, check_base=False)
        self.passes += 1
        r = perplexity_of(lm, self.examples[part], pad_id(tok), BATCH)
        return r.nll, r.tokens

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.scratch)


@dataclass
class Bound:
    """The --calibrate-general constraint: the general-text loss a candidate may reach, and what was scored."""

    limit: float
    at_0: float  # the base's general-text loss (every lora_B x 0)
    checked: dict = field(default_factory=dict)  # "global" -> {s: loss}; layer i -> {s: loss}
    binding: bool = False  # some step passed over a better in-domain candidate because of the bound
    loss: float = 0.0  # the general-text loss of the scales kept so far (the written ones, once search returns)


def pick(cand: dict, preference, known: set, fits) -> float:
    """The candidate to keep: the lowest in-domain loss (``cand``: s -> loss; ties by ``preference(s)``) among those
    that keep the bound: ``known`` ones keep it already, the others are asked ``fits(s)`` in order."""
    for s in sorted(cand, key=lambda s: (cand[s], preference(s))):
        if s in known or fits(s):
            return s
    raise AssertionError("unreachable: a known candidate keeps the bound")  # s = 0 / the current value is always known


def search(score, layers: list[int], scope: str, grid: tuple = GRID, bound: Bound | None = None) -> tuple[dict, dict, int, float]:
    """(scales, in-domain losses, scored tokens, the chosen scales' in-domain loss) by the search of the module
    docstring; ``score(scales, part)`` -> (loss, tokens). With ``bound`` a candidate is kept only if its general-text
    loss stays <= bound.limit (the losses scored land in bound.checked)."""
    keys = [None, *layers]

    def choose(cand: dict, preference, known, where, make) -> float:
        """The best of ``cand`` (ties by ``preference``); under a bound the best that keeps it (``pick``), the
        general-text losses scored recorded under ``where``, ``known`` candidates keeping it without a pass."""
        free = min(cand, key=lambda s: (cand[s], preference(s)))
        if bound is None:
            return free

        def fits(s):
            bound.checked.setdefault(where, {})[s], _ = score(make(s), "general")
            return bound.checked[where][s] <= bound.limit

        got = pick(cand, preference, known, fits)
        bound.binding |= got != free
        bound.loss = bound.checked.get(where, {}).get(got, bound.loss)  # a known candidate keeps the loss it had
        return got

    glob = {}
    for s in grid:
        glob[s], tokens = score(dict.fromkeys(keys, s))
    if bound is not None:
        bound.checked["global"], bound.loss = {0.0: bound.at_0}, bound.at_0
    # a tie goes to the scale nearer the trained one
    best = choose(glob, lambda s: abs(s - 1), {0.0}, "global", lambda s: dict.fromkeys(keys, s))
    scales = dict.fromkeys(keys, best)
    losses: dict = {"global": glob}
    current = glob[best]
    if scope == "layer":
        losses["layers"] = {}
        for i in layers:
            cand = {scales[i]: current}  # the current value: no pass needed, and a change must beat it
            for s in grid:
                if s != scales[i]:
                    cand[s], _ = score({**scales, i: s})
            losses["layers"][i] = dict(sorted(cand.items()))
            keep = scales[i]  # a tie keeps the current value
            scales[i] = choose(cand, lambda s, keep=keep: s != keep, {keep}, i, lambda s, i=i: {**scales, i: s})
            current = cand[scales[i]]
    return scales, losses, tokens, current


def calibrate(base: str | Path, adapter: str | Path, tensors: dict[str, torch.Tensor], slices: dict[str, Slice],
              req: CalibrationRequest, stream_hidden_bytes: int | None = None) -> Outcome:
    """The scales of the adapter folder ``adapter`` (full shapes, ``tensors`` its contents) on ``base``, scored in
    memory, or streamed with that many bytes of hidden states per wave (``check_fits`` says which); ``slices``:
    "domain" (the --calibrate rows) and, with --calibrate-general, "general"."""
    t0 = time.time()
    sc = Scorer(base, adapter, tensors, slices) if stream_hidden_bytes is None else \
        StreamedScorer(base, Path(adapter), tensors, slices, stream_hidden_bytes)
    layers = sorted({i for k in sc.b if (i := layer_of(k)) is not None})
    try:
        bound = None
        if req.general is not None:
            at_0, _ = sc.loss(dict.fromkeys([None, *layers], 0.0), "general")
            bound = Bound(at_0 + req.allowed_rise, at_0)
        scales, losses, scored, loss = search(sc.loss, layers, req.how, req.grid, bound)
    finally:
        if isinstance(sc, StreamedScorer):
            sc.close()
    general = None
    if bound is not None:
        g = slices["general"]
        general = {"data": req.general, "rows": len(g.examples), "tokens": g.tokens, "truncated": g.truncated,
                   "tolerance_pct": req.tolerance or 0.0, "loss_at_0": bound.at_0, "bound": bound.limit, "binding": bound.binding,
                   "loss": bound.loss, "checked": {str(k): {str(s): v for s, v in c.items()} for k, c in bound.checked.items()}}
    return Outcome(req.how, scales, losses, loss, len(slices["domain"].examples), slices["domain"].tokens, scored,
                   time.time() - t0, sc.passes, req.data, slices["domain"].truncated, streamed=stream_hidden_bytes is not None,
                   grid=req.grid, general=general)
