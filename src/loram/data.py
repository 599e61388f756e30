"""Training data: reading rows, formatting them with the chat template, masking prompt tokens.

Row formats (detected per row):

    alpaca    {"instruction", "input"?, "output" | "response"}   -> user: instruction\\n\\ninput, assistant: output
    chat      {"messages": [{"role", "content"}, ...]}             -> every assistant turn is a response
              {"conversations": [{"from", "value"}, ...]}          ShareGPT (human/gpt/system), same
    text      {"text"}                                              -> plain language modelling
    prompt-completion (TRL)
              {"prompt": str, "completion": str}                   -> prompt + completion + EOS, no chat template
              {"prompt": [messages], "completion": [messages]}     -> chat template; loss on all after the prompt

Labels: -100 on prompt tokens (system/user turns, template scaffolding), the token ids on
response tokens (including the closing end-of-turn token, so the model learns to stop).
``train_on_inputs=True`` labels everything. Models without a chat template get the Alpaca
prompt format ("### Instruction: ... ### Response: ...") instead, or the template of a --chat-template
file (``read_chat_template``).

Files: .json, .jsonl, .parquet, .arrow (Arrow IPC file or stream, as `datasets` caches), .csv / .tsv
(header line, every cell read as text). Hub ids and local dataset folders are streamed through
`datasets` (``iter_rows``): rows are read as they are encoded and a run stops reading once it has
the rows its --steps need (``build_dataset``).

Rows longer than --seq-len are cut to it (--long-rows truncate, TRL's default; counted as
"truncated") or skipped (--long-rows drop, counted as too_long).

Skipped rows: a training or --eval row that is too long for --seq-len (--long-rows drop, or a prompt
that leaves no response token within it), has no response token,
a chat role outside KNOWN_ROLES, none of the formats above, or that the chat template rejects is
not trained on; ``encode_all`` counts it by reason (train_report.json `dropped`). A file where
more than half the rows would be skipped is refused with the main reason: that is a wrong
format, role names or --seq-len, not a few bad rows. Files must be UTF-8.

Raw corpora (`loram align`): .txt (one document per non-empty line) or rows with "text"; each
document is tokenized, closed with EOS, concatenated and cut into blocks of exactly seq_len
tokens (the tail shorter than a block is dropped), every token labelled.

Mixtures: several --data sources (rows or corpora) are drawn from in proportion to their weights
(``mix``); ``build_dataset`` / ``eval_sets`` turn a run's --data / --eval into encoded examples.

Packing (--packing): rows are grouped into --seq-len sequences that keep their boundaries (``pack``):
positions restart per row and attention stays inside each row, so the loss equals the rows' own.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .configs import LONG_ROWS
from .errors import LoramError

if TYPE_CHECKING:  # annotations only: loram.train imports this module
    from .configs import RunConfig, TrainConfig

IGNORE = -100
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# roles a chat row may use: any other is a typo or a foreign schema ("bot", "model"), which a template
# would render as a prompt turn, leaving the row with nothing to learn
KNOWN_ROLES = ("system", "user", "assistant", "tool")
FALLBACK_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
FALLBACK_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


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
    if not p.is_dir() and not folder_split(path) and (path.startswith((".", "/")) or path.endswith(FILE_SUFFIXES)):
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


class RowSkipped(LoramError):
    """A row that cannot be trained on. ``encode`` raises it (a single row is a clear error);
    ``encode_all`` counts it under ``reason`` and goes on (a file is refused when most rows are)."""

    def __init__(self, reason: str, what: str, fix: str = ""):
        super().__init__(f"{what}: {fix}" if fix else what)
        self.reason, self.what = reason, what


def check_messages(msgs, what: str = "messages") -> None:
    """A chat row's message list: non-empty {role, content} strings with KNOWN_ROLES (else RowSkipped)."""
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise RowSkipped("malformed", f"dataset row has `{what}` that is not a non-empty list of {{role, content}} "
                                      "strings", "fix the row")
    unknown = [m["role"] for m in msgs if m["role"] not in KNOWN_ROLES]
    if unknown:
        raise RowSkipped("unknown_role", f"dataset row has a message with role {unknown[0]!r}", SKIP_REASONS["unknown_role"][1])


