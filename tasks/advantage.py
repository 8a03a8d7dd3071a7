"""Stage `advantage`: group-normalised advantages with a registered estimator.

`advantage.estimator` names a function in dashflow.core.algorithms (grpo, drgrpo, rloo). Rows
are grouped by prompt_id; every group must have the same size G (the sampler writes
whole groups per shard).

Input : iter-i/rewarded   Output: iter-i/advantaged (schema.ADVANTAGED), shard for shard
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from dashflow.core import algorithms, schema, store
from dashflow.core.config import Params
from dashflow.core.stage import Stage

STAGE = Stage("advantage", __name__, params=("advantage.estimator", "advantage.epsilon"), code=(algorithms, schema))


def add_advantages(table: pa.Table, estimator: str, epsilon: float, *, where: str = "table") -> pa.Table:
    """Rewarded table -> the same rows, ordered by (prompt_id, sample_index), plus advantage columns."""
    fn = algorithms.get(algorithms.ADVANTAGE_ESTIMATORS, estimator, "advantage estimator")
    if table.num_rows == 0:
        return schema.ADVANTAGED.empty_table()
    table = table.sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    counts = pc.value_counts(table.column("prompt_id")).to_pylist()
    sizes = {c["counts"] for c in counts}
    if len(sizes) != 1:
        bad = min(counts, key=lambda c: c["counts"])
        raise store.StageError(
            f"{where}: prompt group {bad['values']!r} has {bad['counts']} rows, others have {max(sizes)}; "
            "groups must be complete (same G) to compute group advantages"
        )
    g = sizes.pop()
    rewards = torch.tensor(table.column("reward").to_pylist(), dtype=torch.float64).view(-1, g)
    adv, mean, std = fn(rewards, epsilon=epsilon)
    per_row = lambda t: pa.array(t.repeat_interleave(g).tolist(), pa.float32())
    return (table.append_column("advantage", pa.array(adv.flatten().tolist(), pa.float32()))
            .append_column("group_mean", per_row(mean)).append_column("group_std", per_row(std)))


def run(params: Params, iteration: int, force: bool = False) -> store.Manifest:
    layout = params.layout
    cfg = STAGE.config(params, iteration)
    src = layout.stage_dir("reward", iteration)
    label = STAGE.label(iteration)

    def build(tmp: Path) -> dict:
        rows = groups = mixed = 0
        transform = lambda table, path: add_advantages(table, cfg.estimator, cfg.epsilon, where=f"{label}: {path}")
        for _, out in store.map_shards(src, tmp, transform, reads=schema.REWARDED, writes=schema.ADVANTAGED, stage=label):
            rows += out.num_rows
            first = out.filter(pc.equal(out.column("sample_index"), 0))  # one row per group
            groups += first.num_rows
            mixed += sum(1 for s in first.column("group_std").to_pylist() if s > 0)
        return {"stats": {"rows": rows, "groups": groups, "mixed_groups": mixed,
                          "mixed_group_fraction": mixed / max(groups, 1)}}

    return STAGE.run(params, iteration, inputs={"rewarded": src}, build=build, force=force)


advantage_task = STAGE.task(run)
