"""loram replaces only what loram wrote, one process writes an output at a time, and a full disk is
one line with nothing half-written left.

Every folder loram writes carries a marker (io.MARKER); --overwrite replaces a folder only if it
carries it (or is empty), and never one that is, contains or lies inside an input of the command,
or contains the current folder. Refusals come before anything is loaded. Each test is one row of the
reliability table in docs/reliability.md.
"""

import errno
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_errors import w  # noqa: F401  (the shared workspace fixture)

import loram.weights
from loram import io as lio
from loram.cli import main
from loram.errors import LoramError
from loram.training import CHECKPOINT_MARK


def fails(capsys, *argv, expect: str) -> str:
    """Run the CLI in-process: exit 2, exactly one stderr line `error: ...` containing ``expect``."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = re.findall(r"error: [^\r\n]*", err)  # a progress bar left open may precede it on its line
    assert rc == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert expect in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) with its bytes: 'untouched' means equal snapshots."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def arts(w):
    """test_errors' workspace: base, a pruned model, a pruned adapter and its recovered adapter (all written by loram)."""
    return w


# ---- --overwrite and the inputs ----------------------------------------------------------------------
def test_prune_into_the_parent_of_its_input_is_refused(capsys, tmp_path, tiny_dir):
    proj = tmp_path / "proj"
    base = proj / "models" / "base"
    shutil.copytree(tiny_dir, base)
    (proj / "notes.txt").write_text("mine")
    lio.write_marker(proj, "prune")  # even a folder loram once wrote is never replaced while it holds an input
    before = snapshot(proj)
    fails(capsys, "prune", base, "-o", proj, "--overwrite", "--method", "random", expect=f"contains the input {base}")
    assert snapshot(proj) == before


def test_merge_onto_its_base_is_refused(capsys, tmp_path, arts):
    base = tmp_path / "base"
    shutil.copytree(arts.base, base)
    lio.write_marker(base, "merge")
    before = snapshot(base)
    fails(capsys, "merge", base, arts.recovered, "-o", base, "--overwrite", expect=f"is the input {base}")
    assert snapshot(base) == before


def test_output_that_is_a_symlink_to_an_input_is_refused(capsys, tmp_path, arts):
    base = tmp_path / "base"
    shutil.copytree(arts.base, base)
    lio.write_marker(base, "merge")
    link = tmp_path / "link"
    link.symlink_to(base)
    before = snapshot(base)
    fails(capsys, "merge", base, arts.recovered, "-o", link, "--overwrite", expect=f"output {link} is the input {base}")
    assert snapshot(base) == before and link.is_symlink()


def test_output_inside_an_input_is_refused(capsys, tmp_path, arts):
    adapter = tmp_path / "A"
    shutil.copytree(arts.adapter, adapter)
    (adapter / "sub").mkdir()
    fails(capsys, "recover", adapter, "--base", arts.base, "-o", adapter / "sub", "--overwrite",
          expect=f"is inside the input {adapter}")


def test_train_overwrite_never_empties_a_user_checkpoint_dir(capsys, tmp_path, arts, alpaca_file):
    user = tmp_path / "mine"
    (user / "checkpoint-5").mkdir(parents=True)
    (user / "checkpoint-5" / "notes.txt").write_text("mine")
    (user / "thesis.tex").write_text("mine")
    before = snapshot(user)
    fails(capsys, "train", arts.pruned, "--data", alpaca_file, "-o", tmp_path / "out", "--checkpoint-dir", user, "--overwrite",
          "--steps", "1", expect=f"checkpoint folder {user} was not written by loram")
    assert snapshot(user) == before and not (tmp_path / "out").exists()


def test_output_dot_is_refused_with_no_leftovers(capsys, tmp_path, monkeypatch, tiny_dir):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("mine")
    lio.write_marker(work, "prune")  # the current folder is refused even when it carries the marker
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    fails(capsys, "prune", tiny_dir, "-o", ".", "--overwrite", "--method", "random", expect="is or contains the current folder")
    assert snapshot(tmp_path) == before  # no .old-*, .tmp-* or lock file anywhere


