"""The HumanEval sandbox (loram.eval.sandbox): what model-written code must not be able to do.

Each test runs a hostile program and checks the effect from outside: no process of the program is
alive after run_program / `loram eval` returns, a fork loop is capped, a write outside the scratch
folder fails and leaves no file, a raw `_socket` connect never reaches a listener the test opens.
Where this machine cannot build the namespaces, the isolated tests skip and the refusal path is
tested instead (the probe is monkeypatched in test_refuses_without_namespaces either way).
"""

import json
import os
import random
import socket
import subprocess
import sys
import tempfile

import pytest

from loram.eval import sandbox
from loram.eval.sandbox import NPROC, SandboxInfo, run_program, sandbox_info

isolated = pytest.mark.skipif(not sandbox_info().isolated,
                              reason=f"no user/mount/net/pid namespaces here: {sandbox_info().reason}")


def _marker() -> str:
    """A `sleep` argument no other process on the machine has: its processes are found by cmdline."""
    return f"{random.randrange(100, 999)}.{random.randrange(10**8, 10**9)}"


def _alive(marker: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                with open(f"/proc/{d}/stat") as f:
                    zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                continue
            if marker.encode() in argv and not zombie:
                out.append(int(d))
    return out


def daemon_program(marker: str, then: str) -> str:
    """Double-fork + setsid a `sleep MARKER` daemon, wait until it runs, then ``then``."""
    return f"""
import os, time
r, w = os.pipe()
os.set_inheritable(w, True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sh", ["sh", "-c", "echo ready >&{{}}; exec sleep {marker}".format(w)])
    os._exit(0)
os.close(w)
assert os.read(r, 5) == b"ready"
time.sleep(0.3)
{then}
"""


def test_marker_detector_sees_a_daemon_outside_the_sandbox():
    """Control: the same program run without the sandbox does leave its daemon behind."""
    m = _marker()
    subprocess.run([sys.executable, "-c", daemon_program(m, "pass")], check=True, timeout=30)
    left = _alive(m)
    assert left, "the daemon should have survived an unsandboxed run"
    for pid in left:
        os.kill(pid, 9)


@isolated
@pytest.mark.parametrize("then,status", [("pass", "passed"), ("time.sleep(60)", "timeout")])
def test_daemon_is_killed(then, status):
    m = _marker()
    r = run_program(daemon_program(m, then), timeout=3)
    assert r.status == status, r.detail
    assert _alive(m) == []


def test_daemon_is_killed_unsandboxed(monkeypatch):
    """Without namespaces (--allow-unsandboxed-code) the supervisor is a subreaper and still kills the tree."""
    monkeypatch.setattr(sandbox, "sandbox_info", lambda: SandboxInfo(False, "test"))
    m = _marker()
    r = run_program(daemon_program(m, "pass"), timeout=5, allow_unsandboxed=True)
    assert r.passed, r.detail
    assert _alive(m) == []


@isolated
def test_fork_loop_is_capped():
    m = _marker()
    prog = f"""
import os
n = 0
for i in range(200):  # bounded: a broken sandbox must not take the machine down
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.execv("/bin/sleep", ["sleep", "{m}"])
    n += 1
raise SystemExit("forked %d" % n)
"""
    r = run_program(prog, timeout=20)
    n = int(r.detail.split("forked ")[1].split()[0])
    assert 0 < n < NPROC  # RLIMIT_NPROC holds although the test runs as root
    assert _alive(m) == []


@isolated
def test_write_outside_scratch_fails():
    d = tempfile.mkdtemp(prefix="loram-test-outside-")
    os.chmod(d, 0o777)  # world-writable: only the read-only view can stop the write
    target = os.path.join(d, "escaped.txt")
    try:
        r = run_program(f"open({target!r}, 'w').write('x')\n")
        assert not r.passed and "Read-only file system" in r.detail
        assert not os.path.exists(target)
        inside = run_program("open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'\n")
        assert inside.passed, inside.detail  # the scratch folder itself stays writable
    finally:
        os.rmdir(d)


@isolated
def test_raw_socket_cannot_reach_a_loopback_listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    try:
        r = run_program(f"import _socket\ns = _socket.socket()\ns.settimeout(3)\ns.connect(('127.0.0.1', {port}))\n",
                        timeout=10)
        assert not r.passed
        with pytest.raises(socket.timeout):
            srv.accept()  # nobody ever connected
    finally:
        srv.close()


def test_refuses_without_namespaces(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_info", lambda: SandboxInfo(False, "unshare: Operation not permitted"))
    from loram.errors import LoramError

    with pytest.raises(LoramError) as e:
        run_program("pass\n")
    msg = str(e.value)
    assert "\n" not in msg and "--allow-unsandboxed-code" in msg and "_socket" in msg
    assert run_program("pass\n", allow_unsandboxed=True).passed


def test_cli_refuses_humaneval_without_namespaces(monkeypatch, capsys, tiny_dir, tmp_path):
    """`loram eval --humaneval` refuses before loading the model: one line, exit 2."""
    from loram.cli import main

    monkeypatch.setattr(sandbox, "sandbox_info", lambda: SandboxInfo(False, "unshare: Operation not permitted"))
    rows = tmp_path / "he.jsonl"
    rows.write_text(json.dumps({"task_id": "t/0", "prompt": "def one():\n", "entry_point": "one",
                                "test": "def check(f):\n    pass\n"}) + "\n")
    assert main(["eval", str(tiny_dir), "--humaneval", str(rows)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot sandbox generated code here") and len(err.splitlines()) == 1


@isolated
def test_no_process_of_the_program_outlives_loram_eval(tiny_dir, tmp_path, capsys, monkeypatch):
    """The HumanEval row's test code daemonizes; after `loram eval` returns, its daemon is gone.
    The completion is fixed (the tiny model's text could be a syntax error, and then nothing runs)."""
    from loram.cli import main
    from loram.eval import humaneval

    monkeypatch.setattr(humaneval, "generate_texts", lambda model, tok, prompts, **k: ["    return 1\n"] * len(prompts))
    m = _marker()
    rows = tmp_path / "he.jsonl"
    rows.write_text(json.dumps({"task_id": "t/0", "prompt": "def one():\n", "entry_point": "one",
                                "test": daemon_program(m, "def check(f):\n    assert f() == 1")}) + "\n")
    assert main(["eval", str(tiny_dir), "--humaneval", str(rows), "--timeout", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (res,) = out["results"]
    assert res["value"] == 1.0  # the program passed, so its daemon had started
    assert res["extra"]["sandbox"]["isolated"] is True
    assert _alive(m) == []
