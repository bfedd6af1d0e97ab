"""The sandbox launcher: runs ONE untrusted Python program and reports how it ended.

Started by phi_model/eval/sandbox.py as `python -I _sandbox_child.py` (standard library only,
never imported by the evaluator), with a JSON request on stdin; prints one JSON result line.

    launcher (this process, outside)      unshare(NEWPID | NEWNET [| NEWUSER when not root])
      `- reaper   pid 1 of a new pid namespace, no network; trusted, waits for the runner
           `- runner  pid 2: rlimits, then (as root) setgroups/setgid/setuid to an unprivileged
                      uid, no_new_privs, fresh temp directory as cwd; exec()s the program

Started by a normal (non-root) user, the launcher also unshares a user namespace (so it may create
the others) and sets RLIMIT_NPROC before creating it, which a new user namespace inherits; the
program then runs as that user, already unprivileged.

Why this shape:
  * RLIMIT_NPROC is not enforced for root (CAP_SYS_RESOURCE), and root could raise any limit
    again: the runner becomes an unprivileged uid before the program starts, so the process
    limit holds (a fork bomb gets EAGAIN) and the hard limits cannot be raised.
  * The program's processes live in their own pid namespace: when the reaper (pid 1) exits or
    is killed, the kernel kills every process left in it, so nothing a program forks outlives
    it, and kill(-1, ...) from inside reaches only the sample's own processes.
  * A pid 1 ignores signals it has no handler for, so the program does not run as pid 1 (a
    runner as pid 1 would survive its own SIGXCPU); the reaper is pid 1 instead.
  * The new network namespace has only a loopback interface, down: no network at all.
  * Wall clock: the launcher kills the reaper at the deadline (and the whole namespace with it);
    CPU time: RLIMIT_CPU in the runner; memory: RLIMIT_AS.

Threat model: the accidents of generated code (loops, fork bombs, huge allocations, sys.exit,
deleting files, network calls), as in Chen et al. (2021). The program runs in the runner's
Python process, so a determined program could forge its own result; it cannot escape the uid,
the namespaces or the limits.
"""
import ctypes
import importlib
import json
import math
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import time

# Imported before the privilege drop, because the unprivileged uid may not be able to read the
# interpreter's standard library (a Python installed under a private home, e.g. pyenv in
# /root): the modules generated code commonly imports stay available. Modules already
# imported cost nothing to import again.
PRELOAD = ("abc", "array", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal",
           "encodings.idna", "enum", "fractions", "functools", "hashlib", "heapq", "itertools", "math", "numbers",
           "operator", "queue", "random", "re", "socket", "statistics", "string", "struct", "subprocess", "textwrap",
           "threading", "typing", "unicodedata")

CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
OUTPUT_TAIL = 2000  # bytes of the program's stdout/stderr kept for the report

_libc = ctypes.CDLL(None, use_errno=True)


def _fail_setup(message: str) -> None:
    """Setup of the sandbox itself failed (not the program): reported as status "error"."""
    print(json.dumps({"status": "error", "detail": message}), flush=True)
    sys.exit(0)


def _unshare(flags: int) -> str | None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        return f"unshare(0x{flags:x}) failed: {os.strerror(err)}"
    return None