@pytest.mark.parametrize("state", ["user files", "marker", "empty"])
def test_overwrite_replaces_only_marked_or_empty_folders(capsys, tmp_path, arts, state):
    out = tmp_path / "out"
    out.mkdir()
    if state != "empty":
        (out / "keep.txt").write_text("mine")
    if state == "marker":
        lio.write_marker(out, "recover")
    argv = ["recover", arts.adapter, "--base", arts.base, "-o", out, "--overwrite"]
    if state == "user files":
        err = fails(capsys, *argv, expect=f"output {out} was not written by loram (no {lio.MARKER}")
        assert "delete it yourself" in err and (out / "keep.txt").read_text() == "mine"
        return
    assert main([str(a) for a in argv]) == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    marker = lio.read_json(out / lio.MARKER)
    assert marker["command"] == "recover" and marker["loram_version"] and marker["written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, temp or old folder left


# ---- loram run --------------------------------------------------------------------------------------
def _recipe(tmp_path, tiny_dir, alpaca_file, workdir, extra="merge: {}\n") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(f"base: {tiny_dir}\nworkdir: {workdir}\nprune: {{method: random, ratio: 0.5}}\n"
                 f"train: {{data: [\"{alpaca_file}\"], steps: 1, micro_batch: 2, seq_len: 64}}\n{extra}")
    return p


def test_recipe_refuses_a_user_folder_among_its_stage_outputs(capsys, tmp_path, tiny_dir, alpaca_file):
    w = tmp_path / "w"
    (w / "merged").mkdir(parents=True)
    (w / "merged" / "model.safetensors").write_text("the user's own merged model")
    recipe = _recipe(tmp_path, tiny_dir, alpaca_file, w)
    before = snapshot(tmp_path)
    fails(capsys, "run", recipe,
          expect=f"recipe stage output {w / 'merged'} was not written by loram")
    assert snapshot(tmp_path) == before  # refused before any stage ran: no pruned/, adapter/


def test_recipe_refuses_a_user_checkpoint_folder(capsys, tmp_path, tiny_dir, alpaca_file):
    w = tmp_path / "w"
    (w / "adapter-checkpoints").mkdir(parents=True)
    (w / "adapter-checkpoints" / "notes.txt").write_text("mine")
    recipe = _recipe(tmp_path, tiny_dir, alpaca_file, w, extra="")
    before = snapshot(tmp_path)
    fails(capsys, "run", recipe,
          expect=f"{w / 'adapter-checkpoints'} was not written by loram")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["root", "home", "holds the data"])
def test_recipe_refuses_a_workdir_it_cannot_own(capsys, tmp_path, monkeypatch, tiny_dir, alpaca_file, where):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    workdir = {"root": Path("/"), "home": home, "holds the data": alpaca_file.parent}[where]
    expect = {"root": "is /", "home": "is your home folder", "holds the data": f"contains the input {alpaca_file}"}[where]
    with pytest.raises(LoramError, match=expect):
        from loram.recipe import run_recipe

        run_recipe(_recipe(tmp_path, tiny_dir, alpaca_file, workdir), dry_run=True, echo=lambda *a: None)


def test_recipe_refuses_a_workdir_holding_its_anchor_or_calibration_rows(tmp_path, tiny_dir, alpaca_file):
    """train --anchor and recover --calibrate read files too: a workdir around them is refused like one around the data."""
    from loram.recipe import run_recipe

    w = tmp_path / "w"
    w.mkdir()
    general = w / "general.txt"
    general.write_text("general text the user keeps\n")
    for extra in (f"train: {{data: [\"{alpaca_file}\"], steps: 1, micro_batch: 2, seq_len: 64, anchor: {general}}}\n",
                  f"train: {{data: [\"{alpaca_file}\"], steps: 1, micro_batch: 2, seq_len: 64}}\nrecover: {{calibrate: {general}}}\n"):
        p = tmp_path / "r.yaml"
        p.write_text(f"base: {tiny_dir}\nworkdir: {w}\nprune: {{method: random, ratio: 0.5}}\n{extra}")
        with pytest.raises(LoramError, match=f"contains the input {general}"):
            run_recipe(p, dry_run=True, echo=lambda *a: None)
    assert general.read_text() == "general text the user keeps\n"


# ---- one writer per output ------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from loram.io import check_checkpoint_dir, check_output
    check_output(sys.argv[1], False)
    check_checkpoint_dir(sys.argv[2], False, False)
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_writer_refuses_at_once(capsys, tmp_path, arts, alpaca_file):
    """A first process holds -o and its checkpoint folder; a second refuses within a second, not after training."""
    out, ckpt = tmp_path / "A", tmp_path / "A-checkpoints"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(ckpt)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (["train", arts.pruned, "--data", alpaca_file, "-o", out, "--steps", "1"],
                     ["train", arts.pruned, "--data", alpaca_file, "-o", tmp_path / "B", "--checkpoint-dir", ckpt, "--steps", "1"],
                     ["recover", arts.adapter, "--base", arts.base, "-o", out]):
            t0 = time.time()
            fails(capsys, *argv, expect=f"is being written by another loram process (pid {holder.pid}): wait for it or choose another")
            assert time.time() - t0 < 1.0
        assert not out.exists() and not (tmp_path / "B").exists()
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process: no stale lock blocks the next run
    assert main(["recover", str(arts.adapter), "--base", str(arts.base), "-o", str(out)]) == 0


