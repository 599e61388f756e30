"""Issue 13 (items 4, 7, 10 and three message cases): plans bound to their weights, one validating
plan loader, safetensors headers checked before use, tensors stored twice, --verify-base full.

Each test is a row of the reliability table in docs/reliability.md (messages via ``fails`` from test_errors).
"""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from test_errors import copy, edit_json, fails, make_pruned_adapter, w  # noqa: F401  (w: test_errors's workspace fixture)

from loram.adapter import ADAPTER_META, ADAPTER_WEIGHTS
from loram.cli import main
from loram.errors import LoramError
from loram.families import ROLES, geometry
from loram.prune_plan import META_PLAN_DIGEST, META_PLAN_ID, PLAN_FILE, PrunePlan
from loram.weights import safetensors_files, safetensors_metadata


def header(f: Path) -> dict:
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def patch_header(f: Path, fn) -> None:
    """Rewrite the JSON header of ``f`` in place (tensor bytes untouched); ``fn`` edits the dict."""
    from loram.weights import write_safetensors_metadata

    write_safetensors_metadata(f, f, {})  # normalise (our writer), then edit the dict by hand
    b = f.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    h = json.loads(b[8 : 8 + n])
    fn(h)
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b[8 + n :])


def strip_binding(f: Path) -> None:
    """The file as a loram without plan binding wrote it: no loram_* metadata."""
    patch_header(f, lambda h: h.__setitem__("__metadata__", {"format": "pt"}))


def swap_plan(folder: Path, other: Path) -> None:
    shutil.copy(other / PLAN_FILE, folder / PLAN_FILE)


# ---- item 4: a plan is bound to the weights it describes --------------------------------------------
def test_same_widths_premise(w):
    """P and P2 differ in kept indices but not in any shape: only the binding can tell them apart."""
    a, b = PrunePlan.load(w.pruned), PrunePlan.load(w.pruned2)
    g = geometry(a.base_config())
    assert a.pruned != b.pruned and a.weights_digest() != b.weights_digest()
    assert all(a.pruned_dim(i, r, g) == b.pruned_dim(i, r, g) for i in range(g.n_layers) for r in ROLES)


def test_writers_bind_plan(w, tmp_path):
    """prune, build, import-plan, merge (pruned base) and the adapter all record the plan's binding."""
    from loram.build import write_pruned
    from loram.import_plan import import_structured
    from loram.merge import merge

    plan = PrunePlan.load(w.pruned)
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps({"pruned": plan.to_dict()["pruned"]}))
    imported = import_structured(w.pruned, w.base, kept, tmp_path / "I")
    write_pruned(None, plan, w.base, tmp_path / "B")
    merge(w.pruned, w.adapter, tmp_path / "M")
    for folder, p in ((w.pruned, plan), (tmp_path / "B", plan), (tmp_path / "M", plan), (tmp_path / "I", imported)):
        for f in safetensors_files(folder):
            meta = safetensors_metadata(f)
            assert meta[META_PLAN_DIGEST] == p.weights_digest() and meta[META_PLAN_ID] == p.id, (folder, meta)
    assert safetensors_metadata(w.adapter / ADAPTER_WEIGHTS)[META_PLAN_DIGEST] == plan.weights_digest()


def test_swapped_plan_refused_by_loader(w, tmp_path):
    from loram.loading import load_pruned

    p = copy(w.pruned, tmp_path / "P")
    swap_plan(p, w.pruned2)
    with pytest.raises(LoramError, match="loram_plan.json does not describe the weights in"):
        load_pruned(p)


@pytest.mark.parametrize("cmd", ["train", "merge", "generate"])
def test_swapped_plan_of_same_widths(capsys, w, tmp_path, cmd):
    p = copy(w.pruned, tmp_path / "P")
    swap_plan(p, w.pruned2)
    out = tmp_path / "o"
    argv = {"train": ["train", p, "--data", w.data, "--steps", "1", "-o", out],
            "merge": ["merge", p, w.adapter, "-o", out],
            "generate": ["generate", p, "--prompt", "hi"]}[cmd]
    msg = fails(capsys, *argv, expect="loram_plan.json does not describe the weights in",
                out=out if cmd != "generate" else None)
    assert PrunePlan.load(w.pruned2).id in msg and PrunePlan.load(w.pruned).id in msg