def row_kind(row) -> str:
    """alpaca | chat | completion (TRL prompt-completion, text) | chat_completion (its conversational form) | text."""
    if not isinstance(row, dict):
        raise RowSkipped("malformed", f"dataset row {str(row)[:60]!r} is not an object", "rows must be JSON objects")
    if "conversations" in row and "messages" not in row:  # ShareGPT (OpenHermes): from/value
        row["messages"] = [{"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": m.get("value")}
                           for m in row["conversations"]] if isinstance(row["conversations"], list) else None
    if "messages" in row:
        check_messages(row["messages"])
        return "chat"
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return "completion"
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise RowSkipped("malformed", f"dataset row {str(row)[:60]!r} has a prompt and a completion that are not both text "
                                          "or both message lists", "give two strings or two lists of {role, content}")
        check_messages(prompt, "prompt")
        check_messages(completion, "completion")
        return "chat_completion"
    if "instruction" in row and ("output" in row or "response" in row):
        resp = row["output"] if isinstance(row.get("output"), str) else row.get("response")
        if not isinstance(row["instruction"], str) or not isinstance(resp, str) or not isinstance(row.get("input", ""), (str, type(None))):
            raise RowSkipped("malformed", f"dataset row {str(row)[:60]!r} has a non-text instruction/input/output", "give strings")
        return "alpaca"
    if "text" in row:
        if not isinstance(row["text"], str):
            raise RowSkipped("malformed", f"dataset row {str(row)[:60]!r} has a non-string `text`", "give a string")
        return "text"
    raise RowSkipped("missing_fields", f"dataset row with fields {sorted(row)[:6]} has none of the known formats",
                     SKIP_REASONS["missing_fields"][1])


def to_messages(row) -> list[dict]:
    kind = row_kind(row)
    if kind == "chat":
        return row["messages"]
    if kind == "chat_completion":
        return row["prompt"] + row["completion"]
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    resp = row["output"] if isinstance(row.get("output"), str) else row.get("response")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": resp}]


def _ids(tok, x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def chat_template_ids(tok, msgs, gen_prompt: bool) -> list[int]:
    """Token ids of ``msgs`` through the tokenizer's chat template; template problems are one-line errors."""
    from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError

    try:
        return _ids(tok, tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen_prompt))
    except SecurityError as e:  # the sandbox stopped the template itself: no row can be formatted
        raise LoramError(f"the tokenizer's chat template is unsafe, the sandbox refused it ({e}): pass a model whose "
                         "chat template is safe, or fix its chat_template.jinja / tokenizer_config.json") from None
    except TemplateSyntaxError as e:
        raise LoramError(f"the tokenizer's chat template is not valid Jinja ({e}): fix its chat_template.jinja / "
                         "tokenizer_config.json") from None
    except TemplateError as e:  # raise_exception(...) in the template: it rejects this row (e.g. roles out of order)
        raise RowSkipped("template_error", f"the chat template rejected a row ({str(e).splitlines()[0]})", "fix the row") from None


def read_chat_template(path: str | Path) -> str:
    """The text of a --chat-template Jinja file, compiled as transformers compiles chat templates, so a missing
    file or a syntax error is one line before anything loads. Set it as ``tok.chat_template``."""
    from jinja2.exceptions import TemplateError

    p = Path(path)
    if not p.is_file():
        raise LoramError(f"--chat-template {path} does not exist: give a Jinja chat template file (e.g. chat_template.jinja)")
    text = read_utf8(p, "--chat-template")
    if not text.strip():
        raise LoramError(f"--chat-template {path} is empty: write a Jinja template over `messages`")
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # private in transformers: without it, a plain Jinja parse still finds syntax errors
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        compile_template = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse
    try:
        compile_template(text)
    except TemplateError as e:
        line = f"line {e.lineno}: " if getattr(e, "lineno", None) else ""
        raise LoramError(f"--chat-template {path} is not valid Jinja ({line}{_first_line(e)}): fix the template") from None
    return text


