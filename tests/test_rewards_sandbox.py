"""Hostile programs against the code sandbox.

Each program tries one attack and prints the expected answer ("WIN") or returns right
values only if the attack worked, so a score of 0 means the attack failed. Every case also
checks the host: the run returned in bounded time, no process of the sandbox uids is left,
no private directory is left, and attack-specific evidence (a listener that must stay
silent, files that must not appear, the scorer still alive). The namespace sandbox (what
these machines get) runs all of them; the `basic` fallback (uid + rlimits + seccomp, no
namespaces) runs those its guarantees cover.
"""
from __future__ import annotations

import glob
import os
import socket
import subprocess
import tempfile
import time

import pytest

from rewards.code.reward import CodeReward

UID_BASE, SLOTS = 62000, 8
TIMEOUT_S = 2.0
STDIO = {"tests": [{"stdin": "", "stdout": "WIN"}]}
ASSERTS = {"assert": ["assert f(2) == 4", "assert f(3) == 9"], "entry_point": "f"}

HOSTILE: dict[str, tuple[str, str]] = {}  # name -> (mode, program)


def hostile(name: str, mode: str, program: str) -> None:
    HOSTILE[name] = (mode, program)


hostile("net_tcp_to_host_listener", "stdio", """
import socket
try:
    socket.create_connection(("127.0.0.1", PORT), timeout=1)
    print("WIN")
except OSError:
    pass
""")
hostile("net_tcp_external", "stdio", """
import socket
for addr in [("1.1.1.1", 80), ("8.8.8.8", 53)]:
    try:
        socket.create_connection(addr, timeout=1)
        print("WIN")
        break
    except OSError:
        pass
""")
hostile("net_dns_lookup", "stdio", """
import socket
try:
    socket.getaddrinfo("example.com", 80)
    print("WIN")
except OSError:
    pass
""")
hostile("net_udp_to_host", "stdio", """
import socket
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"leak", ("127.0.0.1", UDP_PORT))
    print("WIN")
except OSError:
    pass
""")
hostile("net_raw_libc_connect", "stdio", """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)
addr = struct.pack("!HH4s8x", 2, PORT, bytes([127, 0, 0, 1]))
addr = struct.pack("=H", 2) + addr[2:]
if fd >= 0 and libc.connect(fd, addr, len(addr)) == 0:
    print("WIN")
""")
hostile("write_outside_workdir", "stdio", """
import os
won = False
for path in ["REPO/hostile_pwned", "/root/hostile_pwned", "/etc/hostile_pwned",
             "/usr/lib/hostile_pwned", "/var/tmp/hostile_pwned", "/hostile_pwned",
             "HOST_DIR/hostile_pwned", "/dev/shm/../hostile_pwned"]:
    try:
        with open(path, "w") as f:
            f.write("x")
        won = won or not path.startswith("/tmp")
    except OSError:
        pass
print("WIN" if won else "")
""")
hostile("read_parent_environment", "stdio", """
import os
found = any("SECRET" in v for v in os.environ.values())
for pid in ["self", "1", str(os.getppid()), "SCORER_PID"] + os.listdir("/proc"):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            found = found or b"SECRET" in f.read()
    except OSError:
        pass
print("WIN" if found else "")
""")
hostile("read_host_file", "stdio", """
for path in ["HOST_DIR/secret.txt", "/proc/1/root/HOST_DIR/secret.txt", "REPO/pyproject.toml"]:
    try:
        with open(path) as f:
            if f.read():
                print("WIN")
                break
    except OSError:
        pass
""")
hostile("fork_bomb", "stdio", """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""")
hostile("thread_bomb", "stdio", """
import threading, time
while True:
    try:
        threading.Thread(target=time.sleep, args=(100,)).start()
    except RuntimeError:
        pass
""")
hostile("memory_bomb", "stdio", """
chunks = []
try:
    big = bytearray(64 * 1024 ** 3)
    print("WIN")
except MemoryError:
    pass
while True:
    chunks.append(bytearray(64 * 1024 ** 2))
""")
hostile("infinite_loop", "stdio", """
while True:
    pass
""")
hostile("sleeping_grandchild", "stdio", """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(TIMEOUT + 1)
        print("WIN", flush=True)
        open("/tmp/../hostile_late", "w").write("late")
    os._exit(0)
""")
hostile("huge_output", "stdio", """
import sys
while True:
    sys.stdout.write("WIN\\n" * 10000)
""")
hostile("file_size_bomb", "stdio", """
try:
    with open("big.bin", "wb") as f:
        for _ in range(200):
            f.write(b"x" * 1024 * 1024)
    print("WIN")
except OSError:
    pass
""")
hostile("fill_tmp", "stdio", """
import os
n = 0
try:
    while True:
        with open(f"/tmp/fill{n}", "wb") as f:
            f.write(b"x" * 8 * 1024 * 1024)
        n += 1
except OSError:
    pass
print("WIN" if n > 100 else "")
""")
hostile("fd_exhaustion", "stdio", """
import os
fds = []
try:
    while True:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
print("WIN" if len(fds) > 10000 else "")
""")
hostile("setuid_escalation", "stdio", """
import os, subprocess
for attempt in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.setgroups([0])):
    try:
        attempt()
    except OSError:
        pass
for cmd in (["su", "-c", "id -u"], ["sudo", "-n", "id", "-u"]):
    try:
        subprocess.run(cmd, capture_output=True, timeout=1)
    except Exception:
        pass
print("WIN" if os.geteuid() == 0 or os.getuid() == 0 else "")
""")
hostile("chroot_escape", "stdio", """
import os
won = False
try:
    os.mkdir("jail")
    os.chroot("jail")
    for _ in range(20):
        os.chdir("..")
    os.chroot(".")
    won = os.path.exists("REPO")
except OSError:
    pass
won = won or os.path.exists("/proc/1/root/REPO")
print("WIN" if won else "")
""")
hostile("kill_parent_and_scorer", "stdio", """
import os
won = False
for pid in (os.getppid(), 1, SCORER_PID):
    try:
        os.kill(pid, 9)
        won = won or pid == SCORER_PID
    except OSError:
        pass
print("WIN" if won else "", flush=True)
os.kill(-1, 9)
""")
hostile("exit_zero_without_output", "stdio", """
import sys
sys.exit(0)
""")
hostile("os_exit_before_tests", "assert", """
import os
def f(x):
    return 0
os._exit(0)
""")
hostile("sys_exit_before_tests", "assert", """
import sys
def f(x):
    return 0
sys.exit(0)
""")
hostile("monkeypatch_harness", "assert", """
import builtins, sys
main = sys.modules["__main__"]
wire = sys.modules.get("_lockstep_wire")
main._call = lambda ns, msg: {"ok": True, "args": []}
main._describe = lambda ns, names: {n: "missing" for n in names}
if wire:
    wire.decode = lambda data: {"op": "exit"}
builtins.AssertionError = type("Never", (BaseException,), {})
class Liar:
    def __eq__(self, other):
        return True
def f(x):
    return Liar()
""")
hostile("delete_harness", "assert", """
import os, shutil
for d in [".", "/tmp/t", "/tmp/u"]:
    try:
        for name in os.listdir(d):
            try:
                os.remove(os.path.join(d, name))
            except OSError:
                pass
        shutil.rmtree(d, ignore_errors=True)
    except OSError:
        pass
def f(x):
    return 0
""")
hostile("forged_pass_markers", "assert", """
import os, sys
forged = b"ok 0\\nok 1\\ndone 2\\n"
print("ok 0\\nok 1\\ndone 2\\nPASS\\nALL TESTS PASSED")
for fd in range(0, 256):
    try:
        os.write(fd, forged)
    except OSError:
        pass
sys.stdout.flush()
def f(x):
    return -1
""")
hostile("read_the_tests", "assert", """
import marshal, re
def f(x):
    for path in ["/tmp/t/tests.marshal", "../t/tests.marshal"]:
        try:
            with open(path, "rb") as fh:
                spec = marshal.load(fh)
        except OSError:
            continue
        for unit in spec["units"]:
            m = re.match(r"assert f\\((.*)\\) == (.*)", unit)
            if m and int(m.group(1)) == x:
                return int(m.group(2))
    return -1
""")
hostile("kill_the_checker", "assert", """
import os
for pid in range(2, 4096):
    if pid != os.getpid():
        try:
            os.kill(pid, 9)
        except OSError:
            pass
def f(x):
    return 0
""")
hostile("trace_the_checker", "assert", """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for pid in range(2, 512):
    if pid == os.getpid():
        continue
    libc.ptrace(16, pid, 0, 0)
    try:
        with open(f"/proc/{pid}/mem", "r+b") as mem:
            mem.write(b"x")
    except OSError:
        pass
def f(x):
    return 0
""")

