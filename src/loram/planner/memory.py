"""Training memory of (Q)LoRA on an original or pruned model, term by term.

Notation: N = micro_batch * seq_len tokens, D hidden, per layer i: F_i MLP width, Q_i = kept
query heads * d, KV_i = kept KV heads * d, H_i kept query heads; r the LoRA rank; V vocab.
``a`` = bytes of an activation (2 with a 16-bit compute dtype, bf16 or fp16: weights in it or NF4 with
it as compute dtype, LoRA matrices in fp32, autocast -- what `loram train --precision bf16` does; 4 with
fp32). ``precision`` "auto" is what `loram train` picks on the target ``device`` (configs.auto_precision):
bf16 on cuda, fp32 on cpu -- the same default for the planner and for training.

Static terms
    weights          a * params; NF4: 4-bit packed linears + constants + the rest in the compute dtype (a)
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
    NF4 adds a transient copy of the largest quantized matrix in the compute dtype (dequantised per matmul);
    on a CPU three (bitsandbytes' torch path: int32 codes, looked-up values, scaled output: 4 + 2a bytes).
Overhead: a constant for what the terms above do not see (Trainer, dataloader, thread pools,
allocator rounding). OVERHEAD_GB_CPU = 0.07 GB was measured once, on one configuration -- SmolLM2
LoRA through the HF Trainer as `loram train` runs it, batch 1 x 512, gradient checkpointing, fp32:
peak RSS above the post-import baseline 0.983 GB vs 0.916 GB of modelled terms -- and is used
unchanged for every other configuration (benchmarks/plan_vs_measured.py validates them). That
measurement, like the benchmark, pins glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_=131072):
with glibc's default dynamic threshold, freed activations stay in the heap and CPU RSS carries
another 0.3-1 GB of dead memory that varies from run to run, which no config-based model can
predict (setting the variable for `loram train` on CPU removes it).
GPU terms (device "cuda" only; absent on cpu):
    gpu_cublas_workspace  cuBLAS's workspace, torch's default 32 MiB (CUBLAS_WORKSPACE_CONFIG=:4096:8)
    gpu_nccl              world > 1: NCCL's communicator buffers (~0.25 GB per process) + DDP's
                          gradient buckets, a copy of the trainable gradients (4 B * LoRA params)
    gpu_allocator_reserve the caching allocator holds more than it hands out at the peak (block
                          rounding, fragmentation): GPU_RESERVE_FRACTION of the allocated peak above
                          the weights (the frozen weights are allocated once, in exact large blocks;
                          the churn of activations and temporaries is what fragments)
    gpu_context           the CUDA context and loaded kernels, ~0.3-0.5 GB, outside torch's allocator
``MemoryEstimate.allocated`` is what torch.cuda.max_memory_allocated sees (everything but the last two),
``total`` what the device must hold (nvidia-smi; what decides an out-of-memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..configs import PRECISIONS, auto_precision
from ..errors import LoramError
from ..families import geometry
from .params import LayerWidths, ParamCounts, linear_shapes, storage

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Measured once (SmolLM2 LoRA, see the module docstring), the same for every configuration.
OVERHEAD_GB_CPU = 0.07
GB = 1e9
DEVICES = ("cuda", "cpu")
# GPU terms (see the module docstring); typical values, to be checked by benchmarks/gpu_check.sh
GPU_CONTEXT_GB = 0.4
GPU_RESERVE_FRACTION = 0.1
CUBLAS_WORKSPACE = 32 * 2**20
NCCL_GB = 0.25
GPU_TERMS = ("gpu_cublas_workspace", "gpu_nccl", "gpu_allocator_reserve", "gpu_context")


@dataclass(frozen=True)
class TrainSettings:
    """The `loram train` settings that decide memory."""

    seq_len: int = 512
    micro_batch: int = 1
    rank: int = 8
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.05
    grad_checkpointing: bool = False
    precision: str = "auto"  # as `loram train --precision`: auto | bf16 | fp16 | fp32 (auto: by ``device``)
    overhead_gb: float = OVERHEAD_GB_CPU
    device: str = "cuda"  # where the training runs: cuda adds the GPU terms, auto precision is bf16 there
    world: int = 1  # processes (GPUs) of a torchrun / accelerate launch: NCCL buffers when > 1

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def compute(self) -> str:
        """The compute dtype's name: ``precision``, with auto resolved for ``device`` as training resolves it."""
        if self.precision not in PRECISIONS:
            raise LoramError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}: pick one")
        if self.device not in DEVICES:
            raise LoramError(f"device {self.device!r} is not one of {', '.join(DEVICES)}: pick one")
        return auto_precision(self.device) if self.precision == "auto" else self.precision

    @property
    def half(self) -> bool:
        """16-bit compute (bf16 or fp16 autocast)."""
        return self.compute != "fp32"

    @property
    def act_bytes(self) -> int:
        return 2 if self.half else 4


@dataclass
class MemoryEstimate:
    """Peak training memory of one scheme, with every term in bytes."""

    scheme: str
    terms: dict = field(default_factory=dict)
    peak_rule: str = ""

    @property
    def allocated(self) -> int:
        """The peak of what torch allocates (torch.cuda.max_memory_allocated on a GPU)."""
        t = self.terms
        held = t["weights"] + t["lora_params"] + t["lora_grads"] + t["adamw_states"] + t["lora_bf16_copies"] + \
            t["activations_held"] + t["nf4_dequant"] + t["overhead"] + t.get("gpu_cublas_workspace", 0) + t.get("gpu_nccl", 0)
        return held + max(t["logits_loss"], t["layer_peak"])

    @property
    def total(self) -> int:
        """What the device must hold: the allocated peak, the allocator's reserve and the CUDA context."""
        return self.allocated + self.terms.get("gpu_allocator_reserve", 0) + self.terms.get("gpu_context", 0)

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
        if s.half or s.dropout > 0:
            total += a * width  # a fresh copy: the autocast cast, or the dropout output
    if not s.half and s.dropout == 0:
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
    if quantized:  # embeddings, lm_head and norms stored in the compute dtype (loram.nf4.nf4_stream_transform)
        weights = st.nf4_weights + st.nf4_constants + a * counts.non_linear
        # a GPU dequantises in one kernel into the compute dtype; bitsandbytes' CPU path (pure torch,
        # backends/default) holds the codes as int32, the looked-up values and the scaled output at once
        dequant = (a if s.device == "cuda" else 4 + 2 * a) * max(o * i for o, i in counts.linear_shapes)
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
        "lora_bf16_copies": 2 * lp if s.half else 0, "activations_held": held,
        "layer_peak": layer_peak, "logits_loss": logits, "nf4_dequant": dequant, "overhead": int(s.overhead_gb * GB),
    }
    if s.device == "cuda":
        terms |= gpu_terms(terms, lp, s)
    return MemoryEstimate(scheme=scheme, terms=terms, peak_rule=rule)


def gpu_terms(terms: dict, lp: int, s: TrainSettings) -> dict:
    """The GPU's own terms (module docstring) on top of the tensor terms ``terms``."""
    out = {"gpu_cublas_workspace": CUBLAS_WORKSPACE,
           "gpu_nccl": int(NCCL_GB * GB) + 4 * lp if s.world > 1 else 0}
    churn = MemoryEstimate("", terms | out).allocated - terms["weights"]
    return out | {"gpu_allocator_reserve": int(GPU_RESERVE_FRACTION * churn), "gpu_context": int(GPU_CONTEXT_GB * GB)}