def prompt_response_ids(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Plain text prompt + response + EOS, labels on the response and EOS. Each part is tokenized on its own,
    so the label mask falls exactly on the prompt's tokens (tokenizing the joined text could merge a token
    across the boundary)."""
    p = _ids(tok, tok(prompt, add_special_tokens=True))
    r = _ids(tok, tok(response, add_special_tokens=False)) + [tok.eos_token_id]
    return p + r, [IGNORE] * len(p) + r


def encode(tok, row, train_on_inputs: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row."""
    kind = row_kind(row)
    if kind == "text":
        ids = _ids(tok, tok(row["text"], add_special_tokens=True)) + [tok.eos_token_id]
        return ids, list(ids)
    if kind == "completion":  # TRL's standard prompt-completion: plain text, whatever the tokenizer's template
        ids, labels = prompt_response_ids(tok, row["prompt"], row["completion"])
    elif not getattr(tok, "chat_template", None):  # Alpaca prompt format, single turn
        if kind != "alpaca":
            raise LoramError("this tokenizer has no chat template, so `messages` rows cannot be formatted: "
                             "use instruction/output rows, a tokenizer with a chat template, or --chat-template FILE")
        tmpl = FALLBACK_PROMPT_INPUT if row.get("input") else FALLBACK_PROMPT
        ids, labels = prompt_response_ids(tok, tmpl.format(**{"input": "", **row}), to_messages(row)[1]["content"])
    elif kind == "chat_completion":  # as TRL: the loss is on everything after the prompt's generation prompt
        ids = chat_template_ids(tok, to_messages(row), gen_prompt=False)
        prompt = chat_template_ids(tok, row["prompt"], gen_prompt=True)
        if ids[: len(prompt)] != prompt:  # the mask would fall on the wrong tokens
            raise RowSkipped("template_error", "the chat template renders the row's prompt differently alone and before its "
                                               "completion", "use a template whose prompt is a prefix of the conversation")
        labels = [IGNORE] * len(prompt) + ids[len(prompt):]
    else:
        msgs = to_messages(row)
        ids = chat_template_ids(tok, msgs, gen_prompt=False)
        labels = [IGNORE] * len(ids)
        for j, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(chat_template_ids(tok, msgs[:j], gen_prompt=True))
            end = len(chat_template_ids(tok, msgs[: j + 1], gen_prompt=False))
            labels[start:end] = ids[start:end]
    if train_on_inputs:
        labels = list(ids)
    return ids, labels


# why a row is skipped -> (how the count reads, what the user should do when most rows are)
SKIP_REASONS = {
    "too_long": ("longer than --seq-len {seq_len}", "raise --seq-len or shorten the rows"),
    "no_response": ("with no response tokens", "give every row a non-empty output / assistant turn"),
    "unknown_role": ("with an unknown role", f"use the roles {', '.join(KNOWN_ROLES)} (ShareGPT: human, gpt, system)"),
    "missing_fields": ("in none of the known formats", "give instruction+output (or response), messages, or text"),
    "malformed": ("malformed", "give JSON objects with string fields"),
    "template_error": ("rejected by the chat template", "fix the rows the template rejects"),
}


@dataclass
class Encoded:
    examples: list[tuple[list[int], list[int]]]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    truncated: int = 0  # rows kept, cut to --seq-len (--long-rows truncate)

    @property
    def dropped(self) -> int:
        return sum(self.skipped.values())


