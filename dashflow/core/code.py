"""Code tasks: problems whose answer is a set of tests, and what counts as a completion's code.

A code problem's `answer` (schema.PROMPTS) is its tests as JSON, {"code_tests": {...}}:

  {"format": "mbpp", "asserts": ["assert f(1) == 2", ...], "setup": "import math"}
  {"format": "humaneval", "prelude": <the prompt: imports, signature, docstring>,
   "test": "def check(candidate): ...", "entry_point": "f"}

They run in the sandbox (dashflow/core/sandbox.py); an MBPP row's tests are its asserts, one by one;
a HumanEval row's are the top-level asserts of its `check(candidate)`.

What counts as the code of a completion, the two extractions of answers.EXTRACTIONS, both
recorded on every row:
  strict    the last fenced block tagged python (```python / ```py / ```python3), closed.
            Nothing else: a completion without one has no code.
  flexible  the DASH authors' rule (efficient_reasoning utils/math_eval.py,
            extract_final_answer for BigCodeBench): the last ```python block, else the
            last ``` block of any kind, else the whole completion.
(For math the paper's checker is the strict one; for code it is the lenient one.)

Sources (task.kind):
  pyfunc     built in: seeded synthetic small functions of graded difficulty with asserts
             (offline, no download), so a CPU run with the embedded model gets mixed groups
  mbpp       JSONL/Parquet with text|prompt, test_list, optional test_setup_code|test_imports, code
  humaneval  JSONL/Parquet with prompt, test, entry_point, optional canonical_solution
"""

from __future__ import annotations

import json
import random
import re

KINDS = ("pyfunc", "mbpp", "humaneval")
MARKER = '{"code_tests": '
INSTRUCTION = "Write the complete function in a ```python code block."

_STRICT = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL)
_PAPER = (re.compile(r"```python(.*?)```", re.DOTALL), re.compile(r"```(.*?)```", re.DOTALL))


class CodeTaskError(ValueError):
    pass


def tests_answer(tests: dict) -> str:
    """The `answer` string of a code problem."""
    return json.dumps({"code_tests": tests}, sort_keys=True)


def tests_of(answer: str | None) -> dict | None:
    """The tests of a code problem's answer; None for any other answer (a math answer)."""
    if not answer or not answer.startswith(MARKER):
        return None
    return json.loads(answer)["code_tests"]


def extract(completion: str, extraction: str) -> str | None:
    """The code of a completion under `extraction` (see the module doc); None: no code."""
    if extraction == "strict":
        blocks = _STRICT.findall(completion)
        return (blocks[-1].strip() or None) if blocks else None
    for pattern in _PAPER:
        blocks = pattern.findall(completion)
        if blocks:
            return blocks[-1].strip()
    return completion.strip() or None


# ---------------------------------------------------------------- the built-in synthetic task

# (level, function name, signature argument, description, reference body, input maker)
# `k` is drawn per problem; inputs are drawn per test.
_TEMPLATES = [
    (1, "add_{k}", "x", "returns x plus {k}", "return x + {k}", "int"),
    (1, "times_{k}", "x", "returns x multiplied by {k}", "return x * {k}", "int"),
    (1, "minus_{k}", "x", "returns x minus {k}", "return x - {k}", "int"),
    (1, "square_plus_{k}", "x", "returns x squared plus {k}", "return x * x + {k}", "int"),
    (2, "repeat_{k}", "s", "returns the string s repeated {k} times", "return s * {k}", "str"),
    (2, "first_{k}", "s", "returns the first {k} characters of the string s", "return s[:{k}]", "str"),
    (2, "upper_len_{k}", "s", "returns the length of the string s plus {k}", "return len(s) + {k}", "str"),
    (2, "reverse_add_{k}", "s", "returns the string s reversed, followed by the digit {k}",
     "return s[::-1] + '{k}'", "str"),
    (3, "sum_plus_{k}", "xs", "returns the sum of the list xs plus {k}", "return sum(xs) + {k}", "list"),
    (3, "max_times_{k}", "xs", "returns the largest number in the list xs multiplied by {k}",
     "return max(xs) * {k}", "list"),
    (3, "count_above_{k}", "xs", "returns how many numbers in the list xs are greater than {k}",
     "return sum(1 for x in xs if x > {k})", "list"),
    (3, "scale_{k}", "xs", "returns a new list with every number of the list xs multiplied by {k}",
     "return [x * {k} for x in xs]", "list"),
    (4, "divisible_by_{k}", "x", "returns True if x is divisible by {k}, else False", "return x % {k} == 0", "int"),
    (4, "sum_to_{k}", "x", "returns the sum of the integers from {k} to x inclusive (0 if x < {k})",
     "return sum(range({k}, x + 1))", "int"),
    (4, "digits_times_{k}", "x", "returns the sum of the decimal digits of the non-negative integer x, times {k}",
     "return sum(int(d) for d in str(x)) * {k}", "int"),
    (4, "clamp_{k}", "x", "returns x if it is at most {k}, otherwise {k}", "return min(x, {k})", "int"),
]


