"""Bad inputs: every command fails fast with one line `error: <what is wrong>: <what to do>`, exit 2.

Each test here is one row of the reliability table in docs/reliability.md. The CLI runs in-process
(`loram.cli.main`) with stderr captured; one test runs a real subprocess to check that the
user sees no traceback, and one checks that --debug does show it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loram.adapter import ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS, STAGE_PRUNED, write_adapter
from loram.cli import main
from loram.errors import LoramError
from loram.prune_plan import PLAN_FILE, PrunePlan
from loram.testing import save_tiny

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- fixtures: a base, another base, two pruned folders, a pruned and a recovered adapter -------------
def make_pruned_adapter(pruned_dir: Path, out: Path, rank: int = 4, seed: int = 0) -> Path:
    """What `loram train` writes, without training: random non-zero lora_A/B on the pruned model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from loram.loading import load_pruned

    model = load_pruned(pruned_dir)
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    plan = model.loram_plan
    cfg = pm.peft_config["default"].to_dict()
    cfg = json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    meta = {"stage": STAGE_PRUNED, "plan_id": plan.id, "base_fingerprint": plan.base["fingerprint"],
            "base_name": plan.base["name"]}
    out.mkdir(parents=True)
    write_adapter(out, get_peft_model_state_dict(pm), cfg, meta, plan)
    return out


