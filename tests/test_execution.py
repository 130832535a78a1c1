"""The sandbox: results, timeouts, memory, fork bombs, destructive calls, output caps, clean environment."""
import os
import time

from nanochat.execution import execute_code


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


def test_fork_bomb_is_contained():
    code = "import os, subprocess\nfor _ in range(1000):\n    os.fork()\n"
    result = execute_code(code, timeout=2.0)
    assert not result.success and "disabled" in result.error
    result = execute_code("import subprocess\nsubprocess.Popen(['sleep', '100'])", timeout=2.0)
    assert not result.success and "disabled" in result.error


def test_children_are_killed_with_the_process_group():
    # even a child started despite the guards (ctypes fork) dies when the run ends
    code = "import ctypes, time\npid = ctypes.CDLL(None).fork()\nif pid == 0:\n    time.sleep(60)\nprint(pid)"
    result = execute_code(code, timeout=2.0)
    if result.success and result.stdout.strip().isdigit():
        pid = int(result.stdout.strip())
        time.sleep(0.2)
        try:
            os.kill(pid, 0)
            alive = open(f"/proc/{pid}/stat").read().split()[2] != "Z"
        except (ProcessLookupError, FileNotFoundError):
            alive = False
        assert not alive, "the forked child outlived the sandbox"


def test_deleting_or_overwriting_files_outside_the_temp_dir_is_blocked(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    attempts = [f"import os\nos.remove({str(victim)!r})", f"import os\nos.unlink({str(victim)!r})",
                f"import shutil\nshutil.rmtree({str(tmp_path)!r})", f"open({str(victim)!r}, 'w').write('gone')",
                f"import os\nos.rename({str(victim)!r}, 'stolen.txt')", f"import os\nos.system('rm -rf {tmp_path}')"]
    for code in attempts:
        result = execute_code(code)
        assert not result.success and "PermissionError" in result.stderr, code
    assert victim.read_text() == "keep me"
    # its own temp dir is writable
    result = execute_code("open('notes.txt', 'w').write('hi')\nprint(open('notes.txt').read())")
    assert result.success and result.stdout == "hi\n"


def test_huge_output_is_truncated():
    result = execute_code("import sys\nfor _ in range(2000):\n    sys.stdout.write('x' * 100000)", timeout=10.0,
                          max_output_bytes=10000)
    assert result.success and result.output_truncated and len(result.stdout) == 10000


def test_environment_is_scrubbed_and_stdin_closed(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SECRET_TOKEN", "hunter2")
    result = execute_code("import os\nprint(sorted(os.environ))\nprint(os.getcwd())\nprint(repr(input()))")
    assert "NANOCHAT_SECRET_TOKEN" not in result.stdout and "hunter2" not in result.stdout
    assert "nanochat_exec_" in result.stdout  # runs in a fresh temp dir
    assert "EOFError" in result.error  # input() returns at once instead of hanging
