"""`loram train --original-offset --offset-at layers`: train the update through the original's activations.

Why: `--original-offset` at the logits (loram.offset) corrects the pruned model at its output only: inside,
every layer still reads the pruned model's activations, and at 2x those are far from the original's (issue
18, dev split: a 2x plan's support could carry 84 % of full LoRA's gain; trained on the 2x pruned model with
the logit offset, 28-41 % came through). Here the correction is made after EVERY decoder layer:

    h_{l+1} = h_l + f_l^pruned(h_l) + c_l,    c_l = f_l^original(h_l^o) - f_l^pruned(h_l^o)

where h^o is the original's residual stream on the same tokens. With the adapter off, the corrected pruned
model computes the original's hidden states exactly (by induction h_l = h_l^o), hence its logits. So:

  * every LoRA module reads the activations it will read on the original (exactly at step 0, nearly
    while the update is small), and its own effect on its layer's output IS the recovered update's
    effect on the original's layer: the kept rows and columns are the original's weights (unless the
    pruned model was aligned), the pruned ones get zeros on recovery;
  * only how a change propagates through the LATER layers goes through the pruned layers (their
    Jacobian) instead of the original's;
  * the logit offset is not needed: the output already is the original's at step 0, and no second forward
    of the pruned base runs per step.

The corrections are computed once before training, layer by layer: the original's layer l and the pruned
layer l run on the original's input of layer l for every example (the original in memory, or read one layer
at a time from its safetensors, loram.stream, when its pass does not fit --max-memory), and written to a cache
folder (one safetensors shard per layer, every example's tokens in a row; reused by a run on the same
original, pruned weights and examples). Cost: that pass, and L x d numbers per training token on disk
(SmolLM2-135M in fp32: 30 x 576 x 4 B = 69 kB per token; a 70B in bf16: 80 x 8192 x 2 B = 1.3 MB per token).
Each batch reads its examples' rows. Training transformers passes the batch's corrections to every decoder
layer as a forward keyword (``layer_offset``, [batch, L, T, d]); a forward hook per layer adds its slice, so
calls without it (evaluation, --anchor's blocks) see the pruned model as it is.
"""

from __future__ import annotations

import gc
import hashlib
import time
from pathlib import Path

import torch

from . import distill, progress
from .errors import LoramError
from .families import decoder_layers
from .stream import Captured, capture_inputs, run_block

KEY = "layer_offset"  # the batch key the collator adds and the decoder-layer hooks read (a forward keyword)
FORMAT = "loram-layer-offset-v1"
MANIFEST = "layer_offset_cache.json"


def cache_key(teacher, student_id: str, examples: list, dtype) -> str:
    h = hashlib.sha256(f"{FORMAT}|{teacher.fingerprint['id']}|{student_id}|{dtype}".encode())
    distill.hash_rows(h, examples)
    return h.hexdigest()[:32]


def student_id(pruned: Path | str, quantize: str | None) -> str:
    """What the corrections depend on besides the original and the examples: the pruned weights as loaded."""
    from .fingerprint import fingerprint_safetensors
    from .io import load_config
    from .weights import safetensors_files

    return f"{fingerprint_safetensors(safetensors_files(pruned), load_config(pruned).to_dict())['id']}|{quantize}"


def _original(teacher, examples: list, device, dtype, max_memory):
    """(inputs of layer 0 per example, (i, layer) of the original one after another, streamed?): the original in
    memory, or one decoder layer at a time from its safetensors when its pass does not fit the memory budget."""
    from .eval.runner import scoring_plan

    batches = [torch.tensor([ids]) for ids, _ in examples]
    stream, _ = scoring_plan(teacher.name, max(len(b[0]) for b in batches), 1, max_memory)
    if stream:
        from .loading import open_checkpoint
        from .stream import LayerStream

        config, _, weights = open_checkpoint(teacher.name, "--offset-at layers (streamed)")
        ls = LayerStream(weights, config, dtype=dtype, device=device, head=False)
        distill.LIVE.add(ls.model)
        return ls.inputs(batches), ls.layers(), True
    model = distill.load_teacher(teacher, dtype, device)
    return capture_inputs(model, 0, batches), enumerate(decoder_layers(model)), False