def _input(rng: random.Random, kind: str):
    if kind == "int":
        return rng.randint(0, 30)
    if kind == "str":
        return "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
    return [rng.randint(0, 20) for _ in range(rng.randint(2, 5))]


def pyfunc(num_train: int, num_eval: int, *, seed: int, level_weights: list[float], instruction: str):
    """Distinct synthetic function problems (seeded), split into disjoint train and eval lists
    (eval drawn first). Each has 3 asserts, shown in the prompt as MBPP does."""
    rng = random.Random(seed)
    levels = list(range(1, len(level_weights) + 1))
    by_level = {lv: [t for t in _TEMPLATES if t[0] == lv] for lv in levels}
    if any(not by_level[lv] for lv in levels if level_weights[lv - 1] > 0):
        raise CodeTaskError(f"pyfunc: levels are 1..4; got {len(level_weights)} level weights")
    rows, seen = [], set()
    total, attempts = num_train + num_eval, 0
    while len(rows) < total:
        attempts += 1
        if attempts > 100 * total:
            raise CodeTaskError(f"pyfunc: cannot draw {total} distinct problems with level weights {level_weights} "
                                f"(there are {len(_TEMPLATES) * 18} in all)")
        level = rng.choices(levels, weights=level_weights)[0]
        template = rng.choice(by_level[level])
        k = rng.randint(2, 19)
        if (template[1], k) in seen:
            continue
        seen.add((template[1], k))
        _, name, arg, text, body, kind = template
        name, text, body = name.format(k=k), text.format(k=k), body.format(k=k)
        reference = f"def {name}({arg}):\n    {body}\n"
        scope: dict = {}
        exec(reference, scope)  # noqa: S102 - our own template, not input
        asserts = []
        for _ in range(3):
            value = _input(rng, kind)
            asserts.append(f"assert {name}({value!r}) == {scope[name](value)!r}")
        question = (f"Write a Python function `{name}({arg})` that {text}.\n"
                    f"Your code should pass these tests:\n" + "\n".join(asserts))
        rows.append({"prompt_id": f"pyfunc-{len(rows):05d}", "prompt": f"{question}\n{instruction}".strip(),
                     "answer": tests_answer({"format": "mbpp", "asserts": asserts, "setup": ""}),
                     "solution": f"```python\n{reference}```", "source": f"pyfunc-L{level}"})
    return rows[num_eval:], rows[:num_eval]


# ---------------------------------------------------------------- MBPP / HumanEval rows


def _text(row: dict, names: tuple[str, ...], where: str) -> str:
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
    raise CodeTaskError(f"{where}: missing field {' or '.join(map(repr, names))}")


def problem(row: dict, kind: str, where: str, instruction: str) -> dict:
    """One MBPP or HumanEval row as prompt columns (prompt, answer, solution)."""
    if kind == "mbpp":
        question = _text(row, ("text", "prompt"), where)
        asserts = row.get("test_list")
        if not isinstance(asserts, (list, tuple)) or not asserts or not all(isinstance(a, str) for a in asserts):
            raise CodeTaskError(f"{where}: field 'test_list' must be a non-empty list of assert strings")
        imports = row.get("test_imports")
        setup = row.get("test_setup_code") or ("\n".join(imports) if isinstance(imports, (list, tuple)) else "")
        prompt = f"{question.strip()}\nYour code should pass these tests:\n" + "\n".join(asserts)
        tests = {"format": "mbpp", "asserts": list(asserts), "setup": setup or ""}
        reference = row.get("code")
    elif kind == "humaneval":
        stub = _text(row, ("prompt",), where)
        tests = {"format": "humaneval", "prelude": stub, "test": _text(row, ("test",), where),
                 "entry_point": _text(row, ("entry_point",), where)}
        prompt = f"Complete the following Python function:\n```python\n{stub.rstrip()}\n```"
        reference = (stub + row["canonical_solution"]) if isinstance(row.get("canonical_solution"), str) else None
    else:
        raise CodeTaskError(f"unknown code task kind {kind!r}; choose one of {', '.join(KINDS)}")
    return {"prompt": f"{prompt}\n{instruction}".strip(), "answer": tests_answer(tests),
            "solution": f"```python\n{reference.rstrip()}\n```" if isinstance(reference, str) else None,
            "source": kind}
