"""Reward functions: the training reward of a completion, one value per reward function.

The reward stage (tasks/reward.py) and evaluate (tasks/evaluate.py) both score through here.

`reward.functions` names the functions and their weights; the rewarded table gets each
one's value as its own column `reward_<name>` (so `dashflow inspect` shows which one paid)
and their weighted sum as `reward`:

  math              built in: 1 if the answer extracted from the completion equals the
                    reference (math-verify), else 0. `extraction: strict` is the DASH
                    paper's checker, `flexible` the lenient one (dashflow/core/answers.py).
  code              built in, for code tasks (dashflow/core/code.py): 1 if the completion's code
                    passes every test of the row in the sandbox (dashflow/core/sandbox.py), else 0;
                    the fraction of tests passed is the column `tests_passed`, the failure
                    (syntax error, assertion, timeout, memory, output, killed) goes in
                    `reward_error`. `extraction`: strict (the last ```python block) or
                    flexible (the DASH authors' rule: that, else the last ``` block, else
                    the whole completion). Rows are checked `sandbox.workers` at a time.
  module:function   yours: called as fn(prompt=..., completion=..., answer=...,
                    metadata={prompt_id, sample_index, iteration, finish_reason,
                    completion_tokens}) and returning a number (docs/rewards.md).

Every row also gets `strict_correct` and `flexible_correct` (both checkers, whichever one
pays: answer checks on a math row, the tests on a code row), so training accuracy is
reported strict next to flexible; `correct` and `parsed_answer` are those of the first
`math` or `code` function's extraction (strict without one).

Each call -- every reward function and each answer check -- runs under a per-row alarm of
`reward.timeout_s` seconds. An exception, a timeout or a return that is not a finite
number gives that function 0 and its reason in `reward_error` ("<name>: ..."); the stage
goes on. (The alarm interrupts Python code; a function stuck inside a C call that never
returns to the interpreter is not interrupted.)
"""

from __future__ import annotations

import importlib
import math
import re
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from dashflow.core import algorithms, answers, code, problems, sandbox, sandbox_runner, schema, store
from dashflow.core.config import Params

BUILTIN = ("math", "code")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
METADATA = ("prompt_id", "sample_index", "iteration", "finish_reason")


class RewardTimeout(Exception):
    pass


@contextmanager
def time_bound(seconds: float):
    """Raise RewardTimeout in the block after `seconds` (SIGALRM; main thread only). An
    alarm already set by someone else (a Prefect task timeout) is put back with the time it
    had left, and fires at once if that ran out meanwhile."""
    def on_alarm(signum, frame):
        raise RewardTimeout(f"timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    if outer and outer < seconds:
        signal.setitimer(signal.ITIMER_REAL, outer)
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - t0), 1e-3), interval)


# ---------------------------------------------------------------- the configured functions


def functions(cfg: dict) -> list[dict[str, Any]]:
    """reward.functions as a list of {name, function, weight, extraction}, checked."""
    spec = cfg.get("functions")
    where = "params.yaml reward.functions"
    if not isinstance(spec, dict) or not spec:
        raise store.StageError(f"{where} must map names to {{function, weight}}: got {spec!r}")
    out = []
    for name, item in spec.items():
        item = {} if item is None else item
        if not isinstance(item, dict) or set(item) - {"function", "weight", "extraction"}:
            raise store.StageError(f"{where}.{name} = {item!r}: allowed keys are function, weight, extraction")
        if not isinstance(name, str) or not _NAME.match(name) or name == "error":
            raise store.StageError(f"{where}: name {name!r} must match [a-z][a-z0-9_]* (not 'error'): it names "
                                   f"the column reward_<name>")
        function = item.get("function", name)
        if function not in BUILTIN and (not isinstance(function, str) or ":" not in function):
            raise store.StageError(f"{where}.{name}.function = {function!r}: a built-in ({', '.join(BUILTIN)}) "
                                   f"or an import path module:function")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise store.StageError(f"{where}.{name}.weight = {weight!r}: a finite number")
        extraction = item.get("extraction", "strict" if function in BUILTIN else None)
        if function in BUILTIN and extraction not in answers.EXTRACTIONS:
            raise store.StageError(f"{where}.{name}.extraction = {extraction!r}: one of "
                                   f"{', '.join(answers.EXTRACTIONS)}")
        out.append({"name": name, "function": function, "weight": float(weight), "extraction": extraction})
    return out


def load_function(path: str, name: str = "?") -> Callable:
    """`module:function` -> the callable, with an error naming the setting."""
    module_name, _, attr = path.partition(":")
    where = f"params.yaml reward.functions.{name}.function = {path!r}"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise store.StageError(f"{where}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); "
                               f"is it on PYTHONPATH?") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise store.StageError(f"{where}: {module_name} has no function {attr!r}")
    return fn


def user_modules(fns: list[dict]) -> list:
    """The modules of the user functions (their source is part of the stage's key)."""
    return [sys.modules[load_function(f["function"], f["name"]).__module__] for f in fns if f["function"] not in BUILTIN]


# ---------------------------------------------------------------- one row


