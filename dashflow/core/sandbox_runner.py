"""The confined side of the code sandbox (dashflow/core/sandbox.py starts it; standard library only).

Started as `unshare --mount --net --pid --ipc --uts --fork --kill-child -- python -I -S
sandbox_runner.py`, so it is PID 1 of a new PID namespace with its own mount and network
namespaces. It reads its job (the program, the tests, the limits) from stdin, then, before
any of the program runs:

1. builds a new root on an empty tmpfs: /usr, /bin, /lib*, /sbin and the Python install
   bound read-only, /dev/null, /dev/zero, /dev/urandom, a fresh /proc (only this
   namespace's processes), and at /work a tmpfs of `work_mb` (the one writable place);
   nothing else of the host (no /home, /root, /tmp, /etc, no project directory);
2. makes that root read-only and chroots into it, cwd /work;
3. sets its limits: address space (RLIMIT_AS), bytes written to any file (RLIMIT_FSIZE, so
   printing too much is SIGXFSZ), processes of its user (RLIMIT_NPROC), open files, CPU
   seconds, no core files;
4. drops to a user id of its own (no capabilities, owner of nothing outside /work) and sets
   no_new_privs.

The network namespace has only a loopback device that is down: no socket reaches anything.
Then it runs the program and each test, and reports one JSON line per event on the result
pipe: {"ready"}, {"tests": n}, {"test": i, "ok": ..., "error": ...}, {"done"}. A program
that exits, crashes or is killed midway leaves the lines written so far.
"""

import ast
import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
SETUP_FAILED = 70  # exit status: the sandbox could not be built (nothing of the program ran)

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source or ''} on {target}: {os.strerror(err)}")


