"""Layer-streamed evaluation (loram.eval.streamed, loram.lora_delta): the same ppl / mc numbers as the
model in memory, for an original, an original + recovered adapter and a pruned folder + its adapter,
in one pass or in waves, with one decoder layer materialised at a time."""

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from loram import progress
from loram.errors import LoramError
from loram.eval import load_for_eval
from loram.eval.mc import choice_logliks
from loram.eval.runner import EvalRequest, evaluate
from loram.eval.scoring import padded_batches, score_sequences
from loram.eval.streamed import open_streamed, resident_bytes
from loram.lora_delta import LoraDeltas
from test_errors import make_pruned_adapter

ROWS = [{"instruction": f"add {a} {b}", "input": "", "output": str(a + b) * (1 + a)} for a in range(4) for b in range(3)]
MC = [{"query": f"{i} plus {i}?", "choices": ["a", "bb", f"{2 * i}", "c c c"], "gold": i % 4} for i in range(7)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_dir):
    from loram.prune import prune
    from loram.recover import recover

    root = tmp_path_factory.mktemp("evalstream")
    ns = type("WS", (), {})()
    ns.root, ns.base = root, tiny_dir
    ns.pruned = Path(prune(str(tiny_dir), root / "P", method="magnitude", ratio=0.5, layers="1:5").out)
    ns.adapter = make_pruned_adapter(ns.pruned, root / "A")
    ns.recovered = recover(ns.adapter, tiny_dir, root / "R")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (root / "raw.txt").write_text("The quick brown fox jumps over the lazy dog, again and again. " * 4)
    ns.req = EvalRequest(ppl=[("rows", root / "rows.jsonl"), ("raw", root / "raw.txt")], mc=[("mc", root / "mc.jsonl")],
                         seq_len=48, stride=16, batch_size=3)
    return ns