def score_row(row: dict, fns: list[dict], timeout_s: float, max_chars: int,
              loaded: dict[str, Callable] | None = None) -> dict:
    """Every function's value, the weighted total, both checkers' verdicts and the errors.
    A code row (its answer holds tests) must carry `_code`, its sandbox outcomes (see
    `code_outcomes`)."""
    errors: list[str] = []
    completion, reference = row["completion"], row["answer"]
    reads = next((f["extraction"] for f in fns if f["function"] in BUILTIN), "strict")
    is_code = code.tests_of(reference) is not None
    out: dict[str, Any] = {}
    if is_code:
        outcomes = row["_code"]
        for ex in answers.EXTRACTIONS:
            program, outcome = outcomes[ex]
            out[f"{ex}_answer"], out[f"{ex}_correct"] = program, outcome is not None and outcome.ok
        program, outcome = outcomes[reads]
        out["tests_passed"] = outcome.fraction if outcome is not None else 0.0
        # tests whose verdict the program's own process gave (not split: dashflow/core/sandbox.py)
        out["_tests"] = (outcome.total, outcome.opaque) if outcome is not None else (0, 0)
        if outcome is not None and outcome.error:
            errors.append(f"code: {outcome.error}"[:500])
    else:
        answers.warm_up()
        checked: dict[str, bool] = {}

        def verdict(extraction: str) -> tuple[str | None, bool]:
            parsed = answers.extract(completion, extraction, max_chars)
            if parsed is None:
                return None, False
            if parsed not in checked:
                try:
                    with time_bound(timeout_s):
                        ok, error = answers.check(parsed, reference)
                except RewardTimeout as exc:
                    ok, error = False, f"answer check {exc}"
                except Exception as exc:  # noqa: BLE001 - math-verify's failure is recorded, not raised
                    ok, error = False, f"answer check {type(exc).__name__}: {exc}"
                checked[parsed] = ok
                if error:
                    errors.append(f"{extraction}: {error}"[:500])
            return parsed, checked[parsed]

        for ex in answers.EXTRACTIONS:
            out[f"{ex}_answer"], out[f"{ex}_correct"] = verdict(ex)
        out["tests_passed"] = None
    out["parsed_answer"], out["correct"] = out[f"{reads}_answer"], out[f"{reads}_correct"]
    total = 0.0
    for f in fns:
        if f["function"] in BUILTIN:
            value = float(out[f"{f['extraction']}_correct"])
            if (f["function"] == "code") != is_code:
                value = 0.0
                errors.append(f"{f['name']}: this row's answer is {'tests (a code task)' if is_code else 'not tests'}; "
                              f"the {f['function']} reward cannot check it")
        else:
            fn = (loaded or {}).get(f["function"]) or load_function(f["function"], f["name"])
            metadata = {k: row.get(k) for k in METADATA}
            metadata["completion_tokens"] = len(row.get("completion_token_ids") or [])
            try:
                with time_bound(timeout_s):
                    value = fn(prompt=row.get("prompt"), completion=completion, answer=reference, metadata=metadata)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise TypeError(f"returned {value!r}, not a finite number")
                value = float(value)
            except RewardTimeout as exc:
                value = 0.0
                errors.append(f"{f['name']}: {exc}")
            except Exception as exc:  # noqa: BLE001 - a user function's failure is recorded per row
                value = 0.0
                errors.append(f"{f['name']}: {type(exc).__name__}: {exc}"[:500])
        out[f"reward_{f['name']}"] = value
        total += f["weight"] * value
    out["reward"] = total
    out["reward_error"] = "; ".join(errors) if errors else None
    return out


def code_outcomes(rows: list[dict], cfg: dict, desc: str = "sandbox") -> None:
    """Give every code row `_code` = {extraction: (its code, sandbox outcome or None)}, each
    distinct program run once, `sandbox.workers` at a time."""
    jobs: dict[tuple[str, str], int] = {}
    plans = []
    for row in rows:
        tests = code.tests_of(row["answer"])
        if tests is None:
            plans.append(None)
            continue
        plan = {}
        for ex in answers.EXTRACTIONS:
            program = code.extract(row["completion"], ex)
            if program is not None:
                jobs.setdefault((program, row["answer"]), len(jobs))
            plan[ex] = program
        plans.append(plan)
    if not jobs:
        return
    box = sandbox_settings(cfg)
    try:
        sandbox.check_available()
        results = sandbox.run_many([(program, code.tests_of(answer)) for program, answer in jobs],
                                   sandbox.Limits.from_params(box), int(box["workers"]), desc=f"{desc} sandbox")
    except sandbox.SandboxError as exc:  # the sandbox's failure, not the program's: stop, score nothing
        raise store.StageError(f"{desc}: {exc}") from exc
    for row, plan in zip(rows, plans):
        if plan is not None:
            row["_code"] = {ex: (program, None if program is None else results[jobs[(program, row["answer"])]])
                            for ex, program in plan.items()}


def sandbox_settings(cfg: dict) -> dict:
    """The sandbox's limits for the code reward (params.yaml `sandbox:`; these defaults where
    a reward section comes without them)."""
    return {**sandbox.Limits().__dict__, "workers": 2, **(cfg.get("sandbox") or {})}


