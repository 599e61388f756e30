"""`loram merge` and `loram generate`: put a recovered adapter on the original model.

    W = W0 + (alpha / r) * B_full A_full     (PEFT's merge_and_unload; alpha / sqrt(r) with rslora)

Merge streams: the base is read one tensor at a time through ``weights.Weights`` (a safetensors
folder lazily; a .gguf or hub model from its loaded state dict, the same code path), each targeted
weight gets its update in fp32 (``dtype``) on ``device``, is cast back to the dtype it is stored in,
and goes to disk at once through ``ShardWriter.stream``; untargeted tensors are copied as stored.
Memory holds one tensor (plus its fp32 copy and update), not the model: a bf16 checkpoint stays
bf16 and the peak is a few times its largest tensor. The shards mirror the base's files (names and
tensors); a loaded .gguf / hub model is written in shards of at most SHARD_BYTES.

Which weights an adapter touches, by how much, and its refusals are loram.lora_delta's (LoraDeltas,
shared with the streamed evaluation): PEFT wraps the model's skeleton on the meta device, so
target_modules, rank_pattern, alpha_pattern and rslora mean what they mean to PEFT, the adapter must
fit that skeleton exactly, and variants whose merge is not W0 + s B A (DoRA, LoRA bias,
modules_to_save, ...) are refused with one line.

Tied embeddings: lm_head is not written when the config ties it. An adapter on lm_head or on the
embeddings of a tied model unties them (LoraDeltas.untie): the merged folder stores lm_head = E0
(+ its update) and embed_tokens = E0 (+ its update) separately, with tie_word_embeddings false,
which is exactly the unmerged adapter's model (PEFT attached; merging into the one shared tensor
would change both), and what `loram eval --adapter` evaluates, in memory or streamed.

Our loader checks the adapter's recorded base fingerprint against the base it is given, so an
adapter never lands on the wrong model, and never loads partially (see adapter.attach).

--keep-sparse (sparse plans only; BASE must be the sparse pruned folder, whose zeros are the mask):

    W = W_p + (alpha / r) (B A) * M,     M = (W_p != 0) on the targeted linears of the plan's layers

so the merged model keeps exactly the zeros of the pruned one (for sparse kernels). The default,
as in the paper, merges the full update into the dense original.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import STAGE_PRUNED, attach, check_adapter_dir, read_meta
from .errors import LoramError
from .families import ties_embeddings
from .fingerprint import check_verify, describe_difference, same_model
from .io import atomic_dir, check_output, load_config, load_tokenizer, releases_locks, resolve_model, write_tokenizer
from .lora_delta import FOR_MERGE, HEAD, LoraDeltas
from .loading import load_model, load_pruned_model, open_checkpoint
from .progress import bar
from .prune.sparse import sparse_mask_names
from .prune_plan import PLAN_FILE, PrunePlan, has_plan
from .weights import ShardWriter, Weights

SHARD_BYTES = 5 << 30  # shard size for a base without files of its own (.gguf, hub id)


def load_with_adapter(base: str | Path, adapter: str | Path | None = None, dtype=torch.float32, check_base: bool = True,
                      verify_base: str = "sampled"):
    """(model, tokenizer) for an original model or a pruned folder, with an adapter attached if given.

    verify_base="full": compare every byte of ``base`` with the digest the adapter's plan recorded."""

    pruned = check_adapter_request(base, adapter, check_base, verify_base)
    model, plan = load_pruned_model(base, dtype=dtype) if pruned else (load_model(base, dtype=dtype), None)
    tok = load_tokenizer(base)
    if adapter is None:
        return model, tok
    check_adapter_fits(base, adapter, plan, check_base, verify_base, model)
    return attach(model, adapter), tok


def check_adapter_request(base: str | Path, adapter: str | Path | None, check_base: bool = True, verify_base: str = "sampled") -> bool:
    """Checks before anything is loaded (every path that puts an adapter on a base calls them):
    the adapter folder is complete, --verify-base is possible. Returns whether ``base`` is a pruned folder."""
    check_verify(verify_base)
    if adapter is not None:
        check_adapter_dir(adapter)  # an incomplete or edited adapter fails before the model loads
    pruned = Path(str(base)).is_dir() and has_plan(base)
    if verify_base == "full" and (pruned or adapter is None or not check_base):
        raise LoramError("--verify-base full checks an original base against a recovered adapter: pass the original "
                         "model and the recovered adapter, or drop --verify-base full")
    return pruned


