"""Training data: every row format, exact label masks, mixtures, corpora, and the user errors."""

import json

import pytest

from loram.data import IGNORE, build_dataset, chunk_tokens, encode, encode_all, mix, pack, read_rows, read_texts, skip_summary
from loram.errors import LoramError
from loram.testing import tiny_tokenizer
from loram.train import TrainConfig

EOS = 2


def b(text: str) -> list[int]:
    """Ids of the byte-level tiny tokenizer: one id per character."""
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_alpaca_labels_are_exactly_the_response(tok):
    ids, labels = encode(tok, {"instruction": "add 1 2", "input": "", "output": "3"})
    prompt = b("<user>add 1 2") + [EOS] + b("<assistant>")
    assert ids == prompt + b("3") + [EOS]
    assert labels == [IGNORE] * len(prompt) + b("3") + [EOS]


def test_alpaca_input_and_response_field(tok):
    ids, labels = encode(tok, {"instruction": "sum", "input": "4 5", "response": "9"})
    prompt = b("<user>sum\n\n4 5") + [EOS] + b("<assistant>")
    assert ids == prompt + b("9") + [EOS]
    assert labels == [IGNORE] * len(prompt) + b("9") + [EOS]


def test_chat_labels_every_assistant_turn(tok):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "ok"}]
    ids, labels = encode(tok, {"messages": msgs})
    p1 = b("<system>s") + [EOS] + b("<user>hi") + [EOS] + b("<assistant>")
    p2 = b("<user>ok?") + [EOS] + b("<assistant>")
    assert ids == p1 + b("yo") + [EOS] + p2 + b("ok") + [EOS]
    assert labels == [IGNORE] * len(p1) + b("yo") + [EOS] + [IGNORE] * len(p2) + b("ok") + [EOS]


def test_sharegpt_conversations_read_as_chat(tok):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    ids, labels = encode(tok, row)
    prompt = b("<user>hi") + [EOS] + b("<assistant>")
    assert labels == [IGNORE] * len(prompt) + b("yo") + [EOS]


def test_text_rows_label_everything(tok):
    ids, labels = encode(tok, {"text": "abc"})
    assert ids == b("abc") + [EOS] and labels == ids


def test_train_on_inputs_labels_prompt_too(tok):
    ids, labels = encode(tok, {"instruction": "x", "output": "y"}, train_on_inputs=True)
    assert labels == ids


def test_fallback_prompt_without_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = None
    ids, labels = encode(tok, {"instruction": "add 1 2", "output": "3"})
    prompt = b("### Instruction:\nadd 1 2\n\n### Response:\n")
    assert ids == prompt + b("3") + [EOS]
    assert labels == [IGNORE] * len(prompt) + b("3") + [EOS]
    with pytest.raises(LoramError, match="no chat template"):
        encode(tok, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "json-wrapped"])
def test_read_rows_every_file_format(tmp_path, fmt):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    p = tmp_path / f"d.{fmt.split('-')[0]}"
    if fmt == "json":
        p.write_text(json.dumps(rows))
    elif fmt == "json-wrapped":
        p.write_text(json.dumps({"data": rows}))
    elif fmt == "jsonl":
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(p))
    assert read_rows(str(p)) == rows
    assert read_rows(f"{p}[1:3]") == rows[1:3] and read_rows(f"{p}[-1:]") == rows[-1:]