def plain_adapter(base: Path, out: Path, targets: list[str], **lora) -> Path:
    """A plain PEFT adapter on the original (no loram metadata): random non-zero factors."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from loram.adapter import write_adapter
    from loram.loading import load_model

    pm = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **lora))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    cfg = json.loads(json.dumps(pm.peft_config["default"].to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    out.mkdir(parents=True)
    write_adapter(out, get_peft_model_state_dict(pm, save_embedding_layers=False), cfg, {})  # as `loram train` saves
    (out / "loram_adapter.json").unlink()  # plain PEFT: no loram metadata
    return out


def one_layer_at_a_time(lm) -> list[list[int]]:
    """Record, at each layer load, which decoder layers hold real tensors."""
    ls, seen, load = lm.stream, [], lm.stream.load

    def spy(i, **kw):
        block = load(i, **kw)
        seen.append([j for j, b in enumerate(ls.blocks) if any(not p.is_meta for p in b.parameters())])
        return block

    ls.load = spy
    return seen


def in_memory_and_streamed(base, adapter, req, **kw):
    want = evaluate(str(base), adapter and str(adapter), req, stream=False)
    got = evaluate(str(base), adapter and str(adapter), req, stream=True, **kw)
    assert [(r.task, r.metric, r.n) for r in got] == [(r.task, r.metric, r.n) for r in want]
    return want, got


def assert_same(want, got):
    for w, g in zip(want, got):
        assert g.value == pytest.approx(w.value, rel=1e-5), (w.task, w.metric)
        assert {k: v for k, v in g.extra.items() if k != "nll"} == {k: v for k, v in w.extra.items() if k != "nll"}


CASES = {"original": ("base", None), "original+recovered": ("base", "recovered"), "pruned+pruned-adapter": ("pruned", "adapter")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_ppl_and_mc_equal_in_memory(ws, case):
    base, adapter = (getattr(ws, a) if a else None for a in CASES[case])
    want, got = in_memory_and_streamed(base, adapter, ws.req)
    assert_same(want, got)
    assert {(r.task, r.metric) for r in got} == {("rows", "ppl"), ("raw", "ppl"), ("mc", "acc"), ("mc", "acc_norm")}
    # the per-choice log-likelihoods behind acc / acc_norm, and one layer resident at every load
    mem, tok = load_for_eval(str(base), adapter and str(adapter))
    lm, _ = open_streamed(base, adapter)
    seen = one_layer_at_a_time(lm)
    ctx = [""] * len(MC)
    ll_mem = choice_logliks(mem, tok, MC, ctx, batch_size=5)
    ll_str = choice_logliks(lm, tok, MC, ctx, batch_size=5)
    torch.testing.assert_close(torch.tensor(ll_str, dtype=torch.float64), torch.tensor(ll_mem, dtype=torch.float64), rtol=1e-5, atol=0)
    assert seen == [[i] for i in range(lm.stream.n_layers)] and lm.passes == 1
    assert all(p.is_meta for b in lm.stream.blocks for p in b.parameters())


def test_waves_give_the_same_numbers(ws):
    """A budget smaller than one batch: every batch is its own wave, each wave streams every layer again."""
    want, got = in_memory_and_streamed(ws.pruned, ws.adapter, ws.req, max_hidden_bytes=1)
    assert_same(want, got)
    lm, tok = open_streamed(ws.pruned, ws.adapter, max_hidden_bytes=1)
    seen = one_layer_at_a_time(lm)
    mem, _ = load_for_eval(str(ws.pruned), str(ws.adapter))
    pairs = [(list(range(3, 3 + n)), [-100] + list(range(4, 3 + n))) for n in (9, 17, 5, 12, 30)]
    a, b = score_sequences(mem, pairs, batch_size=2), score_sequences(lm, pairs, batch_size=2)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    torch.testing.assert_close(torch.tensor([s.loglik for s in b]), torch.tensor([s.loglik for s in a]), rtol=1e-5, atol=0)
    assert lm.passes == 3  # 5 sequences in batches of 2: 3 waves
    assert seen == [[i] for i in range(lm.stream.n_layers)] * 3
    # a budget for exactly two batches: two waves
    lm2, _ = open_streamed(ws.pruned, ws.adapter)
    batches = padded_batches(pairs, 2, 0)
    lm2.max_hidden_bytes = sum(lm2.state_bytes(x) for x in batches[:2])
    assert [len(w) for w in lm2.waves(batches)] == [2, 1]


def test_resident_bytes_predicts_the_materialised_tensors(ws):
    """resident_bytes (from config + plan) = the bytes of the real tensors while the largest layer is loaded."""
    lm, _ = open_streamed(ws.pruned)
    ls = lm.stream
    real = lambda: sum(t.numel() * t.element_size() for t in {id(p): p for p in ls.model.parameters() if not p.is_meta}.values())  # noqa: E731
    outer = real()
    per_layer = []
    for _i, _block in ls.layers():
        per_layer.append(real() - outer)
    assert resident_bytes(ls.config, ls.plan) == (outer, max(per_layer))
    assert len(set(per_layer)) > 1  # the pruned layers 1:5 are smaller: the largest one counts
    assert resident_bytes(ls.config, ls.plan, torch.bfloat16) == (outer // 2, max(per_layer) // 2)


def test_bf16_streamed_equals_in_memory_bf16(ws):
    """--bf16: layers in bf16 on both paths, the adapter's update added in fp32 and rounded once."""
    req = EvalRequest(ppl=ws.req.ppl, seq_len=48, stride=16, batch_size=3)
    want = evaluate(str(ws.pruned), str(ws.adapter), req, stream=False, dtype=torch.bfloat16)
    got = evaluate(str(ws.pruned), str(ws.adapter), req, stream=True, dtype=torch.bfloat16)
    for w, g in zip(want, got):
        assert g.value == pytest.approx(w.value, rel=1e-3)