@torch.no_grad()
def compute(teacher, student, examples: list, tmp: Path, device="cpu", dtype=torch.float32, max_memory=None) -> dict:
    """Write the corrections of ``examples`` against ``student``'s layers into folder ``tmp``: shard l holds
    ``layer.l`` [total tokens, d] (the examples' tokens one after another). Returns what it did."""
    from .weights import ShardWriter

    from .io import load_config

    mine = decoder_layers(student)
    n = load_config(teacher.name).num_hidden_layers
    if n != len(mine):  # a structured plan never removes layers: this is another model than the plan's base
        raise LoramError(f"the original {teacher.name} has {n} decoder layers, the pruned model {len(mine)}: pass the "
                         "original the plan was made from (--teacher)")
    t0 = time.time()
    xs, layers, streamed = _original(teacher, examples, device, dtype, max_memory)
    writer = ShardWriter(tmp, len(mine), metadata={"loram": FORMAT})
    sizes = []
    # minutes on a big original or many rows: a bar (count, rate, ETA) unless --quiet
    for i, block in progress.track(layers, "layer offsets (original vs pruned)", total=len(mine), unit="layer"):
        rows = []
        for j, x in enumerate(xs):
            out = run_block(block, x)
            rows.append((out - run_block(mine[i], x))[0].to(dtype).cpu())
            xs[j] = Captured(out, x.kwargs)
        c = torch.cat(rows)
        sizes.append(round(float(c.abs().mean()), 5))
        writer.add({f"layer.{i}": c})
    writer.finish(sum(len(ids) for ids, _ in examples))
    del xs, layers
    gc.collect()  # the original's modules are unreachable now: collect them before training
    return {"seconds": round(time.time() - t0, 2), "streamed": streamed, "mean_abs_per_layer": sizes}


class Cache:
    """The corrections of every example, read an example at a time (its rows of each layer's tensor)."""

    def __init__(self, folder: Path, manifest: dict):
        from .weights import Weights

        self.folder, self.manifest = Path(folder), manifest
        self.weights = Weights(folder, use_index=True)
        self.layers = manifest["layers"]
        self.starts = [0]
        for n in manifest["lengths"]:
            self.starts.append(self.starts[-1] + n)

    def example(self, j: int) -> torch.Tensor:
        rows = torch.arange(self.starts[j], self.starts[j + 1])
        return torch.stack([self.weights.read(f"layer.{i}", rows=rows) for i in range(self.layers)])


def open_cache(folder: Path, key: str) -> Cache | None:
    return distill.open_keyed(folder, MANIFEST, FORMAT, key, Cache)  # absent, stale or damaged: None (recomputed)


def ensure_cache(teacher, student, sid: str, examples: list, folder: Path, device="cpu", dtype=torch.float32,
                 max_memory=None) -> tuple[Cache, dict]:
    """The corrections of ``examples`` in ``folder``: reused when its key matches, else computed and written atomically."""
    from .io import atomic_dir, write_json

    key = cache_key(teacher, sid, examples, dtype)
    cache = open_cache(folder, key)
    if cache is not None:
        return cache, {"computed": False}
    with atomic_dir(folder, overwrite=True, command="train --offset-at layers") as tmp:
        how = compute(teacher, student, examples, Path(tmp), device, dtype, max_memory)
        write_json(Path(tmp) / MANIFEST, {"format": FORMAT, "key": key, "teacher": teacher.name,
                                          "teacher_fingerprint": teacher.fingerprint["id"], "student": sid,
                                          "dtype": str(dtype), "layers": len(decoder_layers(student)),
                                          "lengths": [len(ids) for ids, _ in examples]})
    return open_cache(folder, key), {"computed": True} | how


def prepare(teacher, student, sid: str, examples: list, folder: Path, device="cpu", dtype=torch.float32,
            max_memory=None) -> tuple:
    """(dataset, record) of the run: the corrections of ``examples`` made or reused, the original released."""
    cache, how = ensure_cache(teacher, student, sid, examples, folder, device, dtype, max_memory)
    rec = {"teacher": teacher.name, "teacher_fingerprint": teacher.fingerprint["id"], "at": "layers",
           "cache": str(cache.folder), "cache_key": cache.manifest["key"], "examples": len(examples),
           "loss": "CE of the pruned model + LoRA with the original's per-layer corrections added"} | how
    return Rows(examples, cache), rec


class Rows(torch.utils.data.Dataset):
    def __init__(self, examples: list, cache: Cache):
        if len(cache.manifest["lengths"]) != len(examples):
            raise ValueError(f"the cache {cache.folder} holds {len(cache.manifest['lengths'])} examples, the run {len(examples)}")
        self.examples, self.cache = examples, cache

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ids, labels = self.examples[i]
        return {"input_ids": ids, "labels": labels, KEY: self.cache.example(i)}


def collate(pad_id: int):
    """data.collate, plus the corrections zero-padded on the right to the batch's length: [B, L, T, d]."""
    from .data import collate as plain

    base = plain(pad_id)

    def fn(batch):
        out = base([{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batch])
        c = [b[KEY] for b in batch]
        full = c[0].new_zeros((len(c), c[0].shape[0], out["input_ids"].shape[1], c[0].shape[2]))
        for i, x in enumerate(c):
            full[i, :, :x.shape[1]] = x
        return out | {KEY: full}

    return fn


def attach(model) -> list:
    """Forward hooks on the decoder layers adding the batch's correction (the ``layer_offset`` keyword, which
    transformers passes down to every decoder layer; replayed as it is under gradient checkpointing) to each
    layer's output. Calls without it are untouched. Returns the hook handles."""
    def hook(i):
        def fn(mod, args, kwargs, output):
            c = kwargs.get(KEY)
            if c is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            h = h + c[:, i, :h.shape[1]].to(h.dtype)
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        return fn

    return [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(decoder_layers(model))]
