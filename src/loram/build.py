"""Building a pruned model directly from a config + plan, one decoder layer at a time.

    skeleton(config, plan) on meta            (no memory: the pruned shapes, nothing allocated)
    embeddings, final norm, lm_head           materialised from the source
    for each decoder layer i, each module:    materialise its pruned tensors, quantise a linear to
                                              NF4 right away when asked, move on

so the peak while building is the result plus one linear (plus its fp32 copy while it is quantised);
the full model is never built. Weight sources:

    checkpoint folder   safetensors shards (model.safetensors.index.json, or every *.safetensors).
                        Kept rows R of a tensor [n, m]: one read sl[a:b] per run of consecutive
                        kept rows, so only kept bytes are touched. Kept columns C: row chunks
                        sl[r:r+c] of <= CHUNK_BYTES, index_select(1, C) on each. Every tensor is read
                        through its own safe_open, so the shard's mmap is released after it.
                        The plan's base fingerprint must match the checkpoint's.
    "random"            N(0, initializer_range) linears and embeddings, ones for norms, zeros for
                        biases (the transformers init). With quantize="nf4" the decoder linears are
                        drawn as NF4 directly: random 4-bit codes, per-64 block absmax ~ 2.5 sigma
                        (the expected max of 64 Gaussians), double-quantised by bitsandbytes exactly
                        as its quantiser does. Same tensors, dtypes and kernels as a quantised
                        checkpoint; bitsandbytes' CPU quantiser runs ~15 M weights/s here (measured),
                        ~20 min for a 70B-geometry model whose weight values do not matter for
                        memory or speed.

A plan for a config without weights (capacity planning) is ``random_plan``: method random, its
base fingerprint marked {"scheme": "random-init"} so it can never be recovered onto a real model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .errors import LoramError
from .families import COL_PRUNED, MODULE_OF_ROLE, ROLE_OF_PROJ, decoder_layers, geometry
from .io import releases_locks
from .plan import PrunePlan, parse_layers
from .progress import track

CHUNK_BYTES = 64 << 20  # row chunk read when selecting columns
RANDOM_SCHEME = "random-init"
NF4_BLOCK = 64
ABSMAX_SIGMAS = 2.5  # E[max |x|] over 64 N(0, s^2) draws ~ 2.4 s


@dataclass
class BuildReport:
    source: str
    quantize: str | None
    params: int
    seconds: float
    peak_rss_gb: float


# ---- plans without weights --------------------------------------------------------------------
def random_fingerprint(config, seed: int) -> dict:
    """Fingerprint of a randomly initialised base: never equal to a real checkpoint's."""
    import hashlib

    from .fingerprint import config_digest

    fp = {"scheme": RANDOM_SCHEME, "config": config_digest(config), "seed": seed}
    fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


def random_plan(config, ratio: float, attn_ratio: float | None = None, layers: str | None = None, seed: int = 0,
                name: str = "random", fingerprint: dict | None = None) -> PrunePlan:
    """A structured plan (method random) made from a config alone: no weights are read."""
    from .prune import check_ratio
    from .prune.structured import select

    attn_ratio = ratio if attn_ratio is None else attn_ratio
    check_ratio("--ratio", ratio, allow_zero=False)
    check_ratio("--attn-ratio", attn_ratio, allow_zero=True)
    g = geometry(config)
    start, end = parse_layers(layers, g.n_layers)
    plan = PrunePlan(kind="structured", method="random", layers=(start, end), mlp_ratio=ratio, attn_ratio=attn_ratio,
                     seed=seed, base={"name": str(name), "config": config.to_dict(),
                                      "fingerprint": fingerprint or random_fingerprint(config, seed)},
                     pruned=select(g, "random", range(start, end), ratio, attn_ratio, seed))
    sk = _skeleton_shapes(config, None)
    pk = _skeleton_shapes(config, plan)
    plan.extra = {"params_original": _numel(sk, config), "params_pruned": _numel(pk, config)}
    return plan


