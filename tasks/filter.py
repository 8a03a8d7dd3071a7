"""Stage `filter`: DASH gradient filtering -- drop rows with |advantage| <= threshold (and,
with `filter.drop_truncated`, DAPO's overlong filtering: rows cut at max_new_tokens).

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

from dashflow.core import algorithms, sampled_batch, schema, store
from dashflow.core.config import Params
from dashflow.core.stage import Stage

STAGE = Stage("filter", __name__, params=("filter.enabled", "filter.threshold", "filter.drop_truncated",
                                           "sample.dynamic_rounds", "sample.dynamic_groups",
                                           "sample.prompts_per_iteration"),
              code=(algorithms, sampled_batch, schema))


def keep_rows(table: pa.Table, threshold: float, enabled: bool = True, drop_truncated: bool = False,
              batch: set[str] | None = None) -> tuple[pa.Table, dict[str, int]]:
    """The rows the learner gets and how many each rule dropped, the rules in this order:
    with dynamic sampling only the `batch`'s groups; |A| > threshold (unless the filter is
    off: standard GRPO trains on every row, zero-advantage ones included); with
    `drop_truncated` none whose completion was cut at max_new_tokens (DAPO's overlong
    filtering). A row counts under the first rule that drops it."""
    keep = [True] * table.num_rows
    dropped: dict[str, int] = {}

    def rule(name: str, passes: list[bool]) -> None:
        nonlocal keep
        dropped[name] = sum(k and not ok for k, ok in zip(keep, passes))
        keep = [k and ok for k, ok in zip(keep, passes)]

    if batch is not None:
        rule("dynamic_sampling", [pid in batch for pid in table.column("prompt_id").to_pylist()])
    if enabled:
        advantages = torch.tensor(table.column("advantage").to_pylist(), dtype=torch.float32)
        rule(f"abs_advantage_le_{threshold}", algorithms.filter_mask(advantages, threshold).tolist())
    if drop_truncated:
        rule("truncated", [r != "length" for r in table.column("finish_reason").to_pylist()])
    return table.filter(pa.array(keep, pa.bool_())), dropped


def gated(src: Path, target: int, label: str) -> set[str]:
    """Dynamic sampling's batch: the first `target` groups with differing rewards (group_std
    > 0), in sampled order (shard by shard), over every round the sample stage ran."""
    order: list[str] = []
    informative: list[bool] = []
    for path in store.shard_paths(src, needed_by=label):
        table = store.read_shard(path, schema.ADVANTAGED, stage=label).select(["prompt_id", "group_std"])
        for pid, std in zip(table.column("prompt_id").to_pylist(), table.column("group_std").to_pylist()):
            if not order or order[-1] != pid:  # a group's rows are together, sorted by the advantage stage
                order.append(pid)
                informative.append(std > 0)
    return {order[i] for i in algorithms.gate_groups(informative, target)}


def run(params: Params, iteration: int, force: bool = False) -> store.Manifest:
    layout = params.layout
    cfg = STAGE.config(params, iteration)
    src = layout.stage_dir("advantage", iteration)
    label = STAGE.label(iteration)

    target = algorithms.dynamic_target(params.stage("sample", iteration))

    def build(tmp: Path) -> dict:
        rows_in = kept = 0
        dropped: dict[str, int] = {}
        groups: list[dict[str, Any]] = []
        batch = gated(src, target, label) if target is not None else None

        def transform(table: pa.Table, path: Path) -> pa.Table:
            out, counts = keep_rows(table, cfg.threshold, cfg.enabled, cfg.drop_truncated, batch)
            for reason, n in counts.items():
                dropped[reason] = dropped.get(reason, 0) + n
            return out

        for table, out in store.map_shards(src, tmp, transform, reads=schema.ADVANTAGED, writes=schema.KEPT, stage=label):
            rows_in += table.num_rows
            kept += out.num_rows
            # the batch as sampled (the learner's normaliser): every group, or dynamic sampling's
            groups += [g for g in sampled_batch.sampled_groups(table) if batch is None or g["prompt_id"] in batch]
        sampled_batch.write_sampled(tmp, groups)
        return {"stats": {"rows_in": rows_in, "rows_kept": kept, "kept_fraction": kept / max(rows_in, 1),
                          "dropped": dropped or {"filter_disabled": 0},
                          **({"batch_groups": len(groups), "dynamic_target": target} if batch is not None else {})}}

    return STAGE.run(params, iteration, inputs={"advantaged": src}, build=build, force=force)


filter_task = STAGE.task(run)
