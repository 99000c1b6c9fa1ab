"""Runs untrusted programs (model-written code is hostile input) in a throwaway jail.

`run(argv, ...)` starts a small launcher (`python -I -S sandbox_launcher.py CONFIG`) in
a new session; the launcher builds the jail, drops privileges and execs `argv`; the whole
process tree is killed when the run ends, whatever the program did. `capabilities()` says
what this host allows, and the first `run` logs it. As root on Linux (CI, the GPU
machines) everything below holds:

- No network: a new network namespace whose only device, loopback, is down. Connecting
  anywhere fails, the host's localhost included.
- None of the host's files but the system and Python, read-only: a new mount namespace
  whose root is a read-only tmpfs holding read-only, nosuid binds of /usr, /etc, /bin,
  /lib* and the Python prefixes; /root, /home, the repository, its data and caches are
  absent. /tmp (the working directory and $HOME), /var/tmp (a link to it) and /dev/shm are
  private tmpfs mounts of `Limits.tmp_bytes` each, gone with the run (a Python prefix under
  /tmp, such as a CI virtual environment, is bound read-only inside the private /tmp, and
  the working directory is then a fresh /tmp/work).
- No privileges: a dedicated uid and gid per concurrent run (`UID_BASE` + a slot held by
  a lock file, so runs in other processes get other uids), no supplementary groups,
  `no_new_privs`. The program cannot read the host's private files, signal the evaluator
  or another run, or gain privileges through a setuid binary.
- Its own processes only: a new PID namespace (the program sees and signals only its own
  processes, `kill -9 -1` included; when the jail's init exits the kernel kills every
  process left in it, `setsid` daemons too) and a new IPC namespace (System V shared
  memory and queues die with it). After each run every process of the slot's uid is
  killed as well.
- Limits (`Limits`): wall clock (then SIGKILL to the whole tree), CPU seconds, address
  space (and data and stack), processes of the uid, file size, open files; no core
  dumps; oom_score_adj 1000, so the kernel's OOM killer takes sandboxed processes first.
- Output: stdout and stderr are drained and kept up to `Limits.output_bytes` each (the
  rest is read and dropped: a flood costs time, not memory). The program reports on fd 3,
  a socket: each line (at most `Limits.report_bytes`) goes to `on_report`, which may reply.
- Environment: PATH, HOME, TMPDIR, LANG and what the caller passes; nothing else.

Without namespaces (root in a container without CAP_SYS_ADMIN) the separate uid, limits
and cleanup still hold, but the program shares the host's network and sees the host's
files as that uid may; it works in a fresh host temporary directory, removed afterwards.
As root, programs never run as root: if no unprivileged uid can run Python (say it lives
under /root) and there are no namespaces to bind it into a jail, `run` refuses.
Without root there is no separate uid: the program runs as the evaluating user with the
limits (no process limit, which would count all that user's processes), in its own session,
and processes it detaches survive if it also kills its launcher. `capabilities()` names
what is missing, and why.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import marshal
import math
import os
import pwd
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

__all__ = ["Limits", "RunResult", "Capabilities", "SandboxError", "capabilities", "run", "UID_BASE"]

log = logging.getLogger(__name__)

UID_BASE = 1_600_000_000  # sandbox uids and gids are UID_BASE + slot
_SLOTS = 4096
_SLOT_DIR = "/run/renio_pl_sandbox"  # lock files, one per slot in use, shared by all processes
_JAIL_MOUNTPOINTS = ("/mnt", "/media", "/srv", "/opt", "/home", "/tmp")
# The launcher script, found beside this file (not imported: it runs as its own isolated
# interpreter, and this file also works loaded alone, outside the package).
_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")


class SandboxError(RuntimeError):
    """The sandbox could not start a program (a host problem, not the program's fault)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run.

    Attributes:
        timeout_s: wall-clock seconds before the whole process tree is killed.
        memory_bytes: address space of each process (RLIMIT_AS; RLIMIT_DATA too).
        stack_bytes: stack of each process (RLIMIT_STACK); None keeps the evaluator's.
        processes: processes and threads of the sandbox uid (RLIMIT_NPROC; root only).
        file_bytes: largest file the program may write (RLIMIT_FSIZE).
        open_files: open file descriptors per process (RLIMIT_NOFILE).
        tmp_bytes: size of each private tmpfs (/tmp, /dev/shm).
        output_bytes: bytes of stdout and of stderr kept; the rest is read and dropped.
        report_bytes: longest report line accepted on fd 3; a longer one stops the run.
    """

    timeout_s: float = 10.0
    memory_bytes: int = 4 << 30
    stack_bytes: int | None = None
    processes: int = 64
    file_bytes: int = 64 << 20
    open_files: int = 256
    tmp_bytes: int = 64 << 20
    output_bytes: int = 64 << 10
    report_bytes: int = 64 << 20


@dataclass
class RunResult:
    """What a run left behind.

    Attributes:
        returncode: the program's exit code (128 + signal if a signal ended it); None when
            the run was killed (timeout, `on_report` stopping it, or an over-long report).
        timed_out: the wall clock ran out.
        stopped: `on_report` returned False, or a report line was too long (`overflow`).
        overflow: a report line exceeded `Limits.report_bytes`.
        stdout, stderr: the first `Limits.output_bytes` of each.
        seconds: wall-clock duration of the run.
    """

    returncode: int | None
    timed_out: bool
    stopped: bool
    overflow: bool
    stdout: bytes
    stderr: bytes
    seconds: float


@dataclass(frozen=True)
class Capabilities:
    """What the sandbox enforces on this host (module docstring: what each item means).

    Attributes:
        namespaces: network, mount (read-only jail), PID and IPC namespaces.
        separate_uid: programs run as a dedicated unprivileged uid (needs root).
        missing: why something is not enforced; empty when everything is.
    """

    namespaces: bool
    separate_uid: bool
    missing: str = ""

    def describe(self) -> str:
        """One line: what is enforced, and what is not."""
        enforced = ["rlimits", "own session", "scrubbed environment", "fresh working directory"]
        if self.separate_uid:
            enforced += ["unprivileged per-run uid", "no_new_privs", "process limit", "kill by uid"]
        if self.namespaces:
            enforced += ["no network", "read-only jail", "private /tmp", "PID and IPC namespaces"]
        text = "sandbox enforces: " + ", ".join(enforced)
        return text + (f"; NOT enforced: {self.missing}" if self.missing else "")


Report = Callable[[bytes, Callable[[bytes], None]], bool]


def run(
    argv: list[str],
    *,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    limits: Limits = Limits(),
    on_report: Report | None = None,
) -> RunResult:
    """Runs `argv` in the sandbox and waits for it (or its limits) to end.

    Args:
        argv: the program and its arguments; `argv[0]` is an absolute path inside the jail
            (the system and Python prefixes keep their host paths).
        stdin: the program's standard input.
        env: variables added to the scrubbed environment.
        limits: resource limits.
        on_report: called with each line (without its newline) the program writes to fd 3,
            and a `reply(bytes)` that writes back on fd 3; returning False ends the run.

    Returns:
        A `RunResult`; the process tree, the working directory and every process of the
        sandbox uid are gone when it returns.

    Raises:
        SandboxError: the launcher could not set the run up (the message says which step).
    """
    return _run(argv, stdin, env or {}, limits, on_report, capabilities())


def capabilities() -> Capabilities:
    """Probes (once per process) what this host allows, by launching a real program; logs it."""
    with _probe_lock:
        return _probe()


_probe_lock = threading.Lock()


@functools.cache
def _probe() -> Capabilities:
    probe = [sys.executable, "-S", "-c", "pass"]
    missing = []
    if os.geteuid() != 0:
        missing.append("separate uid, process limit, namespaces (the evaluator is not root)")
    for candidate in (Capabilities(True, True), Capabilities(False, True), Capabilities(False, False)):
        if candidate.separate_uid != (os.geteuid() == 0):  # never run programs as root
            continue
        try:
            _run(probe, b"", {}, Limits(), None, candidate)
        except SandboxError as error:
            missing.append(f"{'namespaces' if candidate.namespaces else 'separate uid'} ({error})")
            continue
        found = Capabilities(candidate.namespaces, candidate.separate_uid, "; ".join(missing))
        (log.warning if missing else log.info)(found.describe())
        return found
    raise SandboxError("the sandbox cannot run a program here without root privileges; " + "; ".join(missing)
                       + "; allow namespaces, or put Python where other users can read and run it")


def _run(argv, stdin, env, limits, on_report, caps: Capabilities) -> RunResult:
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        uid = stack.enter_context(_uid_slot()) if caps.separate_uid else None
        workdir = _jail_layout()["workdir"] if caps.namespaces else None
        if not caps.namespaces:
            workdir = tempfile.mkdtemp(prefix="renio_pl_sandbox_")
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            if uid is not None:
                os.chown(workdir, uid, uid)
        config = {
            "argv": list(argv), "parent": os.getpid(), "namespaces": caps.namespaces, "uid": uid, "gid": uid,
            "cwd": workdir,
            "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
                    "LANG": "C.UTF-8", **env},
            "limits": {**asdict(limits), "cpu_s": math.ceil(limits.timeout_s) + 1},
        }
        if caps.namespaces:
            config.update(_jail_layout())
        process = _Process(config, stdin, stack)
        try:
            result, setup_error = process.wait(limits, on_report, started)
        finally:
            process.kill()
            if uid is not None:
                _kill_uid(uid)
        if setup_error:
            raise SandboxError(f"sandbox setup failed at {setup_error}")
        return result


class _Process:
    """One launched launcher with its pipes: stdout, stderr, the fd-3 report socket, the error pipe."""

    def __init__(self, config: dict, stdin: bytes, stack: contextlib.ExitStack) -> None:
        stdin_fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
        view = memoryview(stdin)
        while view:
            view = view[os.write(stdin_fd, view):]
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        error_r, error_w = os.pipe()
        self.report, report_child = socket.socketpair()
        child_fds = [stdin_fd, out_w, err_w, report_child.fileno(), error_w]
        spawn_fds = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in child_fds]  # so none is already 0-4
        try:  # the launcher finds them on fds 0-4 (sandbox_launcher.py's docstring)
            self.pid = os.posix_spawn(
                sys.executable, [sys.executable, "-I", "-S", _LAUNCHER, marshal.dumps(config).hex()],
                {}, file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(spawn_fds)],
                setsid=True,
            )
        finally:
            for fd in [stdin_fd, out_w, err_w, error_w, *spawn_fds]:
                os.close(fd)
            report_child.close()
        self.returncode: int | None = None
        self.exited = self.reaped = False
        self.report.setblocking(False)
        self.fds = {out_r: "stdout", err_r: "stderr", self.report.fileno(): "report", error_r: "error"}
        for fd in (out_r, err_r, error_r):
            stack.callback(os.close, fd)
        stack.callback(self.report.close)

    def wait(self, limits: Limits, on_report: Report | None, started: float) -> tuple[RunResult, str]:
        """Drains the pipes and hands reports over until the tree exits, times out or is stopped.

        Returns:
            The result, and the launcher's setup error ("" when the program started).
        """
        kept = {"stdout": bytearray(), "stderr": bytearray(), "error": bytearray()}
        pending, open_fds = bytearray(), dict(self.fds)
        timed_out = stopped = overflow = False
        poller = select.poll()
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        deadline = started + limits.timeout_s
        exit_fd = _pidfd(self.pid)  # readable once the launcher exits; without one, poll every 5 ms
        if exit_fd is not None:
            poller.register(exit_fd, select.POLLIN)
        while not stopped and (open_fds or not self.exited):
            if not self.exited and self._poll_exit():
                self.kill()  # pipes still open now belong to leftovers: kill them, then drain briefly
                deadline = min(deadline, time.monotonic() + 0.5)
            now = time.monotonic()
            if now >= deadline:
                timed_out = not self.exited
                break
            wait_s = min(deadline - now, 1.0 if exit_fd is not None else 0.005)
            for fd, _ in poller.poll(wait_s * 1000):
                if fd == exit_fd:
                    poller.unregister(exit_fd)
                    os.close(exit_fd)
                    exit_fd = None
                    continue
                name = open_fds[fd]
                try:
                    data = self.report.recv(1 << 20) if name == "report" else os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    poller.unregister(fd)
                    del open_fds[fd]
                elif name != "report":
                    kept[name] += data[: max(limits.output_bytes - len(kept[name]), 0)]
                elif b"\n" not in data:
                    pending += data
                    stopped = overflow = len(pending) > limits.report_bytes
                else:
                    *lines, rest = (bytes(pending) + data).split(b"\n")
                    pending = bytearray(rest)
                    stopped = not all(self._hand_over(line, on_report) for line in lines)
                    stopped = stopped or len(pending) > limits.report_bytes
                    overflow = len(pending) > limits.report_bytes
                if stopped:
                    break
        if exit_fd is not None:
            os.close(exit_fd)
        self.kill()
        result = RunResult(self.returncode, timed_out, stopped, overflow, bytes(kept["stdout"]),
                           bytes(kept["stderr"]), time.monotonic() - started)
        return result, kept["error"].decode(errors="replace")

    def _hand_over(self, line: bytes, on_report: Report | None) -> bool:
        try:
            return on_report is None or on_report(line, self._reply)
        except _Unread:
            return False

    def _reply(self, data: bytes) -> None:
        try:
            sent = self.report.send(data)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            sent = -1
        if sent != len(data):  # the program leaves its replies unread: the run ends
            raise _Unread

    def _poll_exit(self) -> bool:
        """Whether the launcher has exited; leaves it unreaped, so its process group id stays ours."""
        info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            self.exited = True
            self.returncode = info.si_status if info.si_code == os.CLD_EXITED else 128 + info.si_status
        return self.exited

    def kill(self) -> None:
        """SIGKILLs the launcher's process group (the jail's init with it, so its namespaces) and reaps it."""
        if self.reaped:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.reaped = True


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Python < 3.9 or Linux < 5.3
        return None


class _Unread(Exception):
    """The program left a reply unread."""


@functools.cache
def _jail_layout() -> dict:
    """Where to build the jail, what to bind into it read-only, and which symlinks to recreate."""
    wanted = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
              sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    binds, links = set(), []
    for path in (os.path.abspath(p) for p in wanted if os.path.exists(p)):
        real = os.path.realpath(path)
        binds.add(real)
        if real != path:
            links.append((path, os.readlink(path) if os.path.islink(path) else real))
    binds = sorted(p for p in binds if not any(p.startswith(q + "/") for q in binds))
    links = [(p, t) for p, t in dict(links).items() if not any(p.startswith(q + "/") for q in binds)]
    jail = next((d for d in _JAIL_MOUNTPOINTS if os.path.isdir(d) and not any(
        b == d or b.startswith(d + "/") for b in binds)), None)
    if jail is None:
        raise SandboxError(f"no directory to build the jail on: each of {_JAIL_MOUNTPOINTS} is missing or holds Python")
    # the program's working directory, $HOME and $TMPDIR: its private /tmp, or a fresh folder in it
    # when a Python prefix (a virtual environment in /tmp) is bound there too
    workdir = "/tmp/work" if any(b.startswith("/tmp/") for b in binds) else "/tmp"
    return {"jail": jail, "binds": binds, "links": links, "workdir": workdir}


@contextlib.contextmanager
def _uid_slot() -> Iterator[int]:
    """Holds the lowest free sandbox uid for the run (an flock per uid, across processes); kills its leftovers."""
    os.makedirs(_SLOT_DIR, mode=0o700, exist_ok=True)
    for slot in range(_SLOTS):
        uid = UID_BASE + slot
        fd = os.open(f"{_SLOT_DIR}/{uid}", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            if _uid_is_free(uid):
                _kill_uid(uid)  # left by an evaluator that died mid-run
                yield uid
                return
        finally:
            os.close(fd)
    raise SandboxError(f"all {_SLOTS} sandbox uids from {UID_BASE} are in use or belong to users")


def _uid_is_free(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return True
    return False


def _kill_uid(uid: int) -> None:
    """SIGKILLs every live process whose real uid is `uid`, until none is left."""
    for _ in range(1000):
        pids = _live_pids_of(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.001)
    raise SandboxError(f"processes of sandbox uid {uid} survive SIGKILL: {pids[:10]}")


def _live_pids_of(uid: int) -> list[int]:
    """Processes (not zombies) whose real uid is `uid`, from /proc/PID/status."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as file:
                status = file.read()
        except OSError:  # gone meanwhile
            continue
        state = status.partition(b"\nState:\t")[2][:1]
        if int(status.partition(b"\nUid:\t")[2].split(b"\t", 1)[0]) == uid and state not in (b"Z", b"X"):
            pids.append(int(entry))
    return pids