# ---- disk full ----------------------------------------------------------------------------------------
def _full_disk(monkeypatch, when=lambda path: True, kind="oserror"):
    """Make every safetensors writer fail as a full disk does: a partial file, then the error."""
    import peft.peft_model
    import safetensors.torch
    import transformers.modeling_utils
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def save_file(tensors, filename, *a, **k):
        if not when(str(filename)):
            return real(tensors, filename, *a, **k)
        Path(filename).write_bytes(b"\0" * 4096)
        if kind == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)

    real_stream = loram.weights._write_streamed

    def write_streamed(path, header, chunks):  # ShardWriter.stream (merge): the OS error a full disk gives
        if not when(str(path)):
            return real_stream(path, header, chunks)
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(loram.weights, "_write_streamed", write_streamed)


@pytest.mark.parametrize("cmd,kind", [("prune", "safetensors"), ("recover", "oserror"), ("merge", "safetensors"),
                                      ("train", "oserror")])
def test_disk_full_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch, arts, alpaca_file, cmd, kind):
    out = tmp_path / "out"
    argv = {"prune": ["prune", arts.base, "--method", "random"], "recover": ["recover", arts.adapter, "--base", arts.base],
            "merge": ["merge", arts.base, arts.recovered],
            "train": ["train", arts.pruned, "--data", alpaca_file, "--steps", "1", "--micro-batch", "2", "--seq-len", "64"]}[cmd]
    _full_disk(monkeypatch, kind=kind)
    err = fails(capsys, *argv, "-o", out, expect=f"disk full while writing {out}")
    assert " free, the output needs more than " in err and "free space on that disk" in err
    if cmd == "train":
        assert "no checkpoint was saved, the training is lost" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, temp folder, lock or checkpoint folder


def test_disk_full_at_a_checkpoint_keeps_the_last_good_one(capsys, tmp_path, monkeypatch, arts, alpaca_file):
    out, ckpt = tmp_path / "A", tmp_path / "A-checkpoints"
    _full_disk(monkeypatch, when=lambda path: "checkpoint-2" in path)
    err = fails(capsys, "train", arts.pruned, "--data", alpaca_file, "-o", out, "--steps", "3", "--save-steps", "1",
                "--micro-batch", "2", "--seq-len", "64",
                expect=f"disk full while writing {ckpt}")
    assert f"the last good checkpoint {ckpt / 'checkpoint-1'} is kept: continue with --resume" in err
    assert (ckpt / "checkpoint-1" / CHECKPOINT_MARK).exists() and not (ckpt / "checkpoint-2").exists()
    assert not out.exists()


def test_disk_full_at_the_final_save_names_the_checkpoint_to_resume(capsys, tmp_path, monkeypatch, arts, alpaca_file):
    out, ckpt = tmp_path / "A", tmp_path / "A-checkpoints"
    _full_disk(monkeypatch, when=lambda path: ".A.tmp-" in path)
    err = fails(capsys, "train", arts.pruned, "--data", alpaca_file, "-o", out, "--steps", "2", "--save-steps", "2",
                "--micro-batch", "2", "--seq-len", "64", expect=f"disk full while writing {out}")
    assert f"the last good checkpoint {ckpt / 'checkpoint-2'} is kept" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".A.")]


def test_disk_full_anywhere_else_is_one_line(capsys, tmp_path, monkeypatch, arts):
    """A full disk inside `inspect`'s atomic folder names the folder and leaves nothing; a full disk anywhere
    outside the atomic writers (here a verb's own write) is the same one line from the CLI, not a traceback."""
    import loram.cli.plan
    import loram.inspect_adapter

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(loram.inspect_adapter, "write_json", full)
    out = tmp_path / "norms"
    err = fails(capsys, "inspect", arts.recovered, "-o", out, "--no-plots", expect=f"disk full while writing {out}")
    assert "free space on that disk" in err and not out.exists()
    monkeypatch.setattr(loram.cli.plan, "run", lambda a: full(tmp_path / "report.json"))
    err = fails(capsys, "plan", "smollm2", expect=f"disk full while writing {tmp_path / 'report.json'}")
    assert "free space on that disk" in err
