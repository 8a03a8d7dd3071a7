"""Run untrusted code (a model's completion) with its tests in a sandbox: a separate process
in its own Linux namespaces, never in this one.

Each run gets a throw-away directory (made here, removed after: the runner's mount points),
an anonymous in-memory file for its stdout/stderr, and a process started by
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
                            urandom, its own /proc and /work (a tmpfs of work_mb in all,
                            the one writable place, gone with the namespace); it runs as
                            a user id that owns nothing else
  environment               PATH, LANG, HOME=/work, TMPDIR=/work only; none of ours

This needs Linux, util-linux's `unshare`, and root (as here, in CI) or unprivileged user
namespaces; `check_available()` says which is missing. As a non-root user the program runs
as root of a user namespace instead of a user id of its own, so RLIMIT_NPROC is not set
(a fork bomb is still bounded by the wall time and ends with the namespace).

The verdict is made here, not in the sandbox (the program under test never holds the
expected values or the verdict). Each MBPP-style assert is split before the job leaves this
process (`split_assert`): `assert EXPR == LITERAL` (or `LITERAL == EXPR`), `assert EXPR` and
`assert not EXPR` send only EXPR, the call on the test's inputs; the sandbox evaluates it
and sends back the value in a data-only encoding (`encode`: None, bool, int, float, str,
bytes, list, tuple, dict, set, frozenset of exactly those types; anything else, an object
whose `__eq__` always says yes among them, is a failure); this process decodes it into
plain builtins and compares it with the expected value it alone holds, type-strict
(`same`: bool is not int; int and float compare by value). A program that rewrites the
harness, forges the report pipe or exits early can only report values, never "passed",
and it never sees an expected value. Asserts of another shape (and HumanEval `check`
bodies) cannot be split: they run in the sandbox as before and their verdict comes from the
program's process; `Outcome.opaque` counts them (the reward stage reports their share).
"""

from __future__ import annotations

import ast
import json
import math
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
    work_mb: int = 16

    @classmethod
    def from_params(cls, cfg: dict) -> Limits:
        return cls(float(cfg["timeout_s"]), int(cfg["memory_mb"]), int(cfg["output_kb"]), int(cfg["processes"]),
                   int(cfg.get("work_mb", 16)))


@dataclass(frozen=True)
class Outcome:
    passed: int
    total: int
    error: str | None
    opaque: int = 0   # tests whose verdict came from the program's process (not split)

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


_MISSING = object()


def split_assert(line: str):
    """An MBPP assert -> ("value", EXPR source, expected, "eq" | "truthy" | "falsy") where its
    expected side is a literal (or it asserts EXPR / not EXPR), else ("opaque", line)."""
    try:
        tree = ast.parse(line.strip())
    except SyntaxError:
        return ("opaque", line)
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return ("opaque", line)
    test = tree.body[0].test
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
        left, right = test.left, test.comparators[0]
        for expr, lit in ((left, right), (right, left)):
            try:
                expected = ast.literal_eval(lit)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
            return ("value", ast.unparse(expr), expected, "eq")
        return ("opaque", line)
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return ("value", ast.unparse(test.operand), None, "falsy")
    if isinstance(test, (ast.Compare, ast.BoolOp)):
        return ("opaque", line)
    return ("value", ast.unparse(test), None, "truthy")


def decode(node, depth: int = 0):
    """A value the sandbox encoded (sandbox_runner.encode) -> plain builtins; raises ValueError."""
    if depth > 100 or not isinstance(node, list) or not node or not isinstance(node[0], str):
        raise ValueError("not an encoded value")
    tag, rest = node[0], node[1:]
    if tag == "N" and not rest:
        return None
    if len(rest) != 1:
        raise ValueError(f"bad encoded {tag!r}")
    v = rest[0]
    if tag == "b" and isinstance(v, bool):
        return v
    if tag == "i" and isinstance(v, str) and len(v) <= 5000:
        return int(v)
    if tag == "f" and isinstance(v, str):
        return float(v)
    if tag == "s" and isinstance(v, str):
        return v
    if tag == "y" and isinstance(v, str):
        return bytes.fromhex(v)
    if tag in ("l", "t", "S", "F") and isinstance(v, list):
        items = [decode(x, depth + 1) for x in v]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d" and isinstance(v, list):
        return {decode(k, depth + 1): decode(x, depth + 1) for k, x in v}
    raise ValueError(f"bad encoded {tag!r}")


