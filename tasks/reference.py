"""Stage `reference`: log-probs of the kept completions under the frozen reference policy.

Scores rows only when the learner's KL penalty is on (`learn.kl_coef > 0`, mode rl);
otherwise it writes an empty output at once, so every iteration has the same stages (the
flow and dvc.yaml list the same chain whatever the KL setting). The reference policy is the starting checkpoint (base/policy); its log-prob of every
completion token is written as a column, so the reference forward pass runs once per
iteration and is cached like every other stage, and the learner never holds two models.

Inputs : iter-i/kept, base/policy   Output: iter-i/reference (schema.REFERENCED), shard for shard
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from dashflow.core import algorithms, batches, schema, store
from dashflow.core import policy as policy_mod
from dashflow.core.config import Params
from dashflow.core.stage import Stage

STAGE = Stage("reference", __name__, code=(algorithms, batches, policy_mod, schema),
              params=("learn.mode", "learn.kl_coef", "sample.temperature", "sample.token_budget", "model.dtype"))


def run(params: Params, iteration: int, force: bool = False) -> store.Manifest:
    layout = params.layout
    src = layout.stage_dir("filter", iteration)
    ref_dir = layout.policy(-1)
    temperature = params.stage("sample", iteration)["temperature"]
    budget = params.stage("sample", iteration)["token_budget"]
    label = STAGE.label(iteration)
    on = params.needs_reference(iteration)

    def build(tmp: Path) -> dict:
        if not on:
            return {"stats": {"rows": 0, "skipped": "learn.kl_coef is 0: no KL penalty, no reference log-probs"}}
        t0 = time.perf_counter()
        model = policy_mod.inference_model(ref_dir, policy_mod.pick_device(params["run"]["device"]), params["model"]["dtype"])
        pad_id = policy_mod.load_tokenizer(ref_dir).pad_token_id
        t1 = time.perf_counter()
        rows = 0

        def transform(table: pa.Table, path: Path) -> pa.Table:
            if table.num_rows == 0:
                return schema.REFERENCED.empty_table()
            ref, _ = batches.completion_logprobs(
                model, table.column("prompt_token_ids").to_pylist(), table.column("completion_token_ids").to_pylist(),
                pad_id=pad_id, temperature=temperature, token_budget=budget, desc=label)
            return table.append_column("ref_logprobs", pa.array(ref, pa.list_(pa.float32())))

        for _, out in store.map_shards(src, tmp, transform, reads=schema.KEPT, writes=schema.REFERENCED, stage=label):
            rows += out.num_rows
        return {"stats": {"rows": rows}, "timing": {"load_s": t1 - t0, "work_s": time.perf_counter() - t1}}

    return STAGE.run(params, iteration, inputs={"kept": src, "reference": ref_dir} if on else {"kept": src},
                     build=build, force=force)

# Scoring with a frozen model is idempotent; a retry is safe.
reference_task = STAGE.task(run)