def check_adapter_fits(base: str | Path, adapter: str | Path, plan: PrunePlan | None, check_base: bool = True,
                       verify_base: str = "sampled", model=None) -> None:
    """The adapter's stage, base fingerprint and plan fit ``base`` (``plan``: the pruned folder's, None for an
    original). Needs no loaded model for a local folder; ``model`` only fingerprints a GGUF or hub base."""
    pruned = plan is not None
    meta = read_meta(adapter)
    if meta and meta.get("stage") == STAGE_PRUNED and not pruned:
        raise LoramError(f"{adapter} was trained on a pruned model and does not fit the original: run "
                         f"`loram recover {adapter} --base {base} -o RECOVERED` first (or pass the pruned model folder)")
    if meta and check_base and not pruned and meta.get("base_fingerprint"):
        from .fingerprint import base_fingerprint

        got = base_fingerprint(base, model)
        want = meta["base_fingerprint"]
        if not same_model(want, got):
            raise LoramError(f"adapter {adapter} was recovered for another base model ({describe_difference(want, got)}): "
                             f"pass the original it was made for ({meta.get('base_name')})")
        if verify_base == "full":
            from .fingerprint import check_base_full

            check_base_full(want, base, f"adapter {adapter}", "was recovered for")
    elif verify_base == "full":
        raise LoramError(f"adapter {adapter} records no base fingerprint to verify: drop --verify-base full")
    if meta and pruned and meta.get("plan_id") and meta.get("stage") == STAGE_PRUNED:
        if meta["plan_id"] != plan.id:
            raise LoramError(f"adapter {adapter} was trained on another prune plan ({meta['plan_id']}) than {base} "
                             f"({plan.id}): pass the pruned model it was trained on")


# ---- streaming merge -------------------------------------------------------------------------------
@dataclass
class _Source:
    """The base as merge reads it: its config, its plan (pruned folder), its tensors, and the model when
    one had to be loaded (.gguf, hub id: only then is the base in memory)."""

    config: object
    plan: PrunePlan | None
    weights: Weights
    model: object = None


def _open_source(base) -> _Source:
    path, gguf = resolve_model(base)
    if gguf is None and Path(path).is_dir():
        return _Source(*open_checkpoint(base, "merge"))  # headers, config (and plan binding) checked; nothing loaded
    # a .gguf is dequantised: fp32 keeps its values; a hub model loads in the dtype its config stores
    model = load_model(base, dtype=torch.float32 if gguf else _stored_dtype(load_config(base)))
    return _Source(model.config, None, Weights.from_state_dict(model.state_dict(), str(base)), model)


def _stored_dtype(config) -> torch.dtype:
    d = getattr(config, "dtype", None)
    d = getattr(torch, d, None) if isinstance(d, str) else d
    return d if isinstance(d, torch.dtype) and d.is_floating_point else torch.float32


def _layout(src: _Source, names: list[str], origin) -> list[tuple[str | None, list[str]]]:
    """[(shard file name or None, tensor names)]: the base's own files (an untied lm_head goes into the file
    of the embedding it is made from), or SHARD_BYTES shards for a base loaded in memory."""
    if src.weights.files is not None:
        where = {n: src.weights.headers[origin(n)].file for n in names}
        return [(f.name, [n for n in names if where[n] == f]) for f in src.weights.files if f in where.values()]
    shards, cur, total = [], [], 0
    for n in names:
        h = src.weights.headers[origin(n)]
        nbytes = torch.Size(h.shape).numel() * torch.empty((), dtype=h.torch_dtype).element_size()
        if cur and total + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, total = [], 0
        cur.append(n)
        total += nbytes
    shards.append(cur)
    return [("model.safetensors" if len(shards) == 1 else None, s) for s in shards]