def _bind(path, root, writable=False, target=None):
    dest = root + (target or path)
    if os.path.islink(path) and target is None:  # /bin -> usr/bin on a merged-/usr system
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(os.readlink(path), dest)
        return
    if os.path.isdir(path):
        os.makedirs(dest, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        open(dest, "a").close()
    _mount(path, dest, None, MS_BIND | MS_REC)
    _mount(None, dest, None, MS_BIND | MS_REMOUNT | MS_NOSUID | (0 if writable else MS_RDONLY))


def confine(job):
    root = job["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    bound = []
    for path in ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] + job["python_dirs"]:
        if os.path.lexists(path) and not any(path == b or path.startswith(b + "/") for b in bound):
            _bind(path, root)
            bound.append(path)
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom"):
        _bind(dev, root)
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # /work: a tmpfs of its own, bounded in total (not a host directory: nothing the program
    # writes reaches the host's disk, and it goes with the namespace)
    os.makedirs(root + "/work", exist_ok=True)
    owner = f",uid={job['uid']},gid={job['uid']}" if job["uid"] is not None else ""
    _mount("tmpfs", root + "/work", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={int(job['limits'].get('work_mb', 16))}m,nr_inodes=4096,mode=0700{owner}")
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    os.chroot(".")
    os.chdir("/work")
    limits = job["limits"]
    mb = 1024 * 1024
    for rlimit, value in ((resource.RLIMIT_AS, limits["memory_mb"] * mb),
                          (resource.RLIMIT_FSIZE, limits["output_kb"] * 1024),
                          (resource.RLIMIT_NOFILE, 64),
                          (resource.RLIMIT_CORE, 0),
                          (resource.RLIMIT_CPU, int(limits["timeout_s"]) + 1)):
        resource.setrlimit(rlimit, (value, value))
    if job["uid"] is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def describe(exc, limits):
    name = type(exc).__name__
    text = f"{name}: {exc}" if str(exc) else name
    if isinstance(exc, MemoryError):
        return f"memory: {text} (limit {limits['memory_mb']} MB)"
    if isinstance(exc, OSError) and exc.errno == 27:  # EFBIG: RLIMIT_FSIZE (Python ignores SIGXFSZ)
        return f"output: printed or wrote more than {limits['output_kb']} KB ({text})"[:300]
    return text[:300]


def humaneval_tests(test_source):
    """The HumanEval `check(candidate)` with each top-level assert counted as its own test:
    (module source with `check` rewritten, number of asserts)."""
    tree = ast.parse(test_source)
    count = 0
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            body = []
            for stmt in node.body:
                if isinstance(stmt, ast.Assert):
                    def record(err, index=count):  # this assert's index
                        return ast.Expr(ast.Call(ast.Name("__record__", ast.Load()), [ast.Constant(index), err], []))

                    body.append(ast.Try(
                        body=[stmt],
                        handlers=[ast.ExceptHandler(ast.Name("BaseException", ast.Load()), "__err__",
                                                    [record(ast.Name("__err__", ast.Load()))])],
                        orelse=[record(ast.Constant(None))], finalbody=[]))
                    count += 1
                else:
                    body.append(stmt)
            node.body = body
    return ast.unparse(ast.fix_missing_locations(tree)), count


def encode(value, depth=0):
    """A returned value as data only: exactly None, bool, int, float, str, bytes, list, tuple,
    dict, set, frozenset of those (no subclasses); anything else raises TypeError."""
    if depth > 100:
        raise TypeError("nested too deeply")
    t = type(value)
    if value is None:
        return ["N"]
    if t is bool:
        return ["b", value]
    if t is int:
        return ["i", str(value)]
    if t is float:
        return ["f", repr(value)]
    if t is str:
        return ["s", value]
    if t is bytes:
        return ["y", value.hex()]
    if t in (list, tuple, set, frozenset):
        return [{list: "l", tuple: "t", set: "S", frozenset: "F"}[t], [encode(v, depth + 1) for v in value]]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    raise TypeError(f"returned a {t.__name__}, not plain data")


def run_tests(job, report):
    limits, tests = job["limits"], job["tests"]
    scope = {"__name__": "__solution__"}
    try:
        if tests.get("prelude"):  # HumanEval: the prompt (imports, signature) before the completion's code
            exec(compile(tests["prelude"], "prelude.py", "exec"), scope)  # noqa: S102
        exec(compile(job["code"], "solution.py", "exec"), scope)  # noqa: S102 - inside the sandbox
    except BaseException as exc:  # noqa: BLE001 - whatever the program does is its result
        report({"solution_error": describe(exc, limits)})
        return
    if tests.get("setup"):
        exec(compile(tests["setup"], "setup.py", "exec"), scope)  # noqa: S102
    if tests["format"] == "humaneval":
        source, count = humaneval_tests(tests["test"])
        results = {}
        scope["__record__"] = lambda i, err: results.__setitem__(i, err)
        report({"tests": max(count, 1)})
        try:
            exec(compile(source, "test.py", "exec"), scope)  # noqa: S102
            scope["check"](scope[tests["entry_point"]])
            crash = None
        except BaseException as exc:  # noqa: BLE001
            crash = exc
        if not count:
            report({"test": 0, "ok": crash is None, "error": None if crash is None else describe(crash, limits)})
        for i in range(count):
            err = results.get(i, crash if crash is not None else RuntimeError("not reached"))
            report({"test": i, "ok": err is None, "error": None if err is None else describe(err, limits)})
        return
    # MBPP: the parent split each assert; it alone holds the expected values and judges
    probes = tests["probes"]
    report({"tests": len(probes)})
    for i, probe in enumerate(probes):
        try:
            if "expr" in probe:  # the call on the test's inputs: its value goes back as data
                value = eval(compile(probe["expr"], f"test_{i}.py", "eval"), scope)  # noqa: S307
                report({"test": i, "value": encode(value)})
            else:                # an assert the parent could not split: run here
                exec(compile(probe["line"], f"test_{i}.py", "exec"), scope)  # noqa: S102
                report({"test": i, "ok": True, "error": None})
        except BaseException as exc:  # noqa: BLE001
            report({"test": i, "ok": False, "error": describe(exc, limits)})


def main():
    job = json.loads(sys.stdin.read())
    out = os.fdopen(job["result_fd"], "w", buffering=1)
    try:
        confine(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops the stage
        print(f"sandbox setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(SETUP_FAILED)
    runner = os.getpid()

    def report(record):
        if os.getpid() != runner:  # a process the program forked came back into the harness: it ends here
            os._exit(0)
        out.write(json.dumps(record) + "\n")

    report({"ready": True})
    run_tests(job, report)
    report({"done": True})
    out.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
