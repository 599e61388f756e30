"""Safetensors weights on disk: the one reader (and the shard writer) every loram command uses.

    Weights(folder)           headers only at open: every tensor's file, dtype and shape, checked
                              (truncated file, tensor in two shards, non-float dtype: one line each)
    .get(name)                one whole tensor, through its own safe_open (the shard's mmap is
                              released after it), so memory holds one tensor at a time
    .read(name, rows, cols)   kept rows / columns of a tensor without reading the others (build)
    .layer(i)                 every tensor of decoder layer i (for layer-by-layer streaming)
    .mismatch(want, tied)     names and shapes against what a config (+ plan) gives

    ShardWriter(folder, n)    the matching writer: one safetensors shard per call + the index json
                              (.add: from tensors in memory; .stream: tensor by tensor, for merge)

Pickles are never read (see io.refuse_pickle_only); only float dtypes are accepted, because an
integer header over float bytes would be read as integers and cast.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import LoramError
from .families import is_tied_head
from .io import read_json, write_json

INDEX_FILE = "model.safetensors.index.json"
CHUNK_BYTES = 64 << 20  # row chunk read when selecting columns
# dtypes a model weight may be stored in; anything else (I32, U8, BOOL, ...) would be read as integers
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}
# safetensors dtype name of each torch dtype a writer may be given
ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
# buffers some checkpoints carry that no model parameter corresponds to
IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def _corrupt(f, e: Exception) -> LoramError:
    return LoramError(f"{f} is truncated or corrupt ({(str(e).splitlines() or [type(e).__name__])[0]}): "
                      "re-create or re-download it")


READ_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError)  # what a truncated or corrupt file raises


def safetensors_files(folder: str | Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise LoramError(f"no .safetensors files in {folder}: the folder is not a model (or is incomplete)")
    return files


@dataclass(frozen=True)
class TensorHeader:
    file: Path
    dtype: str  # safetensors dtype name: F32, BF16, I32, ... (str(torch dtype) for a Weights.from_state_dict)
    shape: tuple

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype the tensor is stored in (what ``Weights.get`` returns without ``dtype``)."""
        if self.dtype.startswith("torch."):
            return getattr(torch, self.dtype.removeprefix("torch."))
        return next(t for t, n in ST_DTYPE.items() if n == self.dtype)


def safetensors_headers(files: list[Path], dtypes: tuple[str, ...] = FLOAT_DTYPES) -> dict[str, TensorHeader]:
    """{tensor name: file, dtype, shape} from the headers only: the one reader every loader goes through.

    Refuses (one line each) a truncated or corrupt file, a tensor stored in two files (the later one
    would silently win, e.g. a stale shard left beside new ones) and a dtype outside ``dtypes`` (for a
    model, a non-float dtype: an I32 header over float bytes would be read as integers and cast; loram's
    own non-model files, such as the distillation cache's token ids, name the integer dtypes they hold).
    """
    out: dict[str, TensorHeader] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                found = [(k, h.get_slice(k)) for k in h.keys()]
                found = [(k, TensorHeader(Path(f), sl.get_dtype(), tuple(sl.get_shape()))) for k, sl in found]
        except READ_ERRORS as e:
            raise _corrupt(f, e) from None
        for k, hdr in found:
            if k in out:
                raise LoramError(f"tensor {k} is stored twice, in {out[k].file.name} and {Path(f).name} of {Path(f).parent}: "
                                 "the checkpoint is inconsistent (a stale shard?), remove the extra file or re-download it")
            if hdr.dtype not in dtypes:
                allowed = f"a float type ({'/'.join(FLOAT_DTYPES)})" if dtypes == FLOAT_DTYPES else f"one of {'/'.join(dtypes)}"
                raise LoramError(f"tensor {k} in {f} is stored as {hdr.dtype}, not {allowed}: "
                                 "the file is corrupt or not a model checkpoint, re-create or re-download it")
            out[k] = hdr
    return out


def safetensors_shapes(files: list[Path]) -> dict[str, tuple]:
    """{tensor name: shape} from the headers only (checked by ``safetensors_headers``)."""
    return {k: h.shape for k, h in safetensors_headers(files).items()}


def safetensors_metadata(f: Path) -> dict:
    """The ``__metadata__`` of one safetensors file ({} when it has none)."""
    try:
        with safe_open(str(f), framework="pt") as h:
            return dict(h.metadata() or {})
    except READ_ERRORS as e:
        raise _corrupt(f, e) from None


