"""The sandbox's supervisor process (stdlib only: it runs as ``python -I sandbox_child.py CONFIG_JSON``).

loram starts this script in a fresh session; it runs one generated program and makes sure that
nothing the program started outlives it. Two modes (CONFIG["isolate"]):

isolated (the default; needs Linux user, mount, network and PID namespaces)
    1. a private mount namespace where every mount is remounted read-only except a bind mount of
       the scratch folder; the interpreter's folders stay readable even under a private /root
       (a tmpfs over the unreadable ancestor, with the interpreter bind-mounted back). Built by
       real root, it is locked for the less privileged user namespace of 3; the program also runs
       with an empty capability bounding set, so it cannot remount anything
    2. as root, drop to uid/gid 65534: the program is then not real root, so the kernel enforces
       RLIMIT_NPROC on it (it never does for uid 0), and it owns no root-owned file
    3. unshare(user | net | pid) and map uid 0 of the new user namespace to ourselves
       (not root: 1 happens inside the new user namespace, after 3)
    4. fork: the child is PID 1 of the new PID namespace. When PID 1 exits the kernel kills every
       process left in the namespace, including ones that called setsid or double-forked
    5. the network namespace has only a loopback interface that is down: no socket reaches anything,
       including a raw ``import _socket``
unsandboxed (only with --allow-unsandboxed-code)
    the supervisor is a child subreaper, so orphans of the program are re-parented to it and killed
    with the rest; limits are set but, as root, RLIMIT_NPROC is not enforced and writes are not contained

In both modes the program runs in a forked child with RLIMIT_AS / CPU / FSIZE / NOFILE / NPROC /
CORE and ``socket`` disabled at the Python level; on exit or timeout every descendant gets SIGKILL
and is reaped before the supervisor exits. Exit status: the program's, TIMEOUT on timeout, SETUP
when the sandbox could not be built (the reason on stderr).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import signal
import stat
import sys
import time

TIMEOUT, SETUP = 124, 125
NOBODY = 65534
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
# flags a remount must repeat: they are locked on mounts inherited from the parent namespace
KEEP_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
              "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 36, 38

PRELUDE = r"""
import socket, sys
def _no_network(*a, **k):
    raise OSError("network access is disabled in the loram sandbox")
class _NoSocket(socket.socket):
    def __init__(self, *a, **k):
        _no_network()
socket.socket = _NoSocket
socket.create_connection = _no_network
socket.socketpair = _no_network
src = open(sys.argv[1]).read()
exec(compile(src, "program.py", "exec"), {"__name__": "__main__"})
"""

libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _enc(s: str | None) -> bytes | None:
    return None if s is None else s.encode()


def _mount(src, dst: str, flags: int, fstype=None, data=None) -> None:
    _check(libc.mount(_enc(src), _enc(dst), _enc(fstype), ctypes.c_ulong(flags), _enc(data)), f"mount {dst}")


def _mount_points() -> list[tuple[str, list[str]]]:
    """(mount point, options) of every mount; mountinfo writes space, tab, newline and backslash as \\ooo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((point, fields[5].split(",")))
    return out


def _traversable(path: str, for_nobody: bool) -> bool:
    if not for_nobody:
        return os.access(path, os.X_OK)
    st = os.stat(path)  # what uid 65534 may do: the "other" permission bits
    return bool(st.st_mode & stat.S_IXOTH) or st.st_uid == NOBODY


