"""Stage `filter`: DASH gradient filtering -- drop rows with |advantage| <= threshold.

Those rows contribute (almost) nothing to the policy gradient, so the learner never
runs a forward pass on them. A group whose rewards are all equal has advantage 0 on
every row and is dropped whole. The manifest records how many rows were dropped and why.

Filtering only saves compute: it must not change the gradient of the rows it keeps. The
learner normalises its loss by counts of the batch as it was sampled, so `sampled.json`
carries them: every prompt group in sampled order with its rows and completion tokens
(groups dropped whole included). Dropping a zero-advantage row then leaves the update
exactly as it was, and dropping a small-|A| row changes it by that row's own term only.

Input : iter-i/advantaged   Output: iter-i/kept (schema.KEPT), shard for shard (possibly
        empty), and kept/sampled.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from dashflow.core import algorithms, sampled, schema, store
from dashflow.core.config import Params
from dashflow.core.prefecting import stage_task
from dashflow.core.stage import Stage

STAGE = Stage("filter", __name__, params=("filter.enabled", "filter.threshold"), code=(algorithms, sampled, schema))


def keep_rows(table: pa.Table, threshold: float, enabled: bool = True) -> pa.Table:
    if not enabled:  # standard GRPO: the learner sees every row, zero-advantage ones included
        return table
    advantages = torch.tensor(table.column("advantage").to_pylist(), dtype=torch.float32)
    mask = algorithms.filter_mask(advantages, threshold)
    return table.filter(pa.array(mask.tolist(), pa.bool_()))


def run(params: Params, iteration: int, force: bool = False) -> store.Manifest:
    layout = params.layout
    cfg = params.stage("filter", iteration)
    src = layout.stage_dir("advantage", iteration)
    label = f"filter@{iteration}"

    def build(tmp: Path) -> dict:
        rows_in = kept = 0
        groups: list[dict[str, Any]] = []
        transform = lambda table, path: keep_rows(table, cfg["threshold"], cfg["enabled"])  # noqa: E731
        for table, out in store.map_shards(src, tmp, transform, reads=schema.ADVANTAGED, writes=schema.KEPT, stage=label):
            rows_in += table.num_rows
            kept += out.num_rows
            groups += sampled.sampled_groups(table)
        sampled.write_sampled(tmp, groups)
        return {"stats": {"rows_in": rows_in, "rows_kept": kept, "kept_fraction": kept / max(rows_in, 1),
                          "dropped": {f"abs_advantage_le_{cfg['threshold']}" if cfg["enabled"] else "filter_disabled":
                                      rows_in - kept}}}

    return store.run_stage(
        "filter", iteration, layout.stage_dir("filter", iteration), inputs={"advantaged": src},
        params=STAGE.key_params(params, iteration), code=STAGE.code_digest(), build=build, force=force,
    )


filter_task = stage_task(run, "filter")
