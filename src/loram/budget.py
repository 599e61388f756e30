"""How much memory a stage may use, and whether it must stream the model layer by layer.

    budget = memory_budget(max_memory_gb)        # --max-memory GB, else the cgroup's headroom, else MemAvailable
    if choose_streaming("prune", predicted_bytes, budget):
        ...                                      # stream layer by layer (loram.stream)

The budget, in order:

1. ``--max-memory GB`` (decimal GB, as `loram plan`'s numbers): what the user says wins.
2. The memory cgroup this process runs in, when it or one of its ancestors has a limit:
   ``limit - (usage - inactive_file)`` at the tightest level, where
       cgroup v2  memory.max ("max" = no limit), memory.current, memory.stat inactive_file
       cgroup v1  memory.limit_in_bytes (>= 2**62 = no limit), memory.usage_in_bytes,
                  memory.stat total_inactive_file (inactive_file without hierarchy)
   The usage counts page cache: v1 and v2 charge the pages of every file the group read (a
   checkpoint just loaded) to the group. Inactive file pages are what the kernel reclaims first,
   before it would kill anything, so they are not taken from the budget (the "working set" that
   kubelet and docker stats report is the same usage minus inactive_file); active file pages are
   counted, which errs on the side of streaming. What the group already uses includes this
   process (its imports), so the stage predictions of loram.planner.stages count only what the
   stage adds. The result is capped by MemAvailable: a limit above the machine's free memory
   does not make that memory exist.
3. MemAvailable from /proc/meminfo (the kernel's estimate of what can be allocated without swapping).
4. Where there is neither (macOS), the physical memory (sysconf): the stages then stream only on
   machines too small for the model at all, as before this budget existed.

Every path is read under ``root`` (default "/"), so tests build fake /proc and /sys trees; the
sysconf fallback is the running machine's, so it is used only with the real root.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import LoramError
from .validate import POSITIVE

GB = 1e9  # the planner's unit (loram.planner.memory.GB): --max-memory 12 is 12e9 bytes
# cgroup v1 writes "no limit" as the largest page-aligned int64 (9223372036854771712); any value this
# large is no limit on a real machine
V1_UNLIMITED = 1 << 62
# choose_streaming keeps this fraction of the budget free. The predictions are models: the training
# one is within +4 % of measured peaks (docs/planner.md), the stage ones are counted term by term but
# leave out what no config can predict -- glibc keeps freed temporaries in its heap (0.3-1 GB measured
# with the default allocator), safetensors reads and transient copies. A job that crosses a hard cap
# is killed or thrashes (memcap's notes), while streaming when it was not needed only costs time, so
# the margin errs toward streaming.
SAFETY_MARGIN = 0.15


@dataclass(frozen=True)
class Budget:
    """Bytes a stage may use, and where that number came from, in words."""

    bytes: int
    source: str  # "--max-memory 12", "cgroup v2 memory.max", "cgroup v1 memory.limit_in_bytes", "MemAvailable", "physical memory"

    @property
    def gb(self) -> float:
        return self.bytes / GB


def memory_budget(max_memory_gb: float | None = None, root: str | Path = "/") -> Budget:
    """The memory budget of this process (see the module docstring for the order and the rules)."""
    if max_memory_gb is not None:
        POSITIVE.named("--max-memory").check(max_memory_gb)
        return Budget(int(max_memory_gb * GB), f"--max-memory {max_memory_gb:g}")
    root = Path(root)
    available = mem_available(root)
    limited = cgroup_headroom(root)
    if limited is not None and (available is None or limited.bytes < available):
        return limited
    if available is not None:
        return Budget(available, "MemAvailable")
    total = physical_memory() if root == Path("/") else None
    if total is None:
        raise LoramError("cannot tell how much memory is free (no cgroup limit, no MemAvailable in /proc/meminfo): "
                         "pass --max-memory GB")
    return Budget(total, "physical memory")


def physical_memory() -> int | None:
    """Total physical memory from sysconf, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def mem_available(root: Path) -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where there is none (not Linux, kernel < 3.14)."""
    try:
        text = (root / "proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            return int(parts[1]) * 1024 if len(parts) > 1 and parts[1].isdigit() else None
    return None


def _own_cgroups(root: Path) -> dict[str, str]:
    """{"v2": path, "v1": path of the memory controller} from /proc/self/cgroup ("hier:controllers:path")."""
    out = {}
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            out["v2"] = path
        elif "memory" in controllers.split(","):
            out["v1"] = path
    return out


def _levels(mount: Path, path: str) -> list[Path]:
    """The cgroup folder of ``path`` and its ancestors up to the mount, those that exist. Inside a
    container the path can name the host's hierarchy while the mount shows the container's own group
    as its root: the levels that do not exist are skipped and the mount root still counts."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    levels = [mount.joinpath(*parts[:k]) for k in range(len(parts), -1, -1)]
    return [d for d in levels if d.is_dir()]


