"""
The sandbox: results, timeouts, memory, output caps, clean environment; every attack that escaped the old
in-process guards, now run against bubblewrap; the weak fallback and its warning.
"""
import os
import socket
import subprocess
import sys
import time

import pytest

from nanochat.execution import MAX_PROCESSES, WEAK_SANDBOX, execute_code, find_sandbox

needs_bubblewrap = pytest.mark.skipif(not find_sandbox().strong,
                                      reason=f"needs bubblewrap (apt-get install bubblewrap): {find_sandbox().description}")


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
    # posix.fork/execv are not disarmed (only their os.* names are); setsid leaves the process group that is killed
    marker = "987.654321"
    escape = f"import posix\nif posix.fork() == 0:\n    posix.setsid()\n    posix.execv('/usr/bin/sleep', ['sleep', '{marker}'])\n"
    for code in [escape + "print('started')", escape + "print('started', flush=True)\nimport time\ntime.sleep(60)"]:
        result = execute_code(code, timeout=2.0)
        assert result.stdout.strip() == "started", result
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
