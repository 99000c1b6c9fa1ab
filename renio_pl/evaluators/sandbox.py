"""Runs untrusted programs (model-written code is hostile input) in a throwaway jail.

`run(argv, ...)` starts this file as a small launcher (`python -I -S sandbox.py CONFIG`) in
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

import marshal
import os
import signal
import sys

# Only the imports above (and ctypes, in the launcher) are needed to launch a program: this
# file is also the launcher script, whose start-up every run pays. The evaluator side's
# imports are made in `_evaluator_side_imports` below, on first use.

UID_BASE = 1_600_000_000  # sandbox uids and gids are UID_BASE + slot
_SLOTS = 4096
_SLOT_DIR = "/run/renio_pl_sandbox"  # lock files, one per slot in use, shared by all processes
_JAIL_MOUNTPOINTS = ("/mnt", "/media", "/srv", "/opt", "/home", "/tmp")
_REPORT_FD, _ERROR_FD = 3, 4
_SETUP_FAILED = 125

# Linux constants (<sched.h>, <sys/mount.h>, <sys/prctl.h>).
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38


# ---------------------------------------------------------------- launcher (runs as a script)


def _launch(config: dict) -> None:
    """The launcher: [namespaces ->] jail init -> program. Exits with the program's status."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    os.set_inheritable(_ERROR_FD, False)  # closed by the program's exec: EOF means "started"
    os.closerange(_ERROR_FD + 1, os.sysconf("SC_OPEN_MAX"))
    try:
        _call(libc.prctl, _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the evaluator died: so do we
        if os.getppid() != config["parent"]:
            raise ProcessLookupError("the evaluator exited before the launcher started")
        _call(libc.prctl, _PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans come back to us
        if config["namespaces"]:
            flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
            _call(libc.unshare, flags)
        pid = os.fork()
    except BaseException as error:
        _fail("launcher", error)
    if pid == 0:
        if config["namespaces"]:
            _jail_init(libc, config)
        _exec_program(libc, config)
    os.close(_ERROR_FD)
    status = _wait_for(pid)
    _kill_children()  # without a PID namespace, whatever the program left behind
    os._exit(status)


def _jail_init(libc, config: dict) -> None:
    """PID 1 of the new namespaces: builds the jail, runs the program, exits with its status."""
    try:
        _call(libc.prctl, _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _build_jail(libc, config)
        pid = os.fork()
    except BaseException as error:
        _fail("jail", error)
    if pid == 0:
        _exec_program(libc, config)
    os.close(_ERROR_FD)
    os._exit(_wait_for(pid))  # the kernel then kills everything left in the namespace


def _build_jail(libc, config: dict) -> None:
    """A read-only tmpfs root with read-only binds, fresh /proc, /dev nodes and private /tmp; chroots."""
    root, uid, gid, size = config["jail"], config["uid"], config["gid"], config["limits"]["tmp_bytes"]
    os.umask(0o022)
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount reaches the host
    _mount(libc, "tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=4m,nr_inodes=4096,mode=755")
    for private in ("/tmp", "/dev/shm"):  # first: a Python prefix under /tmp is bound inside the private one
        os.makedirs(root + private)
        options = f"size={size},nr_inodes=16384,mode=700,uid={uid},gid={gid}"
        _mount(libc, "tmpfs", root + private, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
    if config["cwd"] != "/tmp":
        os.mkdir(root + config["cwd"], 0o700)
        os.chown(root + config["cwd"], uid, gid)
    for path in config["binds"]:
        os.makedirs(root + path, exist_ok=True)
        _mount(libc, path, root + path, None, _MS_BIND)
        _mount(libc, None, root + path, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    for link, target in config["links"] + [("/var/tmp", "/tmp"), ("/dev/fd", "/proc/self/fd")]:
        os.makedirs(os.path.dirname(root + link), exist_ok=True)
        os.symlink(target, root + link)
    for device in ("null", "zero", "full", "random", "urandom"):
        open(f"{root}/dev/{device}", "w").close()
        _mount(libc, f"/dev/{device}", f"{root}/dev/{device}", None, _MS_BIND)
    os.mkdir(root + "/proc")
    _mount(libc, "proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _mount(libc, None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chroot(root)
    os.chdir("/")


def _exec_program(libc, config: dict) -> None:
    """Limits, identity, then exec: the last steps before the program runs."""
    import resource

    try:
        limits = config["limits"]
        for name, value in (
            ("RLIMIT_CPU", limits["cpu_s"]), ("RLIMIT_AS", limits["memory_bytes"]),
            ("RLIMIT_DATA", limits["memory_bytes"]), ("RLIMIT_STACK", limits["stack_bytes"]),
            ("RLIMIT_FSIZE", limits["file_bytes"]), ("RLIMIT_NOFILE", limits["open_files"]),
            ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", limits["processes"] if config["uid"] is not None else None),
        ):
            if value is not None:
                hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU first, SIGKILL a second later
                resource.setrlimit(getattr(resource, name), (value, hard))
        with open("/proc/self/oom_score_adj", "w") as oom:
            oom.write("1000")
        if config["uid"] is not None:
            os.setgroups([])
            os.setresgid(config["gid"], config["gid"], config["gid"])
            os.setresuid(config["uid"], config["uid"], config["uid"])
        _call(libc.prctl, _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.chdir(config["cwd"])
        for restored in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; programs expect defaults
            signal.signal(restored, signal.SIG_DFL)
        os.execve(config["argv"][0], config["argv"], config["env"])
    except BaseException as error:
        _fail("program", error)


def _wait_for(pid: int) -> int:
    """Reaps children (orphans included) until `pid` exits; its exit code, or 128 + signal."""
    while True:
        try:
            child, status = os.wait()
        except InterruptedError:
            continue
        if child == pid:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _kill_children() -> None:
    """Kills and reaps every child of this (subreaper) process until none is left."""
    while True:
        with open(f"/proc/self/task/{os.getpid()}/children") as file:
            children = [int(pid) for pid in file.read().split()]
        if not children:
            return
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in children:
            try:
                os.wait()
            except ChildProcessError:
                break


def _call(function, *args) -> None:
    if function(*args) != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, f"{function.__name__}: {os.strerror(code)}")


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, f"mount {source or ''} on {target}: {os.strerror(code)}")


def _fail(stage: str, error: BaseException) -> None:
    """Reports a setup failure on the error pipe and exits with `_SETUP_FAILED`."""
    try:
        os.write(_ERROR_FD, f"{stage}: {type(error).__name__}: {error}".encode()[:4096])
    finally:
        os._exit(_SETUP_FAILED)


if __name__ == "__main__":
    _launch(marshal.loads(bytes.fromhex(sys.argv[1])))


# ---------------------------------------------------------------- evaluator side

import contextlib  # noqa: E402  (see the note at the top: the launcher must not pay for these)
import fcntl  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import pwd  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

__all__ = ["Limits", "RunResult", "Capabilities", "SandboxError", "capabilities", "run", "UID_BASE"]

log = logging.getLogger(__name__)


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
        try:
            self.pid = os.posix_spawn(
                sys.executable, [sys.executable, "-I", "-S", os.path.abspath(__file__), marshal.dumps(config).hex()],
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
