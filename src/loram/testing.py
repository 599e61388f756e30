"""Tiny randomly initialised models of every supported family, built from configs in code, and the
reference helpers the tests compare loram's results with.

Used by the tests and by `loram demo --smoke`: seconds per model, no downloads.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .families import COL_PRUNED, geometry, layer_module, parse_name

# name -> (model_type, config overrides). Widths are small but keep the real structure:
# GQA groups > 1, several KV heads to prune, biases where the family has them.
TINY = {
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True)),
    "llama-bias": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "mistral": ("mistral", dict(num_attention_heads=8, num_key_value_heads=4, sliding_window=None)),
    "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
}
BASE = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=6, vocab_size=256, max_position_embeddings=256,
            rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(name: str = "llama-gqa", **overrides):
    from transformers import AutoConfig

    mt, extra = TINY[name]
    kw = {**BASE, **extra, **overrides}
    if "head_dim" not in kw:
        kw["head_dim"] = 8
    return AutoConfig.for_model(mt, **kw)


def tiny_model(name: str = "llama-gqa", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, **overrides), dtype=torch.float32)
    # random biases are zero-initialised by default; make them non-zero so tests see them
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 256):
    """A byte-level tokenizer (256 ids) with a chat template, built offline with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(3)}
    for b in range(3, vocab_size):
        vocab[bytes([b]).decode("latin-1")] = b
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<0>", bos_token="<1>", eos_token="<2>", unk_token="<0>")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def save_tiny(folder: str | Path, name: str = "llama-gqa", seed: int = 0, **overrides) -> Path:
    """Write a tiny model + tokenizer as an HF folder (safetensors) and return its path."""
    folder = Path(folder)
    model = tiny_model(name, seed, **overrides)
    model.save_pretrained(str(folder), safe_serialization=True)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(str(folder))
    return folder


def lm_eval_task(folder: str | Path, rows: list[dict], name: str = "loram_mini") -> Path:
    """A local lm-evaluation-harness multiple-choice task over ``rows`` ({"query", "choices", "gold"}), so
    `--lm-eval NAME --lm-eval-include FOLDER` runs offline; returns FOLDER. The YAML names acc / acc_norm
    without their aggregation, and lm-eval says so (a warning about the task file, which stays visible)."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return folder


# ---- exactness references (tests only) -------------------------------------------------------
def zero_pruned(model, plan):
    """The original model with every pruned row/column (and bias) set to zero, shapes unchanged.

    Exactness reference: with pruned v rows zero the dropped heads output zero, and with pruned
    gate/up rows zero silu(0)*0 = 0, so this model computes what the pruned one computes.
    """
    g = geometry(model.config)
    for i, role, idx in plan.pruned_modules(g):
        lin = layer_module(model, i, role)
        dim = 1 if role in COL_PRUNED else 0
        mask = torch.ones(lin.weight.shape[dim], dtype=torch.bool)
        mask[idx] = False
        drop = mask.nonzero().squeeze(1).to(lin.weight.device)  # the weight may live on a GPU
        with torch.no_grad():
            lin.weight.index_fill_(dim, drop, 0.0)
            if lin.bias is not None and dim == 0:
                lin.bias.index_fill_(0, drop, 0.0)
    return model


def prune_tensors(full: dict[str, torch.Tensor], plan, config) -> dict[str, torch.Tensor]:
    """Inverse of recover.recover_tensors: select the kept coordinates (recover then prune is the identity)."""
    g = geometry(config)
    out = {}
    for key, t in full.items():
        name = parse_name(key)
        kept = plan.kept_along(name, g) if name is not None and name.lora is not None else None
        out[key] = t.clone() if kept is None else t.index_select(*kept)
    return out


# ---- checkpoints larger than memory (memory-cap tests and benchmarks) -------------------------
def random_checkpoint(folder: str | Path, dtype=torch.bfloat16, seed: int = 0, layers_per_shard: int = 2,
                      one_row: bool = False, **config) -> Path:
    """A random Llama checkpoint written tensor by tensor (the model never exists in memory).

    ``config``: LlamaConfig fields (hidden_size, intermediate_size, num_hidden_layers, ...). Values
    are N(0, 0.02) (norms 1): what matters is size and dtype, and that the model computes finite
    outputs. Sharded like transformers (index json), with the byte tokenizer of ``tiny_tokenizer``.
    ``one_row``: each tensor repeats one random row (drawing 10^8 normals takes half a minute on a
    busy CPU; a test of memory only needs the bytes).
    """
    from transformers import LlamaConfig

    from .pruned_model import skeleton_shapes
    from .weights import ShardWriter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**{"vocab_size": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
                         **config})
    cfg.dtype = dtype
    shapes = skeleton_shapes(cfg, None)
    gen = torch.Generator().manual_seed(seed)

    def make(name):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        if one_row:
            return (torch.randn(shape[-1], generator=gen) * 0.02).to(dtype).expand(shape).contiguous()
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    n = cfg.num_hidden_layers
    groups = [[k for k in shapes if not re.search(r"\.layers\.\d+\.", k)]]
    for s in range(0, n, layers_per_shard):
        groups.append([k for k in shapes if (m := re.search(r"\.layers\.(\d+)\.", k)) and s <= int(m.group(1)) < s + layers_per_shard])
    writer = ShardWriter(folder, len(groups))
    total = 0
    for names in groups:
        tensors = {k: make(k) for k in names}
        total += sum(t.numel() for t in tensors.values())
        writer.add(tensors)
        del tensors
    writer.finish(total)
    cfg.save_pretrained(str(folder))
    tiny_tokenizer(min(cfg.vocab_size, 256)).save_pretrained(str(folder))
    return folder


def random_lora(folder: str | Path, base: str | Path, targets=("q_proj", "down_proj"), rank: int = 4, seed: int = 0) -> Path:
    """A plain PEFT LoRA adapter for the model folder ``base`` with random non-zero factors (N(0, 0.01)),
    written without loading the model: PEFT wraps its meta skeleton, which gives every key and shape."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from .adapter import lora_shapes
    from .io import load_config
    from .pruned_model import skeleton

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), task_type="CAUSAL_LM")
    with torch.device("meta"):
        pm = get_peft_model(skeleton(load_config(base), None), cfg)
    folder = Path(folder)
    folder.mkdir(parents=True)
    cfg.save_pretrained(str(folder))
    gen = torch.Generator().manual_seed(seed)
    save_file({k: torch.randn(s, generator=gen) * 0.01 for k, s in lora_shapes(pm).items()}, str(folder / "adapter_model.safetensors"))
    return folder


def hub_cache(cache: str | Path, repo_id: str, folder: str | Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Publish ``folder``'s files as hub repo ``repo_id`` in a Hugging Face hub cache rooted at ``cache``
    (what HF_HUB_CACHE points at): ``models--OWNER--NAME/refs/main`` holds ``commit`` and
    ``snapshots/<commit>/`` the files (copies, no blobs: snapshot_download accepts that), the layout
    snapshot_download resolves with HF_HUB_OFFLINE=1 and no network. Returns the snapshot folder."""
    import shutil

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, ignore=shutil.ignore_patterns(".*"))  # loram's markers and locks start with a dot
    return snapshot


def teacher_watch():
    """(callback, counts): a TrainerCallback that records, at the start of every step, how many teacher / original
    models are still alive (loram.distill.LIVE, after a gc): the tests' check that the original is gone before training."""
    import gc

    from transformers import TrainerCallback

    from .distill import LIVE

    counts: list[int] = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            gc.collect()
            counts.append(len(LIVE))

    return Watch(), counts
