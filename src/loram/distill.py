"""`loram align --distill`: align a pruned model to the ORIGINAL model's next-token distribution.

Minitron and Sheared-LLaMA recover a pruned model with far fewer tokens by distilling from the
model it was pruned from than by plain next-token training. Here the teacher is the plan's base
(``--teacher`` points at another copy of it; its fingerprint must be the plan's). It is run ONCE,
before the student is loaded, over exactly the blocks align trains on, and its top-k is cached:

    blocks     the first steps x micro_batch x grad_accum blocks of the corpus mixture (all of them
               when the corpus has fewer, or with --epochs); align then trains on exactly these
    teacher    in memory, or layer by layer (eval.streamed) when its in-memory pass does not fit the
               memory budget (--max-memory, else the cgroup / MemAvailable: loram.budget, as `loram eval`)
    per block  for positions 0..seq-2: the k largest log-probabilities at temperature T, their token
               ids, and the log of the mass outside them ("rest")
    eval       with --eval NAME=FILE, NAME's blocks go through the same pass after the training blocks,
               so every held-out report also gives NAME's KL to the teacher (below)
    training   the teacher is gone (nothing of it stays in memory); each batch reads its blocks' rows
               from the cache and the loss is T^2 x KL(teacher || student) + W x LM loss (loss.py)

Held-out KL (``eval_NAME_kl`` in the trainer's log, ``eval_kl`` / ``NAME_kl`` in align_report.json): the
training loss's KL term exactly (the same k + 1 outcomes, the same --distill-temperature T, times T^2, no LM
term), mean per scored position of NAME's blocks, so it reads on the training loss's scale (at
--distill-lm-weight 0 the two are the same quantity on different text). With k = vocab and T = 1 it is the
full KL(original || pruned) per token.

The KL is taken over k + 1 outcomes: the teacher's k tokens and one bucket for all others, so student
mass outside the teacher's top-k costs what it costs in the full KL (a top-k renormalisation would
ignore it); with k = vocab it is the full KL.

Cache folder (``--distill-cache DIR``, default CHECKPOINT_DIR/teacher-topk), written atomically
(io.atomic_dir) by the project's writer (weights.ShardWriter) and read by its reader (weights.Weights):

    distill_cache.json                 format, key, teacher fingerprint id, k, temperature, seq_len, blocks
                                       (the training blocks: rows 0..blocks-1), eval_blocks (only with --eval:
                                       NAME -> its block count; their rows follow the training rows, in this order)
    model-0000s-of-0000N.safetensors   per shard s of BLOCKS_PER_SHARD rows (training blocks, then eval blocks):
                                          logprobs.s  F32 [blocks, seq_len-1, k]
                                          indices.s   I32 [blocks, seq_len-1, k]
                                          rest.s      F32 [blocks, seq_len-1]
    model.safetensors.index.json       tensor -> shard

The key is a sha256 of the format, the teacher's fingerprint id, k, T and the token ids of every block
(which fixes the data, tokenizer, seq_len, mixture seed and block count), then each --eval name with its blocks'
token ids (none: the key of a cache without eval blocks, so such caches stay valid). A cache with the same key is
reused (a resumed or repeated align runs no teacher); another key is recomputed and replaced.
Size: (8 k + 4) bytes per position, 260 MB per million training tokens at k = 32.
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from . import progress
from .errors import LoramError
from .loss import IGNORE_INDEX, TEACHER_KEYS, chunked_distill_loss, hidden_states_as_logits, outside_logmass

FORMAT = "loram-distill-topk-v1"
MANIFEST = "distill_cache.json"
BLOCKS_PER_SHARD = 256
CACHE_DTYPES = ("F32", "I32")
HEAD_BYTES = 256 << 20  # the teacher's logits are made this many bytes of [rows, vocab] fp32 at a time
LIVE: weakref.WeakSet = weakref.WeakSet()  # teacher models alive now: none may be during training (tests look)
EVAL_CHUNK = 128  # positions per lm_head call in the held-out KL: a block's full logits never exist at once
FLAGS = ("teacher", "distill_top_k", "distill_lm_weight", "distill_temperature", "distill_cache", "max_memory")


@dataclass(frozen=True)
class DistillLoss:
    """What the Trainer's loss needs (training.fit's ``distill``)."""

    temperature: float
    lm_weight: float
    evals: dict = field(default_factory=dict)  # --eval NAME -> DistillDataset of its blocks: held-out KL to the teacher
    needs_base = False  # offset.OffsetLoss: True

    def eval_sums(self, model, name: str, pad_id: int, batch_size: int, autocast=None) -> tuple[tuple[float, int], tuple[float, int]]:
        """((sum of log p, scored tokens), (sum of T^2 x KL(teacher || model), scored positions)) over --eval ``name``:
        the perplexity's sums and the training loss's KL term (loss.chunked_distill_loss, no LM term), both from
        ONE forward per batch (the body is most of the cost), in eval mode and the run's precision."""
        from .eval.ppl import scoring_mode
        from .loss import chunked_causal_lm_loss

        data, fn = self.evals[name], collate(pad_id)
        nll, kl, n = 0.0, 0.0, 0
        with scoring_mode(model, autocast) as dev, torch.no_grad(), hidden_states_as_logits(model) as head:
            for s in range(0, len(data), batch_size):
                b = fn([data[i] for i in range(s, min(s + batch_size, len(data)))])
                hidden = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev), use_cache=False).logits
                teacher = {k: b[k] for k in TEACHER_KEYS}
                kl += chunked_distill_loss(hidden, head, b["labels"], teacher, self.temperature, chunk=EVAL_CHUNK, num_items=1).item()
                nll += chunked_causal_lm_loss(hidden, head, b["labels"], chunk=EVAL_CHUNK, num_items=1).item()
                n += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        return (-nll, n), (kl, n)


