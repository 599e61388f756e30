"""Data formats a TRL / axolotl user brings: prompt-completion rows, CSV / TSV / Arrow files, streamed dataset
folders and hub ids, --long-rows, --chat-template FILE (issue 17 item 3)."""

import json

import pytest

from loram.data import IGNORE, build_dataset, chunk_tokens, encode, encode_all, read_chat_template, read_rows, read_texts
from loram.errors import LoramError
from loram.settings import check_recipe_section, record
from loram.testing import tiny_tokenizer
from loram.train import TrainConfig
from test_data import EOS, b, tok  # noqa: F401  (tok: the tiny tokenizer fixture; b: its ids of a text)


def user(c):
    return {"role": "user", "content": c}


def assistant(c):
    return {"role": "assistant", "content": c}


# ---- prompt-completion rows (TRL) ------------------------------------------------------------------
def test_prompt_completion_labels_mask_exactly_the_prompt(tok):
    ids, labels = encode(tok, {"prompt": "2+2=", "completion": "4"})
    assert ids == b("2+2=") + b("4") + [EOS]  # plain text: the chat template is not used
    assert labels == [IGNORE] * len("2+2=") + b("4") + [EOS]
    assert encode(tok, {"prompt": "2+2=", "completion": "4"}, train_on_inputs=True) == (ids, ids)
    base = tiny_tokenizer()
    base.chat_template = None  # a base model: the same text, no template needed
    assert encode(base, {"prompt": "2+2=", "completion": "4"}) == (ids, labels)


def test_conversational_prompt_completion_uses_the_chat_template(tok):
    # a few-shot prompt: its assistant turn is prompt, not trained on (a `messages` row would label it)
    row = {"prompt": [user("a"), assistant("b"), user("c")], "completion": [assistant("d")]}
    ids, labels = encode(tok, row)
    prompt = b("<user>a") + [EOS] + b("<assistant>b") + [EOS] + b("<user>c") + [EOS] + b("<assistant>")
    assert ids == prompt + b("d") + [EOS]
    assert labels == [IGNORE] * len(prompt) + b("d") + [EOS]
    as_messages = encode(tok, {"messages": row["prompt"] + row["completion"]})
    assert as_messages[0] == ids and as_messages[1] != labels  # same text, but there "b" is labelled too
    assert encode(tok, row, train_on_inputs=True) == (ids, ids)


def test_conversational_prompt_completion_without_a_template_is_refused():
    base = tiny_tokenizer()
    base.chat_template = None
    with pytest.raises(LoramError, match="no chat template.*or --chat-template FILE"):
        encode(base, {"prompt": [user("a")], "completion": [assistant("b")]})


@pytest.mark.parametrize("row, match", [
    ({"prompt": "a", "completion": [assistant("b")]}, "not both text or both message lists"),
    ({"prompt": [], "completion": [assistant("b")]}, "`prompt` that is not a non-empty list"),
    ({"prompt": [user("a")], "completion": [{"role": "bot", "content": "b"}]}, "role 'bot'"),
    ({"prompt": "a", "completion": None}, "not both text"),
])
def test_bad_prompt_completion_rows_fail_clearly(tok, row, match):
    with pytest.raises(LoramError, match=match):
        encode(tok, row)


# ---- CSV, TSV, Arrow ----------------------------------------------------------------------------------
ROWS = [{"instruction": "add 40 2", "input": "", "output": "42"},  # numbers stay text (no type inference)
        {"instruction": 'say "hi", twice', "input": "line one\nline two", "output": "hi, hi"}]


