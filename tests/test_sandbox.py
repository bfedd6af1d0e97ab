"""phi_model/eval/sandbox.py: every guard is shown to hold, as root too (CI runs as root, where
RLIMIT_NPROC is not enforced and limits could be raised again: the sandbox drops to an
unprivileged uid in new pid and network namespaces). Each bad program must end as a failure,
promptly, and leave nothing behind; the evaluator (this process) is untouched."""
from __future__ import annotations

import os
import socket
import textwrap

import pytest

from phi_model.eval.sandbox import SandboxLimits, check_sandbox, run_program, run_programs

# Small limits keep the bad programs short: a fork bomb is capped at 16 processes for 2 s. A uid
# of this test process's own (no account needed): RLIMIT_NPROC counts per uid, so sandboxes that
# other runs on the same machine start as nobody do not change the counts checked here.
TEST_UID = 60000 + os.getpid() % 1000
FAST = SandboxLimits(cpu_seconds=1, wall_seconds=3, memory_bytes=1 << 30, max_processes=16, uid=TEST_UID,
                     gid=TEST_UID)


def _sandbox_uid_tasks(uid: int) -> int:
    """Processes and threads running as uid (what a leaked fork bomb would leave)."""
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    uid_line = next(line for line in f if line.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            n += int(uid_line.split()[1]) == uid
    return n


def test_sandbox_self_check_and_a_passing_program():
    check_sandbox(FAST)
    out = run_program("x = sum(range(10))\nassert x == 45\nprint('ok')\n", FAST)
    assert out.passed and out.status == "passed", out
    assert out.output_tail == "ok\n"


@pytest.mark.parametrize("program, status, detail", [
    ("assert 1 + 1 == 3, 'wrong answer'\n", "failed", "AssertionError: wrong answer"),
    ("def f(:\n    pass\n", "failed", "SyntaxError"),
    ("import sys\nsys.exit(0)\n", "failed", "SystemExit: 0"),
    ("exit()\n", "failed", "SystemExit"),
    ("import os\nos._exit(0)\n", "failed", "before reporting"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", "failed", "SIGSEGV"),
    ("raise KeyboardInterrupt\n", "failed", "KeyboardInterrupt"),
    ("while True:\n    pass\n", "timeout", ""),  # CPU time (SIGXCPU) or wall clock, whichever first
    ("import time\ntime.sleep(60)\n", "timeout", "wall-clock"),
    ("x = bytearray(10 * 1024**3)\n", "failed", "MemoryError"),  # 10 GB
    ("x = [0] * (10**9)\n", "failed", "MemoryError"),
], ids=["wrong", "syntax", "sys.exit", "exit", "os._exit", "segfault", "keyboardinterrupt", "busy-loop", "sleep",
        "10GB-bytearray", "10GB-list"])
def test_bad_programs_fail(program, status, detail):
    out = run_program(program, FAST)
    assert not out.passed
    assert out.status == status, out
    assert detail in out.detail, out
    assert out.seconds < FAST.wall_seconds + 2


def test_process_limit_holds_as_root():
    """A bounded program asks for 50 children: RLIMIT_NPROC (16, the runner included) stops it at
    15, as root too (the runner is an unprivileged uid), and its children die with the sandbox."""
    program = textwrap.dedent("""
        import os, time
        made = 0
        try:
            for _ in range(50):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                made += 1
        finally:
            print("forked", made, flush=True)
    """)
    out = run_program(program, FAST)
    assert out.status == "failed" and "BlockingIOError" in out.detail, out
    assert out.output_tail.strip() == f"forked {FAST.max_processes - 1}"
    assert _sandbox_uid_tasks(FAST.uid) == 0  # the 15 sleeping children were killed with the namespace


def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    out = run_program(bomb, FAST)
    assert out.status == "timeout", out
    assert _sandbox_uid_tasks(FAST.uid) == 0
    assert run_program("pass\n", FAST).passed  # and the next sample runs normally


def test_memory_limit_is_the_address_space():
    assert run_program("x = bytearray(100 * 1024**2)\n", FAST).passed  # 100 MB fits in 1 GiB
    out = run_program("x = bytearray(2 * 1024**3)\n", FAST)  # 2 GB does not
    assert out.status == "failed" and "MemoryError" in out.detail


def test_no_network():
    # A listener this process can reach; the sandbox, in its own network namespace, cannot.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        out = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", FAST)
    assert out.status == "failed" and "OSError" in out.detail, out


def test_unprivileged_fresh_directory_and_limits_cannot_be_raised():
    program = textwrap.dedent("""
        import os, resource, tempfile
        assert os.getuid() != 0 and os.geteuid() != 0, "running as root"
        assert os.listdir(".") == ["output.txt"], os.listdir(".")   # a fresh directory, ours alone
        open("scratch.txt", "w").write("x")                          # writable
        assert tempfile.gettempdir() == os.getcwd()
        try:  # the directory holding it: enterable, not listable (other samples' files stay hidden)
            os.listdir("..")
        except PermissionError:
            pass
        else:
            raise AssertionError("the parent directory is listable")
        for limit in (resource.RLIMIT_NPROC, resource.RLIMIT_AS, resource.RLIMIT_CPU):
            soft, hard = resource.getrlimit(limit)
            try:
                resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            except (ValueError, PermissionError):
                pass
            else:
                raise AssertionError(f"limit {limit} was raised")
        print(os.getcwd())
    """)
    out = run_program(program, FAST)
    assert out.passed, out
    assert not os.path.exists(out.output_tail.strip())  # the directory is removed afterwards


def test_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "evaluator_file.txt"
    target.write_text("intact")
    out = run_program(f"open({str(target)!r}, 'w').write('overwritten')\n", FAST)
    assert out.status == "failed" and "PermissionError" in out.detail
    assert target.read_text() == "intact"


def test_parallel_workers_keep_the_order():
    programs = [f"assert {i} % 3 != 0\n" for i in range(8)]
    seen = []
    outcomes = run_programs(programs, FAST, workers=2, on_done=lambda i, o: seen.append(i))
    assert [o.passed for o in outcomes] == [i % 3 != 0 for i in range(8)]
    assert sorted(seen) == list(range(8))


@pytest.mark.parametrize("field, value", [("cpu_seconds", 0), ("wall_seconds", -1.0), ("memory_bytes", 1024),
                                          ("max_processes", 0), ("uid", 0), ("gid", True)])
def test_bad_limits_are_refused(field, value):
    with pytest.raises(ValueError, match=f"SandboxLimits.{field}"):
        SandboxLimits(**{field: value})


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="program must be a str"):
        run_program(b"pass")
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        run_programs(["pass"], FAST, workers=0)


def test_launcher_started_by_a_normal_user(tmp_path):
    """An evaluator that is not root (a user's machine): the launcher, run here as another uid,
    takes the unprivileged user-namespace path, and the process and network guards still hold."""
    import json
    import shutil
    import subprocess
    import tempfile

    from phi_model.eval import sandbox

    python, setpriv = shutil.which("python3", path="/usr/bin:/bin"), shutil.which("setpriv")
    if os.geteuid() != 0 or not python or not setpriv:
        pytest.skip("needs root, setpriv and a system python3 to start the launcher as another user")
    as_user = [setpriv, f"--reuid={TEST_UID}", f"--regid={TEST_UID}", "--clear-groups", python, "-I"]
    if subprocess.run([*as_user, "-c", "pass"], capture_output=True).returncode != 0:
        pytest.skip(f"{python} cannot run as uid {TEST_UID} here")
    folder = tempfile.mkdtemp(prefix="phi-launcher-")  # readable by another uid, unlike tmp_path
    try:
        os.chmod(folder, 0o755)
        launcher = shutil.copy(sandbox._LAUNCHER, folder)
        os.chmod(launcher, 0o644)

        def run(program: str) -> dict:
            request = dict(program=program, cpu_seconds=1, wall_seconds=5, memory_bytes=1 << 30,
                           file_size_bytes=1 << 20, nproc=16, drop_to_uid=TEST_UID, drop_to_gid=TEST_UID,
                           namespaces=True)
            done = subprocess.run([*as_user, launcher], input=json.dumps(request), capture_output=True, text=True,
                                  timeout=60)
            return json.loads(done.stdout.strip().splitlines()[-1])

        assert run(f"import os\nassert os.getuid() == {TEST_UID}\n")["status"] == "passed"
        forks = run("import os, time\nfor _ in range(50):\n    if os.fork() == 0:\n        time.sleep(30)\n")
        assert forks["status"] == "failed" and "BlockingIOError" in forks["detail"], forks
        net = run("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\n")
        assert net["status"] == "failed" and "unreachable" in net["detail"], net
        assert _sandbox_uid_tasks(TEST_UID) == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
