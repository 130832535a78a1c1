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
   reaches the child on stdin, so nothing is written on the host's disk. Three more walls:
   - A seccomp filter (a classic-BPF program built below, handed to bwrap on a pipe) refuses what a
     Python tool never needs and an attacker wants. First new namespaces (unshare, clone with
     namespace flags, setns): inside a user namespace of its own the child would hold every
     capability again, enough to mount a tmpfs past our size cap. (--disable-userns says the same
     where bwrap has a user namespace; as root it has none, and only the filter stops this.) Then
     mounts, ptrace and other processes' memory, io_uring, keyrings, bpf, perf, userfaultfd, kernel
     modules, memory no limit counts (memfd, SysV shared memory), sockets other than Unix, IPv4 and
     IPv6 (netlink, packet), and every system call newer than the ones reviewed here.
   - Memory is bounded per call, not per process (fork would multiply the limit). With a cgroup v2
     that hands out the memory and pids controllers, each call gets a cgroup of its own (memory.max,
     pids.max), removed afterwards. Without one (cgroup v1 hosts, most containers) the filter also
     refuses fork: the program stays one process, threads allowed, and its address-space limit bounds
     the whole call. Either way each call has at most SANDBOX_TMPFS_BYTES of files on top.
   - Every process a call starts is waited for. bwrap's outer process exits with the program and
     leaves the sandbox's pid 1 to whoever adopts orphans: a server that is PID 1 (a container
     without init) or a child subreaper would collect a zombie per call, so we reap what is left of
     the call's process group, and nothing else.
2. Inside, the child limits itself before running the program: address space (memory), CPU
   seconds, file size, number of processes, open files; then disarms destructive functions
   (os.remove, kill, fork, subprocess, open() for writing outside its directory, ...) so an honest
   mistake fails with a clear PermissionError. This layer alone is not a boundary (ctypes or
   importlib.reload undo it); it is what remains where bubblewrap is missing or not permitted
   (macOS, a container that forbids namespaces). Then we log a warning, and chat_web bound to a
   non-loopback address refuses to run such code unless told otherwise (see `sandbox_is_strong`).

