"""One sandboxed run from the evaluator's side: the launcher process and its pipes, what the
run is allowed (`Limits`) and what it leaves behind (`RunResult`).

`sandbox.run` decides the run's configuration (uid, jail, limits) and hands it to
`LaunchedProcess`, which spawns `sandbox_launcher.py` with it, feeds stdin, drains stdout and
stderr up to their limits, passes each fd-3 report line to `on_report` (and its replies
back), and kills the launcher's whole process group when the run ends. Standard library
only, like the rest of the sandbox.
"""

from __future__ import annotations

import contextlib
import fcntl
import marshal
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LaunchedProcess", "Limits", "Report", "RunResult"]

# The launcher script beside this file: not imported, it runs as its own isolated interpreter.
_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")


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


Report = Callable[[bytes, Callable[[bytes], None]], bool]


class LaunchedProcess:
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