def skip_counts(skipped: dict[str, int], seq_len: int) -> str:
    """ "3 longer than --seq-len 64, 1 with an unknown role", most frequent first."""
    order = sorted(skipped.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{n} {SKIP_REASONS[r][0].format(seq_len=seq_len)}" for r, n in order if n)


def skip_summary(skipped: dict[str, int]) -> str:
    """ "4 rows skipped (3 too_long, 1 unknown_role)" of a report's ``dropped`` dict (with or without "total"),
    then "; 2 rows truncated to --seq-len" when it counts rows cut (key "truncated", not in the total)."""
    counts = {r: n for r, n in skipped.items() if r not in ("total", "truncated") and n}
    detail = ", ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    n = sum(counts.values())
    out = f"{n} row{'' if n == 1 else 's'} skipped ({detail})" if counts else "no rows skipped"
    cut = skipped.get("truncated", 0)
    return out + (f"; {cut} row{'' if cut == 1 else 's'} truncated to --seq-len" if cut else "")


def encode_all(tok, rows: Iterable, seq_len: int, train_on_inputs: bool = False, name: str = "dataset",
               long_rows: str = "truncate", max_examples: int | None = None, max_tokens: int | None = None) -> Encoded:
    """Every trainable row as (ids, labels); the others are counted by reason in ``skipped``.

    A row longer than ``seq_len`` is cut to its first seq_len tokens (long_rows "truncate", as TRL; counted
    in ``truncated``) or skipped as too_long ("drop"); a cut row left with no response token is skipped too.
    ``max_examples`` / ``max_tokens``: stop reading ``rows`` once that many examples / tokens are kept (a
    streamed source is read only as far as the run needs).

    A file where more than half the rows are skipped is refused: that is a wrong format, role
    names or --seq-len, not a few bad rows, and training on the remainder would mislead.
    """
    if long_rows not in LONG_ROWS:
        raise LoramError(f"--long-rows {long_rows!r} is unknown: use {' or '.join(LONG_ROWS)}")
    out, skipped, example, truncated, tokens, n = [], Counter(), {}, 0, 0, 0
    for n, row in enumerate(rows, 1):  # noqa: B007 - n counts the rows read
        try:
            ids, labels = encode(tok, row, train_on_inputs)
            cut = len(ids) > seq_len
            if cut and long_rows == "drop":
                raise RowSkipped("too_long", "")  # counted only: the summary says how many and why
            ids, labels = ids[:seq_len], labels[:seq_len]
            if all(x == IGNORE for x in labels):
                raise RowSkipped("too_long" if cut else "no_response", "")
        except RowSkipped as e:
            skipped[e.reason] += 1
            example.setdefault(e.reason, e.what)
            continue
        out.append((ids, labels))
        truncated, tokens = truncated + cut, tokens + len(ids)
        if (max_examples is not None and len(out) >= max_examples) or (max_tokens is not None and tokens >= max_tokens):
            break
    if 2 * sum(skipped.values()) > n:
        main = skipped.most_common(1)[0][0]
        first = f"; first: {example[main]}" if example[main] else ""
        raise LoramError(f"{name}: {sum(skipped.values())} of its {n} rows would be skipped "
                         f"({skip_counts(skipped, seq_len)}{first}): {SKIP_REASONS[main][1]}")
    return Encoded(out, dict(skipped), truncated)


def read_texts(source: str) -> Iterable[str]:
    """Documents of a raw corpus: a .txt file (one per non-empty line) or rows with a "text" field. A list for
    a local file; for a streamed source (hub id, folder) a generator, read as far as it is consumed."""
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
        return _stream_texts(iter_rows(source), source)
    rows = read_rows(source)
    bad = [i for i, r in enumerate(rows) if not is_text_row(r)]
    if bad:
        raise LoramError(no_text(source, bad[0], f" ({len(bad)} such rows)"))
    return [r["text"] for r in rows if r["text"].strip()]


def is_text_row(r) -> bool:
    return isinstance(r, dict) and isinstance(r.get("text"), str)


def no_text(source: str, i: int, count: str = "") -> str:
    return f"corpus {source}: row {i} has no \"text\" string{count}: give {{\"text\": ...}} rows or a .txt file"


def _stream_texts(rows: Iterator[dict], source: str) -> Iterator[str]:
    for i, r in enumerate(rows):
        if not is_text_row(r):
            raise LoramError(no_text(source, i))
        if r["text"].strip():
            yield r["text"]


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


def pack(examples, seq_len: int):
    """Rows grouped, in order, into sequences of at most seq_len tokens, with their boundaries kept.

    Each packed sequence is (input_ids, labels, position_ids) as transformers' DataCollatorWithFlattening
    (TRL's padding-free packing) lays rows out: position ids restart at 0 for every row and the label of each
    row's first token is IGNORE, so no token is predicted from the row before it. Given position ids and no
    2-D attention mask, transformers attends within each row only (masking_utils finds the restarts and builds
    a block-diagonal mask for sdpa/eager; flash-attention runs varlen), so a packed sequence trains exactly as
    its rows one by one (tests/test_packing.py) with fewer pad tokens. ``collate`` keeps that layout.
    """
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(return_tensors="np", separator_id=IGNORE)
    groups, cur, n = [], [], 0
    for ids, labels in examples:
        if n + len(ids) > seq_len and cur:
            groups.append(cur)
            cur, n = [], 0
        cur.append({"input_ids": ids, "labels": labels})
        n += len(ids)
    if cur:
        groups.append(cur)
    out = []
    for rows in groups:
        b = flatten(rows)
        out.append(tuple(b[k][0].tolist() for k in ("input_ids", "labels", "position_ids")))
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ids, labels, *positions = self.examples[i]  # packed sequences carry their position ids (``pack``)
        return {"input_ids": ids, "labels": labels} | ({"position_ids": positions[0]} if positions else {})


def collate(pad_id: int):
    """Pad a batch to its longest sequence. Packed sequences (``pack``) keep their position ids and get no
    attention mask: a 2-D mask would turn off transformers' per-row attention (see ``pack``); the padding gets
    positions of its own, 0, 1, ..., so it is a separate (unlabelled) row that no real token attends to.
    """
    def fn(batch):
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        if "position_ids" not in batch[0]:
            return {"input_ids": ids, "labels": labels, "attention_mask": mask}
        pos = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            pos[i, :k] = torch.tensor(b["position_ids"])
            pos[i, k:] = torch.arange(n - k)
        # use_cache=False: with a cache, transformers does not look for row boundaries in the position ids
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False}

    return fn


