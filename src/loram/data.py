"""Training data: reading rows, formatting them with the chat template, masking prompt tokens.

Row formats (detected per row):

    alpaca    {"instruction", "input"?, "output" | "response"}   -> user: instruction\\n\\ninput, assistant: output
    chat      {"messages": [{"role", "content"}, ...]}             -> every assistant turn is a response
              {"conversations": [{"from", "value"}, ...]}          ShareGPT (human/gpt/system), same
    text      {"text"}                                              -> plain language modelling

Labels: -100 on prompt tokens (system/user turns, template scaffolding), the token ids on
response tokens (including the closing end-of-turn token, so the model learns to stop).
``train_on_inputs=True`` labels everything. Models without a chat template get the Alpaca
prompt format ("### Instruction: ... ### Response: ...") instead.

Skipped rows: a training or --eval row that is too long for --seq-len, has no response token,
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
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

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


def read_rows(source: str) -> list[dict]:
    """Rows from a local .json / .jsonl / .parquet file, or a hub dataset id ("name" or "name:split"),
    optionally sliced: "FILE[start:end]" keeps those rows (Python slice semantics)."""
    source, part = split_slice(source)
    if part is not None and not Path(source).exists() and not source.endswith((".json", ".jsonl", ".parquet")):
        # hub id: let `datasets` cut the split (only that part is converted to rows)
        name, _, split = source.partition(":")
        return _read_rows(f"{name}:{split or 'train'}[{part.start or ''}:{part.stop or ''}]")
    rows = _read_rows(source)
    if part is not None:
        rows = rows[part]
        if not rows:
            raise LoramError(f"dataset {source}[{part.start or ''}:{part.stop or ''}] selects no rows: check the slice")
    return rows


def read_utf8(path: str | Path, what: str = "dataset") -> str:
    """The text of a data file; bytes that are not UTF-8 are a user error (never silently replaced)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LoramError(f"{what} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}): "
                         "re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8") from None


def read_parquet(path: Path) -> list[dict]:
    """Rows of a parquet file, read with pyarrow (no datasets cache written for a local file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(str(path)).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise LoramError(f"dataset {path} is not a readable parquet file ({str(e).splitlines()[0]}): "
                         "re-create or re-download it") from None


def _read_rows(source: str) -> list[dict]:
    p = Path(source)
    if p.exists():
        if p.is_dir():
            raise LoramError(f"dataset {p} is a folder: pass a .json, .jsonl or .parquet file")
        try:
            if p.suffix == ".jsonl":
                rows = [json.loads(line) for line in read_utf8(p).splitlines() if line.strip()]
            elif p.suffix == ".json":
                rows = json.loads(read_utf8(p))
                if isinstance(rows, dict):  # {"data": [...]} or {"train": [...]}
                    lists = [v for v in rows.values() if isinstance(v, list)]
                    rows = lists[0] if len(lists) == 1 else [rows]
            elif p.suffix == ".parquet":
                rows = read_parquet(p)
            else:
                raise LoramError(f"dataset {p} has an unknown extension: use .json, .jsonl or .parquet")
        except json.JSONDecodeError as e:
            raise LoramError(f"dataset {p} is not valid JSON ({e}): fix the file") from None
    else:
        if source.startswith((".", "/")) or source.endswith((".json", ".jsonl", ".parquet")):
            raise LoramError(f"dataset file {source} does not exist: check the path")
        import datasets

        name, _, split = source.partition(":")
        name, _, config = name.partition("@")  # "owner/name@config:split"
        try:
            rows = list(datasets.load_dataset(name, config or None, split=split or "train"))
        except Exception as e:  # noqa: BLE001 - hub errors come in many types
            raise LoramError(f"cannot load dataset {source!r} ({str(e).splitlines()[0]}): pass a local file or a valid hub id") from None
    if not isinstance(rows, list) or not rows:
        raise LoramError(f"dataset {source} is empty: give it at least one row")
    return rows


class RowSkipped(LoramError):
    """A row that cannot be trained on. ``encode`` raises it (a single row is a clear error);
    ``encode_all`` counts it under ``reason`` and goes on (a file is refused when most rows are)."""

    def __init__(self, reason: str, what: str, fix: str = ""):
        super().__init__(f"{what}: {fix}" if fix else what)
        self.reason, self.what = reason, what


def row_kind(row) -> str:
    if not isinstance(row, dict):
        raise RowSkipped("malformed", f"dataset row {str(row)[:60]!r} is not an object", "rows must be JSON objects")
    if "conversations" in row and "messages" not in row:  # ShareGPT (OpenHermes): from/value
        row["messages"] = [{"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": m.get("value")}
                           for m in row["conversations"]] if isinstance(row["conversations"], list) else None
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
            raise RowSkipped("malformed", "dataset row has `messages` that is not a non-empty list of {role, content} "
                                          "strings", "fix the row")
        unknown = [m["role"] for m in msgs if m["role"] not in KNOWN_ROLES]
        if unknown:
            raise RowSkipped("unknown_role", f"dataset row has a message with role {unknown[0]!r}", SKIP_REASONS["unknown_role"][1])
        return "chat"
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


def encode(tok, row, train_on_inputs: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row."""
    kind = row_kind(row)
    if kind == "text":
        ids = _ids(tok, tok(row["text"], add_special_tokens=True)) + [tok.eos_token_id]
        return ids, list(ids)
    msgs = to_messages(row)
    if getattr(tok, "chat_template", None):
        ids = chat_template_ids(tok, msgs, gen_prompt=False)
        labels = [IGNORE] * len(ids)
        for j, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(chat_template_ids(tok, msgs[:j], gen_prompt=True))
            end = len(chat_template_ids(tok, msgs[: j + 1], gen_prompt=False))
            labels[start:end] = ids[start:end]
    else:  # no chat template: Alpaca prompt format, single turn
        if kind != "alpaca":
            raise LoramError("this tokenizer has no chat template, so `messages` rows cannot be formatted: "
                             "use instruction/output rows or a tokenizer with a chat template")
        tmpl = FALLBACK_PROMPT_INPUT if row.get("input") else FALLBACK_PROMPT
        prompt = _ids(tok, tok(tmpl.format(**{"input": "", **row}), add_special_tokens=True))
        resp = _ids(tok, tok(msgs[1]["content"], add_special_tokens=False)) + [tok.eos_token_id]
        ids, labels = prompt + resp, [IGNORE] * len(prompt) + resp
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

    @property
    def dropped(self) -> int:
        return sum(self.skipped.values())


