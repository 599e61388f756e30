"""Training memory of (Q)LoRA on an original or pruned model, term by term.

Notation: N = micro_batch * seq_len tokens, D hidden, per layer i: F_i MLP width, Q_i = kept
query heads * d, KV_i = kept KV heads * d, H_i kept query heads; r the LoRA rank; V vocab.
``a`` = bytes of an activation (2 with precision "bf16": bf16 weights or NF4 with bf16 compute,
LoRA matrices in fp32, bf16 autocast -- what `loram train --bf16` does; 4 with "fp32").

Static terms
    weights          bf16/fp32: bytes * params; NF4: 4-bit packed linears + constants + the rest in 16 bits
    LoRA             r * (in + out) per targeted module, fp32: params 4 B + grads 4 B + AdamW m, v 8 B
    LoRA bf16 copies autocast keeps a bf16 copy of each LoRA matrix for the step: 2 B * LoRA params
Saved activations of one layer, bytes per token (counted from the tensors autograd saves with
the stock Llama/Mistral/Qwen2 code, SDPA attention and PEFT LoRA; tests/test_planner.py checks
the count against torch's saved-tensor hooks on a tiny model)
    2 RMSNorms       2 * (4D + 4)           fp32 input copy + rsqrt
    SwiGLU           3aF_i                  gate out, silu out, up out
    SDPA             a(2Q_i + 2KV_i) + 4H_i q, k, v (no GQA repeat), output, fp32 logsumexp
    each LoRA target in width I: a*I (+ 4I dropout mask when dropout > 0) + a*r (lora_A output)
        bf16: PEFT casts the input to the fp32 LoRA dtype and autocast back to bf16: a new 2I
        fp32: the input itself is saved: shared by q/k/v (and by gate/up), o's input is SDPA's output
    rotary cos/sin   2ad once (shared by the layers)
Backward transient of one layer (estimate, not counted from hooks): 3aF_i + 4F_i + 4D.
Logits and loss, fp32 whatever the precision (HF upcasts before cross-entropy):
    forward  a*V logits + 4V fp32 copy + 4V log-softmax;  backward 4V saved + 4V grad + 4V grad-in
    -> 12 V bytes per token at the peak (10 V in the forward with a = 2)
Peak
    gradient checkpointing: weights + LoRA + checkpoints (aD per layer per token)
                            + max(logits, largest layer's saved activations + its backward transient)
    without:                weights + LoRA + all layers' saved activations + max(logits, transient)
    NF4 adds a transient bf16 copy of the largest quantized matrix (dequantised for each matmul).
Overhead: a constant for what the terms above do not see (Trainer, dataloader, thread pools,
allocator rounding). OVERHEAD_GB_CPU = 0.07 GB was measured once, on one configuration -- SmolLM2
LoRA through the HF Trainer as `loram train` runs it, batch 1 x 512, gradient checkpointing, fp32:
peak RSS above the post-import baseline 0.983 GB vs 0.916 GB of modelled terms -- and is used
unchanged for every other configuration (benchmarks/plan_vs_measured.py validates them). That
measurement, like the benchmark, pins glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_=131072):
with glibc's default dynamic threshold, freed activations stay in the heap and CPU RSS carries
another 0.3-1 GB of dead memory that varies from run to run, which no config-based model can
predict (setting the variable for `loram train` on CPU removes it). On a GPU add the CUDA context
(~0.5 GB) yourself: max_memory_allocated excludes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LoramError
from ..families import geometry
from .params import LayerWidths, ParamCounts, linear_shapes, storage

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Measured once (SmolLM2 LoRA, see the module docstring), the same for every configuration.
OVERHEAD_GB_CPU = 0.07
GB = 1e9


@dataclass(frozen=True)
class TrainSettings:
    """The `loram train` settings that decide memory."""

    seq_len: int = 512
    micro_batch: int = 1
    rank: int = 8
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.05
    grad_checkpointing: bool = False
    precision: str = "bf16"  # bf16 (weights bf16 / NF4, autocast) or fp32
    overhead_gb: float = OVERHEAD_GB_CPU

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def act_bytes(self) -> int:
        if self.precision not in ("bf16", "fp32"):
            raise LoramError(f"precision {self.precision!r} is not bf16 or fp32: pick one")
        return 2 if self.precision == "bf16" else 4


@dataclass
class MemoryEstimate:
    """Peak training memory of one scheme, with every term in bytes."""

    scheme: str
    terms: dict = field(default_factory=dict)
    peak_rule: str = ""

    @property
    def total(self) -> int:
        t = self.terms
        held = t["weights"] + t["lora_params"] + t["lora_grads"] + t["adamw_states"] + t["lora_bf16_copies"] + \
            t["activations_held"] + t["nf4_dequant"] + t["overhead"]
        return held + max(t["logits_loss"], t["layer_peak"])

    @property
    def gb(self) -> float:
        return self.total / GB

    def terms_gb(self) -> dict:
        return {k: round(v / GB, 4) for k, v in self.terms.items()}


def lora_params(config, widths: list[LayerWidths], s: TrainSettings) -> int:
    g = geometry(config)
    n = 0
    for w in widths:
        sh = linear_shapes(g, w)
        n += sum(s.rank * (o + i) for r, (o, i) in sh.items() if r in s.targets)
    if "lm_head" in s.targets:
        n += s.rank * (g.vocab + g.hidden)
    return n


def layer_saved_bytes(g, w: LayerWidths, s: TrainSettings) -> int:
    """Bytes per token autograd saves in one decoder layer (see the module docstring)."""
    a, D, r = s.act_bytes, g.hidden, s.rank
    sh = linear_shapes(g, w)
    q, kv, heads = sh["q"][0], sh["k"][0], w.kv_groups * g.group
    t = set(s.targets)
    total = 2 * (4 * D + 4) + 3 * a * w.mlp + a * (2 * q + 2 * kv) + 4 * heads
    for role in ("q", "k", "v", "o", "gate", "up", "down"):
        if role not in t:
            continue
        width = sh[role][1]
        total += a * r + (4 * width if s.dropout > 0 else 0)
        if s.precision == "bf16" or s.dropout > 0:
            total += a * width  # a fresh copy: the autocast cast, or the dropout output
    if s.precision == "fp32" and s.dropout == 0:
        # the inputs themselves: one normed x for q/k/v, one for gate/up, the product for down
        total += a * D * bool(t & {"q", "k", "v"}) + a * D * bool(t & {"gate", "up"}) + a * w.mlp * ("down" in t)
    return total


def layer_transient_bytes(g, w: LayerWidths, s: TrainSettings) -> int:
    return 3 * s.act_bytes * w.mlp + 4 * w.mlp + 4 * g.hidden


def logits_loss_bytes(g, tokens: int) -> int:
    """fp32 logits, their fp32 copy and the log-softmax (forward), or the saved copy, its grad and the grad-in
    (backward): 12 V bytes per token at the peak, whatever the precision (see the module docstring)."""
    return 12 * g.vocab * tokens


def estimate(config, widths: list[LayerWidths], counts: ParamCounts, s: TrainSettings, quantized: bool,
             scheme: str) -> MemoryEstimate:
    g = geometry(config)
    a, n = s.act_bytes, s.tokens
    st = storage(counts)
    if quantized:
        weights = st.nf4_weights + st.nf4_constants + 2 * counts.non_linear
        dequant = 2 * max(o * i for o, i in counts.linear_shapes)
    else:
        weights = a * counts.total
        dequant = 0
    lp = lora_params(config, widths, s)
    saved = [layer_saved_bytes(g, w, s) * n for w in widths]
    transient = max(layer_transient_bytes(g, w, s) for w in widths) * n
    rotary = 2 * a * g.head_dim * n
    final = (4 * g.hidden + 4) * n  # final RMSNorm
    logits = logits_loss_bytes(g, n)
    if "lm_head" in s.targets:
        logits += (a + 4 * (s.dropout > 0)) * g.hidden * n + a * g.vocab * n
    if s.grad_checkpointing:
        held = a * g.hidden * n * g.n_layers + rotary + final
        layer_peak = max(saved) + transient
        rule = "weights + LoRA states + checkpoints + max(logits/loss, one layer recomputed + its backward)"
    else:
        held = sum(saved) + rotary + final
        layer_peak = transient
        rule = "weights + LoRA states + all layers' saved activations + max(logits/loss, backward transient)"
    terms = {
        "weights": weights, "lora_params": 4 * lp, "lora_grads": 4 * lp, "adamw_states": 8 * lp,
        "lora_bf16_copies": 2 * lp if s.precision == "bf16" else 0, "activations_held": held,
        "layer_peak": layer_peak, "logits_loss": logits, "nf4_dequant": dequant, "overhead": int(s.overhead_gb * GB),
    }
    return MemoryEstimate(scheme=scheme, terms=terms, peak_rule=rule)
