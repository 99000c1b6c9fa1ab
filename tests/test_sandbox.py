"""The sandbox against real hostile programs: each test runs the attack and checks the host afterwards.

Tests that need a feature this host lacks (namespaces, a separate uid: see
`sandbox.capabilities()`) skip with the reason the sandbox reports.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from renio_pl.evaluators import sandbox
from renio_pl.evaluators.sandbox import Limits

CAPS = sandbox.capabilities()
needs_uid = pytest.mark.skipif(not CAPS.separate_uid, reason=f"no separate uid here: {CAPS.missing}")
needs_namespaces = pytest.mark.skipif(not CAPS.namespaces, reason=f"no namespaces here: {CAPS.missing}")


def run_python(code: str, **limits) -> sandbox.RunResult:
    """Runs `code` with the evaluator's Python in the sandbox."""
    return sandbox.run([sys.executable, "-S", "-c", textwrap.dedent(code)], limits=Limits(**limits))


def printed(result: sandbox.RunResult) -> dict:
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def sandbox_processes() -> list[int]:
    """Host pids of live processes owned by any sandbox uid."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as file:
                status = dict(line.split(":", 1) for line in file if ":" in line)
        except OSError:
            continue
        uid = int(status["Uid"].split()[0])
        if sandbox.UID_BASE <= uid < sandbox.UID_BASE + 4096 and not status["State"].strip().startswith("Z"):
            found.append(int(entry))
    return found


def test_capabilities_are_reported_in_one_line():
    assert CAPS.describe().startswith("sandbox enforces: rlimits")
    assert ("NOT enforced" in CAPS.describe()) == bool(CAPS.missing)


@needs_uid
def test_program_runs_unprivileged_with_no_new_privs_and_a_scrubbed_environment(monkeypatch):
    monkeypatch.setenv("RENIO_PL_TEST_SECRET", "hunter2")
    result = run_python("""
        import json, os
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
                          "nnp": status["NoNewPrivs"].strip(), "env": sorted(os.environ), "cwd": os.getcwd(),
                          "files": os.listdir(".")}))
        try:
            os.setuid(0)
            print("became root")
        except PermissionError:
            pass
    """)
    seen = printed(result)
    assert seen["uid"] == seen["euid"] >= sandbox.UID_BASE and seen["gid"] >= sandbox.UID_BASE
    assert seen["groups"] == [] and seen["nnp"] == "1"
    assert seen["env"] == ["HOME", "LANG", "PATH", "TMPDIR"] and seen["files"] == []
    assert b"became root" not in result.stdout


@needs_uid
def test_private_files_of_the_host_cannot_be_read(tmp_path):
    secret_dir = tmp_path / "private"
    secret_dir.mkdir(mode=0o700)
    secret = secret_dir / "key"
    secret.write_text("SECRET-TOKEN")
    secret.chmod(0o600)
    shadow = "/etc/shadow" if os.path.exists("/etc/shadow") else "/nonexistent"
    seen = printed(run_python(f"""
        import json
        found = {{}}
        for path in ({str(secret)!r}, {shadow!r}, "/root/.bash_history", "/proc/1/environ"):
            try:
                found[path] = open(path).read()[:40]
            except OSError as error:
                found[path] = type(error).__name__
        print(json.dumps(found))
    """))
    assert "SECRET-TOKEN" not in json.dumps(seen)
    assert seen[str(secret)] in ("FileNotFoundError", "PermissionError")
    assert seen[shadow] in ("FileNotFoundError", "PermissionError")


@needs_namespaces
def test_host_files_outside_the_system_are_not_even_visible():
    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "evaluation", "data")
    seen = printed(run_python(f"""
        import json, os
        print(json.dumps({{"data": os.path.exists({data!r}), "root": os.listdir("/"),
                           "processes": [p for p in os.listdir("/proc") if p.isdigit()]}}))
    """))
    assert not seen["data"]  # the benchmark data (and canonical solutions) are absent
    assert "root" not in seen["root"] or sys.base_prefix.startswith("/root/")  # only to reach Python
    assert len(seen["processes"]) <= 3  # the jail's init and the program: a PID namespace of their own


@needs_namespaces
def test_no_network_not_even_the_hosts_localhost():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    seen = printed(run_python(f"""
        import json, socket
        outcomes = {{}}
        for address in (("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)):
            try:
                socket.create_connection(address, timeout=2).close()
                outcomes[str(address)] = "connected"
            except OSError as error:
                outcomes[str(address)] = type(error).__name__
        print(json.dumps(outcomes))
    """))
    assert "connected" not in seen.values(), seen
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing knocked
    listener.close()


@needs_namespaces
def test_writes_outside_the_jail_tmp_fail_and_nothing_written_survives(tmp_path):
    tmp_path.chmod(0o777)  # world-writable on the host: only the jail keeps the program out
    victim = tmp_path / "victim.txt"
    victim.write_text("intact")
    victim.chmod(0o666)
    marker = f"renio_pl_sandbox_{uuid.uuid4().hex}"
    seen = printed(run_python(f"""
        import json, os, shutil
        outcomes = {{}}
        for path in ("/tmp/{marker}", "/var/tmp/{marker}", "/dev/shm/{marker}", "{marker}"):
            with open(path, "w") as file:
                file.write("x")
            outcomes[path] = os.path.exists(path)
        for path in ({str(victim)!r}, "/etc/{marker}", "/usr/{marker}", "{sys.prefix}/{marker}"):
            try:
                open(path, "w").write("overwritten")
                outcomes[path] = "written"
            except OSError as error:
                outcomes[path] = type(error).__name__
        for path in ({str(victim)!r}, {str(tmp_path)!r}, "/etc/hostname"):
            try:
                os.remove(path) if os.path.isfile(path) else shutil.rmtree(path)
                outcomes["rm " + path] = "removed"
            except OSError as error:
                outcomes["rm " + path] = type(error).__name__
        print(json.dumps(outcomes))
    """))
    assert "written" not in seen.values() and "removed" not in seen.values(), seen
    assert seen[f"/tmp/{marker}"] is True  # its own /tmp works
    for folder in ("/tmp", "/var/tmp", "/dev/shm", "/etc", "/usr", sys.prefix):
        assert not os.path.exists(f"{folder}/{marker}")
    assert victim.read_text() == "intact"


@needs_namespaces
def test_working_directory_is_fresh_for_every_run():
    printed(run_python("""
        import json
        open("left_behind", "w").write("x")
        print(json.dumps({}))
    """))
    assert printed(run_python("import json, os; print(json.dumps(os.listdir('.')))")) == []


@needs_namespaces
def test_an_evaluator_in_a_virtual_environment_under_tmp_runs_programs(tmp_path):
    """CI builds its environment inside its checkout, which may sit in /tmp (the jail's private /tmp)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    evaluator = f"""
        import json, sys
        sys.path.insert(0, {str(Path(sandbox.__file__).parents[2])!r})  # the package, without its dependencies
        from renio_pl.evaluators import sandbox
        program = "import json, os, sys; print(json.dumps([os.getcwd(), os.listdir('.'), sys.executable]))"
        result = sandbox.run([sys.executable, "-S", "-c", program])
        print(sys.executable, result.returncode, result.stdout.decode().strip(), result.stderr[-500:], sep="\\n")
    """
    done = subprocess.run([str(venv / "bin" / "python"), "-c", textwrap.dedent(evaluator)],
                          capture_output=True, text=True, timeout=120)
    executable, returncode, stdout, stderr = done.stdout.split("\n", 3)
    assert executable.startswith("/tmp/") and returncode == "0", (done.stderr[-2000:], stderr)
    assert json.loads(stdout) == ["/tmp/work", [], executable]  # a fresh working directory beside the bound venv


@needs_uid
def test_fork_bomb_is_contained_and_leaves_no_process():
    started = time.monotonic()
    result = run_python("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, processes=32, timeout_s=3)
    assert result.timed_out and time.monotonic() - started < 10
    assert sandbox_processes() == []


@needs_uid
def test_detached_daemons_are_killed_when_the_run_ends():
    started = time.monotonic()
    result = run_python("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.setsid()
                time.sleep(60)  # a daemon: detached twice, parent gone
            os._exit(0)
        print("parent leaves")
    """, timeout_s=20)
    assert result.returncode == 0 and b"parent leaves" in result.stdout
    assert time.monotonic() - started < 5  # did not wait for the daemon
    assert sandbox_processes() == []


@needs_uid
def test_program_cannot_kill_the_evaluator_or_other_processes():
    canary = subprocess.Popen(["sleep", "60"])
    try:
        result = run_python(f"""
            import os, signal
            for target in (os.getppid(), {os.getpid()}, {canary.pid}, 1, -1, 0):
                try:
                    os.kill(target, signal.SIGKILL) if target else os.killpg(os.getpgid(0), signal.SIGKILL)
                except OSError:
                    pass
        """)
        assert result.returncode in (0, 128 + signal.SIGKILL, None)
        assert canary.poll() is None  # the canary, a host process, lives
    finally:
        canary.kill()
        canary.wait()
    assert sandbox_processes() == []


def test_killing_the_evaluator_mid_run_leaves_no_process(tmp_path):
    evaluator = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from renio_pl.evaluators import sandbox
        print("started", flush=True)
        sandbox.run([sys.executable, "-S", "-c", "import time; time.sleep(60)"], limits=sandbox.Limits(timeout_s=60))
    """)], stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert evaluator.stdout.readline() == b"started\n"
    deadline = time.monotonic() + 20
    while not any(_is_sleeper(pid) for pid in _all_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(_is_sleeper(pid) for pid in _all_pids()), "the sandboxed program never started"
    evaluator.kill()
    evaluator.wait()
    deadline = time.monotonic() + 5
    while any(_is_sleeper(pid) for pid in _all_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_is_sleeper(pid) for pid in _all_pids())


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _is_sleeper(pid: int) -> bool:
    """The sandboxed sleeper of the test above (or its launcher), alive."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            cmdline = file.read()
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"time.sleep(60)" in cmdline and state != "Z"


def test_hang_is_killed_on_time():
    started = time.monotonic()
    result = run_python("while True: pass", timeout_s=1)
    assert result.timed_out and result.returncode is None
    assert time.monotonic() - started < 3


def test_memory_exhaustion_fails_the_program_only():
    result = run_python("""
        blocks = []
        while True:
            blocks.append(bytearray(64 << 20))
    """, memory_bytes=256 << 20, timeout_s=10)
    assert result.returncode not in (0, None) and b"MemoryError" in result.stderr


def test_output_flood_is_truncated_with_bounded_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    result = run_python("""
        import os
        chunk = b"x" * (1 << 20)
        for _ in range(300):  # 300 MiB to each stream
            os.write(1, chunk)
            os.write(2, chunk)
        os.write(3, b"y" * (8 << 20))  # one report line over the limit
    """, output_bytes=4096, report_bytes=1 << 20, timeout_s=30)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert result.stdout == b"x" * 4096 and len(result.stderr) == 4096
    assert result.overflow and result.stopped
    assert grown_mib < 64


def test_reports_arrive_in_order_and_replies_reach_the_program():
    seen = []

    def on_report(line: bytes, reply) -> bool:
        seen.append(line)
        reply(line.upper() + b"\n")
        return len(seen) < 3

    code = """
        import os
        for word in (b"a", b"b", b"c", b"d"):
            os.write(3, word + b"\\n")
            assert os.read(3, 10) == word.upper() + b"\\n"
        print("finished")
    """
    result = sandbox.run([sys.executable, "-S", "-c", textwrap.dedent(code)], on_report=on_report)
    assert seen == [b"a", b"b", b"c"] and result.stopped and b"finished" not in result.stdout


def test_setup_failure_is_a_sandbox_error():
    with pytest.raises(sandbox.SandboxError, match="program: FileNotFoundError"):
        sandbox.run(["/nonexistent/python"])
