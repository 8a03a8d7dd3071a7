"""A reward is an adversary's target: completions written to get reward 1.0 without solving
the problem, each through the real code reward (rewards.score_many, strict), each must get 0.
The verdict is made outside the sandbox from returned values (dashflow/core/sandbox.py), so
the program under test never holds the expected values or the verdict."""

from __future__ import annotations

import pytest
from test_sandbox import nothing_left_behind  # noqa: F401 -- no process, no directory left

from dashflow.core import code, rewards, sandbox

TESTS = {"format": "mbpp", "setup": "",
         "asserts": ["assert square_plus_3(2) == 7", "assert square_plus_3(0) == 3", "assert square_plus_3(5) == 28"]}
SOLUTION = "def square_plus_3(x):\n    return x * x + 3\n"

HACKS = {
    "an object whose __eq__ always says yes": (
        "class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
        "def square_plus_3(x):\n    return Yes()\n"),
    "a subclass of int that equals everything": (
        "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def square_plus_3(x):\n    return Int(0)\n"),
    "rewrites the harness's tests through the caller's frame": (
        "import sys\n"
        "def square_plus_3(x):\n"
        "    f = sys._getframe(1)\n"
        "    while f is not None:\n"
        "        t = f.f_locals.get('tests')\n"
        "        if isinstance(t, dict):\n"
        "            if 'asserts' in t: t['asserts'][:] = ['pass'] * len(t['asserts'])\n"
        "            if 'probes' in t: t['probes'][:] = [{'line': 'pass'}] * len(t['probes'])\n"
        "        f = f.f_back\n"
        "    return 0\n"),
    "calls the harness's report function, then exits": (
        "import sys, os\n"
        "def square_plus_3(x):\n"
        "    f = sys._getframe(1)\n"
        "    while f is not None:\n"
        "        rep = f.f_locals.get('report')\n"
        "        if callable(rep):\n"
        "            for i in range(3):\n"
        "                rep({'test': i, 'ok': True, 'error': None})\n"
        "                rep({'test': i, 'value': ['i', '7']})\n"
        "            rep({'done': True})\n"
        "            os._exit(0)\n"
        "        f = f.f_back\n"),
    "writes a passing report into the result pipe found under /proc/self/fd": (
        "import os\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        if int(fd) > 2 and 'pipe' in os.readlink('/proc/self/fd/' + fd):\n"
        "            os.write(int(fd), b'{\"ready\": true}\\n{\"tests\": 1}\\n{\"test\": 0, \"ok\": true}\\n{\"done\": true}\\n')\n"
        "    except (OSError, ValueError):\n"
        "        pass\n"
        "os._exit(0)\n"),
    # report lines that crashed the stage (score_many raised ValueError / TypeError / RecursionError)
    **{f"forges a report line whose test count is {what}": (
        "import os\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        if int(fd) > 2 and 'pipe' in os.readlink('/proc/self/fd/' + fd):\n"
        f"            os.write(int(fd), b'{{\"ready\": true}}\\n{{\"tests\": {count}}}\\n')\n"
        "    except (OSError, ValueError):\n"
        "        pass\n"
        "def square_plus_3(x):\n    return None\n")
       for what, count in (("a string", '\\"three\\"'), ("null", "null"), ("a float", "3.5"),
                           ("nested 5000 deep", "[" * 5000 + "]" * 5000))},
    "reads the expected value from the caller's frame": (
        "import sys, re\n"
        "def square_plus_3(x):\n"
        "    f = sys._getframe(1)\n"
        "    while f is not None:\n"
        "        for v in f.f_locals.values():\n"
        "            m = re.search(r'== (\\d+)', str(v))\n"
        "            if m:\n"
        "                return int(m.group(1))\n"
        "        f = f.f_back\n"
        "    return -1\n"),
    "builds a lookup table from the test list at import": (
        "import gc, re\n"
        "TABLE = {}\n"
        "for o in gc.get_objects():\n"
        "    if isinstance(o, str):\n"
        "        m = re.fullmatch(r'assert square_plus_3\\((\\d+)\\) == (\\d+)', o)\n"
        "        if m:\n"
        "            TABLE[int(m.group(1))] = int(m.group(2))\n"
        "def square_plus_3(x):\n"
        "    return TABLE.get(x, -1)\n"),
    "redefines AssertionError and exits 0 at import": (
        "import builtins, sys\nbuiltins.AssertionError = type('X', (Exception,), {})\nsys.exit(0)\n"),
    "prints a passing report to stdout": (
        "print('{\"ready\": true}')\nprint('{\"test\": 0, \"ok\": true}')\n"
        "def square_plus_3(x):\n    return None\n"),
}