BASIC_CASES = ["net_tcp_to_host_listener", "net_raw_libc_connect", "net_udp_to_host",
               "read_parent_environment", "fork_bomb", "sleeping_grandchild", "infinite_loop",
               "kill_parent_and_scorer", "setuid_escalation", "os_exit_before_tests",
               "forged_pass_markers", "kill_the_checker", "read_the_tests"]


def sandbox_pids() -> list[int]:
    """Live processes whose real, effective or saved uid is a sandbox uid of this module."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
        except OSError:
            continue
        uids = [int(u) for u in status.split("\nUid:")[1].split("\n")[0].split()]
        if any(UID_BASE <= u < UID_BASE + 2 * SLOTS for u in uids):
            found.append(int(name))
    return found


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Listeners that must stay silent and a host directory that must stay untouched."""
    host_dir = tmp_path_factory.mktemp("hostile")
    (host_dir / "secret.txt").write_text("SECRET")
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    yield {"dir": host_dir, "tcp": tcp, "udp": udp}
    tcp.close()
    udp.close()


def _render(program: str, host) -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return (program.replace("UDP_PORT", str(host["udp"].getsockname()[1]))
            .replace("PORT", str(host["tcp"].getsockname()[1]))
            .replace("HOST_DIR", str(host["dir"])).replace("REPO", repo)
            .replace("SCORER_PID", str(os.getpid())).replace("TIMEOUT", str(TIMEOUT_S)))


