"""Runs untrusted programs (model-written code is hostile input) in a throwaway jail.

`run(argv, ...)` chooses the run's uid, jail and limits and starts a small launcher
(`python -I -S sandbox_launcher.py CONFIG`, spawned and drained by
`sandbox_process.LaunchedProcess`) in a new session; the launcher builds the jail, drops
privileges and execs `argv`; the whole process tree is killed when the run ends, whatever
the program did. The sandbox uses the standard library only, so an evaluator without the
package's dependencies can import it. `capabilities()` says
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
import math
import os
import pwd
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from renio_pl.evaluators.sandbox_process import LaunchedProcess, Limits, Report, RunResult

__all__ = ["Limits", "RunResult", "Capabilities", "SandboxError", "capabilities", "run", "UID_BASE"]

log = logging.getLogger(__name__)

UID_BASE = 1_600_000_000  # sandbox uids and gids are UID_BASE + slot
_SLOTS = 4096
_SLOT_DIR = "/run/renio_pl_sandbox"  # lock files, one per slot in use, shared by all processes
_JAIL_MOUNTPOINTS = ("/mnt", "/media", "/srv", "/opt", "/home", "/tmp")


class SandboxError(RuntimeError):
    """The sandbox could not start a program (a host problem, not the program's fault)."""


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
        process = LaunchedProcess(config, stdin, stack)
        try:
            result, setup_error = process.wait(limits, on_report, started)
        finally:
            process.kill()
            if uid is not None:
                _kill_uid(uid)
        if setup_error:
            raise SandboxError(f"sandbox setup failed at {setup_error}")
        return result


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
