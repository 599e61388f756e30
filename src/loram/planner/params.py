"""Exact parameter counts of an original and a pruned model, from the config alone.

Per decoder layer i with kept MLP channels F_i and kept KV groups K_i (q width Q_i = K_i*G*d,
k/v width KV_i = K_i*d; unpruned layers keep F and K):

    attention  D*Q_i + 2*D*KV_i + Q_i*D   (+ Q_i, KV_i, KV_i, D for the biases the family has)
    MLP        3*D*F_i                     (+ F_i, F_i, D with mlp_bias)
    norms      2*D
    model      V*D embeddings (+ V*D lm_head unless tied) + D final norm

F_i and K_i come from a PrunePlan's kept lists, or in closed form from the ratios with the
rounding `loram prune` uses (plan.kept_mlp_channels / kept_kv_groups): the two give the same
count, and the tests check both against the meta-device build and a model `loram prune` wrote.

Sparse methods (SparseGPT, Wanda) keep every shape: the pruned count equals the original, and
``nonzeros`` counts the weights left (per output row ``in - floor(in * ratio)`` for unstructured,
``in * N / M`` for N:M) in the decoder linears of the pruned layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import LoramError
from ..families import ROLES, Geometry, geometry
from ..prune_plan import SPARSE_ONLY, STRUCTURED_METHODS, PrunePlan, kept_kv_groups, kept_mlp_channels, parse_layers
from ..validate import check_ratio

STRUCTURED = ("structured", *STRUCTURED_METHODS)  # "structured": the planner's name for any structured method
SPARSE = SPARSE_ONLY
METHODS = STRUCTURED + SPARSE


@dataclass(frozen=True)
class PruneSpec:
    """What to prune, without a model: the arguments of `loram prune` (ratio 0 = no pruning)."""

    method: str = "structured"
    ratio: float = 0.0
    attn_ratio: float | None = None  # None: same as ratio
    layers: str | None = None  # START:END, default as `loram prune`
    sparsity: str = "unstructured"  # sparse methods: unstructured | N:M

    @property
    def kind(self) -> str:
        return "sparse" if self.method in SPARSE else "structured"

    def attn(self) -> float:
        return self.ratio if self.attn_ratio is None else self.attn_ratio


@dataclass(frozen=True)
class LayerWidths:
    """Kept MLP channels and KV groups of one decoder layer."""

    mlp: int
    kv_groups: int


def layer_widths(config, spec: PruneSpec | PrunePlan | None) -> list[LayerWidths]:
    """Per-layer widths after structured pruning (the original widths for sparse or no pruning)."""
    g = geometry(config)
    full = [LayerWidths(g.intermediate, g.n_kv_heads) for _ in range(g.n_layers)]
    if spec is None:
        return full
    if isinstance(spec, PrunePlan):
        if spec.kind != "structured":
            return full
        spec.validate(g)
        for i, lp in spec.pruned.items():
            full[i] = LayerWidths(len(lp.mlp_keep) if lp.mlp_keep is not None else g.intermediate,
                                  len(lp.kv_keep) if lp.kv_keep is not None else g.n_kv_heads)
        return full
    check_spec(spec)
    if spec.kind == "sparse" or spec.ratio == 0:
        return full
    start, end = parse_layers(spec.layers, g.n_layers)
    f, k = kept_mlp_channels(g.intermediate, spec.ratio), kept_kv_groups(g.n_kv_heads, spec.attn())
    for i in range(start, end):
        full[i] = LayerWidths(f, k)
    return full


def check_spec(spec: PruneSpec) -> None:
    if spec.method not in METHODS:
        raise LoramError(f"unknown --method {spec.method!r}: choose one of {', '.join(METHODS)}")

    for name, r in (("--ratio", spec.ratio), ("--attn-ratio", spec.attn())):
        check_ratio(name, r, allow_zero=True)


def linear_shapes(g: Geometry, w: LayerWidths) -> dict[str, tuple[int, int]]:
    """(out, in) of each role's nn.Linear in a layer with widths ``w``."""
    return {r: g.shape(r, w.mlp, w.kv_groups) for r in ROLES}