@dataclass(frozen=True)
class Teacher:
    """The checked teacher: its name, the fingerprint it must have (the plan's), whether that was checked yet."""

    name: str
    fingerprint: dict
    checked: bool
    vocab: int  # a local safetensors folder is checked from its headers; another source once it is loaded


def check_request(cfg, plan, pruned: str | Path) -> Teacher | None:
    """Refuse a wrong --distill request from configs and headers alone, before anything is loaded."""
    if not cfg.distill:
        defaults = {f.name: f.default for f in fields(cfg)}  # AlignConfig's own defaults: no second copy here
        given = [f"--{n.replace('_', '-')}" for n in FLAGS if n != "max_memory" and getattr(cfg, n) != defaults[n]]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise LoramError(f"{', '.join(given)} only {verb} with --distill: add --distill or drop {given[0]}")
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LoramError("--distill runs the teacher pass in one process: run `loram align --distill` without "
                         "torchrun / accelerate launch")
    clash = [n for n in cfg.eval if n.endswith("_kl") and n[:-3] in cfg.eval]  # NAME_kl is NAME's KL in the report
    if clash:
        raise LoramError(f"--eval {clash[0]} has the name --distill gives the KL of --eval {clash[0][:-3]}: rename it")
    return resolve_teacher(plan, pruned, cfg.teacher, cfg.distill_top_k, "--distill-top-k")


def resolve_teacher(plan, pruned, teacher: str | None, top_k: int, k_flag: str) -> Teacher:
    """The teacher (``teacher`` or the plan's base), checked against the plan's base fingerprint from its headers when
    it is a local folder (else once loaded), its vocabulary against the pruned model's and ``top_k`` against it."""
    from .fingerprint import base_fingerprint
    from .io import load_config
    from .loading import safetensors_folder

    fp = plan.base.get("fingerprint") or {}
    name = teacher or plan.base.get("name")
    if not fp.get("id") or not name:
        raise LoramError(f"the plan of {pruned} records no base model fingerprint, so no teacher can be checked against "
                         "it: re-create the pruned model with `loram prune` from the original")
    vocab, tvocab = load_config(pruned).vocab_size, load_config(name).vocab_size
    if tvocab != vocab:
        raise LoramError(f"teacher {name} has a vocabulary of {tvocab} tokens, the pruned model {vocab}: pass the original "
                         "model the plan was made from (--teacher)")
    if top_k > vocab:
        raise LoramError(f"{k_flag} {top_k} is more than the vocabulary ({vocab} tokens): give at most {vocab}")
    checked = safetensors_folder(name) is not None
    if checked:
        check_teacher(name, fp, base_fingerprint(name), plan.base.get("name"))
    return Teacher(str(name), fp, checked, vocab)