@pytest.fixture(scope="module")
def w(tmp_path_factory, tiny_dir):
    """A workspace of valid artifacts the tests copy and break."""
    from loram.prune import prune
    from loram.recover import recover

    root = tmp_path_factory.mktemp("errors")
    ns = type("W", (), {})()
    ns.root, ns.base = root, tiny_dir
    ns.base2 = save_tiny(root / "base2", "llama-gqa", seed=1)  # same geometry, other weights
    ns.pruned = Path(prune(str(tiny_dir), root / "P", method="random", ratio=0.5).out)
    ns.pruned2 = Path(prune(str(tiny_dir), root / "P2", method="random", ratio=0.5, seed=7).out)
    ns.adapter = make_pruned_adapter(ns.pruned, root / "A")
    ns.recovered = recover(ns.adapter, tiny_dir, root / "R")
    ns.data = root / "d.jsonl"
    ns.data.write_text("".join(json.dumps({"instruction": f"add {a} {b}", "input": "", "output": str(a + b)}) + "\n"
                               for a in range(4) for b in range(4)))
    return ns


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(f: Path) -> None:
    b = f.read_bytes()
    f.write_bytes(b[: len(b) // 2])


def edit_json(f: Path, **changes) -> None:
    d = json.loads(f.read_text())
    d.update(changes)
    f.write_text(json.dumps(d))


def fails(capsys, *argv, expect: str, out: Path | None = None) -> str:
    """Run the CLI; it must exit 2 with exactly one `error:` line containing ``expect`` and write nothing."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    msg = errors[0]
    assert expect in msg, msg
    assert ": " in msg[len("error: "):], f"no 'what to do' part: {msg}"
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    return msg


# ---- paths and models ------------------------------------------------------------------------------
def test_missing_path(capsys, w):
    fails(capsys, "prune", w.root / "nope", "-o", w.root / "o", expect="does not exist", out=w.root / "o")


def test_file_that_is_not_a_model(capsys, w):
    fails(capsys, "prune", w.data, "-o", w.root / "o", expect="is not a model folder or a .gguf file")


def test_folder_that_is_not_a_model(capsys, w, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    fails(capsys, "prune", tmp_path, "-o", w.root / "o", expect="is not a model folder (no config.json)")


def test_config_without_weights(capsys, w, tmp_path):
    shutil.copy(w.base / "config.json", tmp_path / "config.json")
    fails(capsys, "prune", tmp_path, "-o", w.root / "o", expect="no .safetensors weights")


def test_model_without_tokenizer(capsys, w, tmp_path):
    for f in w.base.iterdir():
        if not f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, tmp_path / f.name)
    fails(capsys, "prune", tmp_path, "-o", w.root / "o", expect="needs its tokenizer files")


def test_unsupported_architecture(capsys, w, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    fails(capsys, "prune", tmp_path, "-o", w.root / "o", expect="unsupported architecture 'gpt2'")


def test_unknown_method(capsys, w):
    fails(capsys, "prune", w.base, "-o", w.root / "o", "--method", "psychic", expect="unknown --method")


# ---- ratios and layers -----------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", ["0", "-0.5"])
def test_ratio_out_of_range(capsys, w, ratio):
    fails(capsys, "prune", w.base, "-o", w.root / "o", "--ratio", ratio, expect="is out of range: use 0 < R < 1")


@pytest.mark.parametrize("ratio", ["1", "1.5"])
def test_ratio_removes_every_channel(capsys, w, ratio):
    fails(capsys, "prune", w.base, "-o", w.root / "o", "--ratio", ratio, expect="would remove every MLP channel")


def test_ratio_rounds_to_every_channel(capsys, w):
    # 80 channels: 80 - ceil(80 * 0.999) = 0 kept
    fails(capsys, "prune", w.base, "-o", w.root / "o", "--ratio", "0.999", expect="would remove all 80 MLP channels")


def test_attn_ratio_removes_every_kv_group(capsys, w):
    fails(capsys, "prune", w.base, "-o", w.root / "o", "--attn-ratio", "1", expect="would remove every KV group")


def test_attn_ratio_below_one_keeps_a_group():
    """n - floor(n*r) >= 1 for every r < 1: attention is never emptied by rounding."""
    from loram.families import geometry
    from loram.prune.structured import select
    from loram.testing import tiny_config

    g = geometry(tiny_config("mistral"))  # 4 KV groups
    plans = select(g, "random", range(0, 2), 0.5, 0.99, 0)
    assert all(len(lp.kv_keep) == 1 for lp in plans.values())


def test_ratio_not_a_number(capsys, w):
    fails(capsys, "prune", w.base, "-o", w.root / "o", "--ratio", "half", expect="is not a number")


@pytest.mark.parametrize("layers", ["0:99", "5:3", "-1:4"])
def test_layers_outside_model(capsys, w, layers):
    fails(capsys, "prune", w.base, "-o", w.root / "o", f"--layers={layers}", expect="is outside the model's 6 layers")


def test_layers_malformed(capsys, w):
    fails(capsys, "prune", w.base, "-o", w.root / "o", "--layers", "4-8", expect="is not START:END")


# ---- wrong base, wrong plan, wrong adapter ----------------------------------------------------------
def test_recover_with_other_base(capsys, w):
    fails(capsys, "recover", w.adapter, "--base", w.base2, "-o", w.root / "o", out=w.root / "o",
          expect="is not the model this adapter's plan was made from (weights differ")


def test_recover_with_pruned_folder_as_base(capsys, w):
    fails(capsys, "recover", w.adapter, "--base", w.pruned, "-o", w.root / "o", expect="is a loram pruned model")


def test_merge_with_other_base(capsys, w):
    fails(capsys, "merge", w.base2, w.recovered, "-o", w.root / "o", out=w.root / "o",
          expect="was recovered for another base model (weights differ")


def test_merge_pruned_adapter_into_original(capsys, w):
    fails(capsys, "merge", w.base, w.adapter, "-o", w.root / "o", expect="run `loram recover")


def test_adapter_on_another_plan(capsys, w):
    fails(capsys, "merge", w.pruned2, w.adapter, "-o", w.root / "o", expect="was trained on another prune plan")


def test_adapter_with_swapped_plan_file(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    shutil.copy(w.pruned2 / PLAN_FILE, a / PLAN_FILE)
    fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="the folder was mixed up")


@pytest.mark.parametrize("attn_ratio", [0.5, 0.0])
def test_adapter_tensors_from_another_plan(capsys, w, tmp_path, attn_ratio):
    """Plan and meta consistent, tensors from another plan (other kept counts, or attention kept whole).

    The adapter is rewritten without its plan binding (as an older loram wrote it): with the binding
    the digest check refuses it first (test_plan_binding.py), without it the shapes still do."""
    from loram.prune import prune

    p3 = Path(prune(str(w.base), tmp_path / "P3", method="random", ratio=0.25, attn_ratio=attn_ratio).out)
    a = copy(w.adapter, tmp_path / "A")
    plan = PrunePlan.load(p3)
    shutil.copy(p3 / PLAN_FILE, a / PLAN_FILE)
    edit_json(a / ADAPTER_META, plan_id=plan.id)
    _rewrite_tensors(a, lambda sd: sd)  # save_file without metadata: no binding
    fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="trained on another plan or model")


def test_recovered_adapter_given_to_recover(capsys, w):
    fails(capsys, "recover", w.recovered, "--base", w.base, "-o", w.root / "o", expect="is already recovered")


def test_plain_peft_adapter_given_to_recover(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    (a / ADAPTER_META).unlink()
    (a / PLAN_FILE).unlink()
    fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="is a plain LoRA adapter")


def test_plain_loram_adapter_given_to_recover(capsys, w, tmp_path):
    """An adapter `loram train` made on an original (unpruned) model: stage 'original'."""
    a = copy(w.adapter, tmp_path / "A")
    edit_json(a / ADAPTER_META, stage="original")
    (a / PLAN_FILE).unlink()
    fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="is a plain LoRA adapter")


def test_adapter_rank_mismatch(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    edit_json(a / ADAPTER_CONFIG, r=8)
    fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="has rank 4 but adapter_config says r=8")


def test_adapter_targets_mismatch(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    edit_json(a / ADAPTER_CONFIG, target_modules=["q_proj", "v_proj"])
    fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="does not match the tensors in the adapter")


def _rewrite_tensors(adapter: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(adapter / ADAPTER_WEIGHTS))
    save_file(fn(sd), str(adapter / ADAPTER_WEIGHTS))


def test_adapter_for_another_width(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite_tensors(a, lambda sd: {**sd, key: torch.zeros(4, 40)})  # hidden 40, the model's is 48
    fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="trained on another plan or model")


def test_adapter_for_more_layers(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    k = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    _rewrite_tensors(a, lambda sd: {**sd, k.format(9, "A"): sd[k.format(0, "A")].clone(), k.format(9, "B"): sd[k.format(0, "B")].clone()})
    fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="targets layer 9 but the plan's model has 6")


def test_adapter_for_another_architecture(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    _rewrite_tensors(a, lambda sd: {**sd, "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 48)})
    fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="a module the plan's model does not have")


def test_adapter_does_not_fit_pruned_model(capsys, w):
    """A recovered (full-size) adapter on the pruned model: refused, never loaded partially."""
    fails(capsys, "merge", w.pruned, w.recovered, "-o", w.root / "o", expect="does not fit this model")


# ---- damaged files ---------------------------------------------------------------------------------
def test_truncated_base_safetensors(capsys, w, tmp_path):
    b = copy(w.base, tmp_path / "b")
    truncate(b / "model.safetensors")
    fails(capsys, "prune", b, "-o", w.root / "o", expect="is truncated or corrupt")


def test_truncated_base_in_recover(capsys, w, tmp_path):
    b = copy(w.base, tmp_path / "b")
    truncate(b / "model.safetensors")
    fails(capsys, "recover", w.adapter, "--base", b, "-o", w.root / "o", expect="is truncated or corrupt")


def test_truncated_pruned_folder(capsys, w, tmp_path):
    p = copy(w.pruned, tmp_path / "P")
    truncate(p / "model.safetensors")
    fails(capsys, "merge", p, w.adapter, "-o", w.root / "o", expect="is truncated or corrupt")


def test_garbage_pruned_folder(capsys, w, tmp_path):
    p = copy(w.pruned, tmp_path / "P")
    (p / "model.safetensors").write_bytes(os.urandom(4096))
    fails(capsys, "generate", p, "--prompt", "hi", expect="is truncated or corrupt")


def test_truncated_adapter(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    truncate(a / ADAPTER_WEIGHTS)
    fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="is truncated or corrupt")


def test_truncated_recovered_adapter(capsys, w, tmp_path):
    r = copy(w.recovered, tmp_path / "R")
    truncate(r / ADAPTER_WEIGHTS)
    fails(capsys, "merge", w.base, r, "-o", w.root / "o", expect="is truncated or corrupt")


def test_corrupt_plan_json(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    (a / PLAN_FILE).write_text('{"format": "loram-plan", "kind": ')
    fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="is not a valid prune plan")


def test_config_and_weights_disagree_original(capsys, w, tmp_path):
    b = copy(w.base, tmp_path / "b")
    edit_json(b / "config.json", intermediate_size=96)
    fails(capsys, "prune", b, "-o", w.root / "o", expect="config.json and the weights in")


def test_base_missing_tensor(capsys, w, tmp_path):
    """transformers would initialise a missing tensor randomly with a warning; loram refuses."""
    from safetensors.torch import load_file, save_file

    b = copy(w.base, tmp_path / "b")
    sd = load_file(str(b / "model.safetensors"))
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, str(b / "model.safetensors"), metadata={"format": "pt"})
    fails(capsys, "merge", b, w.recovered, "-o", w.root / "o", expect="1 missing")


def test_config_and_weights_disagree_pruned(capsys, w, tmp_path):
    p = copy(w.pruned, tmp_path / "P")
    edit_json(p / "config.json", intermediate_size=96)
    fails(capsys, "generate", p, "--prompt", "hi", expect="disagree")


# ---- outputs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["prune", "recover", "merge"])
def test_output_exists(capsys, w, cmd):
    out = w.root / f"exists-{cmd}"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("mine")
    argv = {"prune": ["prune", w.base], "recover": ["recover", w.adapter, "--base", w.base],
            "merge": ["merge", w.base, w.recovered]}[cmd]
    fails(capsys, *argv, "-o", out, expect="already exists: choose another -o or pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces(capsys, w):
    out = w.root / "ow"
    assert main(["recover", str(w.adapter), "--base", str(w.base), "-o", str(out)]) == 0  # loram wrote it (marker)
    (out / "stale.txt").write_text("old")
    assert main(["recover", str(w.adapter), "--base", str(w.base), "-o", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / ADAPTER_WEIGHTS).exists()
    assert not [p for p in w.root.iterdir() if p.name.startswith(".ow.")]


def test_output_not_writable(capsys, w, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        fails(capsys, "recover", w.adapter, "--base", w.base, "-o", ro / "x", expect="cannot write to")
    finally:
        ro.chmod(0o755)


# ---- data files, tokenizer and chat template (all refused before the weights load) ----------------------
@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model fails the test: these errors must come first."""
    import loram.eval
    import loram.loading
    import loram.train

    def refuse(*a, **kw):
        raise AssertionError("the weights were loaded before the error")

    for mod, name in ((loram.train, "load_base"), (loram.loading, "load_pruned_model"), (loram.eval, "load_for_eval")):
        monkeypatch.setattr(mod, name, refuse)


def latin1(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("latin-1"))
    return path


def test_train_data_not_utf8(capsys, w, tmp_path, no_weights):
    bad = latin1(tmp_path / "d.jsonl", json.dumps({"instruction": "caf\u00e9", "output": "x"}, ensure_ascii=False) + "\n")
    fails(capsys, "train", w.base, "--data", bad, "-o", tmp_path / "o", expect="is not UTF-8 text (byte 0xe9 on line 1)",
          out=tmp_path / "o")


def test_train_eval_file_not_utf8(capsys, w, tmp_path, no_weights):
    bad = latin1(tmp_path / "held.jsonl", json.dumps({"text": "d\u00e9j\u00e0 vu"}, ensure_ascii=False) + "\n")
    fails(capsys, "train", w.base, "--data", w.data, "--eval", f"held={bad}", "-o", tmp_path / "o", expect="is not UTF-8 text",
          out=tmp_path / "o")


def test_align_corpus_not_utf8(capsys, w, tmp_path, no_weights):
    bad = latin1(tmp_path / "corpus.txt", "plain line\nna\u00efve line\n")
    fails(capsys, "align", w.pruned, "--data", bad, "-o", tmp_path / "o", expect="corpus " + str(bad) + " is not UTF-8 text "
          "(byte 0xef on line 2)", out=tmp_path / "o")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_eval_ppl_file_not_utf8(capsys, w, tmp_path, no_weights, suffix):
    bad = latin1(tmp_path / f"held{suffix}", "caf\u00e9\n" if suffix == ".txt" else '{"text": "caf\u00e9"}\n')
    fails(capsys, "eval", w.base, "--ppl", f"held={bad}", expect="is not UTF-8 text (byte 0xe9 on line 1)")


def test_corrupt_parquet(capsys, w, tmp_path, no_weights):
    bad = tmp_path / "d.parquet"
    bad.write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    fails(capsys, "train", w.base, "--data", bad, "-o", tmp_path / "o", expect="is not a readable parquet file", out=tmp_path / "o")


def test_malformed_tokenizer_json(capsys, w, tmp_path, no_weights):
    m = copy(w.base, tmp_path / "m")
    truncate(m / "tokenizer.json")
    fails(capsys, "train", m, "--data", w.data, "-o", tmp_path / "o", expect="tokenizer.json is not valid JSON", out=tmp_path / "o")
    (m / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))  # valid JSON, wrong content
    fails(capsys, "train", m, "--data", w.data, "-o", tmp_path / "o", expect="tokenizer files of", out=tmp_path / "o")


def test_unsafe_chat_template(capsys, w, tmp_path, no_weights):
    m = copy(w.base, tmp_path / "m")
    (m / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}"
                                           "{% for x in messages %}{{ x.content }}{% endfor %}")
    fails(capsys, "train", m, "--data", w.data, "-o", tmp_path / "o", expect="chat template is unsafe, the sandbox refused it",
          out=tmp_path / "o")


