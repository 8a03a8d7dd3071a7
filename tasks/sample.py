"""Stage `sample`: preemptive sampling of one iteration's rollouts.

The whole iteration's prompts x G samples go to the sampler at once, in generation
batches sized by `sample.token_budget` -- independent of the learner's micro-batch.
This is DASH's preemptive sampling: inference runs at its efficient (large) batch size.

Inputs : base/prompts/train.parquet, the policy written by iteration i-1
Output : iter-i/rollouts/part-*.parquet (schema.ROLLOUTS), whole prompt groups per shard
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pyarrow as pa

from dashflow.config import Params
from tasks import policy as policy_mod
from tasks import samplers, schema, store
from tasks.prefecting import stage_task
from tasks.prepare import read_prompts


def iteration_prompts(prompts: pa.Table, iteration: int, count: int, seed: int) -> list[dict]:
    """The `count` prompts of iteration i: a seeded permutation of the train split, walked in order."""
    rows = prompts.to_pylist()
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[order[(iteration * count + k) % len(rows)]] for k in range(min(count, len(rows)))]


def sample_seed(seed: int, iteration: int) -> int:
    return seed * 1_000_003 + iteration


def run(params: Params, iteration: int, force: bool = False) -> store.Manifest:
    layout = params.layout
    cfg = params.stage("sample", iteration)
    seed = params["run"]["seed"]
    policy_dir = layout.policy(iteration - 1)
    prompts_dir = layout.base / "prompts"

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        policy_version = store.require_output(policy_dir, needed_by=f"sample@{iteration}").digest[:16]
        sampler, tokenizer = samplers.make_sampler(
            cfg["backend"], str(policy_dir), device=policy_mod.pick_device(params["run"]["device"]),
            dtype=params["model"]["dtype"], token_budget=cfg["token_budget"], max_batch_size=cfg["max_batch_size"],
            group_size=cfg["samples_per_prompt"] if cfg["batching"] == "per_group" else None,
        )
        if cfg["batching"] not in ("packed", "per_group"):
            raise store.StageError(f"sample@{iteration}: unknown sample.batching {cfg['batching']!r}; "
                                   "choose packed or per_group")
        chosen = iteration_prompts(read_prompts(params, "train"), iteration, cfg["prompts_per_iteration"], seed)
        g = cfg["samples_per_prompt"]
        prompt_ids = [policy_mod.chat_prompt(tokenizer, row["prompt"]) for row in chosen]
        requests = [prompt_ids[p] for p in range(len(chosen)) for _ in range(g)]
        t1 = time.perf_counter()
        completions = sampler.generate(
            requests, max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"], top_p=cfg["top_p"],
            seed=sample_seed(seed, iteration), desc=f"sample@{iteration}",
        )
        t2 = time.perf_counter()
        rows = []
        for n, comp in enumerate(completions):
            prompt = chosen[n // g]
            rows.append({
                "run": params["run"]["name"], "iteration": iteration, "prompt_id": prompt["prompt_id"],
                "sample_index": n % g, "prompt": prompt["prompt"], "answer": prompt["answer"],
                "prompt_token_ids": requests[n], "completion_token_ids": comp.token_ids,
                "completion": tokenizer.decode(comp.token_ids, skip_special_tokens=True),
                "sampler_logprobs": comp.logprobs, "finish_reason": comp.finish_reason,
                "policy_version": policy_version,
            })
        per_shard = cfg["groups_per_shard"] * g
        for shard, start in enumerate(range(0, len(rows), per_shard)):
            table = pa.Table.from_pylist(rows[start : start + per_shard], schema=schema.ROLLOUTS)
            store.write_shard(tmp, shard, table, schema.ROLLOUTS, stage=f"sample@{iteration}")
        new_tokens = sum(len(c.token_ids) for c in completions)
        return {
            "stats": {
                "rows": len(rows), "prompts": len(chosen), "samples_per_prompt": g,
                "generated_tokens": new_tokens,
                "mean_completion_tokens": new_tokens / max(len(rows), 1),
                "finish_stop_fraction": sum(c.finish_reason == "stop" for c in completions) / max(len(rows), 1),
                "generation_batches": len(sampler.batches(requests, cfg["max_new_tokens"]))
                if hasattr(sampler, "batches") else None,
                "tokens_per_s": new_tokens / max(t2 - t1, 1e-9),
            },
            "timing": {"load_s": t1 - t0, "work_s": t2 - t1},
        }

    return store.run_stage(
        "sample", iteration, layout.stage_dir("sample", iteration),
        inputs={"policy": policy_dir, "prompts": prompts_dir},
        params={"sample": cfg, "seed": seed, "dtype": params["model"]["dtype"]},
        code=store.code_digest(sys.modules[__name__], samplers, policy_mod, schema), build=build, force=force,
    )


# Sampling is idempotent (its output only lands when complete), so a retry is safe.
sample_task = stage_task(run, "sample")