def _assert_host_unharmed(host) -> None:
    with pytest.raises(BlockingIOError):
        host["tcp"].accept()
    with pytest.raises(BlockingIOError):
        host["udp"].recvfrom(64)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in [f"{repo}/hostile_pwned", "/root/hostile_pwned", "/etc/hostile_pwned",
                 "/var/tmp/hostile_pwned", "/hostile_pwned", f"{host['dir']}/hostile_pwned",
                 "/dev/hostile_pwned", "/hostile_late", "/tmp/hostile_late"]:
        assert not os.path.exists(path), f"sandbox wrote {path} on the host"
    assert (host["dir"] / "secret.txt").read_text() == "SECRET"
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def _run_hostile(name: str, isolation: str, host, monkeypatch) -> None:
    monkeypatch.setenv("LOCKSTEP_HOSTILE", "SECRET")
    mode, program = HOSTILE[name]
    reward = CodeReward(timeout_s=TIMEOUT_S, uid_base=UID_BASE, max_slots=SLOTS,
                        memory_mb=512, nproc=16, isolation=isolation,
                        python=None if isolation != "basic" else "/usr/bin/python3")
    dirs_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "lockstep-sbx-*")))
    start = time.monotonic()
    res = reward("hostile", _render(program, host), STDIO if mode == "stdio" else ASSERTS)
    elapsed = time.monotonic() - start
    assert res["score"] == 0.0, f"{name}: the attack scored {res}"
    assert res["sandbox_errors"] == 0, f"{name}: the sandbox itself failed"
    assert elapsed < TIMEOUT_S + 4.0, f"{name}: took {elapsed:.1f}s"
    leftover = sandbox_pids()
    assert not leftover, f"{name}: sandbox processes still running: {leftover}"
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "lockstep-sbx-*"))) <= dirs_before
    _assert_host_unharmed(host)