@pytest.mark.parametrize("targets,lora,scaling", [
    (["q_proj", "down_proj", "lm_head"], {}, {}),                                  # tied model: lm_head untied from the embeddings
    (["v_proj", "embed_tokens"], {"use_rslora": True}, {"": 8 / 2}),               # embedding factors, alpha / sqrt(r)
    (["q_proj", "down_proj"], {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}},
     {"q_proj": 3 / 4, "down_proj": 8 / 2}),                                       # per-module rank and alpha
])
def test_adapter_folded_as_loaded_equals_peft_merge(ws, tmp_path, targets, lora, scaling):
    from loram.io import load_config
    from loram.weights import Weights

    adapter = plain_adapter(ws.base, tmp_path / "a", targets, **lora)
    merged, _ = load_for_eval(str(ws.base), str(adapter))  # PEFT's merge_and_unload, the tied ends untied first
    w = Weights(ws.base)
    d = LoraDeltas(adapter, load_config(ws.base))
    assert d.untie == bool({"lm_head", "embed_tokens"} & set(targets))
    for name, u in d.updates.items():  # alpha / r = 8 / 4 unless the case says otherwise
        assert u.scaling == next((v for k, v in scaling.items() if k in name), 8 / 4), name
    outer = {"lm_head", "embed_tokens"} & set(targets)
    assert len(d.targets) == 6 * (len(targets) - len(outer)) + len(outer)  # every one of the 6 layers, each outer tensor once
    sd = merged.state_dict()
    for name in sorted(d.targets):  # PEFT's operations in PEFT's order: the same bits
        assert torch.equal(d.apply(name, w.get(d.origin(name), torch.float32)), sd[name]), name
    norm = w.get("model.norm.weight")
    assert d.apply("model.norm.weight", norm) is norm
    want, got = in_memory_and_streamed(ws.base, adapter, EvalRequest(ppl=ws.req.ppl, seq_len=48, stride=16, batch_size=3))
    assert_same(want, got)


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["v_proj", "embed_tokens"]])
def test_tied_model_adapter_means_peft_attached_everywhere(ws, tmp_path, targets):
    """A LoRA on lm_head or embed_tokens of a tied model changes only its own end (PEFT attached, unmerged):
    eval BASE --adapter in memory == streamed == eval of the `loram merge` folder == PEFT attached; folding
    the update into the one shared tensor (PEFT's plain merge_and_unload) would give other numbers."""
    from loram.eval.runner import run_tasks
    from loram.merge import load_with_adapter, merge

    adapter = plain_adapter(ws.base, tmp_path / "a", targets)
    req = EvalRequest(ppl=ws.req.ppl, mc=ws.req.mc, seq_len=48, stride=16, batch_size=3)
    in_memory, streamed = in_memory_and_streamed(ws.base, adapter, req)
    merged = evaluate(str(merge(ws.base, adapter, tmp_path / "M")), None, req, stream=False)
    pm, tok = load_for_eval(str(ws.base), str(adapter), merge=False)
    attached = run_tasks(pm, tok, req)
    for got in (in_memory, streamed, merged):
        assert_same(attached, got)
    shared, _ = load_with_adapter(str(ws.base), str(adapter))
    folded = run_tasks(shared.merge_and_unload(), tok, req)
    assert all(f.value != pytest.approx(a.value, rel=1e-3) for f, a in zip(folded, attached) if f.metric == "ppl")


def test_adapter_that_does_not_fit_is_refused_before_streaming(ws, tmp_path):
    # an adapter of the original on the pruned folder: its factors do not fit the pruned shapes
    adapter = plain_adapter(ws.base, tmp_path / "a", ["gate_proj"])
    with pytest.raises(LoramError, match=r"does not fit this model \(4 mismatched.*layers.1.mlp.gate_proj.lora_B.weight: adapter \(80, 4\) "
                                         r"vs model \(40, 4\)"):
        open_streamed(ws.pruned, adapter)
    # the stage checks load_with_adapter makes, without loading the model
    with pytest.raises(LoramError, match="was trained on a pruned model and does not fit the original"):
        open_streamed(ws.base, ws.adapter)


def test_dora_adapter_is_refused(ws, tmp_path):
    adapter = plain_adapter(ws.base, tmp_path / "a", ["q_proj"], use_dora=True)
    with pytest.raises(LoramError, match="uses DoRA") as e:
        open_streamed(ws.base, adapter)
    assert "\n" not in str(e.value)


def test_generation_tasks_refused_when_streaming(ws, monkeypatch):
    import loram.eval.streamed as streamed

    monkeypatch.setattr(streamed, "LayerStream", None)  # nothing may be loaded before the refusal
    req = EvalRequest(ppl=ws.req.ppl, gsm8k=str(ws.root / "rows.jsonl"))
    with pytest.raises(LoramError, match="--gsm8k generate text, which needs the whole model in memory"):
        evaluate(str(ws.base), None, req, stream=True)