Around both: a wall-clock timeout that SIGKILLs the whole process group, a scrubbed environment,
stdin at end-of-file once the program is read, and stdout/stderr capped in size.
NANOCHAT_SANDBOX=weak forces the weak sandbox (to compare the two, or on a host where bwrap misbehaves).
"""
import contextlib
import errno
import functools
import os
import secrets
import select
import shutil
import signal
import socket
import struct
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
MAX_OPEN_FILES = 64  # each open pipe or socket can hold ~200 KB of kernel memory that no address-space limit counts
# When we are root, the child switches to a uid no account uses, a fresh one per call, so that
# RLIMIT_NPROC counts only this call's processes.
SANDBOX_UID_RANGE = (1_000_000, 2_000_000)


@dataclass
class ExecutionResult:
    """What one sandboxed run did. The engine turns it into the tool's output text (stdout, or `Error: <error>`)."""
    success: bool  # ran to the end with exit code 0
    stdout: str
    stderr: str
    error: str | None = None  # short human-readable reason when success is False
    timeout: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False

    def __repr__(self):
        # the start of stdout (the answer comes first), the end of stderr (a traceback's last line names the error)
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
# The program runs with globals of its own (globals_for_program), so none of the prelude's names, _real_open
# included, are visible to it. The guards can still be undone (ctypes, importlib.reload(os)): that is why this
# layer is a safety net for honest mistakes, and bubblewrap the boundary.
_CHILD_PRELUDE = r"""
import builtins, io, os, resource, sys
memory_bytes, cpu_seconds, file_bytes, max_processes, max_open_files, sandbox_uid = (int(a) for a in sys.argv[1:7])
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
_limit(resource.RLIMIT_NOFILE, max_open_files)
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
import posix
for name in ["fork", "forkpty"]:  # os.fork is posix.fork under another name: disarm the original too
    if hasattr(posix, name):
        setattr(posix, name, _disabled("posix." + name))
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
    seccomp_filter: bytes | None = None  # the BPF program bwrap installs before it starts the child
    call_cgroup_parent: str | None = None  # each call runs in a cgroup v2 of its own under this one; None: no fork


# ------------------------------------------------------------------ the seccomp filter

# System calls by name: (number on x86_64, number on aarch64), None where the architecture has no such call
# (<asm/unistd_64.h>, <asm-generic/unistd.h>). The filter refuses all but the last group with EPERM.
_SYSCALL_NUMBERS = {
    # namespaces and mounts: in a user namespace of its own the child has every capability again
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "open_tree_attr": (467, 467),
    # other processes: their memory, their file descriptors
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "process_madvise": (440, 440), "process_mrelease": (448, 448), "pidfd_getfd": (438, 438), "kcmp": (312, 272),
    # kernel surface a Python tool never needs, where many privilege escalations were found
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "fanotify_init": (300, 262),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264), "lookup_dcookie": (212, 18),
    "migrate_pages": (256, 238), "move_pages": (279, 239),
    # memory that neither the address-space limit nor the tmpfs cap counts
    "memfd_create": (319, 279), "shmget": (29, 194),
    # the machine itself (most need capabilities the child lacks: refused here too, should it ever regain them)
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142), "acct": (163, 89),
    "quotactl": (179, 60), "quotactl_fd": (443, 443), "syslog": (103, 116), "settimeofday": (164, 170),
    "clock_settime": (227, 112), "vhangup": (153, 58), "nfsservctl": (180, 42),
    "iopl": (172, None), "ioperm": (173, None), "modify_ldt": (154, None), "uselib": (134, None),
    # not refused outright: their arguments decide, or (fork) whether calls have a cgroup of their own
    "clone": (56, 220), "clone3": (435, 435), "socket": (41, 198), "personality": (135, 92),
    "fork": (57, None), "vfork": (58, None),  # aarch64 forks with clone only
}
# the calls above that are not refused by number alone: their own branch of the filter decides
_DECIDED_ELSEWHERE = {"clone", "clone3", "socket", "personality", "fork", "vfork"}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # EM_X86_64 / EM_AARCH64 | 64-bit | little-endian
_X32_SYSCALL_BIT = 0x40000000  # x86-64's x32 ABI: the same architecture value, this bit set in the number
_FIRST_UNREVIEWED_SYSCALL = 470  # file_setattr (469, Linux 6.17) is the newest call reviewed here
_CLONE_NEW_NAMESPACES = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_CLONE_THREAD = 0x00010000
# Classic BPF (the packet-filter language the kernel also runs for seccomp): a list of instructions over one
# accumulator, with forward jumps only, so every program terminates. The kernel runs it on every system call
# and the first RETURN decides the call's fate. The opcodes used: load a 32-bit word of struct seccomp_data,
# compare (jump if equal / at least / any bit set), return an action (allow, fail with an errno, kill)
_LOAD, _JUMP_IF_EQUAL, _JUMP_IF_AT_LEAST, _JUMP_IF_ANY_BIT, _RETURN = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _ERRNO, _KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in seccomp_data: int nr; u32 arch; u64 ip; u64 args[6] (low half first)


def _seccomp_architecture():
    """The architecture the filter knows the system calls of, or None. A 32-bit Python makes 32-bit calls."""
    machine = os.uname().machine
    return machine if machine in _AUDIT_ARCH and sys.maxsize > 2**32 else None


# cached: every call uses one of these two programs, so each is built once per process
@functools.lru_cache(maxsize=2)
def _seccomp_filter(architecture, allow_fork):
    """The filter the module docstring describes, as bwrap's --seccomp reads it: an array of struct sock_filter."""
    # the column of _SYSCALL_NUMBERS for this architecture: the same call has different numbers on each
    column = list(_AUDIT_ARCH).index(architecture)
    number = {name: numbers[column] for name, numbers in _SYSCALL_NUMBERS.items() if numbers[column] is not None}
    # Built as (code, k, jump-if-true label, jump-if-false label); labels become relative offsets at the end,
    # which is what a hand-written BPF program gets wrong most easily.
    program, labels = [], {}

    def op(code, k, true=None, false=None):  # `true`/`false`: where to jump, by label; None: the next instruction
        program.append((code, k, true, false))

    def label(name):
        labels[name] = len(program)

    # 1. the architecture: system call numbers mean different calls on different ABIs, so a filter that checked
    #    numbers without it could be bypassed by making the same call through another ABI
    op(_LOAD, _ARCH)
    op(_JUMP_IF_EQUAL, _AUDIT_ARCH[architecture], false="kill")  # 32-bit calls (int 0x80) are numbered differently
    # 2. the call number: too new or refused outright, or handed to a branch that reads its arguments
    op(_LOAD, _NR)
    if architecture == "x86_64":
        op(_JUMP_IF_AT_LEAST, _X32_SYSCALL_BIT, true="enosys")
    op(_JUMP_IF_AT_LEAST, _FIRST_UNREVIEWED_SYSCALL, true="enosys")  # what an older kernel would answer
    # clone3 passes its flags in memory, out of a filter's sight: ENOSYS makes glibc fall back to clone, which it sees
    op(_JUMP_IF_EQUAL, number["clone3"], true="enosys")
    for name in ["clone", "socket", "personality"]:
        op(_JUMP_IF_EQUAL, number[name], true=name)
    refused = [name for name in number if name not in _DECIDED_ELSEWHERE]
    if not allow_fork:
        refused += [name for name in ["fork", "vfork"] if name in number]
    for name in refused:
        op(_JUMP_IF_EQUAL, number[name], true="eperm")
    # every call not named above is allowed: a blocklist of what an attacker wants, on top of namespaces that
    # already hide the host; an allowlist would have to track every call CPython and its libraries make
    op(_RETURN, _ALLOW)
    # 3. the branches that look at the first argument
    label("clone")
    op(_LOAD, _ARG0)  # the flags
    op(_JUMP_IF_ANY_BIT, _CLONE_NEW_NAMESPACES, true="eperm")
    if not allow_fork:
        op(_JUMP_IF_ANY_BIT, _CLONE_THREAD, false="eperm")  # a thread shares the address space, a process would not
    op(_RETURN, _ALLOW)
    label("socket")
    op(_LOAD, _ARG0)  # the address family; in our network namespace IPv4 and IPv6 reach only its own loopback
    for family in [socket.AF_UNIX, socket.AF_INET, socket.AF_INET6]:
        op(_JUMP_IF_EQUAL, family, true="allow")
    op(_RETURN, _ERRNO | errno.EPERM)
    label("personality")
    op(_LOAD, _ARG0)
    op(_JUMP_IF_EQUAL, 0, true="allow")  # PER_LINUX, the default
    op(_JUMP_IF_EQUAL, 0xFFFFFFFF, true="allow")  # a query, which changes nothing
    # the actions; EPERM and ENOSYS make the call fail as the kernel itself would, so Python raises a normal
    # OSError the program can handle, rather than the process dying mid-call
    label("eperm")
    op(_RETURN, _ERRNO | errno.EPERM)
    label("allow")
    op(_RETURN, _ALLOW)
    label("enosys")
    op(_RETURN, _ERRNO | errno.ENOSYS)
    label("kill")
    op(_RETURN, _KILL_PROCESS)
    instructions = []
    for index, (code, k, true, false) in enumerate(program):
        # a jump offset counts the instructions skipped after this one: 0 is "fall through to the next"
        jumps = [labels[target] - index - 1 if target else 0 for target in (true, false)]
        assert all(0 <= jump < 256 for jump in jumps), "classic BPF jumps forward, at most 255 instructions"
        # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k, in native byte order and without padding (8 bytes)
        instructions.append(struct.pack("=HBBI", code, *jumps, k))
    return b"".join(instructions)