def test_adapter_with_swapped_plan_of_same_widths(capsys, w, tmp_path):
    """The adapter's plan file and its loram_adapter.json both say P2; its weights were trained on P."""
    a = copy(w.adapter, tmp_path / "A")
    swap_plan(a, w.pruned2)
    edit_json(a / ADAPTER_META, plan_id=PrunePlan.load(w.pruned2).id)
    fails(capsys, "recover", a, "--base", w.base, "-o", tmp_path / "o", out=tmp_path / "o",
          expect="loram_plan.json does not describe the weights in")


def test_shards_with_different_plans(capsys, w, tmp_path):
    p = copy(w.pruned, tmp_path / "P")
    from loram.weights import write_safetensors_metadata

    write_safetensors_metadata(p / "model.safetensors", p / "model.safetensors", {META_PLAN_DIGEST: "0" * 16})
    fails(capsys, "generate", p, "--prompt", "hi", expect="loram_plan.json does not describe the weights in")


def test_legacy_folder_loads_with_warning(capsys, w, tmp_path):
    """Folders written before the binding (no metadata) still load, with one warning naming the risk."""
    from loram.loading import load_pruned

    p = copy(w.pruned, tmp_path / "P")
    strip_binding(p / "model.safetensors")
    capsys.readouterr()
    model = load_pruned(p)
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "cannot check that its loram_plan.json belongs to them" in warnings[0], err
    ref = load_pruned(w.pruned)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_legacy_adapter_recovers_with_warning(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    strip_binding(a / ADAPTER_WEIGHTS)
    capsys.readouterr()
    assert main([ "recover", str(a), "--base", str(w.base), "-o", str(tmp_path / "R")]) == 0
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("warning:")] == [
        f"warning: the weights in {a} record no plan (written by an older loram): loram cannot check that its "
        "loram_plan.json belongs to them; re-train it with `loram train` to bind them"]


def test_align_keeps_binding(w):
    """`loram align` changes only the plan's extra: its id and digest, hence the binding, are unchanged."""
    plan = PrunePlan.load(w.pruned)
    plan.extra = dict(plan.extra, aligned={"steps": 3})
    assert plan.metadata() == PrunePlan.load(w.pruned).metadata()


# ---- item 7: header dtypes and shapes checked before use ---------------------------------------------
def _i32(name):
    def fn(h):
        assert h[name]["dtype"] == "F32"
        h[name]["dtype"] = "I32"  # same byte size: the bytes would be read as integers
    return fn


def test_i32_header_in_pruned_folder(capsys, w, tmp_path):
    p = copy(w.pruned, tmp_path / "P")
    patch_header(p / "model.safetensors", _i32("model.layers.2.mlp.up_proj.weight"))
    fails(capsys, "generate", p, "--prompt", "hi", expect="model.layers.2.mlp.up_proj.weight in")
    msg = fails(capsys, "generate", p, "--prompt", "hi", expect="is stored as I32, not a float type")
    assert "re-create or re-download it" in msg


def test_i32_header_in_base(capsys, w, tmp_path):
    b = copy(w.base, tmp_path / "b")
    patch_header(b / "model.safetensors", _i32("model.layers.0.self_attn.q_proj.weight"))
    fails(capsys, "prune", b, "-o", tmp_path / "o", expect="is stored as I32, not a float type", out=tmp_path / "o")
    fails(capsys, "recover", w.adapter, "--base", b, "-o", tmp_path / "o", expect="is stored as I32, not a float type")


def test_i32_header_in_checkpoint_for_build(w, tmp_path):
    from loram.weights import Weights

    b = copy(w.base, tmp_path / "b")
    patch_header(b / "model.safetensors", _i32("model.norm.weight"))
    with pytest.raises(LoramError, match="is stored as I32"):
        Weights(b, use_index=True)


