"""Stage `reward`: binary correctness reward from the final answer, checked with math-verify.

Answer extraction: the last \\boxed{...} in the completion (DASH's reference reward); if
there is none, the fallback (`reward.fallback`): the last number in the text. The
extracted answer and the reference are compared by math-verify (symbolic and numeric
equivalence: `0.5` = `\\frac{1}{2}`). Checking one row is bounded by `reward.timeout_s`
and by reading only the last `reward.max_chars` characters; a row whose check fails or
times out gets reward 0 and its reason in `reward_error` instead of stopping the stage.

Input : iter-i/rollouts   Output: iter-i/rewarded (schema.REWARDED), shard for shard
"""

from __future__ import annotations

import re
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from dashflow.config import Params
from tasks import problems, schema, store
from tasks.prefecting import stage_task

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str, fallback: str = "last_number", max_chars: int = 4000) -> str | None:
    """The answer a completion gives: last \\boxed{} first, else the fallback, else None."""
    text = text[-max_chars:]
    boxed = problems.last_boxed(text)
    if boxed is not None:
        return boxed
    if fallback == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else None
    return None


def check(parsed: str, reference: str, timeout_s: int = 5) -> tuple[bool, str | None]:
    """(correct, error) comparing an extracted answer with the reference via math-verify."""
    from math_verify import parse, verify

    # math-verify bounds its own work with SIGALRM, which only works in the main thread.
    t = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${reference}$", parsing_timeout=t)
        if not gold:
            return False, f"reference answer {reference!r} is not parseable"
        pred = parse(f"${parsed}$", parsing_timeout=t)
        if not pred:
            return False, None  # an answer math-verify cannot read is simply wrong
        return bool(verify(gold, pred, timeout_seconds=t)), None
    except Exception as exc:  # noqa: BLE001 - a checker failure must not stop the stage
        return False, f"{type(exc).__name__}: {exc}"[:500]


def score(completion: str, reference: str, *, fallback: str = "last_number", max_chars: int = 4000,
          timeout_s: int = 5) -> tuple[float, bool, str | None, str | None]:
    """(reward, correct, parsed_answer, reward_error) of one completion."""
    parsed = extract_answer(completion, fallback, max_chars)
    if parsed is None:
        return 0.0, False, None, None
    correct, error = check(parsed, reference, timeout_s)
    return float(correct), correct, parsed, error


def _score_batch(items: list[tuple[str, str]], fallback: str, max_chars: int, timeout_s: int) -> list[tuple]:
    return [score(c, a, fallback=fallback, max_chars=max_chars, timeout_s=timeout_s) for c, a in items]


def score_many(items: list[tuple[str, str]], cfg: dict, desc: str = "reward") -> list[tuple]:
    """Score (completion, reference) pairs with a per-row time bound.

    In the main thread math-verify's own alarm bounds each row. Elsewhere (Prefect may run
    tasks in worker threads) the rows are scored in a spawned process, whose main thread
    can use the alarm.
    """
    args = (cfg["fallback"], cfg["max_chars"], int(cfg["timeout_s"]))
    if threading.current_thread() is threading.main_thread():
        return [score(c, a, fallback=args[0], max_chars=args[1], timeout_s=args[2])
                for c, a in tqdm(items, desc=desc, unit="row", leave=False)]
    chunks = [items[i : i + 64] for i in range(0, len(items), 64)]
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        results = list(tqdm(pool.map(_score_batch, chunks, *[[a] * len(chunks) for a in args]),
                            total=len(chunks), desc=desc, unit="chunk", leave=False))
    return [r for chunk in results for r in chunk]


def add_rewards(table: pa.Table, cfg: dict, desc: str = "reward") -> pa.Table:
    """Rollout table -> rewarded table (adds reward, correct, parsed_answer, reward_error)."""
    scored = score_many(list(zip(table.column("completion").to_pylist(), table.column("answer").to_pylist())), cfg, desc)
    columns = list(zip(*scored)) if scored else [[], [], [], []]
    for name, values in zip(("reward", "correct", "parsed_answer", "reward_error"), columns):
        table = table.append_column(name, pa.array(list(values), type=schema.REWARDED.field(name).type))
    return table


def run(params: Params, iteration: int, force: bool = False) -> store.Manifest:
    layout = params.layout
    cfg = params.stage("reward", iteration)
    src = layout.stage_dir("sample", iteration)
    label = f"reward@{iteration}"

    def build(tmp: Path) -> dict:
        work = 0.0
        rows = correct = errors = 0
        total = 0.0

        def transform(table: pa.Table, path: Path) -> pa.Table:
            nonlocal work
            t0 = time.perf_counter()
            out = add_rewards(table, cfg, desc=label)
            work += time.perf_counter() - t0
            return out

        for _, out in store.map_shards(src, tmp, transform, reads=schema.ROLLOUTS, writes=schema.REWARDED, stage=label):
            rows += out.num_rows
            total += sum(out.column("reward").to_pylist())
            correct += sum(out.column("correct").to_pylist())
            errors += out.num_rows - out.column("reward_error").null_count
        return {
            "stats": {"rows": rows, "reward_mean": total / max(rows, 1), "accuracy": correct / max(rows, 1),
                      "reward_errors": errors},
            "timing": {"work_s": work},
        }

    return store.run_stage(
        "reward", iteration, layout.stage_dir("reward", iteration), inputs={"rollouts": src},
        params=cfg, code=store.code_digest(sys.modules[__name__], problems, schema), build=build, force=force,
    )


reward_task = stage_task(run, "reward")