def check_teacher(name, expected: dict, got: dict, plan_base=None) -> None:
    """Refuse a teacher whose weights are not the plan's base: from its headers (a local folder, before it
    loads) or from the loaded model (hub / GGUF, before its pass)."""
    from .fingerprint import describe_difference, same_model

    if not same_model(expected, got):
        named = f" (the plan names {plan_base})" if plan_base else ""
        raise LoramError(f"teacher {name} is not the model the plan was made from ({describe_difference(expected, got)}): "
                         f"pass the original model with --teacher{named}")


def teacher_blocks(blocks: list, cfg) -> list:
    """The blocks align trains on under --distill: as many as --steps draws, from the start of the mixture
    (already shuffled by its seed), or all of them when there are fewer or with --epochs."""
    need = None if cfg.epochs is not None else cfg.steps * cfg.micro_batch * cfg.grad_accum
    return blocks if need is None else blocks[:need]


def hash_rows(h, rows: list) -> None:
    """Add the token ids of (ids, labels) rows to hash ``h``: what a teacher cache's key says about its inputs."""
    for ids, _ in rows:
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())


def cache_key(teacher: Teacher, blocks: list, cfg, evals: dict | None = None) -> str:
    h = hashlib.sha256(f"{FORMAT}|{teacher.fingerprint['id']}|k={cfg.distill_top_k}|T={cfg.distill_temperature!r}".encode())
    hash_rows(h, blocks)
    for name, part in (evals or {}).items():  # nothing added without --eval: older caches keep their key
        h.update(f"|eval {name}={len(part)}|".encode())
        hash_rows(h, part)
    return h.hexdigest()[:32]


def cache_folder(given: str | None, ckpt: Path, resume: bool, overwrite: bool) -> Path:
    """Where the teacher's top-k is cached: ``given`` (--distill-cache / --offset-cache), else inside the checkpoint
    folder. That folder is settled first as fit would settle it (an --overwrite start clears earlier checkpoints now,
    not after the cache is written; a new folder gets loram's marker), so the cache survives into the run and a --resume."""
    from .io import write_marker
    from .training.checkpoint import prepare_checkpoint_dir

    if given:
        return Path(given)
    prepare_checkpoint_dir(ckpt, resume, overwrite, True)
    if not ckpt.exists() or not any(ckpt.iterdir()):
        ckpt.mkdir(parents=True, exist_ok=True)
        write_marker(ckpt, "checkpoints")
    return ckpt / "teacher-topk"


# ---- the cache on disk ------------------------------------------------------------------------------
class Cache:
    """The teacher's top-k of every block, read a block at a time (weights.Weights: one row of one shard)."""

    def __init__(self, folder: Path, manifest: dict):
        from .weights import Weights

        self.folder, self.manifest = Path(folder), manifest
        self.weights = Weights(folder, use_index=True, dtypes=CACHE_DTYPES)
        self.blocks = manifest["blocks"]  # the training blocks; the eval blocks' rows follow them
        self.evals = manifest.get("eval_blocks", {})  # --eval NAME -> blocks (absent: a cache without eval rows)

    def part(self, name: str | None = None) -> tuple[int, int]:
        """(first row, block count) of the training blocks (``name`` None) or of --eval ``name``'s (0 blocks: none)."""
        if name is None:
            return 0, self.blocks
        start = self.blocks
        for n, count in self.evals.items():
            if n == name:
                return start, count
            start += count
        return start, 0

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """TEACHER_KEYS -> block ``i``'s [seq-1, k] log-probs, [seq-1, k] token ids, [seq-1] rest."""
        s, j = divmod(i, BLOCKS_PER_SHARD)
        rows = torch.tensor([j])
        return {k: self.weights.read(f"{k.removeprefix('teacher_')}.{s}", rows=rows)[0] for k in TEACHER_KEYS}


def open_cache(folder: Path, key: str) -> Cache | None:
    """The cache in ``folder`` when it holds ``key`` (and reads back), else None (absent, stale or damaged: recomputed)."""
    return open_keyed(folder, MANIFEST, FORMAT, key, Cache)