def _numel(shapes: dict, config) -> int:
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return sum(torch.Size(s).numel() for k, s in shapes.items() if not (tied and k == "lm_head.weight"))


def _skeleton_shapes(config, plan) -> dict:
    from .pruned import skeleton

    return {k: tuple(v.shape) for k, v in skeleton(config, plan).state_dict().items()}


# ---- where each kept tensor comes from ------------------------------------------------------
def kept_indices(plan: PrunePlan, g, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(kept rows, kept columns) of the original tensor ``name``; None = all."""
    parts = name.split(".")
    if "layers" not in parts or not name.endswith(("_proj.weight", "_proj.bias")):
        return None, None
    layer = int(parts[parts.index("layers") + 1])
    role = ROLE_OF_PROJ[parts[-2]]
    idx = plan.kept_index(layer, role, g)
    if idx is None:
        return None, None
    if role in COL_PRUNED:
        return (None, idx) if parts[-1] == "weight" else (None, None)  # o/down bias is per output row: kept
    return idx, None


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Sorted indices -> [start, end) runs of consecutive values."""
    runs, a = [], None
    for j, i in enumerate(idx):
        if a is None:
            a = prev = i
        elif i != prev + 1:
            runs.append((a, prev + 1))
            a = i
        prev = i
        if j == len(idx) - 1:
            runs.append((a, prev + 1))
    return runs


class Checkpoint:
    """A safetensors checkpoint folder read one tensor slice at a time."""

    def __init__(self, folder: str | Path):
        from .io import read_json, safetensors_files, safetensors_headers

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        wm = read_json(index).get("weight_map", {}) if index.exists() else None
        if wm:
            files = sorted({self.folder / f for f in wm.values()})
            missing = [f for f in files if not f.exists()]
            if missing:
                raise LoramError(f"shard {missing[0].name} named in the index is missing from {self.folder}: finish the download")
        else:
            files = safetensors_files(self.folder)
        self.where = {k: h.file for k, h in safetensors_headers(files).items()}
        wrong = [k for k, f in (wm or {}).items() if self.where.get(k) != self.folder / f]
        if wrong:
            raise LoramError(f"model.safetensors.index.json in {self.folder} puts {wrong[0]} in {wm[wrong[0]]}, which does "
                             "not hold it: the index does not match the shards, re-download the checkpoint")

    def files(self) -> list[Path]:
        return sorted(set(self.where.values()))

    def read(self, name: str, rows, cols, expect: tuple, dtype) -> torch.Tensor:
        """Rows/columns ``rows``/``cols`` of tensor ``name`` (full shape must be ``expect``), as ``dtype``."""
        if name not in self.where:
            raise LoramError(f"tensor {name} is not in the checkpoint {self.folder}: the config does not match the weights")
        with safe_open(str(self.where[name]), framework="pt") as h:
            sl = h.get_slice(name)
            shape = tuple(sl.get_shape())
            if shape != tuple(expect):
                raise LoramError(f"{name} is {list(shape)} in {self.folder}, the config says {list(expect)}: "
                                 "the config does not match the weights")
            if rows is None and cols is None:
                return sl[:].to(dtype)
            if rows is not None:
                return torch.cat([sl[a:b].to(dtype) for a, b in _runs(rows.tolist())], 0)
            n_rows, row_bytes = shape[0], max(1, shape[1] * _itemsize(sl.get_dtype()))
            step = max(1, CHUNK_BYTES // row_bytes)
            out = torch.empty((n_rows, len(cols)), dtype=dtype)
            for r in range(0, n_rows, step):
                out[r : r + step] = sl[r : r + step].index_select(1, cols).to(dtype)
            return out


def _itemsize(st_dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(st_dtype, 1)


# ---- materialising tensors ----------------------------------------------------------------
class _Source:
    """Returns the pruned tensor ``name`` of shape ``shape`` (from a checkpoint or random)."""

    def __init__(self, source, plan: PrunePlan, config, seed: int):
        self.plan, self.g, self.config = plan, geometry(config), config
        self.full = _skeleton_shapes(config, None)
        self.ckpt = None if source == "random" else Checkpoint(source)
        self.gen = torch.Generator().manual_seed(seed)
        self.std = float(getattr(config, "initializer_range", 0.02))

    def tensor(self, name: str, shape: tuple, dtype) -> torch.Tensor:
        if self.ckpt is not None:
            rows, cols = kept_indices(self.plan, self.g, name)
            t = self.ckpt.read(name, rows, cols, self.full[name], dtype)
            if tuple(t.shape) != tuple(shape):
                raise LoramError(f"{name}: read {list(t.shape)}, the plan needs {list(shape)}: the plan does not match the config")
            return t
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=dtype)
        return torch.empty(shape, dtype=dtype).normal_(0, self.std, generator=self.gen)

    def random_nf4(self, shape: tuple, bias: bool, compute_dtype) -> nn.Module:
        """A Linear4bit with random NF4 codes and Gaussian-like block scales (see module doc)."""
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        out_f, in_f = shape
        n = out_f * in_f
        n_bytes = (n + 1) // 2
        # random bytes = two random 4-bit codes each; drawn as int64 for speed (8 bytes per draw) and
        # kept as a uint8 view of that buffer: a copy would free a layer-sized temporary per linear
        codes = torch.empty(-(-n_bytes // 8), dtype=torch.int64).random_(generator=self.gen).view(torch.uint8)
        codes = codes[:n_bytes].unsqueeze(1)
        blocks = -(-n // NF4_BLOCK)
        absmax = torch.empty(blocks, dtype=torch.float32).normal_(ABSMAX_SIGMAS * self.std, 0.3 * self.std, generator=self.gen).abs_()
        offset = absmax.mean()
        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
        qs = F.QuantState(absmax=qabsmax, shape=torch.Size(shape), dtype=torch.float32, blocksize=NF4_BLOCK,
                          code=F.get_4bit_type("nf4", device="cpu"), quant_type="nf4", offset=offset, state2=state2)
        with torch.device("meta"):
            q = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=qs, blocksize=NF4_BLOCK, compress_statistics=True,
                                     quant_type="nf4", quant_storage=torch.uint8, module=q, bnb_quantized=True)
        if bias:
            q.bias = nn.Parameter(torch.zeros(out_f, dtype=compute_dtype), requires_grad=False)
        return q


def _assign(module: nn.Module, prefix: str, src: _Source, dtype) -> None:
    """Materialise the direct parameters of ``module`` (named ``prefix``) from ``src``."""
    for k, p in list(module.named_parameters(recurse=False)):
        setattr(module, k, nn.Parameter(src.tensor(prefix + k, tuple(p.shape), dtype), requires_grad=p.requires_grad))


def _materialise_block(block: nn.Module, prefix: str, src: _Source, dtype, quantize: str | None, compute_dtype) -> None:
    from .pruned import nf4_linear

    for mname, mod in list(block.named_modules()):
        if not any(True for _ in mod.parameters(recurse=False)):
            continue
        full = f"{prefix}{mname}."
        parent_name, _, child = mname.rpartition(".")
        is_proj = isinstance(mod, nn.Linear) and child in ROLE_OF_PROJ
        if quantize == "nf4" and is_proj:
            shape, has_bias = tuple(mod.weight.shape), mod.bias is not None
            if src.ckpt is None:
                q = src.random_nf4(shape, has_bias, compute_dtype)
            else:
                w = src.tensor(full + "weight", shape, torch.float32)
                b = src.tensor(full + "bias", (shape[0],), torch.float32) if has_bias else None
                q = nf4_linear(w, b, compute_dtype)
                del w, b
            setattr(block.get_submodule(parent_name), child, q)
        else:
            _assign(mod, full, src, dtype)


def _check_source(plan: PrunePlan, config, source) -> None:
    from .fingerprint import config_digest, describe_difference, fingerprint_safetensors, same_model

    if config_digest(config) != config_digest(plan.base.get("config", {})):
        raise LoramError("the config differs from the one the plan was made for: pass the plan's own base config")
    fp = plan.base.get("fingerprint") or {}
    if source == "random":
        return
    if fp.get("scheme") == RANDOM_SCHEME:
        raise LoramError("this plan was made for random weights: make a plan from the checkpoint "
                         "(`loram build CHECKPOINT --ratio R --plan-only`, or `loram prune`)")
    got = fingerprint_safetensors(Checkpoint(source).files(), config.to_dict())
    if not same_model(fp, got):
        raise LoramError(f"the checkpoint {source} is not the model the plan was made for ({describe_difference(fp, got)}): "
                         "pass the original checkpoint the plan was made from")


def build_pruned(config, plan: PrunePlan, source: str | Path = "random", quantize: str | None = None,
                 dtype=torch.bfloat16, seed: int = 0, compute_dtype=torch.bfloat16):
    """The pruned model ``plan`` describes, built layer by layer without the full model.

    config: the base config (None: the plan's). source: "random" or a safetensors checkpoint folder.
    quantize: None or "nf4" (decoder linears; embeddings, norms and lm_head stay in ``dtype``).
    Returns a stock transformers model with smaller modules; ``model.loram_build`` is a BuildReport.
    """
    from .memory import PeakRSS
    from .pruned import QUANTIZED_MARK, count_params, materialize_buffers, skeleton

    if quantize not in (None, "nf4"):
        raise LoramError(f"--quantize {quantize!r} is not supported: use nf4")
    if plan.kind != "structured":
        raise LoramError(f"build makes structured plans only (this one is {plan.kind!r}): use `loram prune` for it")
    t0, peak = time.time(), PeakRSS()
    config = config if config is not None else plan.base_config()
    source = source if source == "random" else str(source)
    if source != "random" and not Path(source).is_dir():
        raise LoramError(f"weight source {source} is not a folder: pass a safetensors checkpoint folder or 'random'")
    _check_source(plan, config, source)
    model = skeleton(config, plan, dtype=dtype)
    src = _Source(source, plan, config, seed)
    layers, pre = decoder_layers(model), _layers_prefix(model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for mname, mod in list(model.named_modules()):  # embeddings, final norm, lm_head
        if mname.startswith(pre) or not any(True for _ in mod.parameters(recurse=False)):
            continue
        if not (tied and mname == "lm_head"):
            _assign(mod, mname + ".", src, dtype)
    for i, block in enumerate(track(layers, "build: layers", unit="layer")):
        _materialise_block(block, f"{pre}{i}.", src, dtype, quantize, compute_dtype)
    if tied:
        model.tie_weights()
    materialize_buffers(model, "cpu")
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise LoramError(f"build left {left[:3]} unset: this architecture has tensors loram does not know")
    if quantize:
        setattr(model, QUANTIZED_MARK, quantize)
    model.eval()
    model.loram_plan = plan
    model.loram_build = BuildReport(str(source), quantize, count_params(model), time.time() - t0, peak.gb())
    return model


def _layers_prefix(model) -> str:
    layers = decoder_layers(model)
    for n, m in model.named_modules():
        if m is layers:
            return n + "."
    raise LoramError("could not find the decoder layers (model.model.layers) in this model")


# ---- writing a pruned folder without the full model ------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


@releases_locks
def write_pruned(config, plan: PrunePlan, source: str | Path, out: str | Path, dtype=torch.bfloat16, seed: int = 0,
                 overwrite: bool = False, inputs=()) -> BuildReport:
    """Write the pruned folder (loads with ``load_pruned``) one shard per decoder layer.

    Each layer is materialised, saved, then sent back to the meta device: peak = one layer.
    """
    import shutil

    from safetensors.torch import save_file

    from .io import atomic_dir, write_json
    from .memory import PeakRSS
    from .pruned import count_params, skeleton

    t0, peak = time.time(), PeakRSS()
    config = config if config is not None else plan.base_config()
    source = source if source == "random" else str(source)
    _check_source(plan, config, source)
    model = skeleton(config, plan, dtype=dtype)
    n_params = count_params(model)
    src = _Source(source, plan, config, seed)
    layers, pre = decoder_layers(model), _layers_prefix(model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    top = [(n, m) for n, m in model.named_modules() if not n.startswith(pre) and any(True for _ in m.parameters(recurse=False))
           and not (tied and n == "lm_head")]
    n_shards = len(layers) + 1
    weight_map = {}
    with atomic_dir(out, overwrite, "build", (source, *inputs)) as tmp:
        for k in track(range(n_shards), "build: shards", unit="shard"):
            shard = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
            if k == 0:
                tensors = {}
                for n, m in top:
                    _assign(m, n + ".", src, dtype)
                    tensors.update({f"{n}.{p}": t for p, t in m.named_parameters(recurse=False)})
                    m.to("meta")
            else:
                block, prefix = layers[k - 1], f"{pre}{k - 1}."
                _materialise_block(block, prefix, src, dtype, None, dtype)
                tensors = {prefix + p: t for p, t in block.state_dict().items()}
            save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(Path(tmp) / shard),
                      metadata={"format": "pt", **plan.metadata()})
            weight_map.update({n: shard for n in tensors})
            del tensors
            if k > 0:
                layers[k - 1].to("meta")
        write_json(Path(tmp) / "model.safetensors.index.json", {"metadata": {"total_parameters": n_params}, "weight_map": weight_map})
        config.save_pretrained(str(tmp))
        if source != "random":
            for f in TOKENIZER_FILES:
                if (Path(source) / f).exists():
                    shutil.copy(Path(source) / f, Path(tmp) / f)
        plan.save(tmp)
    return BuildReport(str(source), None, n_params, time.time() - t0, peak.gb())


# ---- trying a plan: a few measured LoRA steps on the built model -------------------------------
# On CPU the trial computes in fp32 over bf16/NF4 storage: with torch 2.13 on this CPU a bf16 matmul
# of two row-major operands, which is every frozen layer's input gradient (grad_out @ W), runs at
# ~0.1 GFLOP/s against ~10 for fp32 (measured, e.g. 64x4300 @ 4300x8192: bf16 50 s, fp32 0.7 s).
class _ChunkedLinear(torch.autograd.Function):
    """y = x W^T with W frozen in its storage dtype, cast to x's dtype CHUNK rows at a time in
    forward and backward, so no full-size copy of W is ever made or saved."""

    @staticmethod
    def forward(ctx, x, weight, chunk):
        ctx.save_for_backward(weight)
        ctx.chunk = chunk
        out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
        for i in range(0, weight.shape[0], chunk):
            out[..., i : i + chunk] = x @ weight[i : i + chunk].to(x.dtype).t()
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        gx = torch.zeros(*grad.shape[:-1], weight.shape[1], dtype=grad.dtype, device=grad.device)
        for i in range(0, weight.shape[0], ctx.chunk):
            gx += grad[..., i : i + ctx.chunk] @ weight[i : i + ctx.chunk].to(grad.dtype)
        return gx, None, None


class FrozenLinear(nn.Module):
    """A frozen bias-free Linear computing in its input's dtype without copying the whole weight."""

    def __init__(self, weight: nn.Parameter, chunk_rows: int = 8192):
        super().__init__()
        self.weight, self.chunk = weight, chunk_rows
        self.weight.requires_grad_(False)

    def forward(self, x):
        return _ChunkedLinear.apply(x, self.weight, self.chunk)


def fp32_compute(model) -> None:
    """Keep the storage (bf16 embeddings/lm_head, NF4 linears), compute in fp32 (see above)."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.float32
    emb = model.get_input_embeddings()
    if emb.weight.dtype != torch.float32:
        emb.register_forward_hook(lambda mod, inp, out: out.float())
    head = model.get_output_embeddings()
    if head is not None and head.weight.dtype != torch.float32 and getattr(head, "bias", None) is None:
        model.set_output_embeddings(FrozenLinear(head.weight))


@dataclass
class TrialReport:
    batch: int
    seq_len: int
    steps: int
    rank: int
    step_s: list
    losses: list
    peak_rss_gb: float  # process high-water mark during the steps (model + training)
    peak_cuda_gb: float | None
    trainable_params: int

    @property
    def s_per_step(self) -> float:
        # the first step also pays one-time allocations; report the mean of the later ones when there are
        later = self.step_s[1:] or self.step_s
        return sum(later) / len(later)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.seq_len / self.s_per_step


def trial_steps(model, seq_len: int, steps: int = 2, batch: int = 1, rank: int = 8, grad_checkpointing: bool = True,
                lr: float = 1e-4, seed: int = 0, on_step=None) -> TrialReport:
    """Run ``steps`` LoRA steps (r ``rank``, all seven targets, AdamW) on random tokens and measure them.

    Mirrors `loram train`: PEFT LoRA (alpha 2r, dropout 0.05), non-reentrant gradient checkpointing.
    NF4 on CPU: fp32 compute over the model's storage (``fp32_compute``); else bf16 autocast for bf16 models.
    ``on_step(step, seconds, loss, peak_rss_gb)`` is called after each step (progress of long runs).
    """
    from peft import LoraConfig, get_peft_model

    from .memory import PeakRSS
    from .train import DEFAULT_TARGETS, TARGET_MODULES

    from .pruned import QUANTIZED_MARK

    dev = next(p.device for p in model.parameters() if p.device.type != "meta")
    fp32 = dev.type == "cpu" and getattr(model, QUANTIZED_MARK, None) == "nf4"
    if fp32:
        fp32_compute(model)
    model.config.use_cache = False
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, task_type="CAUSAL_LM",
                                          target_modules=[TARGET_MODULES[t] for t in DEFAULT_TARGETS]))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen).to(dev)
    bf16 = not fp32 and model.get_input_embeddings().weight.dtype == torch.bfloat16
    pm.train()
    peak, times, losses = PeakRSS(), [], []
    for _ in range(steps):
        t0 = time.time()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
        losses.append(float(loss.detach()))
        del loss
        if on_step is not None:
            on_step(len(times), times[-1], losses[-1], peak.gb())
    return TrialReport(batch, seq_len, steps, rank, times, losses, peak.gb(), PeakRSS.cuda_gb(), sum(p.numel() for p in params))


def try_plan(config, plan: PrunePlan, settings, quantize: str | None, steps: int = 2) -> dict:
    """`loram plan --try`: build ``plan`` with random weights, run ``steps`` LoRA steps, and return
    the measured peak (RSS minus the RSS before building, the planner's convention) and step time
    beside the planner's prediction for the same settings."""
    from dataclasses import replace

    from .memory import rss_gb
    from .planner import predict

    baseline = rss_gb()
    dtype = torch.float32 if settings.precision == "fp32" and quantize is None else torch.bfloat16
    model = build_pruned(config, plan, source="random", quantize=quantize, dtype=dtype)
    r = trial_steps(model, settings.seq_len, steps=steps, batch=settings.micro_batch, rank=settings.rank,
                    grad_checkpointing=settings.grad_checkpointing)
    fp32 = quantize == "nf4" and not torch.cuda.is_available()  # trial_steps computes in fp32 then
    s = replace(settings, precision="fp32") if fp32 else settings
    scheme = "QLoRAM" if quantize == "nf4" else "LoRAM"
    pred = predict(config, plan, s).schemes[scheme].gb
    # a tiny trial can peak at the baseline itself (nothing measurable above it): no error then
    measured = r.peak_rss_gb - baseline
    return {"scheme": scheme, "precision": s.precision, "build_s": model.loram_build.seconds, "params": model.loram_build.params,
            "measured_gb": measured, "predicted_gb": pred, "error": (pred - measured) / measured if measured > 0 else None, "s_per_step": r.s_per_step,
            "tokens_per_s": r.tokens_per_s, "peak_rss_gb": r.peak_rss_gb, "peak_cuda_gb": r.peak_cuda_gb, "steps": r.steps}
