"""Where rows come from: local files (.json, .jsonl, .parquet, .arrow, .csv, .tsv), local dataset
folders and hub ids (streamed through `datasets`), "SOURCE[a:b]" slices, and the digest --resume checks."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import LoramError


SLICE = re.compile(r"^(.+)\[(-?\d*):(-?\d*)\]$")


def split_slice(source: str) -> tuple[str, slice | None]:
    """"file.json[100:200]" -> ("file.json", slice(100, 200)): a held-out split without a new file."""
    m = SLICE.match(source)
    if m is None or Path(source).exists():
        return source, None
    a, b = (int(x) if x else None for x in m.group(2, 3))
    return m.group(1), slice(a, b)


def source_digest(source: str) -> str | None:
    """sha256 (16 hex) of a local data file's bytes, None for a hub id: --resume refuses changed data."""
    p = Path(split_slice(source)[0])
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".tsv")  # row files read here (not streamed)


def read_rows(source: str, limit: int | None = None) -> list[dict]:
    """Rows of a local file (FILE_SUFFIXES), a local dataset folder or a hub dataset id ("name",
    "name:split", "owner/name@config:split"), optionally sliced: "SOURCE[start:end]" keeps those rows
    (Python slice semantics). ``limit``: at most that many rows (a streamed source stops reading there)."""
    return list(itertools.islice(iter_rows(source), limit))


def streamed(source: str) -> bool:
    """True for a source read through `datasets` as a stream (a hub id or a local folder), False for a file."""
    return not Path(split_slice(source)[0]).is_file()


def iter_rows(source: str) -> Iterator[dict]:
    """The rows of ``source`` (see read_rows) one by one. A file is read whole (it is local and bounded);
    a hub id or a folder is streamed (``stream_rows``), so taking the first N rows of a large set reads
    about N rows, not the set."""
    path, part = split_slice(source)
    p = Path(path)
    if p.is_file():
        rows = _read_file(p)
        if part is not None:
            rows = rows[part]
            if not rows:
                raise LoramError(f"dataset {source} selects no rows: check the slice")
        elif not rows:
            raise LoramError(f"dataset {source} is empty: give it at least one row")
        return iter(rows)
    if missing_local_file(path):
        raise LoramError(f"dataset file {path} does not exist: check the path")
    return _nonempty(_sliced(stream_rows(path), part), source)


def _sliced(rows: Iterator[dict], part: slice | None) -> Iterator[dict]:
    """rows[part] without reading past the slice's end (a negative bound needs the whole stream)."""
    if part is None:
        return rows
    if any(x is not None and x < 0 for x in (part.start, part.stop)):
        return iter(list(rows)[part])
    return itertools.islice(rows, part.start, part.stop)


def _nonempty(rows: Iterator[dict], source: str) -> Iterator[dict]:
    """``rows``, refused as empty when the stream ends before its first row."""
    seen = False
    for row in rows:
        seen = True
        yield row
    if not seen:
        raise LoramError(f"dataset {source} selects no rows: check the slice" if split_slice(source)[1]
                         else f"dataset {source} is empty: give it at least one row")


def missing_local_file(path: str, suffixes: tuple = FILE_SUFFIXES) -> bool:
    """``path`` looks like a local file (starts with . or /, or ends with one of ``suffixes``) and is not there:
    a one-line error before any loading. A folder, FOLDER:split or hub id ("org/name") is not a file."""
    return (path.startswith((".", "/")) or path.endswith(suffixes)) and not Path(path).exists() and not folder_split(path)


def folder_split(source: str) -> tuple[str, str] | None:
    """"FOLDER:validation" -> (FOLDER, "validation") when FOLDER is a local folder (data files named by split, as
    on the Hub); None otherwise."""
    folder, colon, split = source.rpartition(":")
    return (folder, split) if colon and folder and split and Path(folder).is_dir() else None