def open_keyed(folder: Path, manifest: str, fmt: str, key: str, cls):
    """``cls(folder, manifest)`` of a cache folder whose manifest file has format ``fmt`` and ``key``, else None: absent,
    stale or damaged (a cache that does not read back is recomputed, never an error). Shared by every teacher cache."""
    from .io import read_json

    try:
        m = read_json(folder / manifest)
        if m.get("format") != fmt or m.get("key") != key:
            return None
        return cls(folder, m)
    except (LoramError, OSError, KeyError, TypeError, AttributeError, ValueError):
        return None


def _topk_rows(head, hidden: torch.Tensor, k: int, temperature: float, vocab: int):
    """(log-probs [n, k], ids [n, k], rest [n]) of ``head(hidden)`` rows at temperature T, a few rows at a time."""
    step = max(1, HEAD_BYTES // (4 * vocab))
    out = []
    for s in range(0, hidden.shape[0], step):
        logp = torch.log_softmax(head(hidden[s:s + step]).float() / temperature, dim=-1)
        v, i = logp.topk(k, dim=-1)
        rest = outside_logmass(logp, i)  # -inf when k = vocab: nothing is left
        out.append((v, i.to(torch.int32), rest))
    return tuple(torch.cat([o[j] for o in out]) for j in range(3))


def load_teacher(teacher: Teacher, dtype, device, name: str | None = None):
    """The teacher (``name``, default its own) loaded whole in eval mode, tracked in LIVE, and checked against the plan's
    fingerprint once loaded when its headers could not be (GGUF, hub)."""
    from .fingerprint import fingerprint_model
    from .loading import load_model

    name = name or teacher.name
    model = load_model(name, dtype=dtype).to(device).eval()
    LIVE.add(model)
    if not teacher.checked:
        check_teacher(name, teacher.fingerprint, fingerprint_model(model))
    return model


def _in_memory(name: str, teacher: Teacher, blocks: list, batch: int, device):
    """(block index, hidden states after the final norm, lm_head) per block, the teacher loaded whole."""
    model = load_teacher(teacher, torch.float32, device, name)
    with torch.no_grad(), hidden_states_as_logits(model) as head:
        for s in range(0, len(blocks), batch):
            ids = torch.tensor([b[0] for b in blocks[s:s + batch]], device=device)
            hidden = model(input_ids=ids, use_cache=False).logits
            for j in range(len(ids)):
                yield s + j, hidden[j], head


def _streamed(name: str, blocks: list, batch: int, hidden_bytes: int, device):
    """The same, the teacher read one decoder layer at a time (eval.streamed); the head is final norm + lm_head."""
    from .eval.scoring import Batch
    from .eval.streamed import open_streamed

    lm, _ = open_streamed(name, dtype=torch.float32, device=device, max_hidden_bytes=hidden_bytes, check_base=False)
    LIVE.add(lm.stream.model)
    batches = []
    for s in range(0, len(blocks), batch):
        ids = torch.tensor([b[0] for b in blocks[s:s + batch]])
        batches.append(Batch(list(range(s, s + len(ids))), ids, ids.clone(), torch.ones_like(ids)))
    with torch.no_grad():
        for b, hidden in lm.final_hidden(batches):
            for j, i in enumerate(b.rows):
                yield i, hidden[j], lm.stream.head


def teacher_pass(teacher: Teacher, blocks: list, cfg, tmp: Path, hidden_bytes: int | None, device="cpu") -> None:
    """Write the teacher's top-k of ``blocks`` into folder ``tmp`` (shards + index; the manifest is the caller's)."""
    from .weights import ShardWriter

    k, T, n = cfg.distill_top_k, cfg.distill_temperature, len(blocks)
    shards = -(-n // BLOCKS_PER_SHARD)
    writer = ShardWriter(tmp, shards, metadata={"loram": FORMAT})
    rows = _in_memory(teacher.name, teacher, blocks, cfg.micro_batch, device) if hidden_bytes is None else \
        _streamed(teacher.name, blocks, cfg.micro_batch, hidden_bytes, device)
    part: list = []
    total = 0
    # minutes on a big teacher or many blocks: show a bar (count, rate, ETA) unless --quiet
    for _i, hidden, head in progress.track(rows, "teacher top-k", total=n, unit="block"):  # in block order
        part.append(_topk_rows(head, hidden[:-1], k, T, teacher.vocab))  # position seq-1 predicts nothing align scores
        if len(part) == BLOCKS_PER_SHARD or total + len(part) == n:
            s = total // BLOCKS_PER_SHARD
            writer.add({f"{name}.{s}": torch.stack([p[j] for p in part]).cpu()
                        for j, name in enumerate(("logprobs", "indices", "rest"))})
            total += len(part)
            part = []
    writer.finish(total)
    rows.close()  # the generator's teacher goes with it


def ensure_cache(teacher: Teacher, blocks: list, cfg, folder: Path, device="cpu", evals: dict | None = None,
                 command: str = "align --distill") -> tuple[Cache, dict]:
    """The cache of ``blocks`` (then of each of ``evals``: --eval NAME -> its blocks) in ``folder``: reused when its
    key matches, else computed (the teacher loaded, in memory or streamed, then released) and written atomically.
    Returns (cache, what happened)."""
    from .eval.runner import scoring_plan
    from .io import atomic_dir, write_json

    evals = evals or {}
    key = cache_key(teacher, blocks, cfg, evals)
    cache = open_cache(folder, key)
    if cache is not None:
        return cache, {"computed": False}
    stream, hidden_bytes = scoring_plan(teacher.name, cfg.seq_len, cfg.micro_batch, cfg.max_memory)
    t0 = time.time()
    with atomic_dir(folder, overwrite=True, command=command) as tmp:
        # one pass over the training blocks and the eval blocks after them: the teacher is loaded once
        rows = blocks + [b for part in evals.values() for b in part]
        teacher_pass(teacher, rows, cfg, Path(tmp), hidden_bytes if stream else None, device)
        write_json(Path(tmp) / MANIFEST, {"format": FORMAT, "key": key, "teacher": teacher.name,
                                          "teacher_fingerprint": teacher.fingerprint["id"], "top_k": cfg.distill_top_k,
                                          "temperature": cfg.distill_temperature, "seq_len": cfg.seq_len,
                                          "blocks": len(blocks)}
                   | ({"eval_blocks": {n: len(part) for n, part in evals.items()}} if evals else {}))
    gc.collect()  # the teacher's modules are unreachable now; collect them before the student loads
    return open_cache(folder, key), {"computed": True, "streamed": bool(stream), "seconds": round(time.time() - t0, 2)}


# ---- training data: the blocks with their teacher rows ----------------------------------------------
class DistillDataset(torch.utils.data.Dataset):
    """The training blocks with their teacher rows, or (``name``) --eval NAME's blocks with theirs."""

    def __init__(self, blocks: list, cache: Cache, name: str | None = None):
        self.start, count = cache.part(name)
        if count != len(blocks):
            what = "align trains on" if name is None else f"--eval {name} has"
            raise LoramError(f"the distillation cache {cache.folder} holds {count} blocks, {what} {len(blocks)}: "
                             "delete it to recompute")
        self.blocks, self.cache = blocks, cache

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        ids, labels = self.blocks[i]
        return {"input_ids": ids, "labels": labels} | self.cache.row(self.start + i)


def collate(pad_id: int):
    """data.collate for the ids and labels, the teacher's rows stacked and cut to the batch's length - 1 (align's
    blocks all have seq_len tokens, so nothing is cut there; train --original-offset's rows are padded to the
    longest row for the teacher pass and a batch may be shorter)."""
    from .data import collate as plain

    base = plain(pad_id)

    def fn(batch):
        out = base([{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batch])
        n = out["input_ids"].shape[1] - 1
        return out | {k: torch.stack([b[k][:n] for b in batch]) for k in TEACHER_KEYS}

    return fn


def record(cfg, teacher: Teacher, cache: Cache, how: dict, eval_kl: dict | None = None) -> dict:
    """What extra["aligned"]["distill"] keeps (with --eval: each set's block count and final KL to the teacher)."""
    held = {"eval_blocks": cache.evals, "eval_kl": eval_kl} if eval_kl else {}
    return {"teacher": teacher.name, "teacher_fingerprint": teacher.fingerprint["id"], "top_k": cfg.distill_top_k,
            "lm_weight": cfg.distill_lm_weight, "temperature": cfg.distill_temperature, "cache": str(cache.folder),
            "cache_key": cache.manifest["key"], "blocks": cache.blocks, "loss": "T^2 KL(teacher || student) on top-k + rest "
            "bucket + W x LM", **how} | held
