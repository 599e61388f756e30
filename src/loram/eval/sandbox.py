"""Run untrusted generated Python (HumanEval completions) in a sandbox (the supervisor: sandbox_child.py).

What is enforced (``SandboxInfo`` says which mode this machine gets):

    every descendant killed   the program runs under a supervisor that is PID 1 of its own PID
                              namespace (or, unsandboxed, a child subreaper); on exit or timeout
                              every process the program started - setsid'd daemons included - is
                              SIGKILLed and reaped before run_program returns
    resource limits           RLIMIT_AS (default 1 GiB), RLIMIT_CPU, RLIMIT_FSIZE (16 MiB),
                              RLIMIT_NOFILE (64), RLIMIT_NPROC (64; the program runs as uid 65534
                              outside its namespace, so the kernel enforces it even when loram runs
                              as root), RLIMIT_CORE 0
    writes contained          a private mount namespace where everything but the scratch folder is
                              read-only; the program has no capabilities to remount it
    no network                an empty network namespace (loopback down): a raw ``import _socket``
                              reaches nothing; ``socket.socket`` also raises at the Python level
    isolation                 ``python -I``, a fresh scratch folder (deleted after), a minimal environment

The program can still read what uid 65534 (or, run by a normal user, that user) can read. Without
user namespaces none of this but the limits and the process killing holds, and the socket block is
a Python-level patch that ``import _socket`` bypasses: then loram refuses to run generated code
unless asked with ``allow_unsandboxed=True`` (``--allow-unsandboxed-code``).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoramError

CHILD = Path(__file__).with_name("sandbox_child.py")
NOBODY = 65534
NPROC = 64
TIMEOUT, SETUP = 124, 125  # the supervisor's exit codes (sandbox_child.py)
UNSANDBOXED_FLAG = "--allow-unsandboxed-code"


@dataclass(frozen=True)
class SandboxInfo:
    isolated: bool  # user + mount + network + PID namespaces in use
    reason: str = ""  # why not, when not

    @property
    def limits(self) -> tuple:
        base = ("timeout", "all descendants killed", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE",
                "RLIMIT_NPROC", "socket blocked (Python level)")
        return base + (("network namespace", "read-only filesystem except scratch", "runs as uid 65534")
                       if self.isolated else ())


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""


def _interpreter_dirs() -> list[str]:
    """Folders the program's interpreter needs; kept readable inside the namespace."""
    dirs = {os.path.realpath(d) for d in (sys.base_prefix, sys.prefix, os.path.dirname(sys.executable))}
    return sorted(dirs)


def _supervise(program: str, timeout: float, memory_mb: int, isolate: bool) -> tuple[int, str]:
    """(exit code, stderr) of one program run by the supervisor in a fresh scratch folder."""
    with tempfile.TemporaryDirectory(prefix="loram-sandbox-") as d:
        prog = os.path.join(d, "program.py")
        with open(prog, "w") as f:
            f.write(program)
        if isolate and os.geteuid() == 0:  # the program runs as uid 65534: its scratch folder is its own
            for x in (d, prog):
                os.chown(x, NOBODY, NOBODY)
        cfg = {"scratch": os.path.realpath(d), "program": prog, "timeout": timeout, "memory": memory_mb * 2**20,
               "cpu": max(1, int(timeout) + 1), "nproc": NPROC, "isolate": isolate,
               "interpreter_dirs": _interpreter_dirs()}
        env = {"PATH": "/usr/bin:/bin", "HOME": d, "TMPDIR": d, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        p = subprocess.Popen([sys.executable, "-I", str(CHILD), json.dumps(cfg)], cwd=d, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:  # the supervisor enforces the timeout; this one only guards against the supervisor hanging
            _, err = p.communicate(timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # its PID 1 has PDEATHSIG: the namespace goes with it
            _, err = p.communicate()
            return TIMEOUT, "loram sandbox: the supervisor did not finish"
        return p.returncode, err.decode(errors="replace")


@functools.lru_cache(maxsize=1)
def sandbox_info() -> SandboxInfo:
    """Probe once whether this machine lets the supervisor build its namespaces (it runs ``pass``)."""
    if not sys.platform.startswith("linux"):
        return SandboxInfo(False, "it needs Linux namespaces")
    code, err = _supervise("pass\n", timeout=20, memory_mb=1024, isolate=True)
    if code == 0:
        return SandboxInfo(True)
    lines = [x for x in err.splitlines() if x.strip()]
    return SandboxInfo(False, lines[-1].removeprefix("loram sandbox: ") if lines else f"exit status {code}")


def require_sandbox(allow_unsandboxed: bool = False) -> SandboxInfo:
    """The sandbox this machine gives; refuses (one line) to go on without namespaces unless allowed."""
    info = sandbox_info()
    if not info.isolated and not allow_unsandboxed:
        raise LoramError(f"cannot sandbox generated code here ({info.reason}): without user, mount and network "
                         "namespaces it could write anywhere and open sockets (import _socket bypasses the socket "
                         f"block); run in a container that allows them, or pass {UNSANDBOXED_FLAG} to run it anyway "
                         "with timeouts and resource limits only")
    return info


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024, allow_unsandboxed: bool = False) -> RunResult:
    """Run ``program`` (Python source) in the sandbox; passed = exit status 0 within the timeout."""
    info = require_sandbox(allow_unsandboxed)
    code, err = _supervise(program, timeout, memory_mb, info.isolated)
    if code == 0:
        return RunResult(True, "passed")
    if code == TIMEOUT and err.rstrip().endswith(("loram sandbox: timeout", "did not finish")):
        return RunResult(False, "timeout", f"killed after {timeout:g} s")
    return RunResult(False, "failed", err[-500:])