def _blocked_ancestor(path: str, for_nobody: bool) -> str | None:
    """The highest ancestor of ``path`` the program's user cannot traverse, e.g. /root."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        p = "/" + "/".join(parts[:i])
        if not _traversable(p, for_nobody):
            return p
    return None


def _readonly_view(scratch: str, keep: list[str], for_nobody: bool) -> None:
    """In a fresh mount namespace: read-only everywhere but ``scratch``, and every ``keep`` folder
    readable by the program's user (a tmpfs hides e.g. /root, the interpreter is bound back into it)."""
    _mount(None, "/", MS_REC | MS_PRIVATE)
    # the scratch folder too: TMPDIR may lie under a private home. O_PATH fds: before a tmpfs hides them
    fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in [*keep, scratch]}
    tops = {p: _blocked_ancestor(p, for_nobody) for p in fds}
    covered = set()
    for path, fd in fds.items():
        top = tops[path]
        if top is None:
            continue
        if top not in covered:
            _mount("tmpfs", top, 0, "tmpfs", "mode=0755")
            covered.add(top)
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, MS_BIND | MS_REC)
    for fd in fds.values():
        os.close(fd)
    _mount(scratch, scratch, MS_BIND | MS_REC)
    for point, opts in _mount_points():
        # /proc stays as it is: the uid_map written next lives there (its files check permissions themselves)
        if point == scratch or point == "/proc" or point.startswith("/proc/"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for o in opts:
            flags |= KEEP_FLAGS.get(o, 0)
        try:
            _mount(None, point, flags)
        except FileNotFoundError:
            pass  # under a tmpfs we mounted above: the program cannot see it
    os.chdir(scratch)  # the old working directory is the same folder on the read-only mount below


def _map_self(uid: int, gid: int) -> None:
    """Map uid/gid 0 of the user namespace just created to ourselves (what an unprivileged user may do)."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _enter_namespaces(cfg: dict) -> None:
    """Steps 1-4 of the module docstring; returns in PID 1 of the new namespace (the parent waits)."""
    if os.geteuid() == 0:
        # the read-only view is built by real root, so the (less privileged) user namespace made
        # next finds its mounts locked: not even root of that namespace can make them writable
        _check(libc.unshare(CLONE_NEWNS), "unshare mount namespace")
        _readonly_view(cfg["scratch"], cfg["interpreter_dirs"], for_nobody=True)
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        _check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl dumpable")  # so we may write our own uid_map
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID), "unshare")
        _map_self(NOBODY, NOBODY)
    else:
        uid, gid = os.geteuid(), os.getegid()
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
        _map_self(uid, gid)
        _readonly_view(cfg["scratch"], cfg["interpreter_dirs"], for_nobody=False)
    pid = os.fork()
    if pid:  # outside the PID namespace: wait for PID 1, which takes the whole namespace with it
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) % 256)
    # PID 1 dies with its parent (killed by loram as a last resort), and the namespace with it
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl pdeathsig")


def _limit_and_exec(cfg: dict) -> None:
    """In the program's process: resource limits, no capabilities, then the program itself."""
    for what, value in ((resource.RLIMIT_AS, cfg["memory"]), (resource.RLIMIT_CPU, cfg["cpu"]),
                        (resource.RLIMIT_FSIZE, 16 * 2**20), (resource.RLIMIT_NOFILE, 64),
                        (resource.RLIMIT_NPROC, cfg["nproc"]), (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(what, (value, value))
        except (ValueError, OSError):
            pass
    if cfg["isolate"]:  # root of the namespace, but it must not undo the read-only view: no capabilities
        for cap in range(64):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.execv(sys.executable, [sys.executable, "-I", "-c", PRELUDE, cfg["program"]])


def _children() -> list[int]:
    me, out = str(os.getpid()), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:
                out.append(int(d))
    return out


def _kill_all(isolated: bool) -> None:
    """SIGKILL every descendant and reap it; orphans come back to us (PID 1 / subreaper), so loop."""
    while True:
        targets = [-1] if isolated else _children()  # kill(-1) from PID 1: everything in the namespace
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def supervise(cfg: dict) -> int:
    if not cfg["isolate"]:
        _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl subreaper")
    pid = os.fork()
    if pid == 0:
        try:
            _limit_and_exec(cfg)
        finally:
            os._exit(SETUP)
    deadline, code = time.monotonic() + cfg["timeout"], TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            code = code if code >= 0 else 128 - code  # killed by a signal: 128 + signal, as a shell says
            break
        time.sleep(0.01)
    _kill_all(cfg["isolate"])
    if code == TIMEOUT:
        print("loram sandbox: timeout", file=sys.stderr)
    return code


def main() -> int:
    cfg = json.loads(sys.argv[1])
    try:
        if cfg["isolate"]:
            _enter_namespaces(cfg)
        return supervise(cfg)
    except OSError as e:
        print(f"loram sandbox: setup failed: {e}", file=sys.stderr)
        return SETUP


if __name__ == "__main__":
    sys.exit(main())
