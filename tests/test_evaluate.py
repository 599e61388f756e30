"""`loram eval`: perplexity against hand computation, lm-eval-style multiple choice, generation
metrics, the HumanEval sandbox, the lm-eval bridge (local task, offline) and the CLI."""

import json
import math
import random

import pytest
import torch

from loram.data import encode
from loram.eval.generation import gsm8k_target, last_number
from loram.eval.humaneval import pass_at_k
from loram.eval.mc import decide, multiple_choice, pair_sequence, split_fewshot
from loram.eval.ppl import perplexity_rows, perplexity_text, text_windows
from loram.eval.sandbox import run_program
from loram.testing import lm_eval_task, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def mt():
    return tiny_model("llama-gqa", seed=3), tiny_tokenizer()


def token_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, by one plain forward pass (the reference)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits[:-1], -1)
    return [lp[t - 1, ids[t]].item() for t in range(1, len(ids))]


def test_instruction_perplexity_equals_hand_computation(mt):
    model, tok = mt
    rows = [{"instruction": "add 2 3", "output": "5"}, {"instruction": "say something longer", "output": "a longer answer!"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    nll, n = 0.0, 0
    for r in rows:
        ids, labels = encode(tok, r)
        lps = token_logprobs(model, ids)
        for t in range(1, len(ids)):
            if labels[t] != -100:
                nll -= lps[t - 1]
                n += 1
    p = perplexity_rows(model, tok, rows, batch_size=2)  # 2 per batch: padding is exercised
    assert p.tokens == n
    assert p.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_text_windows_score_each_token_once():
    ids = list(range(3, 40))
    for seq_len, stride in [(8, 8), (8, 3), (50, 10), (5, 1)]:
        w = text_windows(ids, seq_len, stride)
        scored = [t for win, lab in w for t, l in zip(range(len(win)), lab) if l != -100 and t > 0]
        assert len(scored) == len(ids) - 1
        assert all(len(win) <= seq_len for win, _ in w)


def test_text_perplexity_equals_hand_computation(mt):
    model, tok = mt
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    # one window covering everything = plain full-sequence perplexity
    full = token_logprobs(model, ids)
    p = perplexity_text(model, tok, text, seq_len=len(ids), stride=len(ids))
    assert p.tokens == len(ids) - 1
    assert p.ppl == pytest.approx(math.exp(-sum(full) / len(full)), rel=1e-5)
    # strided windows: the same sum, window by window, from plain forward passes
    for seq_len, stride in [(32, 32), (24, 8)]:
        from loram.eval.ppl import text_windows

        nll, n = 0.0, 0
        for win, lab in text_windows(ids, seq_len, stride):
            lps = token_logprobs(model, win)
            nll -= sum(lp for t, lp in enumerate(lps, 1) if lab[t] != -100)
            n += sum(1 for t in range(1, len(win)) if lab[t] != -100)
        assert n == len(ids) - 1
        p = perplexity_text(model, tok, text, seq_len=seq_len, stride=stride, batch_size=3)
        assert p.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
        assert p.ppl != pytest.approx(math.exp(-sum(full) / len(full)), rel=1e-4)  # less context: different value


def test_mc_picks_highest_loglikelihood_and_norm_uses_characters(mt):
    model, tok = mt
    rows = [{"query": f"Question {i}: pick one.\nAnswer:", "choices": ["yes", "no", "maybe so", "x"], "gold": i % 4}
            for i in range(6)]
    r = multiple_choice(model, tok, rows)
    for row, (pa, pn) in zip(rows, r.predictions):
        lls = []
        for c in row["choices"]:
            ids, labels = pair_sequence(tok, row["query"], " " + c)
            lps = token_logprobs(model, ids)
            lls.append(sum(lp for t, lp in enumerate(lps, 1) if labels[t] != -100))
        assert pa == max(range(4), key=lambda j: lls[j])
        assert pn == max(range(4), key=lambda j: lls[j] / len(row["choices"][j]))  # length of the choice, no space
    assert r.acc == sum(p[0] == row["gold"] for p, row in zip(r.predictions, rows)) / len(rows)


def test_decide_constructed_cases():
    # acc: highest log-likelihood; acc_norm: divided by the choice's character length (lm-eval completion_len)
    assert decide([-10.0, -12.0], ["a", "bbbbbbbbbb"]) == (0, 1)
    assert decide([-3.0, -3.0, -9.0], ["aa", "b", "ccc"]) == (0, 0)  # ties: first, like numpy argmax... for ll
    assert decide([-4.0, -3.0], ["abcd", "ab"]) == (1, 0)  # -1.0 per char beats -1.5 per char


def test_mc_context_tokens_match_lm_eval_rules(mt):
    _, tok = mt
    ids, labels = pair_sequence(tok, "Answer: ", "yes")  # trailing space moves into the continuation
    cont = [t for t, l in zip(ids, labels) if l != -100]
    assert tok.decode(cont) == " yes"


def test_fewshot_never_uses_evaluated_rows(mt):
    model, tok = mt
    rows = [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(10)]
    ev, pool = split_fewshot(rows, 3, None)
    assert len(ev) == 7 and not any(p in ev for p in pool)
    r = multiple_choice(model, tok, rows, shots=2)
    assert r.n == 8 and r.shots == 2
    other = [{"query": "z", "choices": ["a", "b"], "gold": 0}] * 2
    assert multiple_choice(model, tok, rows, shots=2, fewshot_rows=other).n == 10


def test_generation_metric_helpers():
    assert last_number("so 3 + 4 = 7, and the answer is 1,234.") == "1234"
    assert last_number("The total is $18.00") == "18"
    assert last_number("no digits") is None
    assert gsm8k_target("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))


def test_sandbox_pass_fail_timeout_network():
    assert run_program("assert sum([1, 2]) == 3\n").passed
    bad = run_program("assert 1 == 2\n")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.detail
    slow = run_program("while True:\n    pass\n", timeout=1.5)
    assert slow.status == "timeout"
    net = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", timeout=5)
    assert not net.passed and ("disabled" in net.detail or "Network" in net.detail or "refused" not in net.detail)
    mem = run_program("x = bytearray(4 * 2**30)\n", timeout=5, memory_mb=512)
    assert not mem.passed and "MemoryError" in mem.detail


def test_lm_eval_bridge_local_task_matches_our_mc(mt, tmp_path):
    pytest.importorskip("lm_eval")
    from loram.eval.harness import lm_eval_tasks

    model, tok = mt
    rng = random.Random(0)
    rows = [{"query": f"Item {i}: which word?\nAnswer:", "choices": ["red", "green", "blue"], "gold": rng.randrange(3)}
            for i in range(8)]
    res = lm_eval_tasks(model, tok, ["loram_mini"], include=str(lm_eval_task(tmp_path, rows)), batch_size=4)
    ours = multiple_choice(model, tok, rows)
    assert res["loram_mini"]["acc"] == (pytest.approx(ours.acc), 8)
    assert res["loram_mini"]["acc_norm"] == (pytest.approx(ours.acc_norm), 8)


def test_cli_eval_json(tiny_dir, alpaca_file, tmp_path, capsys):
    from loram.cli import main

    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"query": f"{i}?", "choices": ["a", "bb"], "gold": 0}) + "\n" for i in range(4)))
    txt = tmp_path / "t.txt"
    txt.write_text("some raw text to score, " * 10)
    assert main(["eval", str(tiny_dir), "--ppl", f"add={alpaca_file}", "--ppl", f"raw={txt}", "--seq-len", "64",
                 "--mc", f"toy={mc}", "--limit", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    got = {(r["task"], r["metric"]) for r in out["results"]}
    assert got == {("add", "ppl"), ("raw", "ppl"), ("toy", "acc"), ("toy", "acc_norm")}
    assert all(r["value"] > 1 for r in out["results"] if r["metric"] == "ppl")
    assert main(["eval", str(tiny_dir)]) == 2  # nothing to evaluate: one-line error


def test_cli_eval_file_slice(tiny_dir, alpaca_file, tmp_path, capsys):
    """--ppl NAME=FILE[a:b] scores those rows, as a file holding only them (the form a recipe's eval prints)."""
    from loram.cli import main

    part = tmp_path / "part.jsonl"  # the fixture is JSON lines
    part.write_text("\n".join(alpaca_file.read_text().splitlines()[2:6]))
    assert main(["eval", str(tiny_dir), "--ppl", f"sliced={alpaca_file}[2:6]", "--ppl", f"file={part}", "--seq-len", "64",
                 "--json"]) == 0
    res = {r["task"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert res["sliced"]["n"] == res["file"]["n"] == 4
    assert res["sliced"]["value"] == pytest.approx(res["file"]["value"], rel=1e-6)
    assert main(["eval", str(tiny_dir), "--ppl", f"x={tmp_path / 'nope.jsonl'}[0:4]"]) == 2  # the file part is checked
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    # not a local path: a hub id, which the data layer loads (here offline: its one-line error, not "file does not exist")
    assert main(["eval", str(tiny_dir), "--ppl", "x=no-such-dataset-here", "--seq-len", "64"]) == 2
    assert "cannot load dataset 'no-such-dataset-here'" in capsys.readouterr().err


def test_generation_tasks_wiring(mt):
    from loram.eval.generation import gsm8k
    from loram.eval.humaneval import humaneval, program_of

    model, tok = mt
    g = gsm8k(model, tok, [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}], max_new_tokens=6)
    assert g.n == 1 and g.outputs[0][2] == "4" and g.accuracy in (0.0, 1.0)
    row = {"task_id": "t/0", "prompt": "def one():\n", "entry_point": "one",
           "test": "def check(f):\n    assert f() == 1\n"}
    h = humaneval(model, tok, [row], samples=2, max_new_tokens=6, timeout=5)
    assert set(h.pass_at) == {1} and 0 <= h.pass_at[1] <= 1 and h.per_task[0][0] == "t/0"
    # the program layout: a correct completion passes in the sandbox
    from loram.eval.sandbox import run_program

    assert run_program(program_of(row, "    return 1\n")).passed
    assert not run_program(program_of(row, "    return 2\n")).passed