def same(got, expected) -> bool:
    """Type-strict equality of plain builtins: bool is not int, list is not tuple; int and
    float compare by value (float: NaN equals NaN)."""
    numbers = (int, float)
    if isinstance(got, bool) or isinstance(expected, bool):
        return type(got) is type(expected) and got == expected
    if type(got) in numbers and type(expected) in numbers:
        if isinstance(got, float) and isinstance(expected, float) and math.isnan(got) and math.isnan(expected):
            return True
        return got == expected
    if type(got) is not type(expected):
        return False
    if isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(same(a, b) for a, b in zip(got, expected))
    if isinstance(got, dict):
        return got.keys() == expected.keys() and all(same(got[k], expected[k]) for k in got)
    return got == expected  # str, bytes, None, set, frozenset (of hashable builtins)


def _judge(spec, record: dict) -> tuple[bool, str | None]:
    """This process's verdict on one split test from the value the sandbox reported."""
    if "value" not in record:
        return False, record.get("error") or "no value"
    try:
        got = decode(record["value"])
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        return False, f"the returned value is not plain data ({exc})"
    kind = spec[3]
    if kind in ("truthy", "falsy"):
        if bool(got) == (kind == "truthy"):
            return True, None
        return False, f"AssertionError: {spec[1]} is {_short(got)}"
    if same(got, spec[2]):
        return True, None
    return False, f"AssertionError: {spec[1]} returned {_short(got)}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def run(code: str, tests: dict, limits: Limits = Limits()) -> Outcome:
    """Run `code` then `tests` ({format: mbpp, asserts, setup} or {format: humaneval, test,
    entry_point}) in a fresh sandbox: tests passed, tests in all, the first failure."""
    split = None
    if tests.get("format") == "mbpp":  # the expected values stay here (see the module doc)
        split = [split_assert(a) for a in tests["asserts"]]
        tests = {"format": "mbpp", "setup": tests.get("setup") or "",
                 "probes": [{"expr": s[1]} if s[0] == "value" else {"line": s[1]} for s in split]}
    box = Path(tempfile.mkdtemp(prefix="dashflow-sandbox-"))
    uid = random.SystemRandom().randrange(1 << 20, 1 << 30) if os.geteuid() == 0 else None
    try:
        (box / "root").mkdir()
        (box / "work").mkdir(mode=0o700)  # a mount point: /work is a tmpfs of the sandbox's own
        read_end, write_end = os.pipe()
        job = {"code": code, "tests": tests, "limits": limits.__dict__, "root": str(box / "root"),
               "work": str(box / "work"), "uid": uid, "python_dirs": _python_dirs(), "result_fd": write_end}
        # its stdout/stderr: an anonymous in-memory file (no host path in /proc/self/fd/1;
        # RLIMIT_FSIZE bounds what it holds)
        output = os.memfd_create("sandbox-output")
        try:
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
            return _outcome(proc.returncode, lines, timed_out, limits, output, split)
        finally:
            os.close(output)
    finally:
        _remove(box)


def _remove(box: Path) -> None:
    """The sandbox's directory: never deep (its /work was a tmpfs inside the sandbox), but
    whatever is there goes, and a failure to remove it never fails the stage."""
    try:
        shutil.rmtree(box, ignore_errors=True)
    except (RecursionError, OSError):
        subprocess.run(["rm", "-rf", "--one-file-system", str(box)], check=False, capture_output=True)


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
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth: garbage
            continue
        if isinstance(record, dict):
            lines.append(record)
    return lines, timed_out


def _tail(fd: int, n: int = 2000) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, n, max(size - n, 0))


def _outcome(returncode: int, lines: list[dict], timed_out: bool, limits: Limits, output: int,
             split: list | None = None) -> Outcome:
    ready = any(r.get("ready") for r in lines)
    if not ready and not timed_out:
        tail = _tail(output).decode("utf-8", "replace").strip()
        raise SandboxError(f"the code sandbox did not start (exit status {returncode}): {tail or 'no output'}")
    # a count that is not an integer (a string, null, a float) is garbage the program wrote
    total = next((r["tests"] for r in lines if type(r.get("tests")) is int), 0)
    results: dict[int, dict] = {}
    for r in lines:  # the first report of each test counts (a forged second one does not)
        if "test" in r and isinstance(r["test"], int):
            results.setdefault(r["test"], r)
    opaque = 0
    if split is not None:  # the verdicts are ours: the total is the row's, whatever was reported
        total = len(split)
        judged = {}
        for i, spec in enumerate(split):
            r = results.get(i)
            if spec[0] == "opaque":
                opaque += 1
                judged[i] = r if r is not None else {"ok": False, "error": "not reached"}
            elif r is not None:
                ok, err = _judge(spec, r)
                judged[i] = {"ok": ok, "error": err}
        results = judged
    results = {i: r for i, r in results.items() if 0 <= i < max(total, 0)}
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
    return Outcome(passed=passed, total=total, error=error, opaque=opaque)


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
