"""Stage `reward`: the training reward of every rollout, one column per reward function
(the functions, their columns and their errors: dashflow/core/rewards.py).

Input : iter-i/rollouts   Output: iter-i/rewarded (schema.REWARDED), shard for shard
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from dashflow.core import rewards, schema, store
from dashflow.core.config import Params
from dashflow.core.stage import Stage

# sandbox.workers (how many programs run at once) is not part of the key: the same rows.
STAGE = Stage("reward", __name__, code=(*rewards.code_modules(), schema), params=(
    "reward.functions", "reward.timeout_s", "reward.max_chars", "reward.overlong_buffer", "reward.overlong_penalty",
    "sample.max_new_tokens", "sandbox.timeout_s", "sandbox.memory_mb",
    "sandbox.output_kb", "sandbox.processes", "sandbox.work_mb"))


def run(params: Params, iteration: int, force: bool = False) -> store.Manifest:
    layout = params.layout
    cfg = rewards.settings(params, iteration)
    src = layout.stage_dir("sample", iteration)
    label = STAGE.label(iteration)
    fns = rewards.functions(cfg)

    def build(tmp: Path) -> dict:
        work = 0.0
        sums: dict[str, float] = {}
        rows = errors = 0
        tally: dict[str, int] = {}

        def transform(table: pa.Table, path: Path) -> pa.Table:
            nonlocal work
            t0 = time.perf_counter()
            out = rewards.add_rewards(table, cfg, desc=label, tally=tally)
            work += time.perf_counter() - t0
            return out

        coded = any(f["function"] == "code" for f in fns)
        columns = (["reward", "correct", "strict_correct", "flexible_correct"] + [f"reward_{f['name']}" for f in fns]
                   + (["tests_passed"] if coded else []) + (["reward_overlong"] if cfg["overlong_buffer"] else []))
        for _, out in store.map_shards(src, tmp, transform, reads=schema.ROLLOUTS, writes=schema.REWARDED, stage=label):
            rows += out.num_rows
            for c in columns:
                sums[c] = sums.get(c, 0.0) + sum(float(v) for v in out.column(c).to_pylist() if v is not None)
            errors += out.num_rows - out.column("reward_error").null_count
        mean = lambda c: sums.get(c, 0.0) / max(rows, 1)
        return {
            "stats": {"rows": rows, "reward_mean": mean("reward"), "accuracy": mean("correct"),
                      "strict_accuracy": mean("strict_correct"), "flexible_accuracy": mean("flexible_correct"),
                      **{f"reward_{f['name']}_mean": mean(f"reward_{f['name']}") for f in fns},
                      **({"tests_passed_mean": mean("tests_passed")} if coded else {}),
                      **({"reward_overlong_mean": mean("reward_overlong")} if cfg["overlong_buffer"] else {}),
                      **tally, "reward_errors": errors},
            "timing": {"work_s": work},
        }

    return STAGE.run(params, iteration, inputs={"rollouts": src}, build=build, force=force,
                     derived={"functions": cfg["functions"]},  # null resolved to the task's
                     extra_code=tuple(rewards.user_modules(fns)))


reward_task = STAGE.task(run)