def test_gguf_or_hub_model_cannot_stream(ws, tmp_path):
    with pytest.raises(LoramError, match="reads the model layer by layer from safetensors"):
        open_streamed("HuggingFaceTB/not-a-local-model-zz")


def test_hidden_budget_must_be_positive(ws, monkeypatch):
    import loram.eval.streamed as streamed

    monkeypatch.setattr(streamed, "LayerStream", None)  # refused before anything is read
    with pytest.raises(LoramError, match="max_hidden_bytes 0 must be positive"):
        open_streamed(ws.base, max_hidden_bytes=0)


def test_progress_bar_per_layer(ws, monkeypatch):
    class Term(io.StringIO):
        def isatty(self):
            return True

    term = Term()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.delenv(progress.QUIET_ENV, raising=False)
    evaluate(str(ws.base), None, EvalRequest(mc=ws.req.mc, batch_size=4), stream=True)
    assert "eval mc (mc): layer" in term.getvalue() and "6/6" in term.getvalue(), term.getvalue()[-500:]


CHILD = """
import json, sys
from pathlib import Path
from loram.procmem import malloc_trim, pin_mmap_threshold, reset_peak
from loram.eval.runner import EvalRequest, evaluate

def hwm():  # VmHWM, not ru_maxrss: ru_maxrss also holds the parent's RSS at exec, which clear_refs cannot reset
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

def rss():
    line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024

pin_mmap_threshold()
warm, big, data = sys.argv[1:4]
req = EvalRequest(ppl=[("t", Path(data))], seq_len=64, batch_size=2)
out = {}
for stream in (True, False):
    evaluate(warm, None, req, stream=stream)  # imports and lazy library state: outside the measure
    malloc_trim()
    base = rss()
    assert reset_peak()
    evaluate(big, None, req, stream=stream)
    out["streamed" if stream else "in_memory"] = hwm() - base
print(json.dumps(out))
"""


def test_streamed_peak_is_one_layer_not_the_model(tmp_path):
    """Peak RSS of a streamed evaluation grows by about one layer; in memory, by the whole checkpoint."""
    import os
    import subprocess

    from loram.testing import save_tiny

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak RSS")
    warm = save_tiny(tmp_path / "warm", "llama-mha")
    big = save_tiny(tmp_path / "big", "llama-mha", hidden_size=384, intermediate_size=1536, num_hidden_layers=8, head_dim=96)
    size = (big / "model.safetensors").stat().st_size  # 8 layers of 9.4 MB: ~77 MB
    (tmp_path / "t.txt").write_text("some raw text to score, " * 40)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", CHILD, str(warm), str(big), str(tmp_path / "t.txt")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    peak = json.loads(r.stdout.strip().splitlines()[-1])
    assert peak["in_memory"] > 0.8 * size, (peak, size)
    assert peak["streamed"] < 0.35 * size, (peak, size)  # measured: 17 MB (one 9.4 MB layer + ~8 MB) vs 81 MB


def test_cli_streams_by_itself_when_the_budget_is_small(tiny_dir, tmp_path, capsys):
    """No flag but the budget: a budget below the predicted in-memory peak streams, with the same numbers."""
    import json

    from loram.cli import main

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    runs = {}
    for budget in ("1000", "0.001"):
        assert main(["eval", str(tiny_dir), "--ppl", f"t={text}", "--seq-len", "32", "--json", "--max-memory", budget]) == 0
        out = capsys.readouterr()
        runs[budget] = json.loads(out.out)["results"][0]["value"]
        assert "streaming" not in out.err  # --json: no status lines
    assert abs(runs["1000"] - runs["0.001"]) <= 1e-5 * runs["1000"]
    for budget, quiet in (("1000", []), ("0.001", []), ("0.001", ["--quiet"])):
        assert main(["eval", str(tiny_dir), "--ppl", f"t={text}", "--seq-len", "32", "--max-memory", budget, *quiet]) == 0
        said = "streaming layer by layer" in capsys.readouterr().err
        assert said == (budget == "0.001" and not quiet)  # the decision is said, unless --quiet
