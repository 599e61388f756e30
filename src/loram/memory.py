"""Peak memory probes: process RSS high-water mark (resettable per phase) and CUDA peak.

tracemalloc does not see torch's allocations, so we read the kernel's VmHWM (= ru_maxrss) and
reset it between phases by writing 5 to /proc/self/clear_refs (Linux >= 4.0).
"""

from __future__ import annotations

import resource
import sys


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
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