def _write_weights(tmp: Path, src: _Source, deltas: LoraDeltas, keep_zeros: set, dtype, device) -> bool:
    """Stream every merged tensor into ``tmp``'s shards; True when lm_head was untied from the embeddings."""
    tied, untie = ties_embeddings(src.config), deltas.untie
    names = [n for n in src.weights.names if not (tied and n == HEAD)]
    if untie:
        names.insert(names.index(deltas.embedding) + 1, HEAD)
    origin = deltas.origin  # the base tensor output tensor n starts from (an untied head: the embeddings)

    def tensor(n: str) -> torch.Tensor:
        return deltas.apply(n, src.weights.get(origin(n)), n in keep_zeros, dtype, device)

    layout = _layout(src, names, origin)
    writer = ShardWriter(tmp, len(layout), src.plan.metadata() if src.plan is not None else None)
    def tensors(group: list[str], b):  # one tensor at a time, each counted on the bar as it is produced
        for n in group:
            yield n, tensor(n)
            b.update(1)

    with bar(len(names), "merge: tensors", unit="tensor") as b:
        for shard, group in layout:
            specs = {n: (src.weights.headers[origin(n)].torch_dtype, src.weights.headers[origin(n)].shape) for n in group}
            writer.stream(specs, tensors(group, b), shard)
    if len(layout) > 1:
        writer.finish(sum(torch.Size(src.weights.headers[origin(n)].shape).numel() for n in names))
    return untie


def _write_config(tmp: Path, src: _Source, untie: bool) -> None:
    config = copy.deepcopy(src.config)
    if untie:
        config.tie_word_embeddings = False
    if getattr(config, "quantization_config", None) is not None:  # a .gguf's: the written tensors are plain floats
        del config.quantization_config
    config.save_pretrained(str(tmp))
    gen = getattr(src.model, "generation_config", None)
    if gen is not None and not (tmp / "generation_config.json").exists():
        gen.save_pretrained(str(tmp))


@releases_locks
def merge(base: str | Path, adapter: str | Path, out: str | Path, overwrite: bool = False, dtype=torch.float32,
          keep_sparse: bool = False, verify_base: str = "sampled", max_memory: float | None = None,
          device: str = "cpu") -> Path:
    """Write a standard merged HF model folder: the original with the adapter folded into its weights.

    Streams tensor by tensor (see the module doc): the output keeps the base's dtypes and shard files.
    ``dtype``: what the update is computed in (fp32); ``device``: where (each tensor is moved there).
    ``max_memory`` (--max-memory) is accepted for the CLI's budget: streaming needs no choice, its peak
    is a few copies of one tensor whatever the budget."""
    check_output(out, overwrite, inputs=(base, adapter))
    sparse = _sparse_plan(base) if keep_sparse else None
    pruned = check_adapter_request(base, adapter, True, verify_base)
    src = _open_source(base)
    tok = load_tokenizer(base)  # a broken tokenizer fails here, before anything is written
    check_adapter_fits(base, adapter, src.plan, True, verify_base, src.model)
    deltas = LoraDeltas(adapter, src.config, src.plan, FOR_MERGE)
    keep_zeros = set(sparse_mask_names(sparse)) & deltas.targets if sparse is not None else set()
    with atomic_dir(out, overwrite, "merge", (base, adapter)) as tmp:
        untie = _write_weights(Path(tmp), src, deltas, keep_zeros, dtype, device)
        _write_config(Path(tmp), src, untie)
        write_tokenizer(tmp, [base], tok)
        if pruned:  # a merged pruned model is still a pruned model folder, bound to the same plan (the shards' metadata)
            shutil.copy(Path(base) / PLAN_FILE, Path(tmp) / PLAN_FILE)
    return Path(out)


def _sparse_plan(base):

    plan = PrunePlan.load(base) if Path(str(base)).is_dir() and has_plan(base) else None
    if plan is None or plan.kind != "sparse":
        raise LoramError(f"--keep-sparse needs the sparse pruned model as BASE (its zeros are the mask), not {base}: "
                         "pass the folder written by `loram prune --sparsity ...`")
    return plan


def generate(model_name: str | Path, prompt: str, adapter: str | Path | None = None, max_new_tokens: int = 64,
             chat: bool = True, temperature: float = 0.0, verify_base: str = "sampled", device="cpu", dtype=torch.float32) -> str:
    """The model's (+ the adapter's, PEFT attached) continuation of ``prompt``, computed on ``device`` in ``dtype``."""
    model, tok = load_with_adapter(model_name, adapter, dtype=dtype, verify_base=verify_base)
    model = model.to(device)
    if chat and getattr(tok, "chat_template", None):
        from .data import chat_template_ids

        ids = torch.tensor([chat_template_ids(tok, [{"role": "user", "content": prompt}], gen_prompt=True)])
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(device)
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    if temperature > 0:
        kw["temperature"] = temperature
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
