"""
The sandbox: results, timeouts, memory, output caps, clean environment; every attack that escaped the old
in-process guards, now run against bubblewrap; the kernel calls, memory and processes around it (seccomp,
the whole-call memory bound, reaping); the weak fallback and its warning.
"""
import dataclasses
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from nanochat.execution import MAX_PROCESSES, SANDBOX_TMPFS_BYTES, WEAK_SANDBOX, execute_code, find_sandbox

needs_bubblewrap = pytest.mark.skipif(not find_sandbox().strong,
                                      reason=f"needs bubblewrap (apt-get install bubblewrap): {find_sandbox().description}")
needs_seccomp = pytest.mark.skipif(not find_sandbox().strong or os.uname().machine not in ("x86_64", "aarch64"),
                                   reason="the seccomp filter needs bubblewrap on 64-bit x86_64 or aarch64")
MB = 1024 * 1024


def test_success_and_error_results():
    result = execute_code("print(sum(range(10)))")
    assert result.success and result.stdout == "45\n" and result.error is None
    result = execute_code("raise ValueError('boom')")
    assert not result.success and "ValueError: boom" in result.error and not result.timeout


def test_infinite_loop_is_killed_in_time():
    t0 = time.time()
    result = execute_code("while True:\n    pass", timeout=1.0)
    assert time.time() - t0 < 3.0
    assert result.timeout and not result.success and "timed out" in result.error


def test_memory_bomb_is_stopped():
    result = execute_code("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))", timeout=10.0,
                          maximum_memory_bytes=128 * 1024 * 1024)
    assert not result.success and result.memory_exceeded and not result.timeout


def test_huge_output_is_truncated():
    result = execute_code("import sys\nfor _ in range(2000):\n    sys.stdout.write('x' * 100000)", timeout=10.0,
                          max_output_bytes=10000)
    assert result.success and result.output_truncated and len(result.stdout) == 10000