def packed_padding(input_ids: torch.Tensor, position_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Where ``collate`` padded a batch of packed sequences (bool, same shape): the last row of each sequence
    when it is all pad ids (its positions restart at 0 like a row's). The Trainer counts the other tokens."""
    seg = (position_ids == 0).cumsum(-1)
    last = seg == seg[:, -1:]
    return last & ((input_ids == pad_id) | ~last).all(-1, keepdim=True)


# ---- mixtures ------------------------------------------------------------------------------------
def mix(sources: list[list], weights: list[float] | None, seed: int) -> list:
    """One list drawing from each source in proportion to its weight (total = sum of sizes).

    Source i gets round(total * w_i / sum w) items: a random subset when that is fewer than it
    has, sampled with replacement (upsampling) when more.
    """
    weights = weights or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise LoramError(f"{len(weights)} mixture weights for {len(sources)} datasets: give one weight per --data")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise LoramError(f"mixture weights {weights} must be >= 0 with a positive sum: e.g. --data a.jsonl=0.7 --data b.jsonl=0.3")
    g = torch.Generator().manual_seed(seed)
    total, out = sum(len(s) for s in sources), []
    for s, w in zip(sources, weights):
        n = round(total * w / sum(weights))
        if n == 0:
            continue
        idx = torch.randint(len(s), (n,), generator=g).tolist() if n > len(s) else \
            torch.randperm(len(s), generator=g)[:n].tolist()
        out += [s[i] for i in idx]
    return out


def with_total(skipped: dict[str, int], truncated: int = 0) -> dict[str, int]:
    """A report's ``dropped``: rows skipped by reason, their "total", and "truncated" (rows kept, cut to
    --seq-len; not in the total) when there are any."""
    return dict(skipped) | {"total": sum(skipped.values())} | ({"truncated": truncated} if truncated else {})


def examples_needed(cfg: RunConfig) -> int | None:
    """Sequences a run of --steps draws (steps x micro-batch x accumulation x ranks); None with --epochs (all)."""
    if cfg.epochs is not None:
        return None
    return cfg.steps * cfg.micro_batch * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))


def build_dataset(tok, cfg: TrainConfig):
    """(ListDataset, rows skipped: reason -> count, "total", and "truncated" when rows were cut) of the
    training mixture.

    A streamed source (hub id, folder) is read until it gives the sequences the run needs: that many rows,
    or with --packing that many x --seq-len tokens (packed sequences hold at most --seq-len tokens each, so
    those tokens fill at least that many). Those are its first rows: slice it ("name:train[5000:]") to
    start elsewhere. Local files are read whole (the Trainer samples from all their rows)."""
    need = examples_needed(cfg)
    limits = {} if need is None else {"max_tokens": need * cfg.seq_len} if cfg.packing else {"max_examples": need}
    encoded = [encode_all(tok, iter_rows(src), cfg.seq_len, cfg.train_on_inputs, name=f"--data {src}", long_rows=cfg.long_rows,
                          **(limits if streamed(src) else {})) for src in cfg.data]
    parts = mix([e.examples for e in encoded], cfg.data_weights, cfg.seed)
    if cfg.packing:
        parts = pack(parts, cfg.seq_len)
    skipped: dict[str, int] = {}
    for e in encoded:
        for reason, n in e.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return ListDataset(parts), with_total(skipped, sum(e.truncated for e in encoded))


def eval_sets(tok, cfg: TrainConfig) -> tuple[dict, dict]:
    """(name -> examples of each --eval set, same formatting, masking and --long-rows as training; name -> rows
    skipped and truncated)."""
    enc = {name: encode_all(tok, iter_rows(src), cfg.seq_len, False, name=f"--eval {name}", long_rows=cfg.long_rows)
           for name, src in cfg.eval.items()}
    return {n: e.examples for n, e in enc.items()}, {n: with_total(e.skipped, e.truncated) for n, e in enc.items()}