def test_empty_and_missing_and_malformed_datasets(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(LoramError, match="empty"):
        read_rows(str(tmp_path / "empty.jsonl"))
    with pytest.raises(LoramError, match="does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(LoramError, match="not valid JSON"):
        read_rows(str(tmp_path / "bad.json"))
    with pytest.raises(LoramError, match="selects no rows"):
        (tmp_path / "one.jsonl").write_text('{"text": "a"}\n')
        read_rows(f"{tmp_path / 'one.jsonl'}[5:]")


@pytest.mark.parametrize("row, match", [
    ({"question": "q", "answer": "a"}, "none of the known formats"),
    ({"instruction": "q"}, "none of the known formats"),
    ({"instruction": "q", "output": None}, "non-text"),
    ({"messages": "hi"}, "not a non-empty list"),
    ({"text": 3}, "non-string"),
    ("just a string", "not an object"),
])
def test_rows_missing_fields_fail_clearly(tok, row, match):
    with pytest.raises(LoramError, match=match):
        encode(tok, row)


LONG = [{"instruction": "q", "output": "a"}] * 3 + [{"instruction": "q", "output": "a" * 50}, {"text": "x" * 80},
                                                    {"instruction": "q" * 50, "output": "a"}]


def test_long_rows_truncated_by_default(tok):
    enc = encode_all(tok, LONG, seq_len=40)  # truncate (TRL's default): the first 40 tokens, labels cut with them
    assert enc.truncated == 2 and len(enc.examples) == 5
    full = encode(tok, LONG[3])
    assert enc.examples[3] == (full[0][:40], full[1][:40]) and enc.examples[4] == (b("x" * 40), b("x" * 40))
    assert enc.skipped == {"too_long": 1}  # the last row's prompt fills --seq-len: nothing to learn is left, skipped


def test_long_rows_dropped_and_counted(tok):
    enc = encode_all(tok, LONG, seq_len=40, long_rows="drop")
    assert enc.skipped == {"too_long": 3} and enc.dropped == 3 and enc.truncated == 0 and len(enc.examples) == 3
    assert enc.examples == [encode(tok, r) for r in LONG[:3]]
    with pytest.raises(LoramError, match=r"3 of its 3 rows would be skipped \(3 longer than --seq-len 10\): raise --seq-len"):
        encode_all(tok, LONG[3:], seq_len=10, long_rows="drop")
    with pytest.raises(LoramError, match=r"2 of its 3 rows would be skipped \(2 longer than --seq-len 3\)"):
        encode_all(tok, LONG[3:], seq_len=3)  # truncate: the two instruction rows keep no response token in 3


def test_truncated_rows_reported_apart_from_skipped(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    rows = [{"instruction": "q", "output": "a"}] * 4 + [{"text": "x" * 80}] * 2 + [{"instruction": "q" * 50, "output": "a"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, dropped = build_dataset(tok, TrainConfig(data=[str(f)], seq_len=40))
    assert dropped == {"too_long": 1, "total": 1, "truncated": 2}
    assert skip_summary(dropped) == "1 row skipped (1 too_long); 2 rows truncated to --seq-len"
    _, dropped = build_dataset(tok, TrainConfig(data=[str(f)], seq_len=40, long_rows="drop"))
    assert dropped == {"too_long": 3, "total": 3} and skip_summary(dropped) == "3 rows skipped (3 too_long)"


def chat(*roles):
    return {"messages": [{"role": r, "content": "hi"} for r in roles]}


def test_skipped_rows_counted_by_reason(tok):
    good = [{"instruction": "q", "output": "a"}] * 6
    bad = [chat("user", "bot"), chat("user", "assistant", "narrator"), {"question": "q", "answer": "a"},
           {"instruction": "q", "output": ""}, {"text": "x" * 80}]
    enc = encode_all(tok, good + bad, seq_len=40, long_rows="drop")
    # "" output still has the closing EOS to learn (kept); only a row with no assistant turn has no response
    assert len(enc.examples) == 7
    assert enc.skipped == {"unknown_role": 2, "missing_fields": 1, "too_long": 1}
    enc = encode_all(tok, good + [chat("system", "user")], seq_len=40)
    assert enc.skipped == {"no_response": 1}


def test_unknown_role_row_fails_alone_and_sharegpt_roles_map(tok):
    with pytest.raises(LoramError, match="role 'bot': use the roles system, user, assistant, tool"):
        encode(tok, chat("user", "bot"))
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "chatgpt", "value": "yo"}]}
    with pytest.raises(LoramError, match="role 'chatgpt'"):
        encode(tok, sharegpt)


def test_mostly_skipped_file_refused_with_main_reason(tok):
    rows = [chat("user", "bot")] * 3 + [{"text": "x" * 80}] + [{"instruction": "q", "output": "a"}] * 3
    with pytest.raises(LoramError, match=r"^d.jsonl: 4 of its 7 rows would be skipped \(3 with an unknown role, 1 longer than "
                                         r"--seq-len 40; first: dataset row has a message with role 'bot'\): use the roles"):
        encode_all(tok, rows, seq_len=40, name="d.jsonl", long_rows="drop")
    assert encode_all(tok, rows[2:], seq_len=40, long_rows="drop").skipped == {"unknown_role": 1, "too_long": 1}  # 2 of 5: counted


def test_unsafe_chat_template_is_one_clear_error():
    tok = tiny_tokenizer()
    tok.chat_template = "{{ ''.__class__.__mro__ }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(LoramError, match=r"chat template is unsafe, the sandbox refused it .*: pass a model whose chat template is safe"):
        encode_all(tok, [{"instruction": "q", "output": "a"}] * 3, seq_len=40)


def test_rows_the_template_rejects_are_counted():
    tok = tiny_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
                         + tiny_tokenizer().chat_template)
    rows = [{"instruction": "q", "output": "a"}] * 2 + [chat("system", "user", "assistant")]
    assert encode_all(tok, rows, seq_len=40).skipped == {"template_error": 1}
    with pytest.raises(LoramError, match=r"1 of its 1 rows .*first: the chat template rejected a row \(no system turns\)"):
        encode_all(tok, rows[2:], seq_len=40)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_non_utf8_files_refused(tmp_path, suffix):
    p = tmp_path / f"d{suffix}"
    text = json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "caf\u00e9"}, ensure_ascii=False) + "\n"
    p.write_bytes(("[" + text.replace("\n", ",", 1).strip() + "]" if suffix == ".json" else text).encode("latin-1"))
    read = read_texts if suffix == ".txt" else read_rows
    with pytest.raises(LoramError, match=r"is not UTF-8 text \(byte 0xe9 on line \d\): re-save it as UTF-8"):
        read(str(p))