def _write_id_maps(outer_uid: int, outer_gid: int) -> None:
    """Not root: inside the new user namespace this process maps itself to its own ids (read
    before the unshare: inside an unmapped namespace getuid() is the overflow id 65534)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{outer_uid} {outer_uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{outer_gid} {outer_gid} 1")


def _run_program(req: dict, workdir: str, result_fd: int) -> None:
    """The runner (pid 2): limits, privilege drop, then the program. Never returns."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_AS, (req["memory_bytes"], req["memory_bytes"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["file_size_bytes"], req["file_size_bytes"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        cpu = max(math.ceil(req["cpu_seconds"]), 1)  # RLIMIT_CPU counts whole seconds
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # soft: SIGXCPU, hard: SIGKILL
        if req["drop_to_uid"] is not None:  # root: the limit binds once the uid is dropped below
            resource.setrlimit(resource.RLIMIT_NPROC, (req["nproc"], req["nproc"]))
        if req["drop_to_uid"] is not None:
            os.setgroups([])  # supplementary groups first, while still root
            os.setgid(req["drop_to_gid"])
            os.setuid(req["drop_to_uid"])  # real, effective and saved uid: no way back
            try:
                os.setuid(0)
            except PermissionError:
                pass
            else:
                raise RuntimeError("privileges could not be dropped (setuid(0) succeeded afterwards)")
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # set after setuid, which clears it
        os.chdir(workdir)
        out = os.open(os.path.join(workdir, "output.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.closerange(3, result_fd)
        os.closerange(result_fd + 1, 1 << 16)
        os.environ.clear()
        os.environ.update(PATH="/usr/bin:/bin", HOME=workdir, TMPDIR=workdir, LANG="C.UTF-8")
        tempfile.tempdir = workdir
        code = compile(req["program"], "<program>", "exec")
    except SyntaxError as e:
        _report(result_fd, "failed", f"SyntaxError: {e}")
        os._exit(1)
    except BaseException as e:  # noqa: BLE001 - a setup failure, reported as such
        _report(result_fd, "error", f"sandbox setup: {type(e).__name__}: {e}")
        os._exit(2)
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are failures too
        _report(result_fd, "failed", f"{type(e).__name__}: {str(e)[:300]}")
        os._exit(1)
    _report(result_fd, "passed", "")
    os._exit(0)  # no atexit handlers or thread joins of the program


def _report(fd: int, status: str, detail: str) -> None:
    for stream in (sys.stdout, sys.stderr):  # the program's buffered output, before os._exit
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a program may have replaced or closed them
            pass
    try:
        os.write(fd, (json.dumps({"status": status, "detail": detail}) + "\n").encode())
    except OSError:
        pass


def _reaper(req: dict, workdir: str, result_fd: int) -> None:
    """pid 1 of the namespace: forks the runner, waits for it, exits with its status. Its exit
    takes every other process in the namespace with it."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the launcher dies -> so does the namespace
    try:
        runner = os.fork()
    except OSError as e:
        _report(result_fd, "error", f"sandbox setup: fork failed: {e}")
        os._exit(3)
    if runner == 0:
        _run_program(req, workdir, result_fd)
    os.close(result_fd)
    while True:
        try:
            _, status = os.waitpid(runner, 0)
            break
        except ChildProcessError:
            os._exit(3)
        except InterruptedError:
            continue
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _tasks_of_uid(uid: int) -> int:
    """Processes and threads now running with real uid `uid` (what RLIMIT_NPROC counts)."""
    count = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return count


def _wait(pid: int, seconds: float) -> int | None:
    """Exit status of child pid, or None if it is still running after `seconds`."""
    deadline = time.monotonic() + seconds
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if fd is not None:
                select.select([fd], [], [], left)
            else:
                time.sleep(min(left, 0.005))
    finally:
        if fd is not None:
            os.close(fd)


def _read_result(fd: int) -> dict | None:
    os.set_blocking(fd, False)
    data = b""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and len(data) < 1 << 16:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    lines = [ln for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    if not lines:
        return None
    try:
        return json.loads(lines[-1])
    except ValueError:
        return {"status": "failed", "detail": "unreadable result"}


def main() -> None:
    req = json.loads(sys.stdin.read())
    for name in PRELOAD:
        importlib.import_module(name)
    root = os.geteuid() == 0
    outer_uid, outer_gid = os.getuid(), os.getgid()  # before a user namespace hides them (overflow id)
    # The program's directory sits under a random name inside a directory it may enter but not
    # list: programs running at the same time share the sandbox uid, and must not find (and
    # delete) each other's files.
    outer = tempfile.mkdtemp(prefix="phi-sandbox-")
    workdir = os.path.join(outer, os.urandom(16).hex())
    try:
        os.chmod(outer, 0o711)
        os.mkdir(workdir, 0o700)
        if root:
            os.chown(workdir, req["drop_to_uid"], req["drop_to_gid"])
        if not root:
            # RLIMIT_NPROC counts every task of the real uid (the user's other processes too), and
            # a new user namespace takes its process limit from its creator: set it here, first.
            n = req["nproc"] + _tasks_of_uid(os.getuid()) + 2  # + this launcher's reaper and runner
            resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
        flags = CLONE_NEWPID | CLONE_NEWNET | (0 if root else CLONE_NEWUSER)
        problem = _unshare(flags) if req["namespaces"] else None
        if problem:
            _fail_setup(f"{problem}; the sandbox needs pid and network namespaces "
                        f"({'as root' if root else 'unprivileged user namespaces'})")
        if not root and req["namespaces"]:
            _write_id_maps(outer_uid, outer_gid)
        if not root:
            req["drop_to_uid"] = None  # already unprivileged
        r, w = os.pipe()
        started = time.monotonic()
        reaper = os.fork()
        if reaper == 0:
            os.close(r)
            _reaper(req, workdir, w)
        os.close(w)
        status = _wait(reaper, req["wall_seconds"])
        timed_out = status is None
        if timed_out:
            os.kill(reaper, signal.SIGKILL)  # pid 1 dies: the kernel kills the whole namespace
            os.waitpid(reaper, 0)
        elapsed = time.monotonic() - started
        result = None if timed_out else _read_result(r)
        os.close(r)
        code = None if timed_out else (os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
        if timed_out:
            result = {"status": "timeout", "detail": f"wall-clock limit {req['wall_seconds']} s"}
        elif code is not None and code > 128 and code - 128 in (signal.SIGXCPU, signal.SIGKILL):
            result = {"status": "timeout" if code - 128 == signal.SIGXCPU else "failed",
                      "detail": f"killed by {signal.Signals(code - 128).name}"
                                + (" (CPU-time limit)" if code - 128 == signal.SIGXCPU else "")}
        elif result is None:
            result = {"status": "failed", "detail": f"exited with code {code} before reporting"
                      + (f" (signal {signal.Signals(code - 128).name})" if code and code > 128 else "")}
        elif result["status"] == "passed" and code != 0:
            result = {"status": "failed", "detail": f"reported success but exited with code {code}"}
        try:
            with open(os.path.join(workdir, "output.txt"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(f.tell() - OUTPUT_TAIL, 0))
                result["output_tail"] = f.read().decode(errors="replace")
        except OSError:
            result["output_tail"] = ""
        result["seconds"] = round(elapsed, 3)
        print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


if __name__ == "__main__":
    main()
