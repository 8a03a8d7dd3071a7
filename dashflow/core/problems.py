"""Where prompts come from: the built-in arithmetic task and dataset loaders.

Every source yields rows of the PROMPTS schema: prompt_id, prompt (question plus the
answer-format instruction), answer (reference final answer), solution, source.

- arithmetic: seeded synthetic problems of graded difficulty (offline, no download).
- gsm8k: JSONL/Parquet rows with `question` and `answer` ending in `#### N`.
- math: JSONL/Parquet rows with `problem` and `answer`, or `solution` containing \\boxed{}.
- hub: any `datasets` hub dataset, with the question/answer field names given (online);
  with `hub_format: mbpp | humaneval`, a code dataset in that format.
- pyfunc, mbpp, humaneval: code tasks (dashflow/core/code.py): the answer is the problem's tests.

A row without a needed field stops with an error naming the file, the row and the field.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from dashflow.core import code
from dashflow.core.answers import last_boxed


class ProblemError(ValueError):
    pass


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


def _arithmetic_item(rng: random.Random, level: int) -> tuple[int, str, int]:
    if level == 1:
        return rng.randint(1, 9), rng.choice("+-"), rng.randint(1, 9)
    if level == 2:
        return rng.randint(10, 99), rng.choice("+-"), rng.randint(1, 9)
    if level == 3:
        return rng.randint(2, 9), "×", rng.randint(2, 9)
    return rng.randint(10, 99), rng.choice("+-"), rng.randint(10, 99)


def arithmetic(num_train: int, num_eval: int, *, seed: int, level_weights: list[float], instruction: str):
    """Distinct problems, split into disjoint train and eval lists (eval drawn first)."""
    rng = random.Random(seed)
    levels = list(range(1, len(level_weights) + 1))
    seen: set[tuple] = set()
    rows: list[dict] = []
    total = num_train + num_eval
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > 100 * total:
            raise ProblemError(f"arithmetic: cannot draw {total} distinct problems with level weights {level_weights}")
        level = rng.choices(levels, weights=level_weights)[0]
        a, op, b = _arithmetic_item(rng, level)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        rows.append(
            {
                "prompt_id": f"arith-{len(rows):05d}",
                "prompt": f"What is {a} {op} {b}? {instruction}".strip(),
                "answer": str(_OPS[op](a, b)),
                "solution": f"{a} {op} {b} = {_OPS[op](a, b)}. The answer is \\boxed{{{_OPS[op](a, b)}}}.",
                "source": f"arithmetic-L{level}",
            }
        )
    return rows[num_eval:], rows[:num_eval]


# ---------------------------------------------------------------- reference answers


def sft_target(solution: str | None, answer: str) -> str:
    """The completion SFT trains on: the worked solution, ending in the answer format the
    reward checks (\\boxed{}); the bare answer when the dataset has no solution. A code
    problem's is its reference code in a ```python block; one without stops SFT."""
    if code.tests_of(answer) is not None:
        if not solution:
            raise ProblemError("SFT on a code task needs each problem's reference solution (MBPP `code`, "
                               "HumanEval `canonical_solution`); this problem has none")
        return solution.strip()
    solution = (solution or "").strip()
    if last_boxed(solution) is not None:
        return solution
    tail = f"The answer is \\boxed{{{answer}}}."
    return f"{solution}\n\n{tail}" if solution else tail


def gsm8k_final(answer: str) -> str | None:
    """`... #### 1,234` -> `1234`."""
    if "####" not in answer:
        return None
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return final or None


# ---------------------------------------------------------------- files and hub


