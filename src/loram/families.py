"""Model families: the one table of what differs between the LLaMA-family architectures we prune.

Every supported family shares the decoder layout

    model.layers[i].self_attn.{q,k,v,o}_proj      q: [H*d, D]  k,v: [K*d, D]  o: [D, H*d]
    model.layers[i].mlp.{gate,up,down}_proj       gate,up: [F, D]  down: [D, F]

with D = hidden, F = intermediate, H query heads, K KV heads, d = head_dim and G = H / K query
heads per KV head. A *KV group* is one KV head and its G query heads: the unit we prune, because
the stock attention code reshapes with ``-1`` heads and keeps G from the config, so whole groups
can go without touching the modeling code. What differs is only which projections carry a bias.

This module also owns the tensor names (``weight_name`` builds them, ``parse_name`` reads base and
LoRA names) and the tied-lm_head rule (``is_tied_head``): every other module asks here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from .errors import LoramError

# Roles of the seven target projections. "out" roles are pruned on their output rows (lora_B
# rows), "in" roles on their input columns (lora_A columns).
ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
ROLES = ATTN_ROLES + MLP_ROLES
COL_PRUNED = ("o", "down")
MODULE_OF_ROLE = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
ROLE_OF_PROJ = {m.split(".")[1]: r for r, m in MODULE_OF_ROLE.items()}  # "q_proj" -> "q"


# ---- tensor names: the one place that builds and parses them ---------------------------------
def module_name(layer: int, role: str) -> str:
    """``model.layers.{layer}.self_attn.q_proj`` (Hugging Face naming, as in the checkpoints)."""
    return f"model.layers.{layer}.{MODULE_OF_ROLE[role]}"


def weight_name(layer: int, role: str, what: str = "weight") -> str:
    """Checkpoint name of the weight (or ``what="bias"``) of ``role`` in decoder layer ``layer``."""
    return f"{module_name(layer, role)}.{what}"


class TensorName(NamedTuple):
    """A decoder projection's tensor: a base weight/bias (lora None) or a LoRA factor (lora "A"/"B")."""

    layer: int
    role: str
    lora: str | None  # None: the base tensor; "A" / "B": PEFT's lora_A / lora_B (any adapter name)
    kind: str  # "weight" | "bias"


# any prefix (PEFT adds base_model.model.), the adapter name PEFT may insert after lora_A/B
_NAME = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)(?:\.lora_(A|B)(?:\.[\w-]+)?)?\.(weight|bias)$")


def parse_name(key: str) -> TensorName | None:
    """(layer, role, lora, kind) of a decoder projection's tensor name; None for anything else
    (embeddings, norms, lm_head, a PEFT wrapper's base_layer, an unknown projection)."""
    m = _NAME.search(key)
    if not m or m.group(2) not in ROLE_OF_PROJ:
        return None
    return TensorName(int(m.group(1)), ROLE_OF_PROJ[m.group(2)], m.group(3), m.group(4))


def pruned_axis(t: TensorName) -> int | None:
    """The axis of tensor ``t`` that lies in its role's pruned space, or None.

    Rows (axis 0) of q/k/v/gate/up: their weight, bias and lora_B. Columns (axis 1) of o/down: their
    weight and lora_A weight (an o/down bias, like lora_B, is per output row and stays whole)."""
    if t.role in COL_PRUNED:
        return 1 if t.kind == "weight" and t.lora != "B" else None
    return 0 if t.lora != "A" else None


# ---- tied embeddings: the one rule for lm_head ------------------------------------------------
TIED_HEAD = "lm_head"
UNPRUNED_MODULES = (TIED_HEAD, "embed_tokens")  # LoRA targets outside the decoder layers: never pruned


def ties_embeddings(config) -> bool:
    """Whether ``config`` (a transformers config or a config.json dict) ties lm_head to the input embeddings."""
    v = config.get("tie_word_embeddings", False) if isinstance(config, dict) else getattr(config, "tie_word_embeddings", False)
    return bool(v)


def is_tied_head(name: str, tied: bool) -> bool:
    """``name`` (the lm_head module or its weight) is the input embeddings' tensor again in a tied model:
    checkpoints may leave it out, counts and fingerprints take the tensor once, builders re-tie it."""
    return tied and name in (TIED_HEAD, f"{TIED_HEAD}.weight")


@dataclass(frozen=True)
class Family:
    name: str
    # bias of each role: True/False, or the config attribute that decides it
    bias: dict


FAMILIES = {
    # Llama 2/3 and SmolLM2 (tied embeddings are a config flag, not a family)
    "llama": Family("llama", {**{r: "attention_bias" for r in ATTN_ROLES}, **{r: "mlp_bias" for r in MLP_ROLES}}),
    "mistral": Family("mistral", {r: False for r in ROLES}),
    # Qwen2: q/k/v carry biases, o and the MLP do not
    "qwen2": Family("qwen2", {"q": True, "k": True, "v": True, "o": False, "gate": False, "up": False, "down": False}),
}


@dataclass(frozen=True)
class Geometry:
    """The numbers of a config that pruning and planning need."""

    family: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    bias: dict  # role -> bool

    @property
    def group(self) -> int:  # query heads per KV head
        return self.n_heads // self.n_kv_heads

    def shape(self, role: str, mlp: int | None = None, kv_groups: int | None = None) -> tuple[int, int]:
        """(out, in) of ``role``'s nn.Linear with ``mlp`` MLP channels and ``kv_groups`` KV groups (None: all)."""
        f = self.intermediate if mlp is None else mlp
        k = self.n_kv_heads if kv_groups is None else kv_groups
        q, kv = k * self.group * self.head_dim, k * self.head_dim
        return {"q": (q, self.hidden), "k": (kv, self.hidden), "v": (kv, self.hidden), "o": (self.hidden, q),
                "gate": (f, self.hidden), "up": (f, self.hidden), "down": (self.hidden, f)}[role]


def family_of(config) -> Family:
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        raise LoramError(
            f"unsupported architecture {mt!r}: loram supports {', '.join(sorted(FAMILIES))} "
            "(Llama 2/3, SmolLM2, Mistral, Qwen2); convert the model or open an issue for this family"
        )
    return FAMILIES[mt]


def geometry(config) -> Geometry:
    fam = family_of(config)
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if n_heads % n_kv:
        raise LoramError(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}: fix config.json")
    bias = {r: (getattr(config, b, False) if isinstance(b, str) else b) for r, b in fam.bias.items()}
    return Geometry(
        family=fam.name, n_layers=config.num_hidden_layers, hidden=config.hidden_size,
        intermediate=config.intermediate_size, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        vocab=config.vocab_size, tied=ties_embeddings(config), bias=bias,
    )


def layer_module(model, layer: int, role: str):
    """The nn.Linear (or a quantized/LoRA-wrapped one) of ``role`` in decoder layer ``layer``."""
    block = decoder_layers(model)[layer]
    attn_or_mlp, proj = MODULE_OF_ROLE[role].split(".")
    return getattr(getattr(block, attn_or_mlp), proj)


def decoder_layers(model):
    """model.model.layers, looking through PEFT wrappers."""
    m = model
    for _ in range(4):
        if hasattr(m, "layers"):
            return m.layers
        m = getattr(m, "model", None) or getattr(m, "base_model", None)
        if m is None:
            break
    raise LoramError("could not find the decoder layers (model.model.layers) in this model")