def write_csv(path, rows, delimiter):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "arrow-file", "arrow-stream", "arrow-datasets"])
def test_csv_tsv_arrow_files_read_like_jsonl(tmp_path, tok, fmt):
    import pyarrow as pa

    p = tmp_path / f"d.{fmt.split('-')[0]}"
    if fmt in ("csv", "tsv"):
        write_csv(p, ROWS, "," if fmt == "csv" else "\t")
    elif fmt == "arrow-datasets":  # what `datasets` caches and save_to_disk writes (the IPC stream format)
        import datasets

        datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
        p = next((tmp_path / "saved").glob("*.arrow"))
    else:
        table = pa.Table.from_pylist(ROWS)
        with pa.OSFile(str(p), "wb") as sink:
            new = pa.ipc.new_file if fmt == "arrow-file" else pa.ipc.new_stream
            with new(sink, table.schema) as w:
                w.write_table(table)
    assert read_rows(str(p)) == ROWS
    assert read_rows(f"{p}[1:]") == ROWS[1:]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert build_dataset(tok, TrainConfig(data=[str(p)], seq_len=64))[0].examples == \
        build_dataset(tok, TrainConfig(data=[str(jl)], seq_len=64))[0].examples


def test_csv_text_corpus_for_align(tmp_path):
    write_csv(tmp_path / "c.csv", [{"text": "first doc"}, {"text": "second, with a comma"}], ",")
    assert read_texts(str(tmp_path / "c.csv")) == ["first doc", "second, with a comma"]


def test_csv_saved_by_a_spreadsheet(tmp_path):
    """Excel's "CSV UTF-8": a byte-order mark, CRLF line ends, a cell with a line break in quotes."""
    p = tmp_path / "d.csv"
    p.write_bytes("\ufeffinstruction,output\r\nsay hi,\"hi\r\nthere\"\r\n".encode())
    assert read_rows(str(p)) == [{"instruction": "say hi", "output": "hi\r\nthere"}]


def test_csv_with_a_ragged_row_is_refused(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("instruction,output\nadd 1 1,2\nsay a, b,c\n")
    with pytest.raises(LoramError, match=r"d.csv line 3 has 3 fields, its header has 2: quote the cells that contain commas"):
        read_rows(str(p))


def test_corrupt_arrow_refused(tmp_path):
    p = tmp_path / "d.arrow"
    p.write_bytes(b"ARROW1\x00\x00" + bytes(range(256)))
    with pytest.raises(LoramError, match="is not a readable arrow file .*: re-create or re-download it"):
        read_rows(str(p))


# ---- streamed dataset folders and hub ids ---------------------------------------------------------------
def shards(folder, n_rows=10, bad_second=False):
    """A dataset folder of two jsonl shards (n_rows each) that `datasets.load_dataset(folder)` reads offline."""
    folder.mkdir()
    for s in range(2):
        lines = [json.dumps({"instruction": f"q{s}-{i}", "output": f"a{s}-{i}"}) for i in range(n_rows)]
        if bad_second and s == 1:
            lines[0] = "{not json"
        (folder / f"part{s}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def counted(monkeypatch):
    """datasets.load_dataset wrapped: records its keyword arguments and counts the rows the caller pulls."""
    import datasets

    real, seen = datasets.load_dataset, {"rows": 0, "kwargs": []}

    def load(*a, **kw):
        seen["kwargs"].append(kw)
        ds = real(*a, **kw)

        class Counting:
            def __iter__(self):
                for row in ds:
                    seen["rows"] += 1
                    yield row

        return Counting()

    monkeypatch.setattr(datasets, "load_dataset", load)
    return seen


def test_folder_streamed_lazily_with_the_rows_of_the_non_streamed_path(tmp_path, counted):
    import datasets

    folder = shards(tmp_path / "ds")
    rows = read_rows(str(folder), limit=4)
    assert counted["kwargs"][0]["streaming"] is True and counted["rows"] == 4  # 4 of 20 rows pulled
    full = list(datasets.Dataset.from_json([str(p) for p in sorted(folder.glob("*.jsonl"))], cache_dir=str(tmp_path / "cache")))
    assert rows == full[:4]
    assert read_rows(str(folder)) == full  # the whole stream: every row, in order
    assert read_rows(f"{folder}[12:15]") == full[12:15] and read_rows(f"{folder}[-2:]") == full[-2:]


def test_stream_never_reaches_rows_it_does_not_need(tmp_path):
    folder = shards(tmp_path / "ds", bad_second=True)  # the second shard is corrupt: reading it would fail
    assert [r["instruction"] for r in read_rows(str(folder), limit=10)] == [f"q0-{i}" for i in range(10)]
    with pytest.raises(LoramError, match=r"cannot read dataset .*ds' \(.*\): fix or re-download its files"):
        read_rows(str(folder))


def test_training_reads_only_the_rows_its_steps_need(tmp_path, tok, counted):
    folder = shards(tmp_path / "ds", n_rows=50)
    ds, dropped = build_dataset(tok, TrainConfig(data=[str(folder)], seq_len=64, steps=3, micro_batch=2, grad_accum=2))
    assert counted["rows"] == 12 and len(ds) == 12 and dropped == {"total": 0}  # steps x micro-batch x accumulation
    counted["rows"] = 0
    ds, _ = build_dataset(tok, TrainConfig(data=[str(folder)], seq_len=64, steps=3, micro_batch=1, packing=True))
    assert counted["rows"] < 100 and sum(len(x[0]) for x in ds.examples) >= 3 * 64  # enough tokens for 3 packed sequences
    assert len(ds) >= 3
    counted["rows"] = 0
    build_dataset(tok, TrainConfig(data=[str(folder)], seq_len=64, epochs=1))
    assert counted["rows"] == 100  # --epochs: every row


def test_skipped_rows_do_not_count_toward_the_rows_needed(tmp_path, tok, counted):
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"instruction": "q", "output": "a"}, {"question": "no known format"}] * 10
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds, dropped = build_dataset(tok, TrainConfig(data=[str(folder)], seq_len=64, steps=2, micro_batch=2))
    assert len(ds) == 4 and counted["rows"] == 7 and dropped == {"missing_fields": 3, "total": 3}