def stream_rows(source: str) -> Iterator[dict]:
    """Rows of a hub dataset or a local dataset folder through `datasets`, lazily (streaming=True: nothing
    is downloaded or converted beyond the rows taken). A folder written by ``Dataset.save_to_disk`` is
    memory-mapped (load_from_disk), any other folder of data files is streamed like a hub dataset."""
    import datasets

    try:
        if Path(source, "state.json").is_file() or Path(source, "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(source)
            ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        elif Path(source).is_dir():
            ds = datasets.load_dataset(source, split="train", streaming=True)
        elif folder_split(source):
            folder, split = folder_split(source)
            ds = datasets.load_dataset(folder, split=split, streaming=True)
        else:
            name, _, split = source.partition(":")
            name, _, config = name.partition("@")  # "owner/name@config:split"
            ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        rows = iter(ds)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise LoramError(f"cannot load dataset {source!r} ({_first_line(e)}): pass a local file or a valid hub id") from None
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a bad shard surfaces only when the stream reaches it
            raise LoramError(f"cannot read dataset {source!r} ({_first_line(e)}): fix or re-download its files") from None
        yield present(row)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def present(row):
    """A columnar row (parquet, Arrow, `datasets`) without its null fields: a column table gives every row
    every column, so a text row of a file that also has chat rows would carry "messages": None."""
    return {k: v for k, v in row.items() if v is not None} if isinstance(row, dict) else row


def read_utf8(path: str | Path, what: str = "dataset") -> str:
    """The text of a data file; bytes that are not UTF-8 are a user error (never silently replaced)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LoramError(f"{what} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}): "
                         "re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8") from None


def read_table(path: Path, kind: str) -> list[dict]:
    """Rows of a parquet or Arrow file, read with pyarrow (no datasets cache written for a local file).
    Arrow: the IPC file format (Feather v2, ``pa.ipc.new_file``) or the stream format `datasets` writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            table = pq.read_table(str(path))
        else:
            with pa.memory_map(str(path)) as src:
                try:
                    table = pa.ipc.open_file(src).read_all()
                except pa.ArrowInvalid:  # no file footer: the stream format
                    src.seek(0)
                    table = pa.ipc.open_stream(src).read_all()
        return [present(r) for r in table.to_pylist()]
    except (pa.ArrowException, OSError) as e:
        raise LoramError(f"dataset {path} is not a readable {kind} file ({_first_line(e)}): "
                         "re-create or re-download it") from None


def read_csv(path: Path, delimiter: str) -> list[dict]:
    """Rows of a .csv / .tsv file with a header line, every cell as text. Not pandas or pyarrow: their type
    inference turns an output "42" into a number and an empty cell into a null, and a row into a non-text row."""
    import csv
    import io

    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long response is one cell: the default stops at 128 KiB
    text = read_utf8(path).removeprefix("\ufeff")  # the byte-order mark spreadsheet programs write would join the first name
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    what = "commas" if delimiter == "," else "tabs"
    rows = []
    try:
        header = next(reader, None)
        for cells in reader:
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                raise LoramError(f"dataset {path} line {reader.line_num} has {len(cells)} fields, its header has {len(header)}: "
                                 f'quote the cells that contain {what} ("a, b")')
            rows.append(dict(zip(header, cells)))
    except csv.Error as e:
        raise LoramError(f"dataset {path} is not valid CSV (line {reader.line_num}: {e}): fix the file") from None
    return rows


def _read_file(p: Path) -> list:
    """The rows of a local data file, by extension."""
    try:
        if p.suffix == ".jsonl":
            return [json.loads(line) for line in read_utf8(p).splitlines() if line.strip()]
        if p.suffix == ".json":
            rows = json.loads(read_utf8(p))
            if isinstance(rows, dict):  # {"data": [...]} or {"train": [...]}
                lists = [v for v in rows.values() if isinstance(v, list)]
                rows = lists[0] if len(lists) == 1 else [rows]
            return rows if isinstance(rows, list) else []  # a bare value: no rows (refused as empty)
    except json.JSONDecodeError as e:
        raise LoramError(f"dataset {p} is not valid JSON ({e}): fix the file") from None
    if p.suffix in (".parquet", ".arrow"):
        return read_table(p, p.suffix[1:])
    if p.suffix in (".csv", ".tsv"):
        return read_csv(p, "," if p.suffix == ".csv" else "\t")
    raise LoramError(f"dataset {p} has an unknown extension: use {', '.join(FILE_SUFFIXES)} (or a dataset folder / hub id)")
