"""The memory budget (loram.budget): --max-memory, cgroup v2 / v1 limits, MemAvailable; when to stream.

The cgroup and /proc files are read under an injectable root, so each case builds the tree a
kernel would show in tmp_path. One test runs a real process under /work/shared/tools/memcap (a
cgroup v1 hard cap) when that tool works here, and checks the process sees the cap as its budget.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loram.budget import SAFETY_MARGIN, V1_UNLIMITED, Budget, choose_streaming, memory_budget, physical_memory
from loram.errors import LoramError

GiB = 1 << 30
MEMCAP = Path(os.environ.get("LORAM_MEMCAP", "/work/shared/tools/memcap"))


def fake(root: Path, cgroup: str | None = None, meminfo_kb: int | None = 64 * 1024 * 1024, files: dict | None = None) -> Path:
    """A fake / with /proc/self/cgroup (``cgroup``: its text), /proc/meminfo and the given /sys files."""
    (root / "proc/self").mkdir(parents=True)
    if cgroup is not None:
        (root / "proc/self/cgroup").write_text(cgroup)
    if meminfo_kb is not None:
        (root / "proc/meminfo").write_text(f"MemTotal:       99999999 kB\nMemFree:  1 kB\nMemAvailable:   {meminfo_kb} kB\n")
    for rel, text in (files or {}).items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


V2 = "0::/user.slice/job\n"
V1 = "12:pids:/\n4:memory:/batch/job\n1:cpu,cpuacct:/\n0::/\n"


def test_cgroup_v2_limit_less_working_set(tmp_path):
    """memory.max - (memory.current - inactive_file): the reclaimable page cache is not taken from the budget."""
    job = "sys/fs/cgroup/user.slice/job/"
    root = fake(tmp_path, V2, files={job + "memory.max": f"{4 * GiB}\n", job + "memory.current": f"{GiB}\n",
                                     job + "memory.stat": f"anon 100\nfile {GiB // 2}\ninactive_file {GiB // 4}\nactive_file 9\n",
                                     "sys/fs/cgroup/user.slice/memory.max": "max\n"})
    assert memory_budget(root=root) == Budget(4 * GiB - (GiB - GiB // 4), "cgroup v2 memory.max")


def test_cgroup_v2_tightest_ancestor_counts(tmp_path):
    """No limit on the job's own group ("max") but one on its parent: the parent's headroom is the budget."""
    root = fake(tmp_path, V2, files={"sys/fs/cgroup/user.slice/job/memory.max": "max\n",
                                     "sys/fs/cgroup/user.slice/job/memory.current": f"{GiB}\n",
                                     "sys/fs/cgroup/user.slice/memory.max": f"{3 * GiB}\n",
                                     "sys/fs/cgroup/user.slice/memory.current": f"{2 * GiB}\n"})
    assert memory_budget(root=root) == Budget(GiB, "cgroup v2 memory.max")


def test_cgroup_v1_limit(tmp_path):
    job = "sys/fs/cgroup/memory/batch/job/"
    root = fake(tmp_path, V1, files={job + "memory.limit_in_bytes": f"{6 * GiB}\n", job + "memory.usage_in_bytes": f"{2 * GiB}\n",
                                     job + "memory.stat": f"cache 5\ninactive_file 7\ntotal_inactive_file {GiB}\n",
                                     "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"})
    # total_inactive_file (hierarchical) is preferred over the group's own inactive_file
    assert memory_budget(root=root) == Budget(6 * GiB - GiB, "cgroup v1 memory.limit_in_bytes")


def test_cgroup_v1_unlimited_falls_back_to_memavailable(tmp_path):
    """v1 writes "no limit" as 9223372036854771712: the budget is then MemAvailable."""
    job = "sys/fs/cgroup/memory/batch/job/"
    root = fake(tmp_path, V1, meminfo_kb=5 * 1024 * 1024,
                files={job + "memory.limit_in_bytes": "9223372036854771712\n", job + "memory.usage_in_bytes": "123\n"})
    assert 9223372036854771712 >= V1_UNLIMITED
    assert memory_budget(root=root) == Budget(5 * GiB, "MemAvailable")


def test_container_path_outside_the_mount_uses_the_mount_root(tmp_path):
    """In a container without a cgroup namespace /proc/self/cgroup names the host's path while the mount
    shows the container's own group as its root: that root's limit is the one that applies."""
    root = fake(tmp_path, "4:memory:/docker/0123abcd\n", files={
        "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{2 * GiB}\n", "sys/fs/cgroup/memory/memory.usage_in_bytes": "0\n"})
    assert memory_budget(root=root) == Budget(2 * GiB, "cgroup v1 memory.limit_in_bytes")


def test_memavailable_caps_a_larger_limit(tmp_path):
    """A cgroup limit above the machine's free memory does not make that memory exist."""
    job = "sys/fs/cgroup/user.slice/job/"
    root = fake(tmp_path, V2, meminfo_kb=1024 * 1024, files={job + "memory.max": f"{8 * GiB}\n", job + "memory.current": "0\n"})
    assert memory_budget(root=root) == Budget(GiB, "MemAvailable")


