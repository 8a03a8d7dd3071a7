"""Run untrusted code (a model's completion) with its tests in a sandbox: a separate process
in its own Linux namespaces, never in this one.

Each run gets a throw-away directory (made here, removed after), and a process started by
util-linux `unshare` in new mount, PID, network, IPC and UTS namespaces, which confines
itself before any of the program runs (dashflow/core/sandbox_runner.py has the details):

  what                      how it is enforced
  wall time (timeout_s)     here: the process group is SIGKILLed at the deadline; the
                            runner is PID 1 of its namespace, so every process the program
                            started (double-forked, setsid'd) dies with it (the kernel
                            kills a PID namespace with its init); RLIMIT_CPU as a backstop
  memory (memory_mb)        RLIMIT_AS: an allocation past it raises MemoryError
  output (output_kb)        RLIMIT_FSIZE on its stdout/stderr file and anything it writes:
                            past it the process gets SIGXFSZ
  processes (processes)     RLIMIT_NPROC of a user id of its own (a fork bomb stops there)
  network                   a network namespace with only a loopback device, down
  files                     chroot into a read-only tmpfs root holding only /usr, /bin,
                            /lib*, /sbin, the Python install (read-only), /dev/null|zero|
                            urandom, its own /proc and /work (its directory, the one
                            writable place); it runs as a user id that owns nothing else
  environment               PATH, LANG, HOME=/work, TMPDIR=/work only; none of ours

This needs Linux, util-linux's `unshare`, and root (as here, in CI) or unprivileged user
namespaces; `check_available()` says which is missing. As a non-root user the program runs
as root of a user namespace instead of a user id of its own, so RLIMIT_NPROC is not set
(a fork bomb is still bounded by the wall time and ends with the namespace).

A verdict means the tests passed in the program's own process: the sandbox protects the
machine, not the verdict from a program written to forge the harness's report.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dashflow.core import sandbox_runner

RUNNER = Path(sandbox_runner.__file__)
MAX_REPORT = 1 << 20  # bytes of result lines read back (a program scribbling on the pipe gets no more)
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/work", "TMPDIR": "/work"}


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not the program's fault): the stage stops."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    memory_mb: int = 512
    output_kb: int = 1024
    processes: int = 16

    @classmethod
    def from_params(cls, cfg: dict) -> "Limits":
        return cls(float(cfg["timeout_s"]), int(cfg["memory_mb"]), int(cfg["output_kb"]), int(cfg["processes"]))


@dataclass(frozen=True)
class Outcome:
    passed: int
    total: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.passed == self.total

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def _python_dirs() -> list[str]:
    """What the confined interpreter reads after the chroot: the Python install's prefix."""
    return sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)})


def _command() -> list[str]:
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return [unshare, *user, "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--",
            sys.executable, "-I", "-S", "-B", str(RUNNER)]


def _signal_error(signum: int, limits: Limits) -> str:
    if signum == signal.SIGXFSZ:
        return f"output: printed or wrote more than {limits.output_kb} KB"
    if signum == signal.SIGXCPU:
        return f"timeout: over {limits.timeout_s:g} s of CPU time"
    if signum == signal.SIGSEGV:
        return "crashed: SIGSEGV (a stack overflow from deep recursion?)"
    try:
        return f"killed by {signal.Signals(signum).name}"
    except ValueError:
        return f"killed by signal {signum}"


def run(code: str, tests: dict, limits: Limits = Limits()) -> Outcome:
    """Run `code` then `tests` ({format: mbpp, asserts, setup} or {format: humaneval, test,
    entry_point}) in a fresh sandbox: tests passed, tests in all, the first failure."""
    box = Path(tempfile.mkdtemp(prefix="dashflow-sandbox-"))
    uid = random.SystemRandom().randrange(1 << 20, 1 << 30) if os.geteuid() == 0 else None
    try:
        (box / "root").mkdir()
        (box / "work").mkdir(mode=0o700)
        if uid is not None:
            os.chown(box / "work", uid, uid)
        read_end, write_end = os.pipe()
        job = {"code": code, "tests": tests, "limits": limits.__dict__, "root": str(box / "root"),
               "work": str(box / "work"), "uid": uid, "python_dirs": _python_dirs(), "result_fd": write_end}
        with open(box / "output", "wb") as output:
            try:
                proc = subprocess.Popen(_command(), stdin=subprocess.PIPE, stdout=output, stderr=output,
                                        pass_fds=(write_end,), env=ENV, cwd=box, start_new_session=True)
            finally:
                os.close(write_end)
        try:
            lines, timed_out = _collect(proc, read_end, json.dumps(job).encode(), limits.timeout_s)
        finally:
            os.close(read_end)
            if uid is not None:
                _reap(uid)
        return _outcome(proc.returncode, lines, timed_out, limits, box / "output")
    finally:
        shutil.rmtree(box, ignore_errors=True)


