"""`loram prune --calib-data`: plain text, {text} rows, or the training rows themselves (rendered as
`loram train` renders them, so Taylor / Wanda scores read the activations the adapter will train on)."""

import json

import pytest

from loram.cli import main
from loram.data.rows import encode
from loram.io import load_tokenizer
from loram.prune.structured import calibration_batches

ROWS = [{"instruction": "add 2 3", "output": "5"},
        {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"}]},
        {"prompt": "The sky is", "completion": " blue."},
        {"text": "plain corpus text stays as it is"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stream(batches):
    return [t for b in batches for t in b[0].tolist()]


def test_training_rows_are_read_as_training_renders_them(tiny_dir, tmp_path):
    """Each training row contributes the token ids `loram train` builds for it (prompt, template and
    response), a {text} row its text, in file order."""
    tok = load_tokenizer(str(tiny_dir))
    got = _stream(calibration_batches(tok, str(_jsonl(tmp_path / "rows.jsonl", ROWS)), 1, 4096)[0])
    pos = 0
    for r in ROWS:
        ids = list(encode(tok, r)[0])[1:-1]  # the first / last token may merge with the "\n\n" between rows
        pos = next(i for i in range(pos, len(got)) if got[i:i + len(ids)] == ids) + len(ids)


def test_training_rows_equal_their_rendered_text(tiny_dir, tmp_path):
    """Passing the training file or the same rows pre-rendered to {text} gives the same calibration
    windows and so the same pruning plan: the rendering is the only difference."""
    tok = load_tokenizer(str(tiny_dir))
    rows = ROWS[:3] * 4
    train = _jsonl(tmp_path / "train.jsonl", rows)
    text = _jsonl(tmp_path / "text.jsonl", [{"text": tok.decode(encode(tok, r)[0])} for r in rows])
    a, b = (calibration_batches(tok, str(f), 3, 16)[0] for f in (train, text))
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    for f, name in ((train, "P1"), (text, "P2")):
        assert main(["prune", str(tiny_dir), "-o", str(tmp_path / name), "--method", "taylor", "--ratio", "0.4",
                     "--calib-data", str(f), "--calib-samples", "3", "--calib-seq-len", "16", "--quiet"]) == 0
    p1, p2 = (json.loads((tmp_path / n / "loram_plan.json").read_text()) for n in ("P1", "P2"))
    assert p1["pruned"] == p2["pruned"]
    assert p1["calibration"]["sha256"] == p2["calibration"]["sha256"]


def test_calib_rows_in_no_known_format(tiny_dir, tmp_path, capsys):
    f = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}, [1, 2]])
    assert main(["prune", str(tiny_dir), "-o", str(tmp_path / "P"), "--method", "taylor", "--calib-data", str(f), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: calibration file {f} has no usable rows: use plain text, {{\"text\": ...}} rows, or training rows "
                   "(instruction/output, messages, prompt/completion)")
    assert not (tmp_path / "P").exists()


def test_calib_data_missing_file(tiny_dir, tmp_path, capsys):
    assert main(["prune", str(tiny_dir), "-o", str(tmp_path / "P"), "--method", "taylor", "--calib-data",
                 str(tmp_path / "nope.jsonl"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: calibration file {tmp_path / 'nope.jsonl'} does not exist: pass --calib-data FILE (.txt, or .jsonl "
                   "of text or training rows)")
    assert not (tmp_path / "P").exists()


@pytest.mark.parametrize("method", ["taylor", "wanda-sp"])
def test_task_rows_change_the_scores(tiny_dir, tmp_path, alpaca_file, method):
    """Scores on the training rows are not the built-in text's: the plan follows the calibration data."""
    assert main(["prune", str(tiny_dir), "-o", str(tmp_path / "A"), "--method", method, "--ratio", "0.5",
                 "--calib-data", str(alpaca_file), "--quiet"]) == 0
    assert main(["prune", str(tiny_dir), "-o", str(tmp_path / "B"), "--method", method, "--ratio", "0.5", "--quiet"]) == 0
    a, b = (json.loads((tmp_path / n / "loram_plan.json").read_text()) for n in ("A", "B"))
    assert a["calibration"]["source"] == str(alpaca_file) and b["calibration"]["source"] == "builtin"
    assert a["pruned"] != b["pruned"]
