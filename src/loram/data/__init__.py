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

Modules: sources (files, folders, hub ids, slices), rows (one row -> ids and labels), corpus (align's
token blocks), batches (packing, collator, mixtures, a run's datasets). Everything public is
re-exported here: ``from loram.data import encode``.
"""

from __future__ import annotations

from .sources import (
    SLICE, split_slice, source_digest, FILE_SUFFIXES, read_rows, streamed, iter_rows, folder_split, missing_local_file,
    stream_rows, present, read_utf8, read_table, read_csv,
)
from .rows import (
    IGNORE, SHAREGPT_ROLES, KNOWN_ROLES, FALLBACK_PROMPT, FALLBACK_PROMPT_INPUT, RowSkipped, check_messages,
    row_kind, row_text, to_messages, chat_template_ids, read_chat_template, prompt_response_ids, encode, SKIP_REASONS,
    Encoded, skip_counts, skip_summary, encode_all,
)
from .corpus import (
    read_texts, is_text_row, no_text, chunk_tokens,
)
from .batches import (
    pack, ListDataset, collate, packed_padding, mix, with_total, examples_needed, build_dataset, eval_sets,
)

__all__ = [
    'SLICE', 'split_slice', 'source_digest', 'FILE_SUFFIXES', 'read_rows', 'streamed', 'iter_rows',
    'folder_split', 'missing_local_file', 'stream_rows', 'present', 'read_utf8', 'read_table', 'read_csv', 'IGNORE',
    'SHAREGPT_ROLES', 'KNOWN_ROLES', 'FALLBACK_PROMPT', 'FALLBACK_PROMPT_INPUT', 'RowSkipped',
    'check_messages', 'row_kind', 'row_text', 'to_messages', 'chat_template_ids', 'read_chat_template',
    'prompt_response_ids', 'encode', 'SKIP_REASONS', 'Encoded', 'skip_counts', 'skip_summary', 'encode_all',
    'read_texts', 'is_text_row', 'no_text', 'chunk_tokens', 'pack', 'ListDataset', 'collate',
    'packed_padding', 'mix', 'with_total', 'examples_needed', 'build_dataset', 'eval_sets',
]