def _processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes running as `uid`."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(status.parent.name))
    return pids


def _reap(uid: int, wait_s: float = 5.0) -> None:
    """Return once no process of the sandbox's user id is alive. The kernel kills a PID
    namespace's processes when its init (the runner) dies, but a fork bomb's many take a
    moment to exit; any still there are SIGKILLed by user id (nothing else runs as it)."""
    deadline = time.monotonic() + wait_s
    while (pids := _processes_of(uid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)


def _collect(proc: subprocess.Popen, fd: int, job: bytes, timeout_s: float) -> tuple[list[dict], bool]:
    """Feed the job, read result lines until the process ends or the deadline kills it."""
    try:
        proc.stdin.write(job)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    deadline = time.monotonic() + timeout_s + 0.5  # + the sandbox's own start (~40 ms)
    data, timed_out, eof = bytearray(), False, False
    while not eof:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            eof = not chunk
            if len(data) < MAX_REPORT:
                data += chunk[: MAX_REPORT - len(data)]
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.0) if not timed_out else 0.0)
    except subprocess.TimeoutExpired:
        timed_out = True
    if timed_out:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    lines = []
    for raw in bytes(data).decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            lines.append(record)
    return lines, timed_out


def _outcome(returncode: int, lines: list[dict], timed_out: bool, limits: Limits, output: Path) -> Outcome:
    ready = any(r.get("ready") for r in lines)
    if not ready and not timed_out:
        tail = output.read_bytes()[-2000:].decode("utf-8", "replace").strip()
        raise SandboxError(f"the code sandbox did not start (exit status {returncode}): {tail or 'no output'}")
    total = next((int(r["tests"]) for r in lines if "tests" in r), 0)
    results = {int(r["test"]): r for r in lines if "test" in r}
    passed = sum(1 for r in results.values() if r.get("ok") is True)
    first_failure = next((f"test {i + 1} of {total}: {results[i].get('error')}" for i in sorted(results)
                          if results[i].get("ok") is not True), None)
    solution_error = next((f"program: {r['solution_error']}" for r in lines if "solution_error" in r), None)
    if timed_out:
        error = f"timeout: over {limits.timeout_s:g} s"
    elif returncode < 0 or returncode > 128:
        error = _signal_error(-returncode if returncode < 0 else returncode - 128, limits)
    elif not any(r.get("done") for r in lines):
        error = f"exited with status {returncode} before the tests finished"
    else:
        error = solution_error or first_failure
    if error is not None and error not in (solution_error, first_failure) and first_failure:
        error = f"{error} (after {first_failure})"
    return Outcome(passed=passed, total=total, error=error)


def run_many(jobs: list[tuple[str, dict]], limits: Limits, workers: int, desc: str = "sandbox") -> list[Outcome]:
    """`run` over (code, tests) pairs, `workers` sandboxes at a time, in order."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(lambda job: run(job[0], job[1], limits), jobs), total=len(jobs), desc=desc,
                         unit="program", leave=False))


_available: dict[str, str | None] = {}
_lock = threading.Lock()


def check_available() -> None:
    """Raise SandboxError, saying what is missing, unless a trivial program runs sandboxed."""
    with _lock:
        if "reason" not in _available:
            reason = None
            if sys.platform != "linux":
                reason = f"it needs Linux namespaces; this is {sys.platform}"
            elif not (shutil.which("unshare") or Path("/usr/bin/unshare").exists()):
                reason = "util-linux's `unshare` is not installed"
            else:
                try:
                    outcome = run("x = 1", {"format": "mbpp", "asserts": ["assert x == 1"]}, Limits(timeout_s=10))
                    if not outcome.ok:
                        reason = f"a trivial program failed: {outcome.error}"
                except SandboxError as exc:
                    reason = str(exc)
            _available["reason"] = reason
        reason = _available["reason"]
    if reason:
        raise SandboxError(f"code rewards run each completion in a sandbox, which cannot start here: {reason}. "
                           f"It needs Linux with util-linux `unshare`, run as root or with unprivileged user "
                           f"namespaces enabled (docs/tasks.md).")
