"""The code reward's sandbox (dashflow/core/sandbox.py) with real processes in real namespaces:
what passes, what fails and how, and hostile programs that must get reward 0, a
`reward_error`, and leave no process and no file behind."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from dashflow.core import code, rewards, sandbox

LIMITS = sandbox.Limits(timeout_s=2, memory_mb=512, output_kb=1024, processes=16)
ADD_TESTS = {"format": "mbpp", "asserts": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 5) == 5"],
             "setup": ""}


def _sandbox_processes() -> list[str]:
    """Live processes of any sandbox user id (dashflow/core/sandbox.py draws them from [2^20, 2^30))."""
    left = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        uid = int(fields["Uid"].split()[0])
        if uid >= 1 << 20 and not fields["State"].strip().startswith("Z"):
            left.append(f"{status.parent.name} uid {uid} {fields['State'].strip()}")
    return left


def _boxes() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("dashflow-sandbox-*")}


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before = _boxes()
    yield
    assert _sandbox_processes() == []
    assert _boxes() - before == set()


def test_passing_failing_and_partly_passing_programs_report_tests_passed_and_the_first_failure():
    ok = sandbox.run("def add(a, b):\n    return a + b\n", ADD_TESTS, LIMITS)
    assert (ok.passed, ok.total, ok.error, ok.ok, ok.fraction) == (3, 3, None, True, 1.0)
    # right only when b == 2 or a == 0 ... passes tests 2 and 3 of 3
    partly = sandbox.run("def add(a, b):\n    return a + b if a != 1 else 0\n", ADD_TESTS, LIMITS)
    assert (partly.passed, partly.total, partly.ok) == (2, 3, False)
    assert partly.fraction == pytest.approx(2 / 3)
    assert partly.error == "test 1 of 3: AssertionError: add(1, 2) returned 0"
    raising = sandbox.run("def add(a, b):\n    return a / 0\n", ADD_TESTS, LIMITS)
    assert (raising.passed, raising.total) == (0, 3)
    assert raising.error == "test 1 of 3: ZeroDivisionError: division by zero"
    syntax = sandbox.run("def add(a, b)\n    return a + b\n", ADD_TESTS, LIMITS)
    assert (syntax.passed, syntax.total) == (0, 3)   # the row's tests, none passed
    assert syntax.error.startswith("program: SyntaxError: expected ':' (solution.py, line 1)")


def test_humaneval_check_counts_each_top_level_assert_and_runs_the_prompt_first():
    tests = {"format": "humaneval", "entry_point": "mean",
             "prelude": "from typing import List\n\ndef mean(xs: List[float]) -> float:\n    \"\"\"Mean of xs.\"\"\"\n",
             "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 2\n    assert candidate([4]) == 4\n"
                     "    assert candidate([]) == 0\n"}
    # the completion uses List from the prompt's imports without importing it; fails on [] (ZeroDivisionError)
    out = sandbox.run("def mean(xs: List[float]) -> float:\n    return sum(xs) / len(xs)\n", tests, LIMITS)
    assert (out.passed, out.total) == (2, 3)
    assert out.error == "test 3 of 3: ZeroDivisionError: division by zero"
    good = sandbox.run("def mean(xs):\n    return sum(xs) / len(xs) if xs else 0\n", tests, LIMITS)
    assert (good.passed, good.total, good.error) == (3, 3, None)


def _serve_once(received: list) -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(4)

    def accept():
        try:
            conn, _ = server.accept()
            received.append(conn.recv(100))
            conn.close()
        except OSError:
            pass
    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


HOSTILE = {
    "infinite loop": ("while True:\n    pass\n", "timeout: over 2 s"),
    "fork bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                  "timeout: over 2 s"),
    "fork bomb, unguarded": ("import os\nwhile True:\n    os.fork()\n", "BlockingIOError"),
    "10 GB allocation": ("x = bytearray(10 * 1024 ** 3)\n", "program: memory: MemoryError (limit 512 MB)"),
    "deep recursion": ("def f(n):\n    return f(n + 1)\nf(0)\n", "program: RecursionError"),
    "deep recursion, limit raised": ("import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nf(0)\n",
                                     None),  # a C stack overflow: a crash or the timeout, either ends it
    "write outside": ("open({target!r}, 'w').write('escaped')\n", "program: FileNotFoundError"),
    "delete outside": ("import os\nos.remove({victim!r})\n", "program: FileNotFoundError"),
    "delete the system": ("import shutil\nshutil.rmtree('/usr')\n", "Read-only file system"),
    "read the parent's environment": ("import os\nprint(os.environ['DASHFLOW_SECRET'])\n",
                                      "program: KeyError: 'DASHFLOW_SECRET'"),
    "read the parent's files": ("print(open({victim!r}).read())\n", "program: FileNotFoundError"),
    "open a socket": ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'hi')\n",
                      "program: OSError: [Errno 101] Network is unreachable"),
    "print 100 MB": ("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 2 ** 20)\n",
                     "program: output: printed or wrote more than 1024 KB"),
    "escape the process group": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                                 "while True:\n    pass\n", "timeout: over 2 s"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_completion_gets_reward_0_an_error_and_leaves_nothing(case, tmp_path, monkeypatch):
    monkeypatch.setenv("DASHFLOW_SECRET", "s3cret")
    victim = tmp_path / "secret.txt"
    victim.write_text("s3cret")
    target = tmp_path / "escaped.txt"
    received: list = []
    server, port = _serve_once(received)
    program, expected = HOSTILE[case]
    program = program.format(target=str(target), victim=str(victim), port=port)
    completion = f"Here is my solution:\n```python\n{program}def add(a, b):\n    return a + b\n```"
    cfg = {"timeout_s": 5, "max_chars": 4000, "functions": {"code": {"extraction": "strict"}},
           "sandbox": dict(LIMITS.__dict__, workers=1)}
    t0 = time.monotonic()
    row = rewards.score_many([{"completion": completion, "answer": code.tests_answer(ADD_TESTS)}],
                            rewards.functions(cfg), cfg)[0]
    elapsed = time.monotonic() - t0
    server.close()
    assert row["reward"] == 0.0 and row["reward_code"] == 0.0 and row["strict_correct"] is False
    assert row["reward_error"] is not None and row["reward_error"].startswith("code: ")
    if expected is not None:
        assert expected in row["reward_error"]
    assert elapsed < LIMITS.timeout_s + 2.0   # its own limit, and the sandbox's start
    assert victim.read_text() == "s3cret" and not target.exists() and received == []


def test_a_hung_program_does_not_hold_up_the_others_beyond_its_own_limit():
    jobs = [("while True:\n    pass\n", ADD_TESTS)] + [("def add(a, b):\n    return a + b\n", ADD_TESTS)] * 6
    t0 = time.monotonic()
    outcomes = sandbox.run_many(jobs, LIMITS, workers=2)
    elapsed = time.monotonic() - t0
    assert outcomes[0].error == "timeout: over 2 s"
    assert all(o.ok for o in outcomes[1:])
    assert elapsed < LIMITS.timeout_s + 2.0   # the six others ran beside it on the second worker


COMPLETIONS = [
    # (completion, strict code, flexible code)
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1", "def f():\n    return 1"),
    ("First:\n```python\nx = 1\n```\nBetter:\n```py\nx = 2\n```", "x = 2", "x = 1"),  # paper's: last ```python
    ("```\ny = 3\n```", None, "y = 3"),                                        # untagged: flexible only
    ("```python\nunclosed = 1\n", None, "```python\nunclosed = 1"),            # no closed block: whole text
    ("def g():\n    return 2", None, "def g():\n    return 2"),                 # no fence: whole text
    ("Sure.\n```python3\nz = 4\n```", "z = 4", "3\nz = 4"),                  # the paper's regex keeps the "3"
    ("", None, None),
]


@pytest.mark.parametrize("completion,strict,flexible", COMPLETIONS)
def test_what_counts_as_the_code_of_a_completion(completion, strict, flexible):
    assert code.extract(completion, "strict") == strict
    assert code.extract(completion, "flexible") == flexible


def test_the_code_reward_columns_and_the_no_code_counts():
    import pyarrow as pa

    tests = code.tests_answer(ADD_TESTS)
    completions = ["```python\ndef add(a, b):\n    return a + b\n```",         # passes: 1
                   "```python\ndef add(a, b):\n    return a + b if a != 1 else 0\n```",  # 2 of 3
                   "```\ndef add(a, b):\n    return a + b\n```",                # flexible only
                   "no code at all"]
    n = len(completions)
    table = pa.table({"prompt": ["p"] * n, "completion": completions, "answer": [tests] * n,
                      "completion_token_ids": [[1]] * n, "prompt_id": ["a"] * n, "sample_index": list(range(n)),
                      "iteration": [0] * n, "finish_reason": ["stop"] * n})
    cfg = {"timeout_s": 5, "max_chars": 4000, "functions": {"code": {"extraction": "strict", "weight": 2.0}}}
    tally: dict = {}
    rows = rewards.add_rewards(table, cfg, tally=tally).to_pylist()
    assert [r["reward"] for r in rows] == [2.0, 0.0, 0.0, 0.0]
    assert [r["reward_code"] for r in rows] == [1.0, 0.0, 0.0, 0.0]
    assert [r["tests_passed"] for r in rows] == pytest.approx([1.0, 2 / 3, 0.0, 0.0])
    assert [r["strict_correct"] for r in rows] == [True, False, False, False]
    assert [r["flexible_correct"] for r in rows] == [True, False, True, False]
    assert [r["reward_error"] for r in rows] == [None, "code: test 1 of 3: AssertionError: add(1, 2) returned 0", None, None]
    # rows 0-1 ran the 3 tests (split: judged here); row 2's flexible code is not the one scored
    assert tally == {"strict_none": 2, "flexible_none": 0, "tests_run": 6, "tests_judged_in_sandbox": 0}
    # a math reward on a code row pays nothing and says why
    math_row = rewards.score_many([{"completion": completions[0], "answer": tests}],
                                 rewards.functions({"functions": {"math": {}}}), cfg)[0]
    assert math_row["reward"] == 0.0 and "the math reward cannot check it" in math_row["reward_error"]