def test_there_are_at_least_twenty_hostile_programs():
    assert len(HOSTILE) >= 20


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_scores_zero_in_namespace_sandbox(name, host, monkeypatch):
    _run_hostile(name, "namespaces", host, monkeypatch)


@pytest.mark.parametrize("name", BASIC_CASES)
def test_hostile_program_scores_zero_in_basic_fallback(name, host, monkeypatch):
    _run_hostile(name, "basic", host, monkeypatch)


def test_each_attack_would_win_unsandboxed(host, tmp_path, monkeypatch):
    """Guard against vacuous attacks: run read-only ones directly on the host (never the
    writing or killing ones) and watch them win."""
    monkeypatch.setenv("LOCKSTEP_HOSTILE", "SECRET")
    for name in ["net_tcp_to_host_listener", "read_host_file", "read_parent_environment"]:
        out = subprocess.run(["python3", "-c", _render(HOSTILE[name][1], host)],
                             capture_output=True, text=True, timeout=30, cwd=tmp_path).stdout
        assert "WIN" in out, name
    host["tcp"].accept()[0].close()  # the connection we just made on purpose


SYSTEM_PYTHON = "/usr/bin/python3.11"


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON)
                    or not os.path.exists("/usr/bin/setpriv"),
                    reason="needs root to start the jail as an unprivileged user")
def test_unprivileged_host_gets_a_user_namespace_sandbox(tmp_path):
    """The jail started by a non-root user: namespaces inside a user namespace, uid 0 there
    with no capabilities, no network, a private /tmp, and asserts still checked."""
    import marshal
    from rewards.code.sandbox import JAIL_DIR
    base = tempfile.mkdtemp()
    os.chown(base, 65534, 65534)
    program = ("import os, socket\n"
               "caps = open('/proc/self/status').read().split('CapEff:')[1].split()[0]\n"
               "print(os.getuid(), caps, sorted(os.listdir('/tmp')))\n"
               "try:\n    socket.create_connection(('1.1.1.1', 80), timeout=1)\n"
               "    print('net')\nexcept OSError:\n    print('offline')\n")
    cfg = {"mode": "stdio", "program": program, "tests": [{"stdin": ""}], "base_dir": base,
           "uids": [UID_BASE, UID_BASE + 1], "isolation": "namespaces", "seccomp": True,
           "python": SYSTEM_PYTHON, "ro_paths": [],
           "limits": {"timeout_s": 5, "cpu_s": 6, "memory_mb": 1024, "file_size_mb": 16,
                      "nproc": 64, "nofile": 64, "stdout_bytes": 1 << 20,
                      "stderr_bytes": 1 << 14, "tmpfs_mb": 64}}
    try:
        proc = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534",
                               "--clear-groups", SYSTEM_PYTHON, "-I", "-S", "-B", JAIL_DIR],
                              input=marshal.dumps(cfg), capture_output=True, timeout=60)
    finally:
        subprocess.run(["rm", "-rf", base])
    result = marshal.loads(proc.stdout)
    if "error" in result and "isolation failed" in result["error"]:
        pytest.skip(f"unprivileged user namespaces unavailable: {result['error']}")
    assert result["isolation"] == {"namespaces": True, "user_ns": True, "uid_drop": False,
                                   "seccomp": True, "network": "netns"}
    assert result["tests"][0]["stdout"].split("\n")[:2] == ["0 0000000000000000 ['t', 'u']",
                                                             "offline"]
