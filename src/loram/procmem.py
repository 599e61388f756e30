"""Peak memory probes: process RSS high-water mark (resettable per phase) and CUDA peak.

tracemalloc does not see torch's allocations, so we read the kernel's VmHWM from /proc/self/status and
reset it between phases by writing 5 to /proc/self/clear_refs (Linux >= 4.0). Not ru_maxrss: the kernel
keeps there the high-water mark of the process image *before* exec (a `loram` started by a Python
process holding a model reports that process's memory), and clear_refs does not reset it.
"""

from __future__ import annotations

import resource
import sys

# glibc serves allocations below its mmap threshold from the heap and keeps freed holes resident; the
# threshold also grows (up to 32 MiB) each time a large block is freed. A layer-by-layer build or a
# training step frees many 1-30 MB temporaries, so RSS then exceeds the live tensors (2.35 GB over
# 12.33 GB on the 70B-geometry build). 128 KiB = glibc's initial threshold, held fixed: every larger
# buffer is its own mapping and goes back to the kernel when freed. Same as MALLOC_MMAP_THRESHOLD_=131072.
MMAP_THRESHOLD = 131072
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def _glibc():
    """glibc through ctypes, or None (musl, macOS, Windows: those allocators need none of this)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold so freed buffers leave RSS (see above). False where not glibc."""
    libc = _glibc()
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes))) if libc is not None else False


def malloc_trim() -> None:
    """Return glibc's free heap pages to the kernel (before a measured phase); no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def rss_gb() -> float:
    """Current resident set size in GB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        return 0.0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no procfs (macOS): the best there is
    return kb / (1e9 / 1024) if sys.platform != "darwin" else kb / 1e9


class PeakRSS:
    """Peak RSS since construction (the high-water mark is reset when it is created)."""

    def __init__(self):
        self.reset_ok = reset_peak()
        self.baseline = rss_gb()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except Exception:  # noqa: BLE001 - no CUDA is fine
            pass

    def gb(self) -> float:
        return peak_rss_gb()

    def above_baseline_gb(self) -> float:
        return peak_rss_gb() - self.baseline

    @staticmethod
    def cuda_gb() -> float | None:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.max_memory_allocated() / 1e9
