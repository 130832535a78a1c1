"""
Run untrusted, model-written Python in a separate process and report what happened.

Used for the engine's tool calls (<|python_start|> ... <|python_end|>) and for HumanEval.

What it does:
- runs the code in a fresh `python -I` child process, in its own process group (new session),
  inside a fresh temporary working directory that is deleted afterwards;
- wall-clock timeout: the whole process group gets SIGKILL, so children die too;
- resource limits in the child: address space (memory), CPU seconds, file size, number of processes;
- a scrubbed environment (no secrets from ours: only PATH, HOME=TMPDIR=the temp dir, LANG);
- stdin is /dev/null, so reading input never blocks;
- stdout/stderr captured and capped in size (the rest is discarded, the child is not blocked);
- destructive functions disabled inside the child: os.remove/unlink/rmdir/rename/kill/fork/system/...,
  shutil.rmtree/move/chown, subprocess.Popen, and open() for writing outside the temp dir.

What it does NOT protect against (this is not a security boundary, do not run hostile code you
care about without a real container/VM around it):
- code that restores the disabled functions (e.g. via ctypes, importlib.reload, or raw syscalls);
- reading files the user running us can read (no filesystem isolation, no chroot);
- network access (no network namespace);
- the process limit is not enforced for root (Linux exempts it), only the disabled fork functions are;
- side channels and resource use below the limits (e.g. filling the disk below the file size limit).
"""
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024  # per stream; a runaway print loop must not fill our memory


@dataclass
class ExecutionResult:
    success: bool  # ran to the end with exit code 0
    stdout: str
    stderr: str
    error: str | None = None  # short human-readable reason when success is False
    timeout: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False

    def __repr__(self):
        parts = [f"success={self.success}", f"timeout={self.timeout}", f"memory_exceeded={self.memory_exceeded}"]
        if self.error:
            parts.append(f"error={self.error!r}")
        if self.stdout:
            parts.append(f"stdout={self.stdout[:200]!r}")
        if self.stderr:
            parts.append(f"stderr={self.stderr[-200:]!r}")
        return "ExecutionResult(" + ", ".join(parts) + ")"


# The child runs this before the user's code: limits first, then disarm destructive functions,
# then exec the program. Kept as source text because the child starts from a bare interpreter.
_CHILD_PRELUDE = r'''
import builtins, io, os, resource, sys
program_path, memory_bytes, cpu_seconds, file_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def _limit(name, value):
    try:
        resource.setrlimit(name, (value, value))
    except (ValueError, OSError):
        pass  # some platforms (macOS) refuse some limits; the wall-clock timeout still holds
_limit(resource.RLIMIT_AS, memory_bytes)
_limit(resource.RLIMIT_DATA, memory_bytes)
_limit(resource.RLIMIT_CPU, cpu_seconds)
_limit(resource.RLIMIT_FSIZE, file_bytes)
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NPROC, 0)  # no new processes or threads (not enforced for root, see docstring)
with open(program_path, encoding="utf-8") as f:
    source = f.read()
sandbox_dir = os.path.realpath(os.getcwd())

def _disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the nanochat sandbox")
    return refuse

def _inside_sandbox(path):
    if isinstance(path, int):
        return True  # an already-open file descriptor
    real = os.path.realpath(os.fsdecode(path))
    return real == sandbox_dir or real.startswith(sandbox_dir + os.sep)

_real_open, _real_os_open = builtins.open, os.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside_sandbox(file):
        raise PermissionError(f"writing outside the sandbox directory is disabled: {file!r}")
    return _real_open(file, mode, *args, **kwargs)
def _guarded_os_open(path, flags, *args, **kwargs):
    writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
    if writing and not _inside_sandbox(path):
        raise PermissionError(f"writing outside the sandbox directory is disabled: {path!r}")
    return _real_os_open(path, flags, *args, **kwargs)
builtins.open = io.open = _guarded_open
os.open = _guarded_os_open

for name in ["kill", "killpg", "system", "popen", "fork", "forkpty", "vfork", "execv", "execve", "execvp",
             "execvpe", "execl", "execle", "execlp", "execlpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
             "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "setsid", "setpgid",
             "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "ftruncate",
             "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "link", "symlink", "putenv",
             "unsetenv", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "plock"]:
    if hasattr(os, name):
        setattr(os, name, _disabled("os." + name))
import shutil, subprocess
for name in ["rmtree", "move", "chown", "copytree", "copy", "copy2", "copyfile"]:
    setattr(shutil, name, _disabled("shutil." + name))
for name in ["Popen", "call", "run", "check_call", "check_output", "getoutput", "getstatusoutput"]:
    setattr(subprocess, name, _disabled("subprocess." + name))
sys.modules["multiprocessing"] = None  # importing it now raises ImportError

globals_for_program = {"__name__": "__main__", "__builtins__": builtins}
del _limit
exec(compile(source, "<program>", "exec"), globals_for_program)
'''


def _read_capped(stream, chunks, cap, truncated_flag):
    """Read a pipe to the end, keep the first `cap` bytes, drop the rest (so the child never blocks on a full pipe)."""
    kept = 0
    while True:
        data = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not data:
            break
        if kept < cap:
            chunks.append(data[: cap - kept])
            kept += len(chunks[-1])
        if kept >= cap and len(data) > 0:
            truncated_flag.append(True)
    stream.close()


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES):
    """Run `code` (a Python program as a string) in a sandboxed child process; returns an ExecutionResult."""
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_") as workdir:
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        cpu_seconds = int(timeout) + 1
        command = [sys.executable, "-I", "-X", "utf8", "-c", _CHILD_PRELUDE, program_path,
                   str(int(maximum_memory_bytes)), str(cpu_seconds), str(16 * 1024 * 1024)]
        # start_new_session: the child leads its own process group, so killpg reaches grandchildren.
        # (No preexec_fn: it is unsafe in threaded servers; the child sets its own limits in the prelude.)
        process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
        stdout_chunks, stderr_chunks, truncated = [], [], []
        readers = [threading.Thread(target=_read_capped, args=(process.stdout, stdout_chunks, max_output_bytes, truncated), daemon=True),
                   threading.Thread(target=_read_capped, args=(process.stderr, stderr_chunks, max_output_bytes, truncated), daemon=True)]
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # always kill the group: a finished program may have left children behind
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        deadline = time.monotonic() + 1.0
        for reader in readers:
            reader.join(timeout=max(0.0, deadline - time.monotonic()))
    stdout = b"".join(stdout_chunks).decode("utf-8", errors="replace")
    stderr = b"".join(stderr_chunks).decode("utf-8", errors="replace")
    memory_exceeded = "MemoryError" in stderr
    return_code = process.returncode
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif return_code == -signal.SIGXCPU or return_code == -signal.SIGKILL:
        timed_out = True
        error = "killed: CPU time limit"
    elif memory_exceeded:
        error = f"memory limit of {maximum_memory_bytes // (1024 * 1024)} MB exceeded"
    elif return_code != 0:
        last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        error = last_line or f"exit code {return_code}"
    else:
        error = None
    return ExecutionResult(success=(error is None), stdout=stdout, stderr=stderr, error=error, timeout=timed_out,
                           memory_exceeded=memory_exceeded, output_truncated=bool(truncated))
