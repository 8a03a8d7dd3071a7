"""The prepared prompts of a run: their chat format, reading a split, and which prompts each
iteration samples.

Prepare writes base/prompts/{train,eval}.parquet (schema.PROMPTS); sample, learn and
evaluate read them through here. Every prompt row carries its `context`: the chat turns
before its question (an optional system message, then the demonstration turns), the same
for every row of a run, so training and every evaluation set see one format
(`task.system`, `task.fewshot`, `task.demonstrations`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa

from dashflow.core import problems, schema, store
from dashflow.core.config import Params


def demonstrations(task: dict, train: list[dict], seed: int) -> list[dict[str, str]]:
    """The demonstration turns, each {question, answer}: `task.demonstrations` (a list, or a
    JSONL file of such rows) when given, else `task.fewshot` rows of the train split drawn
    with the run's seed -- a train question and its worked solution (problems.sft_target)."""
    given = task.get("demonstrations")
    if isinstance(given, str):
        given = _demonstration_file(Path(given))
    if given:
        return [{"question": d["question"], "answer": d["answer"]} for d in given]
    count = int(task.get("fewshot") or 0)
    if count > len(train):
        raise problems.ProblemError(f"task.fewshot = {count}: the train split has only {len(train)} prompts")
    picks = random.Random(f"{seed}/fewshot").sample(range(len(train)), count)
    return [{"question": train[i]["prompt"], "answer": problems.sft_target(train[i]["solution"], train[i]["answer"])}
            for i in picks]


def _demonstration_file(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise problems.ProblemError(f"task.demonstrations: {path} is not a file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise problems.ProblemError(f"{path}: row {n}: not JSON ({exc.msg})") from None
        for key in ("question", "answer"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key]:
                raise problems.ProblemError(f"{path}: row {n}: field {key!r} must be a non-empty string")
        rows.append(row)
    if not rows:
        raise problems.ProblemError(f"{path}: no demonstrations in the file")
    return rows


def context(task: dict, demos: list[dict[str, str]]) -> str:
    """The chat turns before each question, as the JSON the prompt rows store."""
    turns = [{"role": "system", "content": task["system"]}] if task.get("system") else []
    for d in demos:
        turns += [{"role": "user", "content": d["question"]}, {"role": "assistant", "content": d["answer"]}]
    return json.dumps(turns, ensure_ascii=False)


def turns(row: dict) -> list[dict[str, str]]:
    """A prompt row's chat turns before its question (none for a row without `context`)."""
    return json.loads(row.get("context") or "[]")


def task_context(params: Params) -> str:
    """The run's context, as prepare stored it (an evaluation set of another file gets it too)."""
    table = read_prompts(params, "train")
    return table.column("context")[0].as_py() if table.num_rows else "[]"


def read_prompts(params: Params, split: str) -> pa.Table:
    directory = params.layout.base / "prompts"
    store.require_output(directory, needed_by="prompts")
    return store.read_shard(directory / f"{split}.parquet", schema.PROMPTS, stage="prepare")



def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The train split's prompt order in one epoch: a fresh seeded permutation per epoch."""
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def iteration_prompts(prompts: pa.Table, iteration: int, count: int, seed: int) -> list[dict]:
    """The `count` prompts of iteration i: the train split walked epoch by epoch, each epoch
    in its own seeded permutation (every prompt once per epoch, a new order each epoch)."""
    rows = prompts.to_pylist()
    n = len(rows)
    orders: dict[int, list[int]] = {}
    out = []
    for k in range(min(count, n)):
        epoch, pos = divmod(iteration * count + k, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        out.append(rows[orders[epoch][pos]])
    return out


def round_prompts(prompts: pa.Table, iteration: int, round_: int, count: int, seed: int,
                  used: set[str]) -> list[dict]:
    """Dynamic sampling's extra round `round_` (>= 1) of iteration i: `count` train prompts
    not yet sampled in this iteration (`used`: their prompt ids), in a seeded order of their
    own (so the next iterations' prompts, `iteration_prompts`, stay what they were)."""
    rows = [r for r in prompts.to_pylist() if r["prompt_id"] not in used]
    random.Random(f"{seed}/dynamic/{iteration}/{round_}").shuffle(rows)
    return rows[:count]