def test_mostly_skipped_data(capsys, w, tmp_path, no_weights):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "bot", "content": "yo"}]} for i in range(6)]
    rows += [{"instruction": "add 1 1", "output": "2"}] * 2
    d = tmp_path / "chat.jsonl"
    d.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fails(capsys, "train", w.base, "--data", d, "-o", tmp_path / "o", expect="6 of its 8 rows would be skipped (6 with an unknown "
          "role; first: dataset row has a message with role 'bot'): use the roles system, user, assistant, tool", out=tmp_path / "o")


def test_chat_template_file_missing(capsys, w, tmp_path, no_weights):
    fails(capsys, "train", w.base, "--data", w.data, "--chat-template", tmp_path / "nope.jinja", "-o", tmp_path / "o",
          expect="nope.jinja does not exist: give a Jinja chat template file", out=tmp_path / "o")


def test_chat_template_file_not_jinja(capsys, w, tmp_path, no_weights):
    t = tmp_path / "t.jinja"
    t.write_text("{% for m in messages %}{{ m.content }}\n")
    fails(capsys, "train", w.base, "--data", w.data, "--chat-template", t, "-o", tmp_path / "o",
          expect="t.jinja is not valid Jinja (line 1: ", out=tmp_path / "o")


def test_csv_with_ragged_row(capsys, w, tmp_path, no_weights):
    d = tmp_path / "d.csv"
    d.write_text("instruction,output\nadd 1 1,2\nsay a, b,c\n")
    fails(capsys, "train", w.base, "--data", d, "-o", tmp_path / "o",
          expect="d.csv line 3 has 3 fields, its header has 2: quote the cells that contain commas", out=tmp_path / "o")