def _pipe_holding(data):
    """The read end of a pipe that already holds `data`: bwrap reads its filter from a file descriptor, once."""
    read_end, write_end = os.pipe()
    os.write(write_end, data)  # ~1 KB, well under a pipe's buffer: never blocks
    os.close(write_end)
    return read_end


# ------------------------------------------------------------------ memory per call: a cgroup, or no fork

def _cgroup_for_calls():
    """A cgroup v2 directory whose children get the memory and pids controllers: (path, None), or (None, why not).
    NANOCHAT_SANDBOX_CGROUP names one (e.g. a systemd Delegate=yes subtree); otherwise we try our own cgroup."""
    path = os.environ.get("NANOCHAT_SANDBOX_CGROUP")
    if not path:
        # Our own cgroup's directory: /proc/self/cgroup's "0::<path>" line gives it relative to the cgroup2
        # hierarchy, and mountinfo says where that hierarchy is mounted (field 5) and which part of it the mount
        # shows (field 4: inside a container, usually the container's own subtree, not the host's root).
        try:
            with open("/proc/self/mountinfo") as mounts:
                cgroup2 = [fields for fields in map(str.split, mounts) if fields[fields.index("-") + 1] == "cgroup2"]
            with open("/proc/self/cgroup") as cgroups:
                ours = [line.strip()[3:] for line in cgroups if line.startswith("0::")]
        except OSError as error:
            return None, f"cannot read /proc ({error.strerror})"
        if not cgroup2 or not ours:
            return None, "no cgroup v2 is mounted"
        root, mount_point = cgroup2[0][3], cgroup2[0][4]
        path = os.path.normpath(os.path.join(mount_point, os.path.relpath(ours[0], root)))
    try:
        with open(os.path.join(path, "cgroup.subtree_control")) as control:
            controllers = control.read().split()
    except OSError as error:
        return None, f"cannot read {path}/cgroup.subtree_control ({error.strerror})"
    # subtree_control lists the controllers this cgroup hands to its children: without memory and pids there,
    # memory.max and pids.max do not exist in a child, and the per-call limits could not be set
    if not {"memory", "pids"} <= set(controllers):
        return None, (f"the cgroup v2 {path} does not give its children the memory and pids controllers "
                      f"(cgroup.subtree_control: {' '.join(controllers) or 'empty'}); "
                      f"NANOCHAT_SANDBOX_CGROUP can name one that does")
    # creating a child cgroup is a mkdir in this directory
    if not os.access(path, os.W_OK):
        return None, f"the cgroup v2 {path} is not writable by us"
    return path, None