def _read_rows(path: Path) -> Iterable[tuple[int, dict]]:
    """(row number, row) pairs; row numbers are 1-based lines for JSONL, 0-based rows for Parquet."""
    if not path.exists():
        raise ProblemError(f"{path}: dataset file not found")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ProblemError(f"{path}: not a readable Parquet file ({exc}); a .parquet task file must be "
                               "Parquet (or name it .jsonl)") from None
        for i, row in enumerate(table.to_pylist()):
            yield i, row
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProblemError(
                    f"{path}: row {lineno}: not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                    f"JSONL must be UTF-8: convert the file, e.g. `iconv -f latin1 -t utf-8 {path.name}`") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProblemError(f"{path}: row {lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ProblemError(f"{path}: row {lineno}: expected a JSON object")
            yield lineno, row


MAX_FIELD_CHARS = 65_536  # a question or answer longer than this is a broken row, not a problem


def _field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ProblemError(f"{where}: missing field {name!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ProblemError(f"{where}: field {name!r} is a {type(value).__name__} ({str(value)[:60]}); "
                           "expected text (or a number)")
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        raise ProblemError(f"{where}: field {name!r} is {len(value):,} characters long; at most "
                           f"{MAX_FIELD_CHARS:,} are allowed")
    return str(value)


def _problem(row: dict, kind: str, where: str, question_field: str, answer_field: str) -> tuple[str, str, str | None]:
    """(question, final answer, worked solution) of one dataset row."""
    if kind == "gsm8k":
        question, raw = _field(row, "question", where), _field(row, "answer", where)
        final = gsm8k_final(raw)
        if final is None:
            raise ProblemError(f"{where}: field 'answer' does not end in '#### <final answer>'")
        return question, final, raw.rsplit("####", 1)[0].strip()
    if kind == "math":
        question = _field(row, "problem", where)
        solution = row.get("solution")
        if row.get("answer") not in (None, ""):
            return question, str(row["answer"]), solution
        if solution is None:
            raise ProblemError(f"{where}: missing field 'answer' (and no 'solution' to take it from)")
        final = last_boxed(str(solution))
        if final is None:
            raise ProblemError(f"{where}: field 'solution' has no \\boxed{{}} answer and there is no 'answer'")
        return question, final, solution
    # hub: named fields; take the final answer out of GSM8K- or MATH-style answers
    question, raw = _field(row, question_field, where), _field(row, answer_field, where)
    final = gsm8k_final(raw) or last_boxed(raw) or raw.strip()
    return question, final, raw


def from_rows(rows: Iterable[tuple[int, dict]], *, kind: str, origin: str, instruction: str,
              question_field: str = "question", answer_field: str = "answer") -> list[dict]:
    out = []
    for rownum, row in rows:
        where = f"{origin}: row {rownum}"
        question, final, solution = _problem(row, kind, where, question_field, answer_field)
        out.append(
            {
                "prompt_id": f"{Path(origin).stem}-{rownum}",
                "prompt": f"{question.strip()} {instruction}".strip(),
                "answer": final,
                "solution": solution,
                "source": kind,
            }
        )
    return out


def code_rows(rows: Iterable[tuple[int, dict]], *, kind: str, origin: str, instruction: str) -> list[dict]:
    """MBPP- or HumanEval-format rows as prompt rows whose answer is their tests."""
    out = []
    for rownum, row in rows:
        try:
            problem = code.problem(row, kind, f"{origin}: row {rownum}", instruction)
        except code.CodeTaskError as exc:
            raise ProblemError(str(exc)) from None
        ident = row.get("task_id")
        out.append({"prompt_id": f"{Path(origin).stem}-{ident if ident not in (None, '') else rownum}", **problem})
    return out


def load_file(path: Path, kind: str, instruction: str) -> list[dict]:
    if kind in code.KINDS:
        return code_rows(_read_rows(Path(path)), kind=kind, origin=str(path), instruction=instruction)
    return from_rows(_read_rows(Path(path)), kind=kind, origin=str(path), instruction=instruction)


def load_hub(name: str, config: str | None, split: str, question_field: str, answer_field: str, instruction: str,
             hub_format: str | None = None):
    import datasets  # only needed online

    ds = datasets.load_dataset(name, config, split=split)
    if hub_format is not None:
        return code_rows(enumerate(ds), kind=hub_format, origin=f"{name}[{split}]", instruction=instruction)
    return from_rows(enumerate(ds), kind="hub", origin=f"{name}[{split}]", instruction=instruction,
                     question_field=question_field, answer_field=answer_field)


def user_task(kind: str):
    """`module:function` -> (module, function), with an error naming the setting."""
    import importlib

    module_name, _, attr = kind.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ProblemError(f"task.kind = {kind!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); "
                           f"is it on PYTHONPATH?") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ProblemError(f"task.kind = {kind!r}: {module_name} has no function {attr!r}")
    return module, fn


# What a task brings besides its problems, used where params.yaml says null
# (`reward.functions: null`, `evaluate.sets: null`): the built-in tasks' are these; a task
# module of your own may define REWARD_FUNCTIONS and EVAL_SETS (same shapes) to bring its own.
BUILTIN_DEFAULTS = {"reward_functions": {"math": {"weight": 1.0, "extraction": "flexible"}},
                    "eval_sets": {"heldout": {"kind": "heldout"}}}
CODE_DEFAULTS = {"reward_functions": {"code": {"weight": 1.0, "extraction": "strict"}},
                 "eval_sets": {"heldout": {"kind": "heldout"}}}
MATH_INSTRUCTION = "Put the final answer in \\boxed{}."


def _is_code(kind: str, hub_format: str | None) -> bool:
    return kind in code.KINDS or (kind == "hub" and hub_format is not None)


def task_defaults(task: dict) -> dict:
    """The task's default reward functions and evaluation sets (see BUILTIN_DEFAULTS)."""
    kind = task["kind"]
    if not (isinstance(kind, str) and ":" in kind):
        return CODE_DEFAULTS if _is_code(kind, task.get("hub_format")) else BUILTIN_DEFAULTS
    module, _ = user_task(kind)
    return {"reward_functions": getattr(module, "REWARD_FUNCTIONS", BUILTIN_DEFAULTS["reward_functions"]),
            "eval_sets": getattr(module, "EVAL_SETS", BUILTIN_DEFAULTS["eval_sets"])}


def instruction(task: dict, kind: str | None = None) -> str:
    """What is appended to every question: `task.instruction`, or where that is null the
    task's own (math tasks: put the answer in \\boxed{}; code tasks: a ```python block; a
    task module's INSTRUCTION). `kind` names another kind's default (an evaluation set)."""
    if task.get("instruction") is not None:
        return task["instruction"]
    kind = kind or task["kind"]
    if _is_code(kind, task.get("hub_format")):
        return code.INSTRUCTION
    if isinstance(kind, str) and ":" in kind:
        return getattr(user_task(kind)[0], "INSTRUCTION", MATH_INSTRUCTION)
    return MATH_INSTRUCTION


def load_user_task(kind: str, options: dict, seed: int, instruction: str) -> list[dict]:
    """A task of your own: fn(seed=..., **task.options) yields problems as dicts with
    `question` and `answer` (strings), optionally `solution` (for SFT), `id` and `source`."""
    _, fn = user_task(kind)
    out, ids = [], set()
    for n, row in enumerate(fn(seed=seed, **options)):
        where = f"task {kind}: problem {n}"
        if not isinstance(row, dict):
            raise ProblemError(f"{where}: expected a dict with question and answer, got {type(row).__name__}")
        question, answer = _field(row, "question", where), _field(row, "answer", where)
        pid = str(row.get("id", f"{kind.partition(':')[2]}-{n:05d}"))
        if pid in ids:
            raise ProblemError(f"{where}: id {pid!r} is not unique")
        ids.add(pid)
        out.append({"prompt_id": pid, "prompt": f"{str(question).strip()} {instruction}".strip(), "answer": str(answer),
                    "solution": row.get("solution"), "source": str(row.get("source", kind))})
    return out


def split(rows: list[dict], num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle, then the first num_eval rows are eval and the next num_train are train."""
    if len(rows) < 2:
        raise ProblemError(f"need at least 2 rows to make a train/eval split, got {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    num_eval = min(num_eval, len(rows) // 2)
    ev = [rows[i] for i in order[:num_eval]]
    tr = [rows[i] for i in order[num_eval : num_eval + num_train]]
    return tr, ev


def load_task(task: dict, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval prompt rows for the `task:` section of params.yaml."""
    kind, text = task["kind"], instruction(task)
    if isinstance(kind, str) and ":" in kind:
        rows = load_user_task(kind, task.get("options") or {}, seed, text)
        return split(rows, task["num_train"], task["num_eval"], seed)
    if kind == "arithmetic":
        return arithmetic(task["num_train"], task["num_eval"], seed=seed,
                          level_weights=task["level_weights"], instruction=text)
    if kind == "pyfunc":
        try:
            return code.pyfunc(task["num_train"], task["num_eval"], seed=seed,
                               level_weights=task["level_weights"], instruction=text)
        except code.CodeTaskError as exc:
            raise ProblemError(str(exc)) from None
    if kind in ("gsm8k", "math", "mbpp", "humaneval"):
        if not task.get("path"):
            raise ProblemError(f"task.kind={kind} needs task.path (a JSONL or Parquet file)")
        rows = load_file(Path(task["path"]), kind, text)
    elif kind == "hub":
        if not task.get("hub_name"):
            raise ProblemError("task.kind=hub needs task.hub_name")
        rows = load_hub(task["hub_name"], task.get("hub_config"), task.get("hub_split", "train"),
                        task["question_field"], task["answer_field"], text, task.get("hub_format"))
    else:
        raise ProblemError(f"unknown task.kind {kind!r}; choose arithmetic, gsm8k, math, pyfunc, mbpp, humaneval, "
                           f"hub or module:function")
    return split(rows, task["num_train"], task["num_eval"], seed)
