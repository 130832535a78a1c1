"""
Run untrusted, model-written Python in a sandbox and report what happened.

Used for the engine's tool calls that the calculator (nanochat/calculator.py) cannot evaluate, for
HumanEval and for RL. Anyone who can chat with the model can steer it into writing code, so that
code is hostile input. Two layers contain it:

1. The operating system boundary: bubblewrap (`bwrap`, the Debian/Ubuntu package `bubblewrap`,
   the sandbox Flatpak uses). The child gets its own PID, network, IPC, UTS (and, where it can,
   user) namespaces: it cannot see or signal the host's processes, it has only a loopback network
   of its own, and when it or the timeout ends, the kernel kills everything it started. Its
   filesystem is a fresh root holding the Python runtime read-only and a small private tmpfs as
   working directory: no host file can be read or changed. It runs as an unprivileged user with
   no capabilities (when we are root, bwrap sets the sandbox up and the child drops to an unused
   uid of its own, so the process limit, which Linux never enforces for root, holds). The program
   reaches the child on stdin, so nothing is written on the host's disk.
2. Inside, the child limits itself before running the program: address space (memory), CPU
   seconds, file size, number of processes; then disarms destructive functions (os.remove, kill,
   fork, subprocess, open() for writing outside its directory, ...) so an honest mistake fails
   with a clear PermissionError. This layer alone is not a boundary (ctypes or importlib.reload
   undo it); it is what remains where bubblewrap is missing or not permitted (macOS, a container
   that forbids namespaces). Then we log a warning, and chat_web bound to a non-loopback address
   refuses to run such code unless told otherwise (see `sandbox_is_strong`).

Around both: a wall-clock timeout that SIGKILLs the whole process group, a scrubbed environment,
stdin at end-of-file once the program is read, and stdout/stderr capped in size.
NANOCHAT_SANDBOX=weak forces the weak sandbox (to compare the two, or on a host where bwrap misbehaves).
"""
import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from nanochat.common import logger

DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024  # per stream; a runaway print loop must not fill our memory
MAX_FILE_BYTES = 16 * 1024 * 1024  # any one file the program writes
SANDBOX_TMPFS_BYTES = 32 * 1024 * 1024  # all of them together: the tmpfs lives in the host's memory
MAX_PROCESSES = 16  # processes and threads of the sandbox's user, the program included
# When we are root, the child switches to a uid no account uses, a fresh one per call, so that
# RLIMIT_NPROC counts only this call's processes.
SANDBOX_UID_RANGE = (1_000_000, 2_000_000)


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


# The child runs this before the user's code: read the program, drop to the sandbox uid, set limits,
# disarm destructive functions, then exec the program. Source text because the child is a bare interpreter.
_CHILD_PRELUDE = r"""
import builtins, io, os, resource, sys
memory_bytes, cpu_seconds, file_bytes, max_processes, sandbox_uid = (int(a) for a in sys.argv[1:6])
source = sys.stdin.buffer.read().decode("utf-8", errors="replace")
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the program itself reads end-of-file: input() never blocks
if sandbox_uid:
    # bwrap ran us as root with only CAP_SETUID/CAP_SETGID; dropping every uid clears those too
    os.setgroups([])
    os.setresgid(sandbox_uid, sandbox_uid, sandbox_uid)
    os.setresuid(sandbox_uid, sandbox_uid, sandbox_uid)
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
_limit(resource.RLIMIT_NPROC, max_processes)
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
_DISARM_ON_IMPORT = {"shutil": ["rmtree", "move", "chown", "copytree", "copy", "copy2", "copyfile"],
                     "subprocess": ["Popen", "call", "run", "check_call", "check_output", "getoutput", "getstatusoutput"]}
class _DisarmOnImport:
    # Importing shutil and subprocess up front would double the start-up time (~25 ms of ~50), and most programs
    # never use them: disarm them when the program imports them (importlib.import_module included).
    def find_spec(self, name, path=None, target=None):
        if name not in _DISARM_ON_IMPORT:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                run_module = spec.loader.exec_module
                def exec_module(module):
                    run_module(module)
                    for function in _DISARM_ON_IMPORT[name]:
                        setattr(module, function, _disabled(f"{name}.{function}"))
                spec.loader.exec_module = exec_module
                return spec
        return None
sys.meta_path.insert(0, _DisarmOnImport())
sys.modules["multiprocessing"] = None  # importing it now raises ImportError

globals_for_program = {"__name__": "__main__", "__builtins__": builtins}
del _limit
exec(compile(source, "<program>", "exec"), globals_for_program)
"""


