"""Fingerprint of a base model: config + tensor shapes + a sampled hash of the weight values.

Recovery and merge must put an adapter on exactly the model it was planned for. Hashing all
the bytes of a 70B checkpoint (140 GB) would take minutes, so we hash a fixed sample:

    for each tensor (sorted by name):   rows r_i = i*R // 8  (i < 8),  in each row
                                        columns c_j = j*C // 128 (j < 128)
    value bytes = sample cast to bfloat16   (so fp32, bf16 and fp16 loads of one checkpoint agree)

That is <= 1024 values per tensor: ~700 tensors * 8 row reads for a 70B checkpoint, milliseconds
per shard with safetensors' lazy slices. Any retrained, re-quantised or other model differs in
sampled values with near certainty; shapes and the config hash catch every geometry change.

What the sample does not catch: a change confined to rows or columns it does not read (e.g. a few
retrained or added token embeddings, one edited weight, a flipped bit on disk), and differences
below bfloat16 precision. ``--verify-base full`` (``full_digest``) hashes every byte of every weight
file instead: the digest is recorded when the plan is made (`loram prune/import-plan --verify-base
full`) and compared by `loram recover/merge --verify-base full`. Hashing reads the whole checkpoint
(~1 GB/s), so each file's sha256 is cached under $XDG_CACHE_HOME/loram (default ~/.cache/loram),
keyed by its resolved path, size and mtime_ns: a file rewritten in place gets a new mtime and is
hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import LoramError
from .families import is_tied_head, ties_embeddings
from .io import load_config, resolve_model
from .loading import load_model
from .weights import safetensors_files, safetensors_headers

SCHEME = "sampled-bf16-v1"
VERIFY_MODES = ("sampled", "full")  # --verify-base
DIGEST_CACHE = "full-digests.json"
ROWS, COLS = 8, 128
# config keys that define the architecture (others, like dtype or generation defaults, don't)
CONFIG_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "hidden_act", "rms_norm_eps",
)


def config_digest(config) -> str:
    d = config if isinstance(config, dict) else config.to_dict()
    keep = {k: d.get(k) for k in CONFIG_KEYS}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _sample_rows(n_rows: int) -> list[int]:
    k = min(n_rows, ROWS)
    return [i * n_rows // k for i in range(k)]


def _sample_cols(row: torch.Tensor) -> torch.Tensor:
    c = row.numel()
    k = min(c, COLS)
    idx = torch.arange(k, dtype=torch.long) * c // k
    return row.reshape(-1)[idx]


def _value_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def _tensor_sample(shape, get_row) -> bytes:
    """get_row(r) returns row r of a tensor of >= 2 dims (flattened), or the whole 1-D tensor."""
    if len(shape) <= 1:
        return _value_bytes(_sample_cols(get_row(None)))
    return b"".join(_value_bytes(_sample_cols(get_row(r))) for r in _sample_rows(shape[0]))


def _finish(config, items) -> dict:
    """items: iterable of (name, shape, sample_bytes) sorted by name."""
    shapes, weights = hashlib.sha256(), hashlib.sha256()
    n_params = 0
    for name, shape, sample in items:
        shapes.update(f"{name}:{list(shape)};".encode())
        weights.update(name.encode() + sample)
        n = 1
        for s in shape:
            n *= s
        n_params += n
    fp = {"scheme": SCHEME, "config": config_digest(config), "shapes": shapes.hexdigest()[:16],
          "weights": weights.hexdigest()[:16], "n_params": n_params}
    fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


def fingerprint_state_dict(state_dict: dict, config) -> dict:
    """Fingerprint of in-memory tensors (a loaded model's state_dict, e.g. from GGUF)."""
    tied = ties_embeddings(config)

    def items():
        for name in sorted(state_dict):
            if is_tied_head(name, tied):
                continue
            t = state_dict[name]
            yield name, tuple(t.shape), _tensor_sample(t.shape, lambda r, t=t: t.reshape(-1) if r is None else t[r])

    return _finish(config, items())


def fingerprint_model(model) -> dict:
    return fingerprint_state_dict(model.state_dict(), model.config)


def fingerprint_safetensors(files: list[Path], config) -> dict:
    """Fingerprint of a safetensors checkpoint, reading only the sampled rows (no full load)."""
    from safetensors import safe_open

    tied = ties_embeddings(config)
    # a truncated or corrupt file, a tensor in two shards or a non-float dtype is a one-line user error
    headers = safetensors_headers(files)
    handles = {Path(f): safe_open(str(f), framework="pt") for f in files}
    where = {k: handles[h.file] for k, h in headers.items()}

    def items():
        for name in sorted(where):
            if is_tied_head(name, tied):
                continue
            sl = where[name].get_slice(name)
            shape = tuple(sl.get_shape())
            yield name, shape, _tensor_sample(shape, lambda r, sl=sl: sl[:] if r is None else sl[r : r + 1])

    return _finish(config, items())


def base_fingerprint(name: str | Path, model=None, verify: str = "sampled") -> dict:
    """Fingerprint of an original model: from its safetensors files when it is a local folder
    (no load needed, fast for 70B), else from the loaded tensors (GGUF, hub).
    verify="full" also records the digest of every byte of its weight files (fingerprint["full"])."""
    check_verify(verify)
    path, gguf = resolve_model(name)
    if gguf is None and Path(path).is_dir():
        fp = fingerprint_safetensors(safetensors_files(path), load_config(name).to_dict())
    else:
        fp = fingerprint_model(model if model is not None else load_model(name))
    if verify == "full":
        fp["full"] = full_digest(weight_files(name))  # outside fp["id"]: sampled and full plans share their id
    return fp


def check_verify(verify: str) -> None:
    if verify not in VERIFY_MODES:
        raise LoramError(f"--verify-base {verify!r} is unknown: use {' or '.join(VERIFY_MODES)}")


def same_model(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("scheme", "config", "shapes", "weights"))


def describe_difference(expected: dict, got: dict) -> str:
    parts = [k for k in ("config", "shapes", "weights") if expected.get(k) != got.get(k)] or ["scheme"]
    verb = "differ" if len(parts) > 1 or parts[0] in ("shapes", "weights") else "differs"
    return f"{', '.join(parts)} {verb} (expected fingerprint {expected.get('id')}, got {got.get('id')})"


# ---- full digest (--verify-base full) ---------------------------------------------------------
def cache_dir() -> Path:
    """loram's own cache folder: $XDG_CACHE_HOME/loram, default ~/.cache/loram."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loram"


def _read_cache(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):  # absent or damaged: the cache is only a shortcut, start afresh
        return {}


def _write_cache(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only home only costs the next run a re-hash
        pass


def file_sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def full_digest(files: list[Path]) -> str:
    """sha256 over every byte of ``files`` (with their names); each file's hash is cached (see module doc)."""
    path = cache_dir() / DIGEST_CACHE
    cache, changed, parts = _read_cache(path), False, []
    for f in sorted(map(Path, files), key=lambda f: f.name):
        st, key = f.stat(), str(f.resolve())
        hit = cache.get(key)
        if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            digest = hit["sha256"]
        else:
            digest = file_sha256(f)
            cache[key], changed = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}, True
        parts.append(f"{f.name}:{digest}")
    if changed:
        _write_cache(path, cache)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def weight_files(name: str | Path) -> list[Path]:
    """The files holding a local model's weights (safetensors shards or the .gguf) for a full digest."""
    path, gguf = resolve_model(name)
    if gguf is not None:
        return [Path(path) / gguf]
    if not Path(path).is_dir():
        raise LoramError(f"--verify-base full hashes local files, and {name} is a hub id: download it and pass the folder")
    return safetensors_files(path)


def check_base_full(expected: dict, base: str | Path, subject: str, made: str) -> None:
    """--verify-base full: every byte of ``base``'s weight files must be the ones recorded in ``expected``
    (``subject`` ``made``: e.g. "this adapter's plan" "was made from", for the messages)."""
    want = expected.get("full")
    if not want:
        raise LoramError(f"{subject} records no full digest of its base (it was made without --verify-base full): "
                         "re-create the plan with `loram prune ... --verify-base full`, or drop --verify-base full "
                         "to check the sampled fingerprint")
    got = full_digest(weight_files(base))
    if got != want:
        raise LoramError(f"base {base} is not byte for byte the model {subject} {made} (full digest {got[:16]}, "
                         f"expected {want[:16]}): pass the original model, unmodified")