def test_usage_above_the_limit_leaves_nothing(tmp_path):
    job = "sys/fs/cgroup/user.slice/job/"
    root = fake(tmp_path, V2, files={job + "memory.max": f"{GiB}\n", job + "memory.current": f"{2 * GiB}\n"})
    assert memory_budget(root=root) == Budget(0, "cgroup v2 memory.max")


def test_max_memory_wins_over_the_cgroup(tmp_path):
    job = "sys/fs/cgroup/user.slice/job/"
    root = fake(tmp_path, V2, files={job + "memory.max": f"{GiB}\n", job + "memory.current": "0\n"})
    assert memory_budget(12, root=root) == Budget(12_000_000_000, "--max-memory 12")
    assert memory_budget(0.5, root=root) == Budget(500_000_000, "--max-memory 0.5")


@pytest.mark.parametrize("value, message", [
    (0, "--max-memory 0 is out of range: use a number > 0"),
    (-3, "--max-memory -3 is out of range: use a number > 0"),
    (float("nan"), "--max-memory nan is not a finite number: use a number > 0"),
])
def test_max_memory_is_checked_like_the_flag(value, message):
    with pytest.raises(LoramError) as e:
        memory_budget(value, root="/nonexistent")
    assert str(e.value) == message


def test_nothing_readable_asks_for_max_memory(tmp_path):
    root = fake(tmp_path, None, meminfo_kb=None)
    with pytest.raises(LoramError, match=r"cannot tell how much memory is free .*: pass --max-memory GB$"):
        memory_budget(root=root)


SOURCES = ("MemAvailable", "cgroup v2 memory.max", "cgroup v1 memory.limit_in_bytes", "physical memory")


def test_this_machine_has_a_budget():
    b = memory_budget()
    assert b.bytes > 0 and b.source in SOURCES
    total = physical_memory()  # the fallback where /proc/meminfo has no MemAvailable (macOS)
    assert total is None or b.bytes <= total


# ---- choose_streaming --------------------------------------------------------------------------------
def test_choose_streaming_decides_with_the_margin_and_says_so(capsys):
    budget = Budget(6_000_000_000, "cgroup v2 memory.max")
    assert choose_streaming("prune", 4_000_000_000, budget) is False
    assert capsys.readouterr().err == ""
    # above the budget less the margin, though below the budget itself: streams
    just_over = int(budget.bytes * (1 - SAFETY_MARGIN)) + 1
    assert just_over < budget.bytes and choose_streaming("merge", just_over, budget) is True
    assert choose_streaming("prune", int(budget.bytes * (1 - SAFETY_MARGIN)), budget, quiet=True) is False
    capsys.readouterr()
    assert choose_streaming("prune", 8_500_000_000, budget) is True
    err = capsys.readouterr().err
    assert err == ("prune: the in-memory peak (~8.5 GB) exceeds 85% of the memory budget (6.0 GB, cgroup v2 memory.max): "
                   "streaming layer by layer\n")