def test_folder_split_by_name(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"text": f"a {split} row"}) + "\n")
    assert read_rows(str(folder)) == [{"text": "a train row"}]
    assert read_rows(f"{folder}:validation") == [{"text": "a validation row"}]
    assert read_rows(f"{folder}:validation[0:1]") == [{"text": "a validation row"}]


def test_save_to_disk_folder_and_hub_style_id(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert read_rows(str(tmp_path / "saved")) == ROWS
    with pytest.raises(LoramError, match=r"cannot load dataset 'no-such-dataset-here' \(.*\): pass a local file or a valid hub id"):
        read_rows("no-such-dataset-here")


def test_streamed_corpus_tokenized_only_as_far_as_the_blocks_needed(tmp_path, tok):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "c.jsonl").write_text("".join(json.dumps({"text": "abcdefg"}) + "\n" for _ in range(100)))
    taken = []

    def docs():
        for d in read_texts(str(folder)):
            taken.append(d)
            yield d

    blocks = chunk_tokens(tok, docs(), 8, max_blocks=3)
    assert len(blocks) == 3 and len(taken) == 3  # 3 documents of 8 tokens (with EOS) fill 3 blocks of 8
    assert blocks[0][0] == b("abcdefg") + [EOS]


# ---- --chat-template FILE ------------------------------------------------------------------------------
def test_chat_template_file_sets_the_rendered_ids(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}|{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
    base = tiny_tokenizer()
    base.chat_template = None  # a base model without a template
    base.chat_template = read_chat_template(f)
    ids, labels = encode(base, {"messages": [user("hi"), assistant("yo")]})
    prompt = b("[user]hi|[assistant]")
    assert ids == prompt + b("yo|") and labels == [IGNORE] * len(prompt) + b("yo|")
    ids, labels = encode(base, {"prompt": [user("hi")], "completion": [assistant("yo")]})
    assert ids == prompt + b("yo|") and labels == [IGNORE] * len(prompt) + b("yo|")


@pytest.mark.parametrize("text, match", [
    (None, r"--chat-template .*t.jinja does not exist: give a Jinja chat template file"),
    ("{% for m in messages %}{{ m.content }}", r"is not valid Jinja \(line 1: .*\): fix the template"),
    ("{{ m.content | no_such_filter }}", r"is not valid Jinja \(line 1: .*no_such_filter.*\): fix the template"),
    ("  \n", r"is empty: write a Jinja template"),
])
def test_bad_chat_template_file(tmp_path, text, match):
    f = tmp_path / "t.jinja"
    if text is not None:
        f.write_text(text)
    with pytest.raises(LoramError, match=match):
        read_chat_template(f)


# ---- the knobs: flags and recipe keys of the same names ------------------------------------------------
def test_knobs_from_flags_and_recipes():
    cfg = record("train", {"data": ["d.jsonl"], "long_rows": "drop", "chat_template": "t.jinja"})
    assert cfg.long_rows == "drop" and cfg.chat_template == "t.jinja"
    assert TrainConfig(data=["d"]).long_rows == "truncate"
    with pytest.raises(LoramError, match=r"train.long_rows = 'cut' is not one of truncate, drop: pick one"):
        check_recipe_section("train", {"long_rows": "cut"})
    with pytest.raises(LoramError, match=r"--long-rows 'cut' is unknown: use truncate or drop"):
        encode_all(tiny_tokenizer(), [{"text": "a"}], 8, long_rows="cut")


def test_recipe_knobs_checked_before_any_stage(tmp_path):
    from loram.recipe import load_recipe, run_recipe, stage_configs

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"base: x\nworkdir: w\ntrain: {{data: [owner/set], long_rows: drop, chat_template: {template}}}\n")
    cfg = stage_configs(load_recipe(ok))["train"]
    assert cfg.long_rows == "drop" and cfg.chat_template == str(template)
    for body, match in [("long_rows: cut", "train.long_rows = 'cut' is not one of truncate, drop: pick one"),
                        (f"chat_template: {tmp_path / 'missing.jinja'}", "missing.jinja does not exist")]:
        bad = tmp_path / "bad.yaml"  # a prune stage first: the error must come before it runs
        bad.write_text(f"base: x\nworkdir: {tmp_path / 'w'}\nprune: {{}}\ntrain: {{data: [owner/set], {body}}}\n")
        with pytest.raises(LoramError, match=match):
            run_recipe(bad, dry_run=True, echo=lambda *a: None)
        assert not (tmp_path / "w").exists()