# ---- a tensor stored twice across shards -------------------------------------------------------------
def _add_stale_shard(folder: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    src = safetensors_files(folder)[0]
    save_file({name: load_file(str(src))[name]}, str(folder / "model-stale.safetensors"), metadata={"format": "pt"})


def test_tensor_twice_in_base(capsys, w, tmp_path):
    b = copy(w.base, tmp_path / "b")
    _add_stale_shard(b, "model.layers.1.mlp.down_proj.weight")
    fails(capsys, "prune", b, "-o", tmp_path / "o", out=tmp_path / "o",
          expect="tensor model.layers.1.mlp.down_proj.weight is stored twice, in model-stale.safetensors and model.safetensors")
    fails(capsys, "recover", w.adapter, "--base", b, "-o", tmp_path / "o", expect="is stored twice")


def test_tensor_twice_in_pruned_folder(capsys, w, tmp_path):
    p = copy(w.pruned, tmp_path / "P")
    _add_stale_shard(p, "model.norm.weight")
    fails(capsys, "generate", p, "--prompt", "hi", expect="is stored twice")


def test_index_disagrees_with_shards(w, tmp_path):
    """build's weight reader trusts the index only where the shards' headers agree with it."""
    from loram.weights import Weights

    b = copy(w.base, tmp_path / "b")
    (b / "model.safetensors").rename(b / "model-00001-of-00001.safetensors")
    names = list(header(b / "model-00001-of-00001.safetensors"))
    wm = {k: "model-00001-of-00001.safetensors" for k in names if k != "__metadata__"}
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(b / "model-00002-of-00002.safetensors"))
    wm["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (b / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(LoramError, match="puts model.norm.weight in model-00002-of-00002.safetensors, which does not hold it"):
        Weights(b, use_index=True)


# ---- item 10: one plan loader validates every field ------------------------------------------------
def _edit_plan(d: dict, case: str) -> None:
    first = sorted(d["pruned"], key=int)[0]
    lp = d["pruned"][first]
    if case == "layer beyond the model":
        d["pruned"]["9"] = lp
    elif case == "layers beyond the model":
        d["layers"] = [d["layers"][0], 9]
    elif case == "layer key x":
        d["pruned"]["x"] = d["pruned"].pop(first)
    elif case == "float indices":
        lp["mlp_keep"] = [i + 0.5 for i in lp["mlp_keep"]]
    elif case == "unsorted indices":
        lp["mlp_keep"] = lp["mlp_keep"][::-1]
    elif case == "duplicate indices":
        lp["mlp_keep"] = [lp["mlp_keep"][0]] + lp["mlp_keep"][:-1]
    elif case == "index out of range":
        lp["mlp_keep"] = lp["mlp_keep"][:-1] + [80]
    elif case == "kv index out of range":
        lp["kv_keep"] = [0, 5]
    elif case == "boolean index":
        lp["kv_keep"] = [True]
    elif case == "unknown method":
        d["method"] = "psychic"
    elif case == "unknown kind":
        d["kind"] = "dense"
    elif case == "ratio out of range":
        d["mlp_ratio"] = 1.5
    elif case == "layers not a range":
        d["layers"] = "1:4"
    elif case == "unknown layer field":
        lp["q_keep"] = [0]
    else:
        raise AssertionError(case)


PLAN_CASES = {
    "layer beyond the model": "plan prunes layer 9 outside its range 1:4 (the model has 6 layers)",
    "layers beyond the model": "plan layers 1:9 do not fit the model's 6 layers",
    "layer key x": 'pruned layer key "x" is not a layer number',
    "float indices": "not a non-empty list of integer indices",
    "unsorted indices": "not in increasing order without repeats",
    "duplicate indices": "not in increasing order without repeats",
    "index out of range": "mlp_keep is not a sorted set of indices in [0, 80)",
    "kv index out of range": "kv_keep is not a sorted set of indices in [0, 3)",
    "boolean index": "not a non-empty list of integer indices",
    "unknown method": 'field method is "psychic", not one of random, magnitude, taylor, fisher, wanda-sp, sparsegpt, wanda, imported',
    "unknown kind": 'field kind is "dense", not one of structured, sparse',
    "ratio out of range": "field mlp_ratio is 1.5, not a number in [0, 1)",
    "layers not a range": "field layers is \"1:4\", not [START, END]",
    "unknown layer field": "field pruned.1 has unknown entries q_keep (a layer has only mlp_keep and kv_keep)",
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_bad_plan_refused_by_recover(capsys, w, tmp_path, case):
    a = copy(w.adapter, tmp_path / "A")
    d = json.loads((a / PLAN_FILE).read_text())
    _edit_plan(d, case)
    (a / PLAN_FILE).write_text(json.dumps(d))
    msg = fails(capsys, "recover", a, "--base", w.base, "-o", tmp_path / "o", expect=PLAN_CASES[case], out=tmp_path / "o")
    assert str(a / PLAN_FILE) in msg and "the plan file is corrupt, re-create it with `loram prune`" in msg


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_bad_plan_refused_by_loader(w, case):
    d = json.loads((w.pruned / PLAN_FILE).read_text())
    _edit_plan(d, case)
    with pytest.raises(LoramError, match=__import__("re").escape(PLAN_CASES[case])):
        PrunePlan.from_dict(d)


def test_plan_methods_cover_prune_methods():
    """plan.METHODS lists every method a writer can record (so no valid plan is refused)."""
    from loram.prune.sparse import METHODS as SPARSE
    from loram.prune.structured import METHODS as STRUCTURED
    from loram.prune_plan import METHODS

    assert set(STRUCTURED) | set(SPARSE) | {"imported"} == set(METHODS)


# ---- --verify-base full ------------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    """loram's digest cache in a temporary $XDG_CACHE_HOME (never the user's)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "loram" / "full-digests.json"


def _flip_unsampled_byte(folder: Path, name: str = "model.layers.2.mlp.up_proj.weight") -> None:
    """Change one byte of row 1 of ``name`` (the fingerprint samples rows 0, n/8, 2n/8, ...)."""
    from loram.fingerprint import _sample_rows

    f = folder / "model.safetensors"
    h = header(f)
    rows, cols = h[name]["shape"]
    assert 1 not in _sample_rows(rows)
    b = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", b[:8])
    at = 8 + n + h[name]["data_offsets"][0] + 1 * cols * 4 + 3  # row 1, column 0, the float's high byte
    b[at] ^= 0x01
    f.write_bytes(bytes(b))


def test_verify_base_full(capsys, w, tmp_path, cache):
    from loram.fingerprint import same_model
    from loram.prune import base_fingerprint, prune

    b = copy(w.base, tmp_path / "B")
    p = Path(prune(str(b), tmp_path / "P", method="random", ratio=0.5, verify_base="full").out)
    fp = PrunePlan.load(p).base["fingerprint"]
    assert len(fp["full"]) == 32 and fp["id"] == PrunePlan.load(w.pruned).base["fingerprint"]["id"]
    a = make_pruned_adapter(p, tmp_path / "A")
    assert main(["recover", str(a), "--base", str(b), "-o", str(tmp_path / "R1"), "--verify-base", "full"]) == 0

    b2 = copy(w.base, tmp_path / "B2")
    _flip_unsampled_byte(b2)
    assert same_model(fp, base_fingerprint(b2))  # the sampled fingerprint cannot see the change ...
    assert main(["recover", str(a), "--base", str(b2), "-o", str(tmp_path / "R2")]) == 0
    fails(capsys, "recover", a, "--base", b2, "-o", tmp_path / "R3", "--verify-base", "full", out=tmp_path / "R3",
          expect=f"base {b2} is not byte for byte the model this adapter's plan was made from")  # ... the full digest can
    # the recovered adapter carries the full digest on to merge
    fails(capsys, "merge", b2, tmp_path / "R1", "-o", tmp_path / "M", "--verify-base", "full", out=tmp_path / "M",
          expect="was recovered for (full digest")
    assert main(["merge", str(b), str(tmp_path / "R1"), "-o", str(tmp_path / "M"), "--verify-base", "full"]) == 0
    fails(capsys, "generate", b2, "--adapter", tmp_path / "R1", "--prompt", "hi", "--verify-base", "full",
          expect="was recovered for (full digest")
    fails(capsys, "generate", p, "--prompt", "hi", "--verify-base", "full",
          expect="--verify-base full checks an original base against a recovered adapter")


def test_verify_base_full_uses_cache(w, tmp_path, cache, monkeypatch):
    import loram.fingerprint as fpm

    files = safetensors_files(copy(w.base, tmp_path / "B"))
    calls = []
    real = fpm.file_sha256
    monkeypatch.setattr(fpm, "file_sha256", lambda f: calls.append(f) or real(f))
    first = fpm.full_digest(files)
    assert len(calls) == len(files) and cache.exists()
    assert str(files[0].resolve()) in json.loads(cache.read_text())
    assert fpm.full_digest(files) == first and len(calls) == len(files)  # second time: from the cache
    _flip_unsampled_byte(files[0].parent)  # rewritten: new mtime (and here new bytes), so hashed again
    assert fpm.full_digest(files) != first and len(calls) == 2 * len(files)


def test_verify_base_full_needs_recorded_digest(capsys, w, tmp_path, cache):
    fails(capsys, "recover", w.adapter, "--base", w.base, "-o", tmp_path / "o", "--verify-base", "full",
          expect="records no full digest of its base (it was made without --verify-base full)", out=tmp_path / "o")


def test_i32_header_in_adapter(capsys, w, tmp_path):
    a = copy(w.adapter, tmp_path / "A")
    patch_header(a / ADAPTER_WEIGHTS, _i32("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"))
    fails(capsys, "recover", a, "--base", w.base, "-o", tmp_path / "o", expect="is stored as I32, not a float type")
