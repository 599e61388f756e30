"""Run untrusted generated Python (HumanEval completions) in a restricted child process.

What is enforced (each best-effort layer is reported in ``SandboxInfo``):

    wall-clock timeout     the child runs in its own session; on timeout the whole process group
                           is killed (SIGKILL)
    resource limits        in the child, before the program runs (resource.setrlimit):
                           RLIMIT_AS (address space, default 1 GiB), RLIMIT_CPU (CPU seconds),
                           RLIMIT_FSIZE (16 MiB per written file), RLIMIT_NOFILE (64), RLIMIT_CORE 0
    no network             `unshare --user --net` (an empty network namespace: no interface but
                           loopback-down) when the kernel allows unprivileged user namespaces;
                           and in every case socket.socket / create_connection raise in the child
    isolation              `python -I` (no user site, no PYTHONPATH, no cwd on sys.path), a fresh
                           empty temporary working directory (deleted after), a minimal environment

This is a guard against accidents (infinite loops, memory bombs, stray downloads, files littered
in the repo), not a security boundary against a determined attacker: the child runs as the same
user and can read what that user can read. Run evaluations of untrusted models in a container.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

RUNNER = r"""
import resource, socket, sys
def _lim(what, value):
    try:
        resource.setrlimit(what, (value, value))
    except (ValueError, OSError):
        pass
_lim(resource.RLIMIT_AS, {mem})
_lim(resource.RLIMIT_CPU, {cpu})
_lim(resource.RLIMIT_FSIZE, 16 * 2**20)
_lim(resource.RLIMIT_NOFILE, 64)
_lim(resource.RLIMIT_CORE, 0)
def _no_network(*a, **k):
    raise OSError("network access is disabled in the loram sandbox")
class _NoSocket(socket.socket):
    def __init__(self, *a, **k):
        _no_network()
socket.socket = _NoSocket
socket.create_connection = _no_network
socket.socketpair = _no_network
src = open(sys.argv[1]).read()
exec(compile(src, "program.py", "exec"), {{"__name__": "__main__"}})
"""


@dataclass(frozen=True)
class SandboxInfo:
    network_namespace: bool
    limits: tuple = ("timeout", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "socket blocked")


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """["unshare", "--user", "--net"] if this kernel lets us make an empty network namespace."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    try:
        ok = subprocess.run([exe, "--user", "--net", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (exe, "--user", "--net") if ok else ()


def sandbox_info() -> SandboxInfo:
    return SandboxInfo(network_namespace=bool(_unshare_prefix()))


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> RunResult:
    """Run ``program`` (Python source) in the sandbox; passed = exit status 0 within the timeout."""
    with tempfile.TemporaryDirectory(prefix="loram-sandbox-") as d:
        prog, runner = os.path.join(d, "program.py"), os.path.join(d, "runner.py")
        with open(prog, "w") as f:
            f.write(program)
        with open(runner, "w") as f:
            f.write(RUNNER.format(mem=memory_mb * 2**20, cpu=max(1, int(timeout) + 1)))
        env = {"PATH": "/usr/bin:/bin", "HOME": d, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [*_unshare_prefix(), sys.executable, "-I", runner, prog]
        p = subprocess.Popen(cmd, cwd=d, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.communicate()
            return RunResult(False, "timeout", f"killed after {timeout:g} s")
        if p.returncode == 0:
            return RunResult(True, "passed")
        return RunResult(False, "failed", err.decode(errors="replace")[-500:])