def write_safetensors_metadata(src: Path, dst: Path, extra: dict[str, str]) -> None:
    """Copy safetensors ``src`` to ``dst`` (may be ``src``) with ``extra`` added to its ``__metadata__``.

    The tensor bytes are streamed unchanged: data offsets are relative to the end of the header, so
    only the header (8-byte length + JSON, padded to 8 bytes as safetensors writes it) is rewritten.
    In place (``dst`` is ``src``) and with a header of the same length, e.g. placeholder values of the
    same length written first (the streamed writers know their plan's id only at the end), only the
    header bytes are overwritten: no copy of the tensors. Callers do this inside an atomic_dir.
    """
    import os
    import shutil
    import struct

    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.meta-tmp")
    with open(src, "rb") as fin:
        (n,) = struct.unpack("<Q", fin.read(8))
        header = json.loads(fin.read(n))
        header["__metadata__"] = {**(header.get("__metadata__") or {}), **extra}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        if len(raw) == n and dst.resolve() == src.resolve():
            fin.close()
            with open(dst, "r+b") as f:
                f.seek(8)
                f.write(raw)
            return
        with open(tmp, "wb") as fout:
            fout.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(fin, fout, 16 << 20)
    os.replace(tmp, dst)


def runs(idx: list[int]) -> list[tuple[int, int]]:
    """Sorted indices -> [start, end) runs of consecutive values."""
    out, a = [], None
    for j, i in enumerate(idx):
        if a is None:
            a = prev = i
        elif i != prev + 1:
            out.append((a, prev + 1))
            a = i
        prev = i
        if j == len(idx) - 1:
            out.append((a, prev + 1))
    return out


@dataclass
class Mismatch:
    """How a checkpoint's tensors differ from what a config (+ plan) gives."""

    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    wrong: list = field(default_factory=list)  # names present in both with different shapes

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong)


def mismatch(have: dict[str, tuple], want: dict[str, tuple], tied: bool, ignore=IGNORED) -> Mismatch:
    """Names missing from ``have``, unexpected in it, or of another shape than ``want`` says.

    A tied lm_head may be absent; names matching ``ignore`` (rotary inv_freq buffers) are never unexpected."""
    return Mismatch([k for k in want if k not in have and not is_tied_head(k, tied)],
                    [k for k in have if k not in want and not (ignore is not None and ignore.search(k))],
                    [k for k in want if k in have and tuple(have[k]) != tuple(want[k])])


