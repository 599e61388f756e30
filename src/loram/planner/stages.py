"""Peak memory of each pipeline stage, in memory and streamed layer by layer, from a config alone.

    from loram.planner.stages import predict_in_memory, stage_peaks
    need = predict_in_memory("prune", config, PruneSpec("taylor", 0.5))   # bytes; then budget.choose_streaming
    for p in stage_peaks(config, spec): p.stage, p.in_memory_bytes, p.streamed_bytes

Notation (bytes; 4 = fp32, the compute dtype of every stage on CPU): P parameters of the model,
L the largest decoder layer's parameters, R = P - sum of the layers (embeddings, lm_head unless
tied, final norm), M the largest decoder linear (out * in), I_q, I_o, I_g, I_d the input widths of
q/k/v, o, gate/up and down (D, Q, D, F: the linears sharing an input share its statistics), D hidden,
V vocab, n_layers layers. Calibration: n samples of s tokens, S = n * s. Per token and layer,
saved(w) and transient(w) are memory.py's layer_saved_bytes / layer_transient_bytes in fp32, and
logits(T) = 12 V T is memory.py's logits_loss_bytes. What the process holds before the stage
(Python, torch, the tokenizer) is not counted: loram.budget takes it out of the budget.

prune (the original model; the method and layers from the PruneSpec / PrunePlan, taylor by default)
    streamed weights  Ws = 4 (L + R): one decoder layer + embeddings, final norm and lm_head
    random      in memory 4P                                   streamed Ws (no weight is needed to choose)
    magnitude   in memory 4P + 4M                              streamed Ws + 4M (|W| of one linear)
    taylor      in memory 4P + 4G + sum_layers(saved) s + max(logits(s), transient s) (+ rotary, final norm)
                    G = parameters of the scored layers (their gradients); one calibration sequence's
                    graph at a time (memory.estimate of a rank-0 fp32 step: see _grad_step)
                streamed  Ws + 4L (one layer's gradients) + 4 D S (n_layers + 1) (the hidden states at
                    every layer boundary, kept for the backward) + 4 D s (the gradient flowing back)
                    + saved s + max(logits(s), transient s) (one layer of one sequence)
    fisher      taylor's (its per-sequence squared unit sums add 2 floats per channel / group: nothing)
    wanda-sp    both: 2 * 4 D S + transient s + 8 (I_q + I_o + I_g + I_d) (one forward, the input-feature norms
                    of one layer's linears); in memory + 4P, streamed + Ws
    sparsegpt   both: 2 * 4 D S (a layer's inputs and outputs for the calibration set, while one
                    replaces the other) + transient s + 4 (I_q^2 + I_o^2 + I_g^2 + I_d^2) (one layer's
                    Hessians) + 12 I_max^2 + 4M (the solve of the widest input, alive together in
                    prune/sparsegpt.py, all float32: H's damped copy 4, the Cholesky factor 4, the inverse 4,
                    then its upper factor 4 once the factor is freed; and the weight's fp32 copy; a float64
                    retry, only when the float32 factorisation fails, is not counted); in memory + 4P,
                    streamed + Ws. For wide MLPs the solve can still pass the weights (Qwen2-7B: I = 18944,
                    12 I^2 = 4.3 GB)
    wanda       as sparsegpt with 8 (I_q + I_o + I_g + I_d) of column norms (float64) and 8M for the
                    solve (the float64 score of one linear)
build       streamed: the pruned model as stored (bf16 = 2 B/param, or NF4 + constants + 16-bit rest) + 4M of
            the pruned model (one linear in fp32 while it is materialised); build always streams (in memory None)
train       memory.estimate of LoRAM (QLoRAM when quantized) with the given TrainSettings
recover     4 (A' + A): the pruned adapter read and the recovered one written, fp32, A = LoRA parameters
merge (the model merged into: original shapes, or the plan's when given; A its adapter): merge always
            streams tensor by tensor, so it has no in-memory prediction (None), as build
            streamed  b max(L, R) + 4 max(M, V D) + 4A: one output shard in the stored dtype (b bytes
                      per parameter; build and `loram prune` write one shard per layer and one for the
                      rest), the tensor being merged in fp32, the adapter
eval (the model evaluated, as merge; batch B of T = B t tokens, t the sequence length)
            in memory 4P + 2 * 4 D T + max(logits(T), transient T + 4 B H t^2)
                      (the residual stream and a layer's output, then the larger of the scoring's
                      logits and one layer's MLP intermediates + attention scores [B, heads, t, t]:
                      SDPA's math path materialises them under a padding mask)
            streamed  Ws + 2 * 4 D N t + max(logits(T), transient T + 4 B H t^2)
                      (N evaluated sequences' hidden states, in and out of the layer)

These are models, term by term, not measurements: the training one is checked against measured
peaks (benchmarks/plan_vs_measured.py), the others leave out allocator slack, which is why
loram.budget.choose_streaming keeps a margin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..budget import Budget, choose_streaming, exceeds
from ..errors import LoramError
from ..families import geometry
from ..prune_plan import PrunePlan, parse_layers
from ..settings import EvalSettings, PruneSettings
from .memory import GB, DEFAULT_TARGETS, TrainSettings, estimate, layer_saved_bytes, layer_transient_bytes, lora_params, logits_loss_bytes
from ..prune.structured import GRADIENT
from .params import METHODS, SPARSE, LayerWidths, ParamCounts, PruneSpec, count, layer_widths, linear_shapes, storage

STAGES = ("prune", "build", "train", "recover", "merge", "eval")
STREAMED = ("prune", "build", "merge", "eval")  # the stages with a layer-by-layer path (build and merge have no other)
FP32 = 4
_PRUNE, _EVAL = PruneSettings(), EvalSettings()


@dataclass(frozen=True)
class StageInputs:
    """What besides the config and the pruning decides a stage's peak (defaults: the commands' defaults)."""

    calib_samples: int = _PRUNE.calib_samples
    calib_seq_len: int = _PRUNE.calib_seq_len
    train: TrainSettings = field(default_factory=TrainSettings)  # train, and the adapter of recover / merge
    quantize: bool = False  # build / train: NF4
    eval_batch: int = _EVAL.batch_size
    eval_seq_len: int = _EVAL.seq_len
    eval_sequences: int | None = None  # streamed eval: sequences whose hidden states are held (None: one batch)
    stored_bytes: int = 2  # bytes per parameter written (bf16: build's default, published checkpoints)


@dataclass(frozen=True)
class StagePeak:
    """Predicted peak of one stage in bytes: in memory, and streamed (None: the stage has no such path;
    build and merge always stream, train and recover always run in memory; at least one is set)."""

    stage: str
    in_memory_bytes: int | None
    streamed_bytes: int | None = None
    detail: str = ""  # which variant was predicted, e.g. "taylor, 8 x 128 calibration tokens"

    def streams(self, budget: Budget) -> bool:
        """Whether the stage streams under ``budget`` (loram.budget.choose_streaming's rule; always, without an in-memory path)."""
        return self.in_memory_bytes is None or (self.streamed_bytes is not None and exceeds(self.in_memory_bytes, budget))

    def peak(self, budget: Budget) -> int:
        """The peak of the path the stage takes under ``budget``."""
        return self.streamed_bytes if self.streams(budget) else self.in_memory_bytes

    def fits(self, budget: Budget) -> bool:
        """Whether that peak fits the budget with the same margin."""
        return not exceeds(self.peak(budget), budget)

    def to_dict(self, budget: Budget | None = None) -> dict:
        gb = lambda b: None if b is None else b / GB  # noqa: E731 - None: the stage has no such path
        d = {"stage": self.stage, "detail": self.detail, "in_memory_gb": gb(self.in_memory_bytes), "streamed_gb": gb(self.streamed_bytes)}
        if budget is not None:
            d.update(streams=self.streams(budget), peak_gb=self.peak(budget) / GB, fits=self.fits(budget))
        return d


@dataclass
class _Model:
    """The sizes the formulas use, of one model (original or pruned widths)."""

    g: object
    widths: list[LayerWidths]
    counts: ParamCounts

    @property
    def P(self) -> int:  # noqa: N802 - the docstring's notation
        return self.counts.total

    @property
    def L(self) -> int:  # noqa: N802
        return max(self.counts.per_layer)

    @property
    def R(self) -> int:  # noqa: N802
        return self.counts.total - sum(self.counts.per_layer)

    @property
    def M(self) -> int:  # noqa: N802
        return max(o * i for o, i in self.counts.linear_shapes)

    def input_widths(self) -> list[int]:
        """Widest input of each statistics group (q/k/v, o, gate/up, down) over the layers."""
        shapes = [linear_shapes(self.g, w) for w in self.widths]
        return [max(sh[r][1] for sh in shapes) for r in ("q", "o", "gate", "down")]

    def layer_max(self, per_token) -> int:
        return max(per_token(self.g, w, _fp32()) for w in self.widths)


def _model(config, spec) -> _Model:
    widths = layer_widths(config, spec)
    return _Model(geometry(config), widths, count(config, widths))


def _fp32() -> TrainSettings:
    return TrainSettings(precision="fp32", dropout=0.0, rank=0, overhead_gb=0.0, device="cpu")


def _grad_step(seq_len: int) -> TrainSettings:
    """A full-gradient fp32 step of one sequence in memory.py's terms: rank 0 makes the LoRA terms
    vanish, and with fp32 and no dropout its count keeps exactly the linears' inputs, which their
    weight gradients need (it counts every layer: those below the scored range need less)."""
    return TrainSettings(seq_len=seq_len, micro_batch=1, rank=0, targets=DEFAULT_TARGETS, dropout=0.0, precision="fp32", device="cpu",
                         overhead_gb=0.0, grad_checkpointing=False)


def _method(spec) -> str:
    if spec is None:
        return "taylor"
    return "taylor" if spec.method == "structured" else spec.method


def _layer_range(config, spec) -> range:
    g = geometry(config)
    start, end = spec.layers if isinstance(spec, PrunePlan) else parse_layers(getattr(spec, "layers", None), g.n_layers)
    return range(start, end)


# ---- prune ----------------------------------------------------------------------------------------
def _prune(config, spec, x: StageInputs) -> StagePeak:
    m, method = _model(config, None), _method(spec)
    s, S, D = x.calib_seq_len, x.calib_samples * x.calib_seq_len, m.g.hidden
    ws = FP32 * (m.L + m.R)
    calib = f"{x.calib_samples} x {s} calibration tokens"
    if method == "random":
        return StagePeak("prune", FP32 * m.P, ws, "random")
    if method == "magnitude":
        return StagePeak("prune", FP32 * (m.P + m.M), ws + FP32 * m.M, "magnitude")
    one_layer = m.layer_max(layer_saved_bytes) * s + max(logits_loss_bytes(m.g, s), m.layer_max(layer_transient_bytes) * s)
    if method in GRADIENT:  # fisher: taylor's passes, plus two floats per unit
        scored = sum(m.counts.per_layer[i] for i in _layer_range(config, spec))
        in_memory = estimate(config, m.widths, m.counts, _grad_step(s), False, "prune").total + FP32 * scored
        boundaries = FP32 * D * S * (m.g.n_layers + 1) + FP32 * D * s
        return StagePeak("prune", in_memory, ws + FP32 * m.L + boundaries + one_layer, f"{method}, {calib}")
    widths = m.input_widths()
    if method == "wanda-sp":  # one forward, no gradients: per-input-feature norms (8 B each) of the layer's linears
        work = 2 * FP32 * D * S + m.layer_max(layer_transient_bytes) * s + 8 * sum(widths)
        return StagePeak("prune", FP32 * m.P + work, ws + work, f"wanda-sp, {calib}")
    if method not in SPARSE:
        raise LoramError(f"unknown --method {method!r}: choose one of {', '.join(x for x in METHODS if x != 'structured')}")
    if method == "sparsegpt":
        stats, solve = FP32 * sum(i * i for i in widths), 12 * max(widths) ** 2 + FP32 * m.M
    else:
        stats, solve = 8 * sum(widths), 8 * m.M
    work = 2 * FP32 * D * S + m.layer_max(layer_transient_bytes) * s + stats + solve
    return StagePeak("prune", FP32 * m.P + work, ws + work, f"{method}, {calib}")


# ---- build, train, recover ------------------------------------------------------------------------
def _build(config, spec, x: StageInputs) -> StagePeak:
    m = _model(config, spec)
    st = storage(m.counts)
    result = st.nf4_total if x.quantize else x.stored_bytes * m.P
    return StagePeak("build", None, result + FP32 * m.M, "NF4" if x.quantize else f"{x.stored_bytes} B/param")


def _train(config, spec, x: StageInputs) -> StagePeak:
    from .predict import predict

    scheme = "QLoRAM" if x.quantize else "LoRAM"
    return StagePeak("train", predict(config, spec, x.train).schemes[scheme].total, None, scheme)


def _adapter_params(config, spec, x: StageInputs) -> int:
    return lora_params(config, layer_widths(config, spec), x.train)


def _recover(config, spec, x: StageInputs) -> StagePeak:
    both = _adapter_params(config, spec, x) + _adapter_params(config, None, x)
    return StagePeak("recover", FP32 * both, None, f"rank {x.train.rank}")


# ---- merge, eval ----------------------------------------------------------------------------------
def _merge(config, spec, x: StageInputs) -> StagePeak:
    m, a = _model(config, spec), _adapter_params(config, spec, x)
    streamed = x.stored_bytes * max(m.L, m.R) + FP32 * max(m.M, m.g.vocab * m.g.hidden) + FP32 * a
    return StagePeak("merge", None, streamed, f"rank {x.train.rank}")


def _eval(config, spec, x: StageInputs) -> StagePeak:
    m = _model(config, spec)
    b, t = x.eval_batch, x.eval_seq_len
    T, D = b * t, m.g.hidden
    scores = FP32 * b * m.g.n_heads * t * t
    batch = max(logits_loss_bytes(m.g, T), m.layer_max(layer_transient_bytes) * T + scores)
    held = x.eval_sequences or b
    return StagePeak("eval", FP32 * m.P + 2 * FP32 * D * T + batch,
                     FP32 * (m.L + m.R) + 2 * FP32 * D * held * t + batch, f"batch {b} x {t}")


_PREDICT = {"prune": _prune, "build": _build, "train": _train, "recover": _recover, "merge": _merge, "eval": _eval}


def predict_stage(stage: str, config, plan_or_spec: PrunePlan | PruneSpec | None = None,
                  inputs: StageInputs | None = None) -> StagePeak:
    """The StagePeak of ``stage`` (see the module docstring for each formula and what ``plan_or_spec`` means)."""
    if stage not in _PREDICT:
        raise LoramError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    return _PREDICT[stage](config, plan_or_spec, inputs or StageInputs())


def predict_in_memory(stage: str, config, plan_or_spec: PrunePlan | PruneSpec | None = None,
                      inputs: StageInputs | None = None) -> int | None:
    """Predicted in-memory peak of ``stage`` in bytes: what loram.budget.choose_streaming compares with the budget
    (None for build and merge, which always stream)."""
    return predict_stage(stage, config, plan_or_spec, inputs).in_memory_bytes


def must_stream(stage: str, config, plan_or_spec: PrunePlan | PruneSpec | None, inputs: StageInputs, budget: Budget) -> bool:
    """The one streaming decision of the stages that choose (prune, eval): the predicted in-memory peak of
    ``stage`` (``predict_in_memory``) against ``budget`` (loram.budget.memory_budget, read first by the
    caller: it checks --max-memory before anything else) through budget.choose_streaming, which says so
    on stderr when it streams."""
    return choose_streaming(stage, predict_in_memory(stage, config, plan_or_spec, inputs), budget)


def stage_peaks(config, plan_or_spec: PrunePlan | PruneSpec | None = None, inputs: StageInputs | None = None) -> list[StagePeak]:
    """Every stage of the pipeline for ``config`` pruned by ``plan_or_spec``: prune, build, train and
    recover see the pruning; merge and eval work on the original shapes (what the pipeline merges
    into and evaluates)."""
    x = inputs or StageInputs()
    return [predict_stage(s, config, plan_or_spec if s in ("prune", "build", "train", "recover") else None, x)
            for s in STAGES]
