"""One row -> (ids, labels): row kinds, chat templates, prompt masking, long rows, skip counts
(see the package docstring for the formats)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..configs import LONG_ROWS
from ..errors import LoramError
from .sources import _first_line, read_utf8

IGNORE = -100
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# roles a chat row may use: any other is a typo or a foreign schema ("bot", "model"), which a template
# would render as a prompt turn, leaving the row with nothing to learn
KNOWN_ROLES = ("system", "user", "assistant", "tool")
FALLBACK_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
FALLBACK_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"



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


def row_text(tok, row) -> str | None:
    """A row as one text: its ``text``, or a training row (instruction/output, messages, prompt/completion) rendered
    as `loram train` renders it (chat template, special tokens kept), so what reads text (prune --calib-data's
    scores, train --anchor's KL) sees the activations training sees. None for a row in no known format."""
    try:
        if row_kind(row) == "text":
            return row["text"]
        return tok.decode(encode(tok, row)[0])
    except RowSkipped:
        return None


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
    "missing_fields": ("in none of the known formats", "give instruction+output (or response), messages, prompt+completion, or text"),
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