def test_environment_is_scrubbed_and_stdin_closed(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SECRET_TOKEN", "hunter2")
    result = execute_code("import os\nprint(sorted(os.environ.items()))\nprint(repr(input()))")
    assert "NANOCHAT_SECRET_TOKEN" not in result.stdout and "hunter2" not in result.stdout
    assert "EOFError" in result.error  # input() returns at once instead of hanging


def test_a_large_program_reaches_the_child_whole():
    # the program travels on stdin: more than a pipe buffer (64 KiB) must not deadlock or be cut
    code = "\n".join(f"x{i} = {i}" for i in range(20000)) + "\nprint(x19999)"
    result = execute_code(code, timeout=10.0)
    assert result.success and result.stdout == "19999\n"


# ------------------------------------------------------------------ the weak sandbox: in-process guards only

@pytest.mark.parametrize("sandbox", [None, WEAK_SANDBOX], ids=["default", "weak"])
def test_guards_refuse_destructive_calls_with_a_clear_error(tmp_path, sandbox):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    attempts = [f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                f"import os\nos.system('rm -rf {tmp_path}')", "import os\nos.fork()",
                "import subprocess\nsubprocess.Popen(['sleep', '100'])"]
    if sandbox is WEAK_SANDBOX:  # (under bubblewrap this path is in the private /tmp, where writing is harmless)
        attempts.append(f"open({str(victim)!r}, 'w').write('gone')")
    for code in attempts:
        result = execute_code(code, sandbox=sandbox)
        assert not result.success and "PermissionError" in result.stderr and "disabled" in result.error, code
    assert victim.read_text() == "keep me"
    result = execute_code("open('notes.txt', 'w').write('hi')\nprint(open('notes.txt').read())", sandbox=sandbox)
    assert result.success and result.stdout == "hi\n"  # its own working directory is writable


def test_without_bubblewrap_the_weak_sandbox_runs_with_a_warning():
    code = ("from nanochat.execution import execute_code, sandbox_is_strong\n"
            "print(sandbox_is_strong(), execute_code('print(6 * 7)').stdout.strip())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "NANOCHAT_SANDBOX": "weak"})
    assert result.returncode == 0 and result.stdout.split() == ["False", "42"]
    assert "WARNING" in result.stderr and "not a security boundary" in result.stderr


# ------------------------------------------------------------------ attacks that escaped the in-process guards

@pytest.fixture
def planted(tmp_path):
    """A file outside the sandbox that every attack tries to delete or overwrite."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    return victim


FILE_ATTACKS = {
    "posix.unlink": "import posix\nposix.unlink({path!r})",
    "ctypes unlink": "import ctypes\nassert ctypes.CDLL(None).unlink({path!r}.encode()) == 0, 'unlink failed'",
    "ctypes system": "import ctypes\nctypes.CDLL(None).system(b'rm -f {path}')",
    "reload os": "import importlib, os\nimportlib.reload(os)\nos.remove({path!r})",
    "os.open with dir_fd": ("import posix\ndirectory = posix.open({directory!r}, posix.O_RDONLY)\n"
                            "posix.write(posix.open('precious.txt', posix.O_WRONLY | posix.O_TRUNC, dir_fd=directory), b'x')"),
    "io.FileIO": "import io\nio.FileIO({path!r}, 'w').write(b'overwritten')",
}


@needs_bubblewrap
@pytest.mark.parametrize("attack", FILE_ATTACKS)
def test_files_outside_the_sandbox_survive(planted, attack):
    code = FILE_ATTACKS[attack].format(path=str(planted), directory=str(planted.parent))
    execute_code(code, timeout=3.0)
    assert planted.read_text() == "keep me", attack


@needs_bubblewrap
def test_host_files_are_invisible_and_the_runtime_is_read_only():
    result = execute_code("import os\nprint(sorted(os.listdir('/')))\nprint(os.path.exists('/etc/passwd'), os.path.exists('/home'))")
    assert result.success, result
    assert set(eval(result.stdout.splitlines()[0])) <= {"bin", "sbin", "lib", "lib32", "lib64", "usr", "etc", "proc", "dev", "tmp", "root", "opt", "home"}
    assert result.stdout.splitlines()[1] == "False False"
    result = execute_code("import posix\nposix.open('/usr/planted_by_sandbox', posix.O_WRONLY | posix.O_CREAT)")
    assert not result.success and "Read-only file system" in result.error
    assert not os.path.exists("/usr/planted_by_sandbox")


@needs_bubblewrap
def test_the_caller_and_other_processes_cannot_be_signalled():
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        for code in ["import posix, os\nposix.kill(os.getppid(), 9)", f"import posix\nposix.kill({bystander.pid}, 9)",
                     "import ctypes, os\nctypes.CDLL(None).kill(os.getppid(), 9)", f"import posix\nposix.kill({os.getpid()}, 9)"]:
            execute_code(code, timeout=3.0)
        assert bystander.poll() is None, "a process outside the sandbox was killed"
        # (and this test process, whose pid the last attack named, is still running)
    finally:
        bystander.kill()


@needs_bubblewrap
def test_the_callers_environment_is_unreachable(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SECRET_TOKEN", "hunter2")
    for path in [f"/proc/{os.getpid()}/environ", f"/proc/{os.getppid()}/environ", "/proc/1/environ", "/proc/self/environ"]:
        result = execute_code(f"print(open({path!r}, 'rb').read())")
        assert "hunter2" not in result.stdout and "NANOCHAT_SECRET" not in result.stdout, path


@needs_bubblewrap
def test_a_listener_on_the_hosts_loopback_is_unreachable():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        result = execute_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
        assert not result.success and "connected" not in result.stdout
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def _processes_with(marker):
    lines = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in lines if marker in line]


@needs_bubblewrap
def test_no_process_outlives_the_run():
    # a child that leaves the process group (setsid) and execs; where calls have no cgroup of their own, fork is refused
    marker = "987.654321"
    escape = ("import ctypes, posix\npid = ctypes.CDLL(None).fork()\n"
              f"if pid == 0:\n    posix.setsid()\n    posix.execv('/usr/bin/sleep', ['sleep', '{marker}'])\n")
    outcome = "print('started' if pid > 0 else 'fork refused', flush=True)\n"
    for code in [escape + outcome, escape + outcome + "import time\ntime.sleep(60)"]:
        result = execute_code(code, timeout=2.0)
        assert result.stdout.strip() in ("started", "fork refused"), result
        deadline = time.time() + 2.0
        while _processes_with(marker) and time.time() < deadline:
            time.sleep(0.05)
        assert not _processes_with(marker), f"left behind: {_processes_with(marker)}"


@needs_bubblewrap
def test_the_process_limit_holds_even_as_root():
    code = ("import ctypes, os, time\nlibc = ctypes.CDLL(None)\nstarted = 0\nfor _ in range(200):\n"
            "    pid = libc.fork()\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    started += pid > 0\nprint(started)")
    result = execute_code(code, timeout=5.0)
    assert result.success, result
    assert int(result.stdout) < MAX_PROCESSES


@needs_bubblewrap
def test_each_call_starts_from_an_empty_directory():
    assert execute_code("open('left.txt', 'w').write('x')").success
    result = execute_code("import os\nprint(os.listdir('.'))")
    assert result.success and result.stdout.strip() == "[]"


# ------------------------------------------------------------------ the kernel, memory and processes around it

# System calls the seccomp filter refuses: (x86_64, aarch64) numbers, arguments, the answer. Where they can, the
# arguments make the kernel itself answer otherwise (succeed, EFAULT, EBADF, EINVAL), so that only the filter
# explains an EPERM (or clone3's ENOSYS); mount, ptrace or userfaultfd also fail without it, for lack of capabilities.
DENIED_CALLS = {
    "unshare(CLONE_NEWUSER)": ((272, 97), (0x10000000,), "EPERM"),
    "clone(CLONE_NEWUSER)": ((56, 220), (0x10000000 | 17, 0, 0, 0, 0), "EPERM"),  # 17: SIGCHLD
    "clone3": ((435, 435), (0, 0), "ENOSYS"),  # so that glibc falls back to clone, whose flags the filter sees
    "mount": ((165, 40), ("none", "/tmp", "tmpfs", 0, 0), "EPERM"),
    "setns": ((308, 268), (-1, 0), "EPERM"),
    "ptrace(PTRACE_TRACEME)": ((101, 117), (0, 0, 0, 0), "EPERM"),
    "process_vm_readv": ((310, 270), ("getpid", 0, 0, 0, 0, 0), "EPERM"),
    "io_uring_setup": ((425, 425), (1, 0), "EPERM"),
    "keyctl(KEYCTL_GET_KEYRING_ID)": ((250, 219), (0, -3, 0), "EPERM"),
    "bpf": ((321, 280), (0, 0, 0), "EPERM"),
    "perf_event_open": ((298, 241), (0, 0, -1, -1, 0), "EPERM"),
    "userfaultfd": ((323, 282), (0,), "EPERM"),
    "memfd_create": ((319, 279), ("x", 0), "EPERM"),
    "personality(ADDR_NO_RANDOMIZE)": ((135, 92), (0x0040000,), "EPERM"),
}
PROBE_DENIED_CALLS = """
import ctypes, errno, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
column = ("x86_64", "aarch64").index(os.uname().machine)
calls, answers = json.loads(CALLS), {}
if column == 0:
    calls["getpid, x32 ABI"] = [[0x40000000 | 39, None], [], "ENOSYS"]
for name, (numbers, arguments, _) in calls.items():
    arguments = [os.getpid() if a == "getpid" else a.encode() if isinstance(a, str) else ctypes.c_long(a)
                 for a in arguments]
    result = libc.syscall(ctypes.c_long(numbers[column]), *arguments)
    if result == 0 and name.startswith("clone"):
        os._exit(0)  # the child of a clone that went through
    answers[name] = errno.errorcode[ctypes.get_errno()] if result == -1 else "succeeded"
sockets = {"socket(AF_NETLINK)": socket.AF_NETLINK, "socket(AF_PACKET)": socket.AF_PACKET}
if hasattr(os, "unshare"):  # Python 3.12+
    sockets["os.unshare(CLONE_NEWUSER)"] = None
for name, family in sockets.items():
    try:
        socket.socket(family, socket.SOCK_RAW).close() if family else os.unshare(os.CLONE_NEWUSER)
        answers[name] = "succeeded"
    except OSError as error:
        answers[name] = errno.errorcode[error.errno]
print(json.dumps(answers))
"""
ORDINARY_PROGRAM = """
import hashlib, json, math, random, socket, threading
results = []
threads = [threading.Thread(target=lambda n=n: results.append(math.factorial(n))) for n in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
with open("results.json", "w") as f:
    json.dump(sorted(results), f)
server = socket.create_server(("127.0.0.1", 0))  # the sandbox's own loopback
client = socket.create_connection(server.getsockname())
connection, _ = server.accept()
client.sendall(b"ping")
left, right = socket.socketpair()
right.sendall(connection.recv(4))
print(json.load(open("results.json"))[-1], left.recv(4).decode(), hashlib.sha256(b"").hexdigest()[:8],
      0 <= random.random() < 1)
"""


@needs_seccomp
def test_the_seccomp_filter_refuses_kernel_calls_a_python_tool_never_needs():
    result = execute_code(PROBE_DENIED_CALLS.replace("CALLS", repr(json.dumps(DENIED_CALLS))), timeout=10.0)
    assert result.success, result
    answers = json.loads(result.stdout)
    expected = {name: answer for name, (_, _, answer) in DENIED_CALLS.items()}
    expected.update({"socket(AF_NETLINK)": "EPERM", "socket(AF_PACKET)": "EPERM"})
    if os.uname().machine == "x86_64":
        expected["getpid, x32 ABI"] = "ENOSYS"
    if "os.unshare(CLONE_NEWUSER)" in answers:
        expected["os.unshare(CLONE_NEWUSER)"] = "EPERM"
    assert answers == expected
    # the variant for calls with a cgroup of their own lets the program fork, but still not into a new namespace
    from nanochat.execution import _seccomp_filter
    forking = dataclasses.replace(find_sandbox(), seccomp_filter=_seccomp_filter(os.uname().machine, allow_fork=True))
    result = execute_code("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.fork() == 0:\n"
                          "    os._exit(0)\nprint(libc.unshare(0x10000000), ctypes.get_errno())", sandbox=forking)
    assert result.success and result.stdout == "-1 1\n", result  # 1: EPERM
    # while ordinary programs still run: threads, files in the tmpfs, sockets on the sandbox's loopback, ...
    result = execute_code(ORDINARY_PROGRAM, timeout=10.0)
    assert result.success and result.stdout == "5040 ping e3b0c442 True\n", result
    description = find_sandbox().description  # what the startup log line says
    assert "seccomp filter on" in description and "memory bounded per call" in description, description


@needs_seccomp
def test_no_nested_namespace_and_mount_writes_past_the_tmpfs_cap():
    # the attack: a user namespace of its own (every capability again), a fresh tmpfs over /tmp, then 45 MB into it
    code = f"""
import ctypes, os, posix
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, after the switch to the sandbox uid: /proc/self/uid_map is ours again
def put(path, text):
    fd = posix.open(path, posix.O_WRONLY)
    posix.write(fd, text.encode())
    posix.close(fd)
mounted = False
if libc.unshare(0x10000000 | 0x20000) == 0:  # CLONE_NEWUSER | CLONE_NEWNS
    put("/proc/self/setgroups", "deny")
    put("/proc/self/uid_map", f"0 {{uid}} 1")
    put("/proc/self/gid_map", f"0 {{gid}} 1")
    mounted = libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0
for i in range(3):  # each file under the 16 MB limit per file, together over the tmpfs
    try:
        with open(f"/tmp/file{{i}}", "wb") as f:
            f.write(b"x" * {15 * MB})
    except OSError:
        pass
print(mounted, sum(os.path.getsize(f"/tmp/{{name}}") for name in os.listdir("/tmp")))
"""
    result = execute_code(code, timeout=10.0)
    assert result.success, result
    mounted, written = result.stdout.split()
    assert mounted == "False" and int(written) <= SANDBOX_TMPFS_BYTES, result.stdout


@needs_seccomp
def test_memory_is_bounded_per_call_not_per_process():
    # Children by every route (posix.fork, os.fork, libc fork, a raw clone, an undisarmed subprocess), threads and
    # socket buffers each try to hold memory; the program reports, from inside, how much it holds at once.
    budget = 128 * MB
    code = """
import ctypes, os, posix, socket, sys, threading, time
MB, CHUNK = 1 << 20, 40
libc = ctypes.CDLL(None)
read_end, write_end = posix.pipe()
def hold_a_chunk_and_wait():  # what each child does: allocate (and touch) a chunk, say so, keep it
    try:
        block = b"x" * (CHUNK * MB)
        posix.write(write_end, b"%d\\n" % posix.getpid())
    except MemoryError:
        pass
    time.sleep(30)
    posix._exit(0)
children = []
def start_child(fork):
    try:
        pid = fork()
    except OSError:
        return
    if pid == 0:
        hold_a_chunk_and_wait()
    if pid > 0:
        children.append(pid)
clone = {"x86_64": 56, "aarch64": 220}[os.uname().machine]
for fork in [posix.fork, os.fork, libc.fork, lambda: libc.syscall(clone, 17, 0, 0, 0, 0)]:  # 17: SIGCHLD
    for _ in range(3):
        start_child(fork)
sys.meta_path.pop(0)  # the prelude's import guard: a subprocess module imported now is not disarmed
import subprocess
for _ in range(3):
    try:
        children.append(subprocess.Popen([sys.executable, "-S", "-c", f"import os, time\\nb = b'x' * {CHUNK * MB}\\n"
                                          f"os.write({write_end}, b'%d\\\\n' % os.getpid())\\ntime.sleep(30)"],
                                         pass_fds=[write_end]).pid)
    except OSError:
        pass
held = []
def hold_a_chunk():
    try:
        held.append(b"x" * (CHUNK * MB))
    except MemoryError:
        pass
threads = [threading.Thread(target=hold_a_chunk) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
hold_a_chunk()
queued, pairs = 0, []  # bytes waiting in socket buffers: kernel memory, which no address-space limit counts
try:
    for _ in range(400):
        a, b = socket.socketpair()
        pairs.append((a, b))
        a.setblocking(False)
        try:
            while True:
                queued += a.send(b"x" * 65536)
        except BlockingIOError:
            pass
except OSError:  # out of file descriptors
    pass
time.sleep(2)  # the children allocate meanwhile
os.set_blocking(read_end, False)
try:
    reported = {int(pid) for pid in posix.read(read_end, 65536).split()}
except BlockingIOError:
    reported = set()
alive = {pid for pid in children if posix.waitpid(pid, posix.WNOHANG) == (0, 0)}
print(len(children), (len(held) + len(reported & alive)) * CHUNK, queued // MB)
"""
    result = execute_code(code, timeout=10.0, maximum_memory_bytes=budget)
    assert result.success, result
    children, held_mb, queued_mb = map(int, result.stdout.split())
    print(f"children started: {children}, memory held at once: {held_mb} MB, in socket buffers: {queued_mb} MB")
    # a cgroup of the call's own counts the tmpfs too; without one, the one process's limit is the budget
    assert held_mb + queued_mb <= (budget + SANDBOX_TMPFS_BYTES) // MB, result.stdout


def test_no_zombie_is_left_where_orphans_come_to_us():
    # the server as PID 1 of a container without init, or a child subreaper: bwrap's pid 1 and the weak sandbox's
    # forked children would each stay a zombie of ours; someone else's child must keep its exit status (7)
    script = """
import ctypes, os, subprocess, time
assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER: orphans now come to us
from nanochat.execution import WEAK_SANDBOX, execute_code
bystander = subprocess.Popen(["sh", "-c", "exit 7"])
forks = "import ctypes, time\\nif ctypes.CDLL(None).fork() == 0:\\n    time.sleep(30)\\nprint('ok')"
for code, sandbox in [("print(1)", None), ("import time\\ntime.sleep(30)", None), (forks, None),
                      (forks, WEAK_SANDBOX), ("print(1)", WEAK_SANDBOX)]:
    execute_code(code, timeout=1.0, sandbox=sandbox)
time.sleep(0.5)
zombies = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        status = dict(line.split(":\\t", 1) for line in open(f"/proc/{pid}/status") if ":\\t" in line)
    except OSError:
        continue
    if int(status["PPid"]) == os.getpid() and status["State"].startswith("Z") and int(pid) != bystander.pid:
        zombies.append(status["Name"].strip())
print(zombies, bystander.wait())
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] 7", result.stdout


def run_filter(program, number, architecture, arguments=()):
    """A classic-BPF interpreter just big enough for our filter: what the kernel would answer to this call."""
    data = struct.pack("=iIQ6Q", number, architecture, 0, *(list(arguments) + [0] * 6)[:6])  # struct seccomp_data
    position, accumulator = 0, 0
    while True:
        code, jump_if_true, jump_if_false, k = struct.unpack_from("=HBBI", program, 8 * position)
        position += 1
        if code == 0x20:  # load a word of seccomp_data
            accumulator = struct.unpack_from("=I", data, k)[0]
        elif code == 0x06:  # return an action
            return k
        else:  # jump if equal / at least / any bit set
            taken = {0x15: accumulator == k, 0x35: accumulator >= k, 0x45: accumulator & k != 0}[code]
            position += jump_if_true if taken else jump_if_false


@pytest.mark.parametrize("architecture", ["x86_64", "aarch64"])
def test_the_filter_decides_by_architecture_call_and_arguments(architecture):
    # the filters for both architectures, checked here whatever this machine is
    from nanochat.execution import _AUDIT_ARCH, _seccomp_filter
    allow, eperm, enosys, kill = 0x7FFF0000, 0x50000 | 1, 0x50000 | 38, 0x80000000
    number = {"x86_64": {"read": 0, "unshare": 272, "clone": 56, "socket": 41, "mount": 165},
              "aarch64": {"read": 63, "unshare": 97, "clone": 220, "socket": 198, "mount": 40}}[architecture]
    thread, fork, new_user_namespace = 0x3D0F00, 17, 0x10000000  # glibc's pthread_create flags; SIGCHLD; CLONE_NEWUSER
    native = _AUDIT_ARCH[architecture]
    for allow_fork in (False, True):
        program = _seccomp_filter(architecture, allow_fork)

        def answer(name, *arguments):
            return run_filter(program, number[name], native, arguments)
        assert answer("read") == allow and answer("unshare", new_user_namespace) == eperm and answer("mount") == eperm
        assert answer("clone", thread) == allow and answer("clone", new_user_namespace | fork) == eperm
        assert answer("clone", fork) == (allow if allow_fork else eperm)
        assert answer("socket", socket.AF_INET) == allow and answer("socket", socket.AF_NETLINK) == eperm
        assert run_filter(program, 470, native) == enosys  # newer than any call reviewed
        assert run_filter(program, number["read"], 0x40000003) == kill  # AUDIT_ARCH_I386: a 32-bit call
        if architecture == "x86_64":
            assert run_filter(program, 0x40000000 | number["read"], native) == enosys  # the x32 ABI
