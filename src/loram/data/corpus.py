"""Raw corpora for `loram align`: documents (.txt lines or "text" rows) tokenized, joined with EOS and
cut into blocks of exactly --seq-len tokens."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import LoramError
from .rows import _ids, row_text
from .sources import iter_rows, read_rows, read_utf8, split_slice, streamed


def read_texts(source: str, tok=None) -> Iterable[str]:
    """Documents of a raw corpus: a .txt file (one per non-empty line) or rows with a "text" field. A list for
    a local file; for a streamed source (hub id, folder) a generator, read as far as it is consumed. With a
    tokenizer ``tok``, training rows (instruction/output, messages, prompt/completion) count too, each rendered as
    `loram train` renders it (rows.row_text): `train --anchor` takes the general instructions a user has."""
    path, part = split_slice(source)
    p = Path(path)
    if p.suffix == ".txt":
        if not p.is_file():
            raise LoramError(f"corpus file {path} does not exist: check the path")
        docs = [line.strip() for line in read_utf8(p, "corpus").splitlines() if line.strip()]
        docs = docs[part] if part is not None else docs
        if not docs:
            raise LoramError(f"corpus {source} is empty: give it at least one line of text")
        return docs
    if streamed(source):
        return _stream_texts(iter_rows(source), source, tok)
    texts = [_text(r, tok) for r in read_rows(source)]
    bad = [i for i, t in enumerate(texts) if t is None]
    if bad:
        raise LoramError(no_text(source, bad[0], f" ({len(bad)} such rows)", tok is not None))
    return [t for t in texts if t.strip()]


def is_text_row(r) -> bool:
    return isinstance(r, dict) and isinstance(r.get("text"), str)


def _text(r, tok) -> str | None:
    """A row's document: its "text"; with a tokenizer, a training row rendered (None: neither)."""
    if is_text_row(r):
        return r["text"]
    return row_text(tok, r) if tok is not None else None


def no_text(source: str, i: int, count: str = "", rows_too: bool = False) -> str:
    if rows_too:
        return (f"corpus {source}: row {i} is neither a {{\"text\": ...}} row nor a training row{count}: give text rows, "
                "training rows (instruction/output, messages, prompt/completion) or a .txt file")
    return f"corpus {source}: row {i} has no \"text\" string{count}: give {{\"text\": ...}} rows or a .txt file"


def _stream_texts(rows: Iterator[dict], source: str, tok=None) -> Iterator[str]:
    for i, r in enumerate(rows):
        t = _text(r, tok)
        if t is None:
            raise LoramError(no_text(source, i, rows_too=tok is not None))
        if t.strip():
            yield t


def chunk_tokens(tok, docs: Iterable[str], seq_len: int, name: str = "corpus",
                 max_blocks: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Blocks of exactly seq_len tokens from the concatenated documents (EOS between them); with
    ``max_blocks``, documents are read only until that many blocks are full (a streamed corpus stops there)."""
    stream: list[int] = []
    for d in docs:
        stream += _ids(tok, tok(d, add_special_tokens=False)) + [tok.eos_token_id]
        if max_blocks is not None and len(stream) >= max_blocks * seq_len:
            break
    n = len(stream) // seq_len
    if n == 0:
        raise LoramError(f"{name} has {len(stream)} tokens, fewer than one block of --seq-len {seq_len}: "
                         "give more text or a smaller --seq-len")
    return [(stream[i * seq_len:(i + 1) * seq_len], stream[i * seq_len:(i + 1) * seq_len]) for i in range(n)]