def _read_int(f: Path) -> int | None:
    try:
        text = f.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2's no limit) and junk read as None


def _stat(f: Path, *keys: str) -> int:
    """The first of ``keys`` found in a memory.stat file, 0 when none is (or the file is unreadable)."""
    try:
        rows = dict(line.split()[:2] for line in f.read_text().splitlines() if len(line.split()) >= 2)
    except OSError:
        return 0
    for k in keys:
        if k in rows and rows[k].isdigit():
            return int(rows[k])
    return 0


# (version, limit file, usage file, memory.stat keys of the reclaimable page cache, "no limit" test)
_CGROUP_FILES = {
    "v2": ("memory.max", "memory.current", ("inactive_file",), lambda n: False),
    "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file", "inactive_file"),
           lambda n: n >= V1_UNLIMITED),
}


def cgroup_headroom(root: Path) -> Budget | None:
    """limit - (usage - inactive_file) at the tightest limited level of this process's memory cgroup
    (v2 first, then v1), or None when no level has a limit."""
    own = _own_cgroups(root)
    mounts = {"v2": root / "sys/fs/cgroup", "v1": root / "sys/fs/cgroup/memory"}
    for version in ("v2", "v1"):
        if version not in own:
            continue
        limit_file, usage_file, cache_keys, unlimited = _CGROUP_FILES[version]
        best = None
        for d in _levels(mounts[version], own[version]):
            limit = _read_int(d / limit_file)
            if limit is None or unlimited(limit):
                continue
            usage = _read_int(d / usage_file) or 0
            used = max(0, usage - _stat(d / "memory.stat", *cache_keys))
            room = max(0, limit - used)
            best = room if best is None else min(best, room)
        if best is not None:
            return Budget(best, f"cgroup {version} {limit_file}")
    return None


def exceeds(need_bytes: int, budget: Budget) -> bool:
    """True when ``need_bytes`` is more than the budget less SAFETY_MARGIN (see there why)."""
    return need_bytes > budget.bytes * (1 - SAFETY_MARGIN)


def choose_streaming(stage: str, in_memory_bytes: int, budget: Budget, quiet: bool | None = None) -> bool:
    """True when the predicted in-memory peak of ``stage`` exceeds the budget less SAFETY_MARGIN;
    then, unless ``quiet`` (None: the command's --quiet / --json, loram.progress.quiet), say so in
    one line on stderr."""
    if not exceeds(in_memory_bytes, budget):
        return False
    if quiet is None:
        from .progress import quiet as asked_quiet

        quiet = asked_quiet()
    if not quiet:
        print(f"{stage}: the in-memory peak (~{in_memory_bytes / GB:.1f} GB) exceeds {1 - SAFETY_MARGIN:.0%} of the memory "
              f"budget ({budget.gb:.1f} GB, {budget.source}): streaming layer by layer", file=sys.stderr)
    return True