def _load_all(fns: list[dict]) -> dict[str, Callable]:
    """Each user function, imported once for all rows."""
    return {f["function"]: load_function(f["function"], f["name"]) for f in fns if f["function"] not in BUILTIN}


def _score_rows(rows: list[dict], fns: list[dict], timeout_s: float, max_chars: int) -> list[dict]:
    loaded = _load_all(fns)
    return [score_row(r, fns, timeout_s, max_chars, loaded) for r in rows]


def score_many(rows: list[dict], fns: list[dict], cfg: dict, desc: str = "reward") -> list[dict]:
    """score_row over rows ({completion, answer, ...}; `fns` may be empty: the checks only).
    Code rows' programs run in the sandbox first, in parallel. The alarm needs a main
    thread: in one the rows are scored here; elsewhere (Prefect may run tasks in worker
    threads) in a spawned process's."""
    rows = [dict(r) for r in rows]
    code_outcomes(rows, cfg, desc)
    args = (fns, float(cfg["timeout_s"]), int(cfg["max_chars"]))
    if threading.current_thread() is threading.main_thread():
        loaded = _load_all(fns)
        return [score_row(r, *args, loaded) for r in tqdm(rows, desc=desc, unit="row", leave=False)]
    chunks = [rows[i : i + 64] for i in range(0, len(rows), 64)]
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        results = list(tqdm(pool.map(_score_rows, chunks, *[[a] * len(chunks) for a in args]),
                            total=len(chunks), desc=desc, unit="chunk", leave=False))
    return [r for chunk in results for r in chunk]


def add_rewards(table: pa.Table, cfg: dict, desc: str = "reward", tally: dict | None = None) -> pa.Table:
    """Rollout table -> rewarded table (schema.REWARDED plus one reward_<name> column per
    function, and `tests_passed` with a code function). `tally` counts, per extraction, the
    completions from which nothing could be extracted (`strict_none`, `flexible_none`), and
    for code the tests run and those whose verdict came from inside the sandbox (asserts
    that could not be split, HumanEval `check` bodies: `tests_judged_in_sandbox`)."""
    fields = ["prompt", "completion", "answer", "completion_token_ids", *METADATA]
    fns = functions(cfg)
    scored = score_many(table.select(fields).to_pylist(), fns, cfg, desc)
    names = [f"reward_{f['name']}" for f in fns]
    if cfg.get("overlong_buffer"):  # DAPO's soft overlong punishment, added to the reward
        lengths = pc.list_value_length(table.column("completion_token_ids")).to_pylist()
        for s, n in zip(scored, lengths):
            s["reward_overlong"] = algorithms.overlong_penalty(n, cfg["max_new_tokens"], cfg["overlong_buffer"],
                                                               cfg["overlong_penalty"])
            s["reward"] += s["reward_overlong"]
        names.append("reward_overlong")
    for name in ("reward", "correct", "parsed_answer", "reward_error", "strict_correct", "flexible_correct"):
        table = table.append_column(name, pa.array([s[name] for s in scored], type=schema.REWARDED.field(name).type))
    for name in names:
        table = table.append_column(name, pa.array([s[name] for s in scored], type=pa.float32()))
    if any(f["function"] == "code" for f in fns):
        table = table.append_column("tests_passed", pa.array([s["tests_passed"] for s in scored], type=pa.float32()))
    if tally is not None:
        for ex in answers.EXTRACTIONS:
            tally[f"{ex}_none"] = tally.get(f"{ex}_none", 0) + sum(s[f"{ex}_answer"] is None for s in scored)
        if any("_tests" in s for s in scored):  # code: how many verdicts were not ours
            tally["tests_run"] = tally.get("tests_run", 0) + sum(s.get("_tests", (0, 0))[0] for s in scored)
            tally["tests_judged_in_sandbox"] = tally.get("tests_judged_in_sandbox", 0) + \
                sum(s.get("_tests", (0, 0))[1] for s in scored)
    return table


def settings(params: Params, iteration: int | None = None) -> dict:
    """The reward section for `iteration`, `functions: null` resolved to the task's defaults
    (so the stage key holds the functions that actually run), with the `sandbox:` section
    under `sandbox` (the code reward's limits)."""
    cfg = dict(params.stage("reward", iteration), sandbox=params.stage("sandbox"),
               max_new_tokens=params.stage("sample", iteration)["max_new_tokens"])
    if cfg.get("functions") is None:
        try:
            cfg["functions"] = problems.task_defaults(params["task"])["reward_functions"]
        except problems.ProblemError as exc:
            raise store.StageError(f"reward: {exc}") from exc
    return cfg


def code_modules() -> tuple:
    """The modules scoring runs (what a stage that scores rows hashes as its code)."""
    return (sys.modules[__name__], algorithms, answers, code, sandbox, sandbox_runner)


def key_settings(cfg: dict) -> dict:
    """The reward settings that change scores (`settings`, less how many programs run at once)."""
    return {**{k: v for k, v in cfg.items() if k != "sandbox"},
            "sandbox": {k: v for k, v in cfg["sandbox"].items() if k != "workers"}}