@dataclass
class Sandbox:
    """How this host runs model-written code: bwrap's command line, or the weak sandbox and why."""
    strong: bool
    description: str  # for logs: what contains the code, or why nothing does
    bwrap_arguments: list | None = None  # everything between `bwrap` and the Python command
    switch_user: bool = False  # bwrap runs as root without a user namespace: the child drops to a sandbox uid


def _python_runtime_mounts():
    """bwrap arguments that show the Python runtime, read-only, at the paths where it lives on the host."""
    arguments = ["--ro-bind", "/usr", "/usr", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64"]:
        if os.path.islink(top):
            arguments += ["--symlink", os.readlink(top), top]  # merged /usr: /lib -> usr/lib
        elif os.path.isdir(top):
            arguments += ["--ro-bind", top, top]
    # an interpreter outside /usr (pyenv, conda, a custom build) brings its prefix along
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/"):
        # bwrap creates missing parents with mode 0700, which the unprivileged child could not traverse
        parents = []
        parent = os.path.dirname(prefix)
        while parent not in ("/", ""):
            parents.append(parent)
            parent = os.path.dirname(parent)
        for parent in reversed(parents):
            arguments += ["--perms", "0755", "--dir", parent]
        arguments += ["--ro-bind", prefix, prefix]
    return arguments


def _bwrap_arguments(user_namespace, disable_nested_user_namespaces=True):
    namespaces = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if user_namespace:
        # --disable-userns (bwrap 0.8+) keeps the child from making user namespaces of its own: less kernel to attack
        namespaces = ["--unshare-user"] + (["--disable-userns"] if disable_nested_user_namespaces else []) + namespaces
    else:
        # bwrap started by root without a user namespace drops every capability but these two, which the
        # child's prelude needs once to switch to the sandbox uid
        namespaces += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return (namespaces + ["--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv",
                          "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
                          "--setenv", "LANG", "C.UTF-8"]
            + _python_runtime_mounts()
            + ["--proc", "/proc", "--dev", "/dev", "--size", str(SANDBOX_TMPFS_BYTES), "--perms", "1777",
               "--tmpfs", "/tmp", "--chdir", "/tmp"])


@functools.lru_cache(maxsize=1)
def find_sandbox():
    """Probe once per process for the strongest sandbox this host allows (one trial run each, ~0.1 s)."""
    if os.environ.get("NANOCHAT_SANDBOX") == "weak":
        return Sandbox(False, "weak in-process guards only (NANOCHAT_SANDBOX=weak)")
    if not sys.platform.startswith("linux"):
        return Sandbox(False, f"weak in-process guards only (bubblewrap needs Linux, this is {sys.platform})")
    if shutil.which("bwrap") is None:
        return Sandbox(False, "weak in-process guards only: bubblewrap is not installed "
                              "(Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)")
    candidates = []
    if os.geteuid() == 0:
        candidates.append(Sandbox(True, "bubblewrap (namespaces, child switched to an unprivileged uid)",
                                  _bwrap_arguments(user_namespace=False), switch_user=True))
        for nested in (True, False):
            candidates.append(Sandbox(True, "bubblewrap (user namespace as root: the process limit is not enforced)",
                                      _bwrap_arguments(user_namespace=True, disable_nested_user_namespaces=nested)))
    else:
        for nested in (True, False):  # an older bwrap lacks --disable-userns
            candidates.append(Sandbox(True, "bubblewrap (user, PID, network, IPC and UTS namespaces)",
                                      _bwrap_arguments(user_namespace=True, disable_nested_user_namespaces=nested)))
    failures = []
    for candidate in candidates:
        result = _run(candidate, "print(6 * 7)", timeout=10.0, maximum_memory_bytes=256 * 1024 * 1024,
                      max_output_bytes=4096)
        if result.success and result.stdout == "42\n":
            return candidate
        failures.append((result.stderr.strip().splitlines() or [result.error or "no output"])[-1])
    return Sandbox(False, f"weak in-process guards only: bubblewrap is installed but failed here ({failures[-1]}); "
                          f"namespaces may be forbidden on this host (a container without user namespaces?)")


def sandbox_is_strong():
    """True when model-written code runs behind the OS boundary; False means only the in-process guards."""
    return find_sandbox().strong


@functools.lru_cache(maxsize=1)
def _warn_if_weak():
    sandbox = find_sandbox()
    if sandbox.strong:
        logger.info(f"model-written code runs in {sandbox.description}")
    else:
        logger.warning(f"model-written code runs with {sandbox.description}. That is not a security boundary: "
                       f"do not expose this to people you do not trust.")


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


def _write_program(stream, data):
    try:
        stream.write(data)
        stream.close()
    except (BrokenPipeError, OSError):
        pass  # the child died before reading it all; its exit status tells what happened


def _run(sandbox, code, timeout, maximum_memory_bytes, max_output_bytes):
    cpu_seconds = int(timeout) + 1
    sandbox_uid = secrets.randbelow(SANDBOX_UID_RANGE[1] - SANDBOX_UID_RANGE[0]) + SANDBOX_UID_RANGE[0] if sandbox.switch_user else 0
    limits = [str(int(maximum_memory_bytes)), str(cpu_seconds), str(MAX_FILE_BYTES), str(MAX_PROCESSES), str(sandbox_uid)]
    python = os.path.realpath(sys._base_executable if hasattr(sys, "_base_executable") else sys.executable)
    # -I: ignore PYTHON* variables, user site-packages and the current directory; -S: no site-packages at all
    child = [python, "-I", "-S", "-X", "utf8", "-c", _CHILD_PRELUDE] + limits
    # The bwrap process's own environment shows in /proc/1/environ inside: give it nothing of ours.
    environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    # only the weak sandbox works in a directory on the host's disk; bwrap's is a tmpfs inside the sandbox
    weak = sandbox.bwrap_arguments is None
    with (tempfile.TemporaryDirectory(prefix="nanochat_exec_") if weak else contextlib.nullcontext()) as workdir:
        if not weak:
            command, cwd = ["bwrap"] + sandbox.bwrap_arguments + child, "/"
        else:
            command, cwd = child, workdir
            environment.update(HOME=workdir, TMPDIR=workdir)
        # start_new_session: the child leads its own process group, so killpg reaches what it started.
        # (No preexec_fn: it is unsafe in threaded servers; the child sets its own limits in the prelude.)
        process = subprocess.Popen(command, cwd=cwd, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
        stdout_chunks, stderr_chunks, truncated = [], [], []
        threads = [threading.Thread(target=_write_program, args=(process.stdin, code.encode("utf-8", "replace")), daemon=True),
                   threading.Thread(target=_read_capped, args=(process.stdout, stdout_chunks, max_output_bytes, truncated), daemon=True),
                   threading.Thread(target=_read_capped, args=(process.stderr, stderr_chunks, max_output_bytes, truncated), daemon=True)]
        for thread in threads:
            thread.start()
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # Always kill the group, even after a clean exit: the program may have left children behind.
            # Under bwrap, killing bwrap kills the namespace's init and with it every process inside.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        deadline = time.monotonic() + 1.0
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
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


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES,
                 sandbox=None):
    """
    Run `code` (a Python program as a string) in the sandbox; returns an ExecutionResult.
    `sandbox` defaults to the strongest this host allows (find_sandbox()); the benchmark passes each in turn.
    """
    if sandbox is None:
        _warn_if_weak()
        sandbox = find_sandbox()
    return _run(sandbox, code, timeout, maximum_memory_bytes, max_output_bytes)


WEAK_SANDBOX = Sandbox(False, "weak in-process guards only")