def test_corrupt_arrow(capsys, w, tmp_path, no_weights):
    bad = tmp_path / "d.arrow"
    bad.write_bytes(b"ARROW1\x00\x00" + os.urandom(200))
    fails(capsys, "train", w.base, "--data", bad, "-o", tmp_path / "o", expect="is not a readable arrow file", out=tmp_path / "o")


def test_dataset_folder_with_corrupt_shard(capsys, w, tmp_path, no_weights):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "a.jsonl").write_text(w.data.read_text())
    (folder / "b.jsonl").write_text("{not json\n")
    fails(capsys, "train", w.base, "--data", folder, "--epochs", "1", "-o", tmp_path / "o",
          expect="cannot read dataset", out=tmp_path / "o")


# ---- optional packages -----------------------------------------------------------------------------
def test_nf4_without_bitsandbytes(capsys, w, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    fails(capsys, "train", w.pruned, "--data", w.data, "-o", w.root / "o", "--steps", "1", "--quantize", "nf4",
          expect="needs bitsandbytes: pip install", out=w.root / "o")


def test_gguf_without_gguf_package(capsys, w, monkeypatch, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setitem(sys.modules, "gguf", None)
    fails(capsys, "prune", f, "-o", w.root / "o", expect="needs the gguf package: pip install gguf")


def test_corrupt_gguf(capsys, w, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(os.urandom(256))
    fails(capsys, "prune", f, "-o", w.root / "o", expect="cannot read the config of")


# ---- what the user sees ----------------------------------------------------------------------------
def test_debug_shows_the_traceback(w):
    with pytest.raises(LoramError, match="does not exist"):
        main(["--debug", "prune", str(w.root / "nope"), "-o", str(w.root / "o")])


def test_subprocess_one_line_no_traceback(w):
    """A real process: exit 2, stderr is the single error line, no traceback."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "loram", "recover", str(w.adapter), "--base", str(w.base2), "-o",
                        str(w.root / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error: base ") and "is not the model this adapter's plan was made from" in lines[-1]
    assert sum(x.startswith("error:") for x in lines) == 1


# ---- tampered adapter_config.json: one check (adapter.check_config) for every reader ------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """The adapter check must come before the (expensive) model load."""
    import loram.merge

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the adapter was checked")

    monkeypatch.setattr(loram.merge, "load_model", refuse)
    monkeypatch.setattr("loram.loading.load_pruned_model", refuse)


def test_adapter_config_rank_zero(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    edit_json(a / ADAPTER_CONFIG, r=0)
    fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="has r=0: the LoRA rank must be a positive integer")


def test_adapter_config_rank_string(capsys, w, tmp_path, no_model_load):
    a = copy(w.recovered, tmp_path / "R")
    edit_json(a / ADAPTER_CONFIG, r="4")
    fails(capsys, "merge", w.base, a, "-o", w.root / "o", expect="has r='4': the LoRA rank must be a positive integer")


def test_adapter_config_unknown_target_module(capsys, w, tmp_path, no_model_load):
    a = copy(w.recovered, tmp_path / "R")
    edit_json(a / ADAPTER_CONFIG, target_modules=["q_proj", "attn.c_proj"])
    fails(capsys, "generate", w.base, "--adapter", a, "--prompt", "hi", expect="(unknown module 'attn.c_proj')")


def test_adapter_config_invalid_json(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    (a / ADAPTER_CONFIG).write_text('{"r": 4, "lora_alpha": ')
    fails(capsys, "inspect", a, "-o", w.root / "o", expect="adapter_config.json is not valid JSON")


def test_adapter_config_alpha_differs_from_training(capsys, w, tmp_path, no_model_load):
    """loram_adapter.json records what `loram train` used; an edited lora_alpha silently rescales the update."""
    a = copy(w.recovered, tmp_path / "R")
    edit_json(a / ADAPTER_META, train={"rank": 4, "alpha": 8})
    edit_json(a / ADAPTER_CONFIG, lora_alpha=32)
    fails(capsys, "eval", w.base, "--adapter", a, "--ppl", f"d={w.data}",
          expect="has lora_alpha=32 but loram_adapter.json records 8 from training")


# ---- non-finite weights: importance scores would be NaN, and argsort still makes a plan of them --------
def _poison(base: Path, dst: Path, key: str, value: float) -> Path:
    from safetensors.torch import load_file, save_file

    b = copy(base, dst)
    sd = load_file(str(b / "model.safetensors"))
    sd[key][1, 2] = value
    save_file(sd, str(b / "model.safetensors"), metadata={"format": "pt"})
    return b


@pytest.mark.parametrize("method,value,what", [("magnitude", float("nan"), "NaN"), ("taylor", float("inf"), "inf"),
                                               ("magnitude --sparsity unstructured", float("nan"), "NaN")])
def test_prune_refuses_non_finite_weights(capsys, w, tmp_path, method, value, what):
    b = _poison(w.base, tmp_path / "b", "model.layers.1.mlp.up_proj.weight", value)
    out = tmp_path / "o"
    fails(capsys, "prune", b, "--method", *method.split(), "-o", out,
          expect=f"weight model.layers.1.mlp.up_proj.weight of the model contains {what} values")
    assert not out.exists()


# ---- loram prune --compensate ---------------------------------------------------------------------
@pytest.mark.parametrize("extra", [["--sparsity", "2:4"], ["--method", "sparsegpt"]])
def test_compensate_with_a_sparse_method(capsys, w, extra):
    fails(capsys, "prune", w.base, "-o", w.root / "o", "--compensate", *extra,
          expect="--compensate applies to structured pruning only", out=w.root / "o")


@pytest.mark.parametrize("extra, expect", [(["--compensate-damp", "0.1"], "--compensate-damp sets the --compensate refit"),
                                           (["--compensate", "--compensate-damp", "0"], "--compensate-damp")])
def test_compensate_damp_without_compensate_or_not_positive(capsys, w, extra, expect):
    fails(capsys, "prune", w.base, "-o", w.root / "o", *extra, expect=expect, out=w.root / "o")


# ---- align --distill: the teacher is checked from configs and headers, before anything loads ----------
@pytest.fixture
def no_teacher(monkeypatch, no_weights):
    import loram.loading

    def refuse(*a, **kw):
        raise AssertionError("the teacher was loaded before the error")

    monkeypatch.setattr(loram.loading, "load_model", refuse)


def distill_fails(capsys, w, tmp_path, *flags, expect: str, pruned=None) -> str:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the river runs to the sea\n" * 40)
    return fails(capsys, "align", pruned or w.pruned, "--data", corpus, "-o", tmp_path / "o", *flags, expect=expect,
                 out=tmp_path / "o")


def test_align_distill_flags_without_distill(capsys, w, tmp_path, no_teacher):
    distill_fails(capsys, w, tmp_path, "--distill-top-k", "4", expect="--distill-top-k only applies with --distill")


def test_align_distill_top_k_below_one(capsys, w, tmp_path, no_teacher):
    distill_fails(capsys, w, tmp_path, "--distill", "--distill-top-k", "0", expect="--distill-top-k")


def test_align_distill_top_k_above_vocab(capsys, w, tmp_path, no_teacher):
    distill_fails(capsys, w, tmp_path, "--distill", "--distill-top-k", "100000", expect="is more than the vocabulary (256 tokens)")


def test_align_distill_wrong_teacher(capsys, w, tmp_path, no_teacher):
    distill_fails(capsys, w, tmp_path, "--distill", "--teacher", w.base2, expect="is not the model the plan was made from")


def test_align_distill_teacher_vocab_mismatch(capsys, w, tmp_path, no_teacher):
    other = save_tiny(tmp_path / "small-vocab", "llama-gqa", vocab_size=200)
    distill_fails(capsys, w, tmp_path, "--distill", "--teacher", other, expect="has a vocabulary of 200 tokens, the pruned model 256")


def test_align_distill_plan_without_base(capsys, w, tmp_path, no_teacher):
    p = copy(w.pruned, tmp_path / "P")
    plan = json.loads((p / PLAN_FILE).read_text())
    plan["base"]["fingerprint"] = {}
    (p / PLAN_FILE).write_text(json.dumps(plan))
    distill_fails(capsys, w, tmp_path, "--distill", expect="records no base model fingerprint", pruned=p)


def test_align_distill_under_torchrun(capsys, w, tmp_path, no_teacher, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    distill_fails(capsys, w, tmp_path, "--distill", expect="runs the teacher pass in one process")


def test_align_distill_eval_name_clash(capsys, w, tmp_path, no_teacher):
    held = tmp_path / "h.txt"
    held.write_text("the sea runs to the river\n" * 40)
    distill_fails(capsys, w, tmp_path, "--distill", "--eval", f"h={held}", "--eval", f"h_kl={held}",
                  expect="--eval h_kl has the name --distill gives the KL of --eval h: rename it")


# ---- loram prune --allocate -----------------------------------------------------------------------
@pytest.mark.parametrize("extra, expect", [(["--method", "random"], "--allocate global ranks channel scores across layers and random"),
                                           (["--sparsity", "2:4"], "--allocate applies to structured pruning only"),
                                           (["--method", "sparsegpt"], "--allocate applies to structured pruning only")])
def test_allocate_global_needs_structured_scores(capsys, w, extra, expect):
    fails(capsys, "prune", w.base, "-o", w.root / "o", "--allocate", "global", *extra, expect=expect, out=w.root / "o")