def _score(program: str) -> dict:
    completion = f"```python\n{program}```"
    cfg = {"timeout_s": 5, "max_chars": 4000, "functions": {"code": {"extraction": "strict"}},
           "sandbox": {**sandbox.Limits(timeout_s=3).__dict__, "workers": 1}}
    return rewards.score_many([{"completion": completion, "answer": code.tests_answer(TESTS)}],
                              rewards.functions(cfg), cfg)[0]


def test_the_solution_scores_1_and_a_wrong_one_0():
    assert _score(SOLUTION)["reward"] == 1.0
    wrong = _score("def square_plus_3(x):\n    return x + 3\n")
    assert wrong["reward"] == 0.0 and "square_plus_3(2) returned 5" in wrong["reward_error"]


@pytest.mark.parametrize("hack", list(HACKS))
def test_a_hack_gets_reward_0(hack):
    row = _score(HACKS[hack])
    assert row["reward"] == 0.0 and row["reward_code"] == 0.0, row
    assert row["reward_error"]


def test_the_verdict_is_made_here_type_strict_from_plain_data():
    out = sandbox.run("def f(x):\n    return [x, (x, 'a'), {x: None}, {1, 2}, 1.5, b'z', True]\n",
                      {"format": "mbpp", "asserts": [
                          "assert f(1) == [1, (1, 'a'), {1: None}, {1, 2}, 1.5, b'z', True]",
                          "assert f(1) == [1, [1, 'a'], {1: None}, {1, 2}, 1.5, b'z', True]",  # list is not tuple
                          "assert f(1) == [1, (1, 'a'), {1: None}, {1, 2}, 1.5, b'z', 1]",      # True is not 1
                          "assert f(2)", "assert not f(2)",
                          "assert f(1)[4] == 3 / 2",  # the expected side is not a literal: run in the sandbox
                      ], "setup": ""})
    assert (out.passed, out.total, out.opaque) == (3, 6, 1)
    assert out.error.startswith("test 2 of 6: AssertionError: f(1) returned [1, [1, 'a']") or \
        out.error.startswith("test 2 of 6: AssertionError: f(1) returned [1, (1, 'a')")
    number = sandbox.run("def f():\n    return 4\n", {"format": "mbpp", "asserts": ["assert f() == 4.0"], "setup": ""})
    assert number.ok  # int and float compare by value


@pytest.mark.parametrize("line, split", [
    ("assert f(1, [2]) == {'a': (1,)}", ("value", "f(1, [2])", {"a": (1,)}, "eq")),
    ("assert 7 == g(x=2)", ("value", "g(x=2)", 7, "eq")),
    ("assert is_prime(7)", ("value", "is_prime(7)", None, "truthy")),
    ("assert not is_prime(8)", ("value", "is_prime(8)", None, "falsy")),
    ("assert set(f(3)) == set([1, 2])", ("opaque", "assert set(f(3)) == set([1, 2])")),
    ("assert math.isclose(f(2), 1.5)", ("value", "math.isclose(f(2), 1.5)", None, "truthy")),
    ("assert f(1) < 3", ("opaque", "assert f(1) < 3")),
    ("assert f(1) == __import__('os').getpid()", ("opaque", "assert f(1) == __import__('os').getpid()")),
    ("x = 1", ("opaque", "x = 1")),
])
def test_asserts_are_split_into_the_call_and_the_expected_literal(line, split):
    assert sandbox.split_assert(line) == split


def test_a_deep_directory_chain_and_a_disk_filler_stay_in_the_sandbox():
    """A 3,000-deep chain made the stage's cleanup raise RecursionError (and left the
    directory); 64 files of 512 KB (each under the per-file limit) filled the host's /tmp."""
    deep = _score("import os\nfor _ in range(3000):\n    os.mkdir('a')\n    os.chdir('a')\n" + SOLUTION)
    assert (deep["reward"], deep["reward_error"]) == (1.0, None)
    filler = _score("import os\nfor i in range(64):\n    with open(f'/work/f{i}', 'wb') as f:\n"
                    "        f.write(os.urandom(1 << 19))\n" + SOLUTION)
    assert filler["reward"] == 0.0 and "No space left on device" in filler["reward_error"]


def test_the_program_sees_no_host_path():
    """Its stdout was a file under the host's /tmp, named in /proc/self/fd/1."""
    out = sandbox.run("import os\nseen = [os.readlink('/proc/self/fd/%d' % i) for i in (0, 1, 2)] + [os.getcwd()]\n",
                      {"format": "mbpp", "asserts": ["assert [s for s in seen if 'dashflow-sandbox' in s or "
                                                     "s.startswith('/tmp')] == []"], "setup": ""})
    assert out.ok, out.error
