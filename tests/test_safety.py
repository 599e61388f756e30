"""Safe loading: loram reads safetensors, GGUF and JSON only, never runs code from a model folder.

* the source has no torch.load / pickle / trust_remote_code=True (checked on code tokens, so the
  words may still appear in messages and docstrings);
* .bin / .pt inputs are refused with the conversion hint;
* a model folder that ships its own modeling code (config auto_map) never gets that code run;
* a whole prune -> recover -> merge -> generate chain runs with torch.load and pickle.load disabled;
* transformers' Trainer, which loram uses for --resume on its *own* checkpoints, only calls
  torch.load with weights_only=True.
"""

import io
import json
import re
import shutil
import tokenize
from pathlib import Path

import pytest
from test_errors import fails, make_pruned_adapter

import loram

SRC = Path(loram.__file__).resolve().parent
FORBIDDEN = {
    "torch.load": re.compile(r"\btorch\.load\("),
    "pickle": re.compile(r"\b(import(pickle|cPickle|dill|cloudpickle)|frompickleimport|pickle\.loads?\(|joblib\.load\()"),
    "trust_remote_code=True": re.compile(r"trust_remote_code=True"),
    "weights_only=False": re.compile(r"weights_only=False"),
    "allow_pickle=True": re.compile(r"allow_pickle=True"),
}

# literal text (strings, f-string text on 3.12+) and comments may mention the words; code may not
SKIP_TOKENS = {"STRING", "FSTRING_MIDDLE", "FSTRING_START", "FSTRING_END", "COMMENT", "NL", "NEWLINE", "INDENT",
               "DEDENT", "ENDMARKER"}


def code_without_strings(path: Path) -> list[tuple[int, str]]:
    """(line number, code of that line with strings and comments removed, tokens joined without spaces)."""
    lines: dict[int, list[str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tokenize.tok_name[tok.type] in SKIP_TOKENS:
            continue
        lines.setdefault(tok.start[0], []).append(tok.string)
    return [(n, "".join(t)) for n, t in sorted(lines.items())]


def test_source_has_no_unsafe_loading():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    found = []
    for f in files:
        for n, code in code_without_strings(f):
            found += [f"{f.relative_to(SRC)}:{n}: {name}" for name, rx in FORBIDDEN.items() if rx.search(code)]
    assert not found, "unsafe loading in src/: " + "; ".join(found)


def test_the_scan_sees_real_code(tmp_path):
    """The scanner flags code but not strings or comments (so the test above cannot pass vacuously)."""
    f = tmp_path / "x.py"
    f.write_text('import pickle\nx = torch.load(p)\n# torch.load(p) in a comment\nmsg = "never torch.load(p)"\n'
                 "m = Auto.from_pretrained(p, trust_remote_code = True)\n")
    hits = [name for _, code in code_without_strings(f) for name, rx in FORBIDDEN.items() if rx.search(code)]
    assert sorted(hits) == ["pickle", "torch.load", "trust_remote_code=True"]


# ---- pickle inputs are refused ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def w(tmp_path_factory, tiny_dir):
    from loram.prune import prune

    root = tmp_path_factory.mktemp("safety")
    ns = type("W", (), {})()
    ns.root, ns.base = root, tiny_dir
    ns.pruned = Path(prune(str(tiny_dir), root / "P", method="random").out)
    ns.adapter = make_pruned_adapter(ns.pruned, root / "A")
    return ns


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth", ".ckpt"])
def test_pickle_model_file_refused(capsys, w, suffix):
    f = w.root / f"model{suffix}"
    f.write_bytes(b"\x80\x04not really a pickle")
    fails(capsys, "prune", f, "-o", w.root / "o", expect="is a pickle checkpoint, which loram never loads")


def test_pickle_model_folder_refused(capsys, w, tmp_path):
    shutil.copy(w.base / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    msg = fails(capsys, "prune", tmp_path, "-o", w.root / "o", expect="has only pickle weights (.bin/.pt)")
    assert "save_pretrained(safe_serialization=True)" in msg  # the conversion hint


def test_pickle_adapter_refused(capsys, w, tmp_path):
    a = shutil.copytree(w.adapter, tmp_path / "A")
    (a / "adapter_model.safetensors").rename(a / "adapter_model.bin")
    msg = fails(capsys, "recover", a, "--base", w.base, "-o", w.root / "o", expect="holds a pickle adapter (adapter_model.bin)")
    assert "safe_serialization=True" in msg


# ---- no remote code, no torch.load at run time ---------------------------------------------------------
def test_model_folder_code_is_never_run(capsys, w, tmp_path):
    """A folder whose config points at its own modeling file (auto_map): the file is never imported."""
    m = shutil.copytree(w.base, tmp_path / "m")
    marker = tmp_path / "RAN"
    (m / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                        "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
    (m / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                             "from transformers import LlamaConfig as EvilConfig\n")
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (m / "config.json").write_text(json.dumps(cfg))
    from loram.cli import main

    rc = main(["prune", str(m), "-o", str(tmp_path / "o"), "--method", "random"])
    assert not marker.exists(), "loram ran code shipped in a model folder"
    assert rc == 0  # the architecture is a stock one (llama): it loads with transformers' own code


def test_whole_chain_runs_without_torch_load_or_pickle(monkeypatch, w, tmp_path):
    import pickle

    import torch

    from loram.merge import generate, merge
    from loram.recover import recover

    def refuse(*a, **k):
        raise AssertionError("torch.load / pickle.load called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    r = recover(w.adapter, w.base, tmp_path / "R")
    merge(w.base, r, tmp_path / "M")
    generate(tmp_path / "M", "hi", max_new_tokens=2)
    generate(w.pruned, "hi", adapter=w.adapter, max_new_tokens=2)


def test_trainer_resume_uses_weights_only():
    """`loram train --resume` lets transformers' Trainer reload optimizer / scheduler / RNG states
    (torch pickles) from checkpoints loram itself wrote. Check that every torch.load there is
    weights_only=True (no arbitrary code even if a checkpoint were tampered with)."""
    import transformers.trainer as trainer_mod

    src = Path(trainer_mod.__file__).read_text()
    calls = [m.start() for m in re.finditer(r"torch\.load\(", src)]
    assert calls, "transformers changed how Trainer resumes: re-check this test"
    for start in calls:
        depth, i = 0, src.index("(", start)
        for j in range(i, len(src)):
            depth += {"(": 1, ")": -1}.get(src[j], 0)
            if depth == 0:
                break
        assert "weights_only=True" in src[start:j], src[start:j + 1]