def test_train_cli_csv_prompt_completion_chat_template_and_truncation(tiny_dir, tmp_path, capsys, monkeypatch):
    """One `loram train` run: a CSV of prompt-completion rows and a --chat-template file; a row longer than --seq-len
    is truncated (the default) and counted in the log line and train_report.json."""
    import loram.train
    from loram.cli import main

    real, used = loram.train.build_dataset, []

    def build(tok, cfg):  # the template the rows are formatted with
        used.append(tok.chat_template)
        return real(tok, cfg)

    monkeypatch.setattr(loram.train, "build_dataset", build)

    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(8)] + [{"prompt": "long ", "completion": "z" * 100}]
    data = tmp_path / "d.csv"
    write_csv(data, rows, ",")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}|{% endfor %}")
    assert main(["train", str(tiny_dir), "--data", str(data), "-o", str(tmp_path / "A"), "--steps", "1", "--seq-len", "32",
                 "--chat-template", str(template)]) == 0
    rep = json.loads((tmp_path / "A" / "train_report.json").read_text())
    assert rep["dropped"] == {"total": 0, "truncated": 1}
    out = capsys.readouterr().out
    assert "--data: no rows skipped; 1 row truncated to --seq-len" in out
    assert used == [template.read_text()]
    meta = json.loads((tmp_path / "A" / "loram_adapter.json").read_text())
    assert meta["train"]["long_rows"] == "truncate" and meta["train"]["chat_template"] == str(template)