def test_choose_streaming_quiet(capsys):
    assert choose_streaming("eval", 10**12, Budget(10**9, "--max-memory 1"), quiet=True) is True
    assert capsys.readouterr().err == ""


# ---- a real hard cap -----------------------------------------------------------------------------------
def test_a_process_under_memcap_sees_the_cap(tmp_path):
    """memcap puts the command in a fresh cgroup v1 group with memory.limit_in_bytes = GB GiB: the budget the
    process reads is that cap less what it already uses (Python and loram's imports), well under the cap."""
    if not MEMCAP.exists() or shutil.which("bash") is None:
        pytest.skip("no memcap tool here")
    import loram

    src = str(Path(loram.__file__).resolve().parents[1])
    env = dict(os.environ, MEMCAP_TIMEOUT="120", PYTHONPATH=src)
    code = "from loram.budget import memory_budget; b = memory_budget(); print(b.bytes); print(b.source)"
    r = subprocess.run([str(MEMCAP), "1.5", sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180,
                       cwd=tmp_path, check=False)
    if r.returncode == 3:
        pytest.skip(f"memcap: no writable memory cgroup ({r.stderr.strip()})")
    assert r.returncode == 0, r.stderr
    got, source = r.stdout.split("\n")[:2]
    assert source == "cgroup v1 memory.limit_in_bytes"
    assert 0.5 * GiB < int(got) < 1.5 * GiB  # the imports (torch comes with loram) use a few hundred MB of the cap


# ---- the --max-memory flag of the stages that stream -----------------------------------------------------
@pytest.mark.parametrize("verb", ["prune", "merge", "eval"])
def test_max_memory_flag_reaches_the_record(verb, tmp_path):
    """--max-memory is a knob of prune, merge and eval (loram.settings): parsed by the POSITIVE validator,
    carried in the record the command hands to the library as keywords."""
    from loram.cli import build_parser
    from loram.settings import from_args

    from test_cli_numbers import required_argv, verbs

    ns = build_parser().parse_args([verb, *required_argv(verbs()[verb], tmp_path), "--max-memory", "12"])
    assert from_args(verb, ns).max_memory == 12.0
    assert from_args(verb, build_parser().parse_args([verb, *required_argv(verbs()[verb], tmp_path)])).max_memory is None


def test_library_entry_points_take_max_memory():
    """The functions the verbs and recipes call accept max_memory= (the streamed code decides with it)."""
    import inspect

    from loram.eval.runner import evaluate
    from loram.merge import merge
    from loram.prune import prune
    from loram.prune.sparse import prune_sparse

    for f in (prune, prune_sparse, merge, evaluate):
        p = inspect.signature(f).parameters["max_memory"]
        assert p.default is None, f.__name__


def test_prune_with_max_memory_runs(tiny_dir, tmp_path):
    from loram.cli import main

    assert main(["prune", str(tiny_dir), "-o", str(tmp_path / "P"), "--method", "random", "--ratio", "0.4", "--max-memory", "12"]) == 0
    assert (tmp_path / "P" / "loram_plan.json").exists()


def test_recipe_budget_does_not_change_stage_hashes(tmp_path):
    """A recipe may set max_memory in prune, merge and eval; giving a run more or less memory changes how
    the stages run, not what they write, so finished stages are not re-run."""
    from loram.recipe import load_recipe, stage_steps

    def hashes(prune: str, merge: str) -> list[str]:
        p = tmp_path / "r.yaml"
        p.write_text(f"base: x\nworkdir: w\nprune: {{{prune}}}\ntrain: {{data: [owner/set]}}\nmerge: {{{merge}}}\n"
                     "eval: {max_memory: 3, limit: 2}\n")
        return [s.hash for s in stage_steps(load_recipe(p))]

    plain = hashes("ratio: 0.5", "")
    assert hashes("ratio: 0.5, max_memory: 4", "max_memory: 2.5") == plain
    assert hashes("ratio: 0.6, max_memory: 4", "")[0] != plain[0]  # a knob that changes the result still counts
    with pytest.raises(LoramError, match=r"prune.max_memory 0 is out of range: use a number > 0"):
        hashes("max_memory: 0", "")