def _new_call_cgroup(parent, maximum_memory_bytes):
    """A fresh cgroup for one call, its limits written before anything runs in it; returns its path."""
    # the pid and a random suffix: concurrent calls, and calls of other processes, never share a name
    path = os.path.join(parent, f"nanochat-sandbox-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(path)
    # the program's memory and its files in the tmpfs (charged here too); processes: bwrap's two and its setup helper
    for name, value in [("memory.max", maximum_memory_bytes + SANDBOX_TMPFS_BYTES), ("memory.swap.max", 0),
                        ("pids.max", MAX_PROCESSES + 3)]:
        try:
            with open(os.path.join(path, name), "w") as control:
                control.write(str(value))
        except FileNotFoundError:
            # absent without swap accounting: then there is no swap to limit
            if name != "memory.swap.max":
                raise
    return path


def _remove_call_cgroup(path):
    """Kill what is left in the call's cgroup and remove it. True when the memory limit killed a process in it."""
    # read first: the counters go with the directory
    with open(os.path.join(path, "memory.events")) as events:
        oom_kills = dict(line.split() for line in events).get("oom_kill", "0")
    with contextlib.suppress(OSError):  # cgroup.kill: Linux 5.14+; before, the end of the pid namespace does it
        with open(os.path.join(path, "cgroup.kill"), "w") as kill:
            kill.write("1")
    deadline = time.monotonic() + 2.0
    while True:
        try:
            os.rmdir(path)
            break
        except OSError as error:  # EBUSY until its last process has exited
            if time.monotonic() > deadline:
                logger.warning(f"could not remove the sandbox cgroup {path}: {error}")
                break
            time.sleep(0.002)
    return int(oom_kills) > 0


def _describe_containment(architecture, cgroup_parent, no_cgroup):
    """
    For the startup log line: is the seccomp filter on, and what bounds a call's memory. Said at startup because
    the two are host properties an operator can fix (a delegated cgroup, a 64-bit x86 or ARM machine), and a
    degraded sandbox should never be a silent one.
    """
    if architecture:
        seccomp = (f"seccomp filter on ({architecture}: no nested namespaces or mounts, ptrace, io_uring, keyrings, "
                   f"bpf, netlink or packet sockets, ...)")
    else:
        seccomp = (f"seccomp filter OFF: no system call table here for {os.uname().machine} (only 64-bit x86_64 and "
                   f"aarch64), so nested namespaces and the kernel calls it would refuse stay reachable")
    if cgroup_parent:
        memory = f"memory bounded per call by a cgroup v2 of its own under {cgroup_parent} (memory.max, pids.max)"
    elif architecture:
        memory = (f"memory bounded per call by refusing fork, one process under the call's memory limit "
                  f"(no cgroup v2 for calls: {no_cgroup})")
    else:
        memory = f"memory limited per process only (no cgroup v2 for calls: {no_cgroup}; no filter to refuse fork)"
    return f"{seccomp}; {memory}"


def _python_runtime_mounts():
    """bwrap arguments that show the Python runtime, read-only, at the paths where it lives on the host."""
    # read-only: the program can run everything there but change nothing. ld.so.cache lets the dynamic loader
    # find libpython and libc without searching; "-try" because not every system has one
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
    """bwrap's command line (without the seccomp and the program): namespaces, environment, mounts, working dir."""
    namespaces = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if user_namespace:
        # --disable-userns (bwrap 0.8+) keeps the child from making user namespaces of its own: less kernel to attack
        namespaces = ["--unshare-user"] + (["--disable-userns"] if disable_nested_user_namespaces else []) + namespaces
    else:
        # bwrap started by root without a user namespace drops every capability but these two, which the
        # child's prelude needs once to switch to the sandbox uid
        namespaces += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    # No --new-session: bwrap's pid 1 then stays in the call's process group, where killpg reaches it and
    # _reap_process_group finds it. (That option keeps the child from injecting input into a terminal; bwrap starts
    # in a session of its own, with pipes for stdio, so there is no terminal.)
    # --die-with-parent: if we die, the kernel kills the sandbox too (no orphan runs on unwatched). --clearenv and
    # the --setenv list: the child sees none of our environment (API keys, tokens), only what it needs.
    # --proc and --dev: a /proc of the sandbox's own PID namespace, a minimal /dev (null, zero, urandom, ...).
    return (namespaces + ["--die-with-parent", "--hostname", "sandbox", "--clearenv",
                          "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
                          "--setenv", "LANG", "C.UTF-8"]
            + _python_runtime_mounts()
            + ["--proc", "/proc", "--dev", "/dev", "--size", str(SANDBOX_TMPFS_BYTES), "--perms", "1777",
               "--tmpfs", "/tmp", "--chdir", "/tmp"])


@functools.lru_cache(maxsize=1)
def find_sandbox():
    """Probe once per process for the strongest sandbox this host allows (one trial run each, ~0.1 s)."""
    # Decided by trying, not by reading the kernel's settings: whether an unprivileged user namespace may be
    # made depends on sysctls, AppArmor or SELinux policy and the container runtime's seccomp profile, and a
    # trial run answers all of them at once.
    if os.environ.get("NANOCHAT_SANDBOX") == "weak":
        return Sandbox(False, "weak in-process guards only (NANOCHAT_SANDBOX=weak)")
    if not sys.platform.startswith("linux"):
        return Sandbox(False, f"weak in-process guards only (bubblewrap needs Linux, this is {sys.platform})")
    if shutil.which("bwrap") is None:
        return Sandbox(False, "weak in-process guards only: bubblewrap is not installed "
                              "(Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)")
    # Every bwrap candidate gets the same filter and memory bound; a filter bwrap cannot install fails the probe.
    cgroup_parent, no_cgroup = _cgroup_for_calls()
    architecture = _seccomp_architecture()
    seccomp_filter = _seccomp_filter(architecture, allow_fork=cgroup_parent is not None) if architecture else None
    containment = _describe_containment(architecture, cgroup_parent, no_cgroup)

    def bwrap_sandbox(description, arguments, switch_user=False):
        return Sandbox(True, f"{description}; {containment}", arguments, switch_user, seccomp_filter, cgroup_parent)

    # Strongest first; the first that runs `print(6 * 7)` correctly is the one used. Whether namespaces work
    # depends on the kernel and on the container we are in, which only trying tells.
    candidates = []
    # As root, bwrap can set up namespaces without a user namespace; the child then drops to a fresh uid, so
    # RLIMIT_NPROC holds (Linux never enforces it for root, and inside a user namespace the child is root).
    if os.geteuid() == 0:
        candidates.append(bwrap_sandbox("bubblewrap (namespaces, child switched to an unprivileged uid)",
                                    _bwrap_arguments(user_namespace=False), switch_user=True))
        for nested in (True, False):
            candidates.append(bwrap_sandbox("bubblewrap (user namespace as root: the process limit is not enforced)",
                                        _bwrap_arguments(user_namespace=True, disable_nested_user_namespaces=nested)))
    else:
        for nested in (True, False):  # an older bwrap lacks --disable-userns
            candidates.append(bwrap_sandbox("bubblewrap (user, PID, network, IPC and UTS namespaces)",
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
    """Log once per process what contains model-written code: a warning when it is less than the full sandbox."""
    sandbox = find_sandbox()
    if sandbox.strong and sandbox.seccomp_filter is None:
        logger.warning(f"model-written code runs in {sandbox.description}")
    elif sandbox.strong:
        logger.info(f"model-written code runs in {sandbox.description}")
    else:
        logger.warning(f"model-written code runs with {sandbox.description}. That is not a security boundary: "
                       f"do not expose this to people you do not trust.")


def _read_capped(stream, chunks, cap, truncated_flag):
    """Read a pipe to the end, keep the first `cap` bytes, drop the rest (so the child never blocks on a full pipe)."""
    kept = 0
    while True:
        # read1: return what is there now instead of waiting to fill 64 KB
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
    """Send the program on the child's stdin, then close it: the prelude reads to end-of-file."""
    try:
        stream.write(data)
        stream.close()
    except (BrokenPipeError, OSError):
        pass  # the child died before reading it all; its exit status tells what happened


def _wait(process, timeout):
    """process.wait(timeout) without its polling: Popen.wait sleeps in steps that double up to 50 ms, so a call that
    ends after 17 ms is noticed at 32 ms. A pidfd (Linux 5.3+) wakes us the moment the child exits."""
    # Measured (dev/BENCHMARKS.md, sandbox): with Popen.wait, p50 jumped between ~17 and ~33 ms from run to run;
    # with the pidfd it stays at 17-19 ms.
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux, or too old: poll like Popen.wait
        return process.wait(timeout=timeout)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        # the pidfd becomes readable when the process exits; poll's timeout is in milliseconds
        if not poller.poll(timeout * 1000):
            raise subprocess.TimeoutExpired(process.args, timeout)
    finally:
        os.close(pidfd)
    # returns at once now; it also records the exit status on the Popen object
    return process.wait()


def _reap_process_group(process_group):
    """
    Wait for what the call left in its process group that became our child. Orphans go to PID 1 or to the nearest
    child subreaper: when that is us (a server in a container without init), bwrap's pid 1, which its outer process
    never waits for, and whatever the weak sandbox's program forked would each stay a zombie. Only the call itself
    can be in its group, so no exit status that another part of this program waits for is taken. Everything in it
    was just SIGKILLed: this returns at once, and at once too where orphans go elsewhere (ChildProcessError).
    """
    deadline = time.monotonic() + 2.0
    while True:
        try:
            pid, _ = os.waitpid(-process_group, os.WNOHANG)  # a negative pid: any child in that process group
        except ChildProcessError:
            return
        if pid == 0:  # ours, killed, not yet exited
            if time.monotonic() > deadline:
                logger.warning(f"a process of sandbox process group {process_group} did not exit after SIGKILL")
                return
            time.sleep(0.001)


def _run(sandbox, code, timeout, maximum_memory_bytes, max_output_bytes):
    """One call in `sandbox`: start the child, feed it the program, collect its output, always kill and reap."""
    # A backstop behind the wall-clock timeout: a program with several threads burns CPU seconds faster than
    # wall seconds, and RLIMIT_CPU (SIGXCPU or SIGKILL) stops it even if our own wait were to fail.
    cpu_seconds = int(timeout) + 1
    sandbox_uid = secrets.randbelow(SANDBOX_UID_RANGE[1] - SANDBOX_UID_RANGE[0]) + SANDBOX_UID_RANGE[0] if sandbox.switch_user else 0
    limits = [str(int(maximum_memory_bytes)), str(cpu_seconds), str(MAX_FILE_BYTES), str(MAX_PROCESSES),
              str(MAX_OPEN_FILES), str(sandbox_uid)]
    # The base interpreter, not the venv's: under bwrap only /usr and the base prefix are mounted, so a path inside
    # the venv would not exist there (and the child needs no site-packages: it runs with -S).
    python = os.path.realpath(sys._base_executable if hasattr(sys, "_base_executable") else sys.executable)
    # -I: ignore PYTHON* variables, user site-packages and the current directory; -S: no site-packages at all
    child = [python, "-I", "-S", "-X", "utf8", "-c", _CHILD_PRELUDE] + limits
    # The bwrap process's own environment shows in /proc/1/environ inside: give it nothing of ours.
    environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    passed_fds, oom_killed = [], []
    with contextlib.ExitStack() as cleanup:
        if sandbox.bwrap_arguments is None:
            # only the weak sandbox works in a directory on the host's disk; bwrap's is a tmpfs inside the sandbox
            workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="nanochat_exec_"))
            command, cwd = child, workdir
            environment.update(HOME=workdir, TMPDIR=workdir)
        else:
            # bwrap itself starts in the host's "/"; the child's working directory is its own /tmp (--chdir)
            command, cwd = ["bwrap"] + sandbox.bwrap_arguments, "/"
            if sandbox.call_cgroup_parent:
                try:
                    cgroup = _new_call_cgroup(sandbox.call_cgroup_parent, maximum_memory_bytes)
                except OSError as error:
                    return ExecutionResult(False, "", "", error=f"could not create this call's cgroup under "
                                                                f"{sandbox.call_cgroup_parent}: {error}")
                cleanup.callback(lambda: oom_killed.append(_remove_call_cgroup(cgroup)))
                # the shell moves itself into the call's cgroup, then becomes bwrap: all that it starts is born inside.
                # Writing 0 to cgroup.procs means "the writing process"; $0 is the first word after the script (the
                # cgroup), "$@" the rest (bwrap's command).
                command = ["/bin/sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', cgroup] + command
            # bwrap reads the compiled filter from a file descriptor we leave open for it (pass_fds below)
            if sandbox.seccomp_filter:
                passed_fds.append(_pipe_holding(sandbox.seccomp_filter))
                command += ["--seccomp", str(passed_fds[-1])]
            command += child
        # start_new_session: the child leads its own process group, so killpg reaches what it started.
        # (No preexec_fn: it is unsafe in threaded servers; the child sets its own limits in the prelude.)
        try:
            process = subprocess.Popen(command, cwd=cwd, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, start_new_session=True, pass_fds=passed_fds)
        finally:
            for fd in passed_fds:
                os.close(fd)  # the child has its copy
        stdout_chunks, stderr_chunks, truncated = [], [], []
        # A thread per pipe: writing stdin while nobody reads stdout would deadlock as soon as both pipe buffers
        # fill (64 KB each on Linux), with the child blocked on its write and us on ours.
        threads = [threading.Thread(target=_write_program, args=(process.stdin, code.encode("utf-8", "replace")), daemon=True),
                   threading.Thread(target=_read_capped, args=(process.stdout, stdout_chunks, max_output_bytes, truncated), daemon=True),
                   threading.Thread(target=_read_capped, args=(process.stderr, stderr_chunks, max_output_bytes, truncated), daemon=True)]
        for thread in threads:
            thread.start()
        # the wall-clock limit counts from here: the time the child spends starting Python counts against it too
        timed_out = False
        try:
            _wait(process, timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # Always kill the group, even after a clean exit: the program may have left children behind.
            # Under bwrap the group holds bwrap and the namespace's pid 1, whose death ends every process inside.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
            _reap_process_group(process.pid)
        # The pipes close when the last process holding them dies, which the kill above ensured; one second in all
        # bounds the wait should a descendant have escaped the group. The threads are daemons: none can hang us.
        deadline = time.monotonic() + 1.0
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stdout = b"".join(stdout_chunks).decode("utf-8", errors="replace")
    stderr = b"".join(stderr_chunks).decode("utf-8", errors="replace")
    # RLIMIT_AS makes an allocation fail, which Python raises as MemoryError; the cgroup's OOM killer leaves no
    # traceback, only its count in memory.events
    memory_exceeded = "MemoryError" in stderr or any(oom_killed)
    # a negative return code is the signal that killed the child (subprocess's convention)
    return_code = process.returncode
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif return_code == -signal.SIGXCPU or return_code == -signal.SIGKILL:
        timed_out = True
        error = "killed: CPU time limit"
    elif memory_exceeded:
        error = f"memory limit of {maximum_memory_bytes // (1024 * 1024)} MB exceeded"
    elif return_code != 0:
        # a traceback's last line is the exception and its message: the part worth showing the model
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


# the weak sandbox on its own, whatever this host allows: the tests and dev/bench_sandbox.py pass it to compare
WEAK_SANDBOX = Sandbox(False, "weak in-process guards only")