def test_corrupt_parquet_refused(tmp_path):
    import datasets

    p = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"text": f"row {i}"} for i in range(50)]).to_parquet(str(p))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LoramError, match="is not a readable parquet file .*: re-create or re-download it"):
        read_rows(str(p))


def test_mixture_weights_set_the_share_of_each_source():
    a, b_ = [("a", i) for i in range(100)], [("b", i) for i in range(100)]
    out = mix([a, b_], [3.0, 1.0], seed=0)
    assert sum(x[0] == "a" for x in out) == 150 and sum(x[0] == "b" for x in out) == 50
    assert mix([a, b_], [3.0, 1.0], seed=0) == out  # seeded: same mixture every run
    with pytest.raises(LoramError, match="one weight per"):
        mix([a, b_], [1.0], seed=0)
    with pytest.raises(LoramError, match="positive sum"):
        mix([a, b_], [0.0, 0.0], seed=0)


def test_build_dataset_mixes_files(tmp_path, tok):
    pa, pb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    pa.write_text("\n".join(json.dumps({"text": "aaaa"}) for _ in range(30)))
    pb.write_text("\n".join(json.dumps({"text": "bb"}) for _ in range(10)))
    ds, dropped = build_dataset(tok, TrainConfig(data=[str(pa), str(pb)], data_weights=[0.25, 0.75], seq_len=32))
    kinds = [ds[i]["input_ids"][0] for i in range(len(ds))]
    assert dropped == {"total": 0} and len(ds) == 40 and kinds.count(ord("a")) == 10 and kinds.count(ord("b")) == 30


def test_packing_fills_sequences(tok):
    ex = [(b("abc"), b("abc"))] * 5
    packed = pack(ex, 7)
    assert [len(i) for i, *_ in packed] == [6, 6, 3]


def test_corpus_txt_and_jsonl_chunked_into_blocks(tmp_path, tok):
    (tmp_path / "c.txt").write_text("abc\n\ndefg\n")
    assert read_texts(str(tmp_path / "c.txt")) == ["abc", "defg"]
    blocks = chunk_tokens(tok, ["abc", "defg"], 4)
    assert blocks == [(b("abc") + [EOS], b("abc") + [EOS]), (b("defg"), b("defg"))]  # tail [EOS] dropped
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    assert read_texts(str(tmp_path / "c.jsonl")) == ["hello"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(LoramError, match='no "text"'):
        read_texts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(LoramError, match="fewer than one block"):
        chunk_tokens(tok, ["ab"], 64)