class Weights:
    """The tensors of a safetensors model folder, read lazily one tensor (or slice) at a time.

    ``use_index``: take the shard list from model.safetensors.index.json when there is one (files it
    does not name are ignored, a shard it names must exist, every name must be where it says);
    otherwise every *.safetensors in the folder is read and a tensor in two files is refused.
    A ``Weights`` over a state dict (``from_state_dict``) serves a model loaded in memory (GGUF, hub).
    """

    def __init__(self, folder: str | Path, use_index: bool = False, dtypes: tuple[str, ...] = FLOAT_DTYPES):
        self.folder = Path(folder)
        wm = self._index() if use_index else None
        if wm:
            files = sorted({self.folder / f for f in wm.values()})
            missing = [f for f in files if not f.exists()]
            if missing:
                raise LoramError(f"shard {missing[0].name} named in the index is missing from {self.folder}: finish the download")
        else:
            files = safetensors_files(self.folder)
        self.headers = safetensors_headers(files, dtypes)
        self.files: list[Path] | None = files
        self._sd: dict | None = None
        wrong = [k for k, f in (wm or {}).items() if getattr(self.headers.get(k), "file", None) != self.folder / f]
        if wrong:
            raise LoramError(f"{INDEX_FILE} in {self.folder} puts {wrong[0]} in {wm[wrong[0]]}, which does "
                             "not hold it: the index does not match the shards, re-download the checkpoint")

    @classmethod
    def from_state_dict(cls, sd: dict, name: str) -> "Weights":
        self = cls.__new__(cls)
        self.folder, self.files, self._sd = Path(name), None, sd
        self.headers = {k: TensorHeader(Path(name), str(v.dtype), tuple(v.shape)) for k, v in sd.items()}
        return self

    def _index(self) -> dict | None:
        index = self.folder / INDEX_FILE
        return read_json(index).get("weight_map", {}) if index.exists() else None

    # ---- headers ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self.headers)

    @property
    def shapes(self) -> dict[str, tuple]:
        """{name: shape} (a new dict each call: keep it in a variable in loops)."""
        return {k: h.shape for k, h in self.headers.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.headers

    def mismatch(self, want: dict[str, tuple], tied: bool) -> Mismatch:
        return mismatch(self.shapes, want, tied)

    def stored_dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's values are stored in (what a folder derived from it is written in)."""
        count: dict[str, int] = {}
        for h in self.headers.values():
            count[h.dtype] = count.get(h.dtype, 0) + int(torch.Size(h.shape).numel())
        return TORCH_DTYPES[max(count, key=count.get)]

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype tensor ``name`` is stored in (a streamed writer keeps it: bf16 in, bf16 out)."""
        return TORCH_DTYPES[self.headers[name].dtype]

    # ---- values -----------------------------------------------------------------------------
    def get(self, name: str, dtype=None) -> torch.Tensor:
        """Tensor ``name`` (as ``dtype`` when given and it is a float tensor)."""
        return self.read(name, dtype=dtype)

    def read(self, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
        """Rows ``rows`` or columns ``cols`` (sorted index tensors; None = all) of tensor ``name``.

        Kept rows: one read per run of consecutive rows, so only kept bytes are touched. Kept columns:
        row chunks of <= CHUNK_BYTES, index_select(1, cols) on each."""
        if name not in self.headers:
            raise LoramError(f"tensor {name} is not in the checkpoint {self.folder}: the config does not match the weights")
        if self._sd is not None:
            t = self._sd[name]
            t = t if rows is None else t.index_select(0, rows)
            t = t if cols is None else t.index_select(1, cols)
            return _cast(t, dtype)
        hdr = self.headers[name]
        try:
            with safe_open(str(hdr.file), framework="pt") as h:
                sl = h.get_slice(name)
                if rows is None and cols is None:
                    return _cast(sl[:], dtype)
                if rows is not None:
                    return torch.cat([_cast(sl[a:b], dtype) for a, b in runs(rows.tolist())], 0)
                step = max(1, CHUNK_BYTES // max(1, hdr.shape[1] * ITEMSIZE.get(hdr.dtype, 1)))
                out = None  # filled chunk by chunk: no second full-size copy
                for r in range(0, hdr.shape[0], step):
                    part = _cast(sl[r : r + step].index_select(1, cols), dtype)
                    out = torch.empty((hdr.shape[0], len(cols)), dtype=part.dtype) if out is None else out
                    out[r : r + step] = part
                return out
        except READ_ERRORS as e:
            raise _corrupt(hdr.file, e) from None

    def layer(self, i: int, dtype=None) -> dict[str, torch.Tensor]:
        """Every tensor of decoder layer ``i`` ({name: tensor}), one layer in memory at a time."""
        return {k: self.get(k, dtype) for k in self.layer_names(i)}

    def layer_names(self, i: int) -> list[str]:
        """The names of decoder layer ``i``'s tensors (headers only)."""
        mark = f".layers.{i}."
        return [k for k in self.names if mark in f".{k}"]

    def state_dict(self, dtype=None) -> dict[str, torch.Tensor]:
        """Every tensor (float ones as ``dtype``): for loaders that assign a whole model at once."""
        return {k: self.get(k, dtype) for k in self.names}


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


class ShardWriter:
    """Write a model folder's weights one shard at a time, then the index json.

    Shards are named as transformers names them (model-00001-of-0000N.safetensors); each carries
    ``metadata`` (e.g. the plan binding) in its header. Tensors keep the dtype they are given."""

    def __init__(self, folder: str | Path, n_shards: int, metadata: dict[str, str] | None = None):
        self.folder, self.n, self.k = Path(folder), n_shards, 0
        self.metadata = {"format": "pt", **(metadata or {})}
        self.weight_map: dict[str, str] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> str:
        from safetensors.torch import save_file

        if self.k >= self.n:
            raise ValueError(f"ShardWriter: more than the {self.n} shards announced")
        self.k += 1
        shard = f"model-{self.k:05d}-of-{self.n:05d}.safetensors"
        save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(self.folder / shard), metadata=self.metadata)
        self.weight_map.update({n: shard for n in tensors})
        return shard

    def finish(self, total_parameters: int) -> None:
        write_json(self.folder / INDEX_FILE, {"metadata": {"total_parameters": total_parameters}, "weight_map": self.weight_map})

    def stream(self, specs: dict[str, tuple[torch.dtype, tuple]], tensors, shard: str | None = None) -> str:
        """Write one shard tensor by tensor, so memory holds one tensor, not the shard.

        ``specs`` gives every tensor's dtype and shape up front (the safetensors header comes first in
        the file); ``tensors`` yields (name, tensor) in the order of ``specs``. ``shard``: the file name
        (default: transformers' model-0000k-of-0000N name)."""
        if self.k >= self.n:
            raise ValueError(f"ShardWriter: more than the {self.n} shards announced")
        self.k += 1
        shard = shard or f"model-{self.k:05d}-of-{self.n:05d}.safetensors"
        head, pos = {"__metadata__": self.metadata}, 0
        for name, (dtype, shape) in specs.items():
            n = ST_DTYPE[dtype]
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            head[name] = {"dtype": n, "shape": list(shape), "data_offsets": [pos, pos + size]}
            pos += size
        raw = json.dumps(head, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes with spaces
        _write_streamed(self.folder / shard, raw, _checked(specs, tensors))
        self.weight_map.update({n: shard for n in specs})
        return shard


def _checked(specs: dict, tensors):
    """The tensors' raw bytes, each checked against the header already written (a mismatch is a bug)."""
    expect = iter(specs.items())
    for name, t in tensors:
        want, (dtype, shape) = next(expect, (None, (None, None)))
        if name != want or t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"ShardWriter.stream: got {name} {t.dtype} {tuple(t.shape)}, the header says {want} {dtype} {shape}")
        yield t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    left = next(expect, None)
    if left is not None:
        raise ValueError(f"ShardWriter.stream: {left[0]} was announced but never given")


def _write_streamed(path: Path, header: bytes, chunks) -> None:
    """The safetensors layout: 8-byte little-endian header length, header JSON, then the tensors' bytes."""
    import struct

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for c in chunks:
            f.write(c.data)