@dataclass
class ParamCounts:
    """Parameter counts of one model (original or pruned), split the way storage needs them."""

    linear_weights: int  # decoder q/k/v/o/gate/up/down weights (what NF4 quantizes)
    linear_shapes: list  # [(out, in)] of every decoder linear, for the NF4 constants
    biases: int
    norms: int
    embed: int
    lm_head: int  # 0 when tied to the embeddings
    nonzeros: int | None = None  # sparse methods: weights left non-zero
    per_layer: list = field(default_factory=list)  # parameters of each decoder layer

    @property
    def total(self) -> int:
        return self.linear_weights + self.biases + self.norms + self.embed + self.lm_head

    @property
    def non_linear(self) -> int:
        """Everything NF4 leaves in 16 bits: embeddings, lm_head, norms, biases."""
        return self.total - self.linear_weights


def count(config, widths: list[LayerWidths]) -> ParamCounts:
    g = geometry(config)
    lin = bias = 0
    shapes, per_layer = [], []
    for w in widths:
        sh = linear_shapes(g, w)
        lw = sum(o * i for o, i in sh.values())
        lb = sum(sh[r][0] for r in ROLES if g.bias[r])
        lin, bias = lin + lw, bias + lb
        shapes += list(sh.values())
        per_layer.append(lw + lb + 2 * g.hidden)
    return ParamCounts(linear_weights=lin, linear_shapes=shapes, biases=bias, norms=2 * g.hidden * g.n_layers + g.hidden,
                       embed=g.vocab * g.hidden, lm_head=0 if g.tied else g.vocab * g.hidden, per_layer=per_layer)


def sparse_nonzeros(config, spec: PruneSpec, counts: ParamCounts) -> int:
    """Non-zero parameters after a sparse method (weights of the pruned layers' linears only)."""
    g = geometry(config)
    start, end = parse_layers(spec.layers, g.n_layers)
    removed = 0
    for w in layer_widths(config, None)[start:end]:
        for out, inp in linear_shapes(g, w).values():
            if spec.sparsity == "unstructured":
                removed += out * math.floor(inp * spec.ratio)
            else:
                n, m = _nm(spec.sparsity)
                removed += out * (inp // m) * (m - n)
    return counts.total - removed


def _nm(s: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in s.split(":"))
        if 0 < n < m:
            return n, m
    except ValueError:
        pass
    raise LoramError(f"--sparsity {s!r} is not 'unstructured' or N:M with 0 < N < M (e.g. 2:4)")


# ---- NF4 storage ---------------------------------------------------------------------------
NF4_BLOCK = 64  # weights per absmax (bitsandbytes default)
NF4_BLOCK2 = 256  # absmaxes per second-level fp32 scale (double quant)


def nf4_constant_bytes(n: int) -> int:
    """Quantization constants bitsandbytes keeps for one NF4 + double-quant tensor of n weights:
    uint8 absmax per 64 weights, fp32 scale per 256 absmaxes, fp32 offset, the 256-entry fp32
    second-level code and the 16-entry fp32 NF4 code."""
    blocks = math.ceil(n / NF4_BLOCK)
    return blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + 4 + 4 * 256 + 4 * 16


@dataclass
class Storage:
    """Bytes of a model's weights."""

    bf16: int  # everything in 16 bits
    nf4_weights: int  # decoder linears at 4 bits (packed two per byte)
    nf4_constants: int  # their quantization constants (reported apart: the paper counts 4 bits flat)
    nf4_rest_bf16: int  # embeddings, lm_head, norms, biases left in 16 bits

    @property
    def nf4_total(self) -> int:
        return self.nf4_weights + self.nf4_constants + self.nf4_rest_bf16


def storage(c: ParamCounts) -> Storage:
    return Storage(bf16=2 * c.total, nf4_weights=sum(math.ceil(o * i / 2) for o, i in c.linear_shapes),
                   nf4_constants=sum(nf4_constant_bytes(o * i) for o, i in c.linear_shapes),
                   nf4_rest_bf16=2 * c.non_linear)