def skip_counts(skipped: dict[str, int], seq_len: int) -> str:
    """ "3 longer than --seq-len 64, 1 with an unknown role", most frequent first."""
    order = sorted(skipped.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{n} {SKIP_REASONS[r][0].format(seq_len=seq_len)}" for r, n in order if n)


def skip_summary(skipped: dict[str, int]) -> str:
    """ "4 rows skipped (3 too_long, 1 unknown_role)" of a report's ``dropped`` dict (with or without "total")."""
    counts = {r: n for r, n in skipped.items() if r != "total" and n}
    detail = ", ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    n = sum(counts.values())
    return f"{n} row{'' if n == 1 else 's'} skipped ({detail})" if counts else "no rows skipped"


def encode_all(tok, rows: list[dict], seq_len: int, train_on_inputs: bool = False, name: str = "dataset") -> Encoded:
    """Every trainable row as (ids, labels); the others are counted by reason in ``skipped``.

    A file where more than half the rows are skipped is refused: that is a wrong format, role
    names or --seq-len, not a few bad rows, and training on the remainder would mislead.
    """
    out, skipped, example = [], Counter(), {}
    for row in rows:
        try:
            ids, labels = encode(tok, row, train_on_inputs)
            if len(ids) > seq_len:
                raise RowSkipped("too_long", "")  # counted only: the summary says how many and why
            if all(x == IGNORE for x in labels):
                raise RowSkipped("no_response", "")
        except RowSkipped as e:
            skipped[e.reason] += 1
            example.setdefault(e.reason, e.what)
            continue
        out.append((ids, labels))
    if 2 * sum(skipped.values()) > len(rows):
        main = skipped.most_common(1)[0][0]
        first = f"; first: {example[main]}" if example[main] else ""
        raise LoramError(f"{name}: {sum(skipped.values())} of its {len(rows)} rows would be skipped "
                         f"({skip_counts(skipped, seq_len)}{first}): {SKIP_REASONS[main][1]}")
    return Encoded(out, dict(skipped))


def read_texts(source: str) -> list[str]:
    """Documents of a raw corpus: a .txt file (one per non-empty line) or rows with a "text" field."""
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
    rows = read_rows(source)
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or not isinstance(r.get("text"), str)]
    if bad:
        raise LoramError(f"corpus {source}: row {bad[0]} has no \"text\" string ({len(bad)} such rows): "
                         "give {\"text\": ...} rows or a .txt file")
    return [r["text"] for r in rows if r["text"].strip()]


def chunk_tokens(tok, docs: list[str], seq_len: int, name: str = "corpus") -> list[tuple[list[int], list[int]]]:
    """Blocks of exactly seq_len tokens from the concatenated documents (EOS between them)."""
    stream: list[int] = []
    for d in docs:
        stream += _ids(tok, tok(d, add_special_tokens=False)) + [tok.eos_token_id]
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


def with_total(skipped: dict[str, int]) -> dict[str, int]:
    return dict(skipped) | {"total": sum(skipped.values())}


def build_dataset(tok, cfg: TrainConfig):
    """(ListDataset, rows skipped: reason -> count and "total") of the training mixture."""
    encoded = [encode_all(tok, read_rows(src), cfg.seq_len, cfg.train_on_inputs, name=f"--data {src}") for src in cfg.data]
    parts = mix([e.examples for e in encoded], cfg.data_weights, cfg.seed)
    if cfg.packing:
        parts = pack(parts, cfg.seq_len)
    skipped: dict[str, int] = {}
    for e in encoded:
        for reason, n in e.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return ListDataset(parts), with_total(skipped)


def eval_sets(tok, cfg: RunConfig) -> tuple[dict, dict]:
    """(name -> examples of each --eval set, same formatting and masking as training; name -> rows skipped)."""
    enc = {name: encode_all(tok, read_rows(src), cfg.seq_len, False, name=f"--eval {name}") for name, src in cfg.eval.items()}
    return {n: e.examples for n, e in enc.items()}, {n: with_total(e.skipped) for n, e in enc.items()}
