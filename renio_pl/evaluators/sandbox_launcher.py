"""The sandbox's launcher: the script `sandbox.run` starts to put one program in its jail.

`sandbox.py` (the evaluator side) starts it as `python -I -S sandbox_launcher.py CONFIG`
(CONFIG: the marshalled, hex-encoded run settings) in a new session, with the program's
stdin, stdout and stderr on fds 0-2, the report socket on fd 3 and an error pipe on fd 4.
The launcher [unshares the namespaces,] forks the jail's init, which builds the jail
(`_build_jail`), sets the limits and identity and execs the program (`_exec_program`); it
exits with the program's status. A setup failure is written to fd 4 (`stage: error`) and
ends the launcher with status 125; the evaluator reads fd 4's EOF (closed by the program's
exec) as "started".

Only the standard library's `marshal`, `os`, `signal`, `sys` (and `ctypes`, `resource` where
needed) are imported: every run pays for this script's start-up, and it must not import the
package (it runs isolated, `-I -S`). `sandbox.py`'s docstring says what the jail enforces.
"""

from __future__ import annotations

import marshal
import os
import signal
import sys

_REPORT_FD, _ERROR_FD = 3, 4  # the report socket and the setup-error pipe (stdin/stdout/stderr: 0-2)
_SETUP_FAILED = 125  # exit status of a launcher whose setup failed (the reason is on _ERROR_FD)

# Linux constants (<sched.h>, <sys/mount.h>, <sys/prctl.h>).
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38



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
