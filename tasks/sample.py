"""Stage `sample`: preemptive sampling of one iteration's rollouts.

The whole iteration's prompts x G samples go to the sampler at once, in generation
batches sized by `sample.token_budget` -- independent of the learner's micro-batch.
This is DASH's preemptive sampling: inference runs at its efficient (large) batch size.

`sample.workers: N > 1` splits the iteration's Parquet shards (whole prompt groups) into
N jobs that run in parallel on a Ray cluster through Prefect's Ray task runner
(dashflow/core/scaleout.py); each worker loads the policy once and writes its own shards. Every
request samples from its own seeded stream (dashflow/core/samplers.py), so N workers give the same
rows as one. With `workers: 1` the single job runs in this process and Ray is not imported.

Inputs : base/prompts/train.parquet, the policy written by iteration i-1
Output : iter-i/rollouts/part-*.parquet (schema.ROLLOUTS), whole prompt groups per shard
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dashflow.core import algorithms, prompts, rewards, samplers, scaleout, schema, store
from dashflow.core import policy as policy_mod
from dashflow.core.config import Params
from dashflow.core.stage import Stage

# The sample keys that change rows; how a stage runs (workers, ray_address, worker_gpus,
# worker_retries, tensor_parallel) is not part of its key: each request has its own seeded stream.
STAGE = Stage("sample", __name__, code=(prompts, samplers, policy_mod, schema), params=(
    "run.seed", "model.dtype", "sample.backend", "sample.prompts_per_iteration", "sample.samples_per_prompt",
    "sample.max_new_tokens", "sample.temperature", "sample.top_k", "sample.top_p", "sample.token_budget",
    "sample.batching", "sample.max_batch_size", "sample.groups_per_shard", "sample.dynamic_rounds",
    "sample.dynamic_groups"))


def sample_seed(seed: int, iteration: int) -> int:
    return seed * 1_000_003 + iteration


@dataclass
class ShardJob:
    """One worker's share of an iteration: everything it needs, nothing it must look up
    (absolute paths: a Ray worker's working directory is not the driver's)."""

    label: str
    policy_dir: str
    out_dir: str                  # the stage's temporary output directory (shared storage)
    shards: dict[int, list[dict]]  # shard index -> its rows so far (metadata and request ids)
    sample: dict                  # the sample stage's parameter slice
    seed: int
    device: str
    dtype: str


def sample_shards(job: ShardJob) -> dict:
    """Generate the job's requests and write each of its shards atomically. A shard already
    written (by an earlier attempt of this job) is not sampled or written again."""
    t0 = time.perf_counter()
    out = Path(job.out_dir)
    todo = {k: rows for k, rows in job.shards.items() if not (out / store.shard_name(k)).exists()}
    cfg = job.sample
    stats = {"rows": 0, "generated_tokens": 0, "stopped": 0, "generation_batches": 0, "load_s": 0.0, "work_s": 0.0}
    if not todo:
        return stats
    sampler, tokenizer = samplers.make_sampler(
        cfg, job.policy_dir, device=policy_mod.pick_device(job.device), dtype=job.dtype,
        group_size=cfg["samples_per_prompt"] if cfg["batching"] == "per_group" else None)
    rows = [row for k in sorted(todo) for row in todo[k]]
    requests = [row["prompt_token_ids"] for row in rows]
    t1 = time.perf_counter()
    completions = sampler.generate(
        requests, max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"], top_p=cfg["top_p"],
        top_k=int(cfg.get("top_k") or 0), seed=job.seed, desc=job.label, request_ids=[row.pop("request_id") for row in rows])
    t2 = time.perf_counter()
    for row, comp in zip(rows, completions):
        row.update(completion_token_ids=comp.token_ids, sampler_logprobs=comp.logprobs,
                   finish_reason=comp.finish_reason,
                   completion=tokenizer.decode(comp.token_ids, skip_special_tokens=True))
    for k in sorted(todo):
        store.fault_point("worker-shard", f"{job.label.split()[0]}:{k}", once_in=out)
        table = pa.Table.from_pylist(todo[k], schema=schema.ROLLOUTS)
        store.write_shard(out, k, table, schema.ROLLOUTS, stage=job.label)   # atomic: whole or absent
    stats.update(rows=len(rows), generated_tokens=sum(len(c.token_ids) for c in completions),
                 stopped=sum(c.finish_reason == "stop" for c in completions),
                 generation_batches=len(sampler.batches(requests, cfg["max_new_tokens"]))
                 if hasattr(sampler, "batches") else None,
                 load_s=t1 - t0, work_s=t2 - t1, **getattr(sampler, "sync", {}))
    return stats


def run(params: Params, iteration: int, force: bool = False) -> store.Manifest:
    layout = params.layout
    cfg = STAGE.config(params, iteration)
    seed = params["run"]["seed"]
    policy_dir = layout.policy(iteration - 1)
    prompts_dir = layout.base / "prompts"
    label = STAGE.label(iteration)
    workers = int(cfg.get("workers") or 1)
    if cfg["batching"] not in ("packed", "per_group"):
        raise store.StageError(f"{label}: unknown sample.batching {cfg['batching']!r}; choose packed or per_group")
    if workers < 1:
        raise store.StageError(f"{label}: sample.workers must be >= 1, not {workers}")

    target = algorithms.dynamic_target(cfg)
    dynamic = target is not None
    reward_cfg = rewards.settings(params, iteration) if dynamic else None

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        policy_version = store.require_output(policy_dir, needed_by=label).digest[:16]
        tokenizer = policy_mod.load_tokenizer(policy_dir)
        train = prompts.read_prompts(params, "train")
        g = cfg["samples_per_prompt"]
        rows: list[dict] = []       # every round's rows, in sampled order
        shards: dict[int, list] = {}
        results: list[dict] = []
        timing = {"load_s": 0.0, "work_s": 0.0}

        def sample_round(chosen: list[dict]) -> list[int]:
            """Sample `chosen` x G into new shards (numbered after the earlier rounds'); their indices."""
            first_request, first_shard = len(rows), len(shards)
            new = []
            for p, prompt in enumerate(chosen):
                ids = policy_mod.chat_prompt(tokenizer, prompt["prompt"], prompts.turns(prompt))
                text = tokenizer.decode(ids)
                new += [{"run": params["run"]["name"], "iteration": iteration, "prompt_id": prompt["prompt_id"],
                         "sample_index": k, "prompt": prompt["prompt"], "answer": prompt["answer"],
                         "prompt_token_ids": ids, "prompt_text": text, "policy_version": policy_version,
                         "request_id": first_request + p * g + k}   # each request its own seeded stream
                        for k in range(g)]
            policy_mod.check_fits([(r["prompt_id"], r["prompt_token_ids"]) for r in new[::g]], cfg["max_new_tokens"],
                                  policy_mod.context_length(policy_dir), stage=label, setting="sample.max_new_tokens")
            rows.extend(new)
            per_shard = cfg["groups_per_shard"] * g
            mine = {first_shard + k: new[start : start + per_shard]
                    for k, start in enumerate(range(0, len(new), per_shard))}
            shards.update(mine)
            parts = [dict(list(mine.items())[w::workers]) for w in range(min(workers, len(mine)))]
            jobs = [ShardJob(label if workers == 1 else f"{label} worker {w}", str(policy_dir.resolve()),
                             str(tmp.resolve()), part, cfg, sample_seed(seed, iteration), params["run"]["device"],
                             params["model"]["dtype"])
                    for w, part in enumerate(parts)]
            started = time.perf_counter()
            if workers == 1:
                done = [sample_shards(job) for job in jobs]
            else:
                done = scaleout.map_on_ray(sample_shards, jobs, name="sample", address=cfg.get("ray_address"),
                                           gpus_per_job=float(cfg.get("worker_gpus") or 0),
                                           retries=int(cfg.get("worker_retries", 2)))
            load = max(r["load_s"] for r in done)
            timing["load_s"] += load
            timing["work_s"] += time.perf_counter() - started - load
            results.extend(done)
            return sorted(mine)

        chosen = prompts.iteration_prompts(train, iteration, cfg["prompts_per_iteration"], seed)
        timing["load_s"] += time.perf_counter() - t0
        written = sample_round(chosen)
        rounds, informative = 0, informative_in(tmp, written) if dynamic else None
        used = {p["prompt_id"] for p in chosen}
        # DAPO dynamic sampling: more rounds of new prompts until the batch holds `target`
        # groups whose rewards differ (scored with the reward stage's own functions)
        while dynamic and algorithms.rounds_needed(informative, target, rounds, int(cfg["dynamic_rounds"])):
            more = prompts.round_prompts(train, iteration, rounds + 1, cfg["prompts_per_iteration"], seed, used)
            if not more:
                break  # every train prompt was sampled in this iteration
            rounds += 1
            used |= {p["prompt_id"] for p in more}
            chosen += more
            informative += informative_in(tmp, sample_round(more))
        store.check_shards(tmp, {k: len(v) for k, v in shards.items()}, stage=label)
        new_tokens = sum(r["generated_tokens"] for r in results)
        batches = [r["generation_batches"] for r in results]
        return {
            "stats": {
                "rows": len(rows), "prompts": len(chosen), "samples_per_prompt": g, "workers": min(workers, len(shards)),
                "generated_tokens": new_tokens,
                "mean_completion_tokens": new_tokens / max(len(rows), 1),
                "finish_stop_fraction": sum(r["stopped"] for r in results) / max(len(rows), 1),
                "generation_batches": None if None in batches else sum(batches),
                "tokens_per_s": new_tokens / max(timing["work_s"], 1e-9),
                "generation_s": timing["work_s"],
                **({"dynamic_rounds": rounds, "informative_groups": informative, "dynamic_target": target}
                   if dynamic else {}),
                # vLLM: the policy's weights loaded into the running engine, and the check that
                # it runs them (dashflow/core/samplers.py VLLMEngine.verify)
                **{k: max(r[k] for r in results) for k in samplers.SYNC_STATS if all(k in r for r in results)},
            },
            # load: the policy on the slowest worker of each round; work: generation wall time
            "timing": timing,
        }

    def informative_in(tmp: Path, written: list[int]) -> int:
        """Groups with differing rewards in the shards just written, scored as the reward stage scores."""
        found = 0
        for k in written:
            # a shard this build just wrote (whole: write_shard is atomic), not yet under a manifest
            table = pq.read_table(tmp / store.shard_name(k))
            table = rewards.add_rewards(table, reward_cfg, desc=f"{label} dynamic sampling")
            by_group: dict[str, list[float]] = {}
            for pid, r in zip(table.column("prompt_id").to_pylist(), table.column("reward").to_pylist()):
                by_group.setdefault(pid, []).append(r)
            found += int(algorithms.informative_groups(torch.tensor(list(by_group.values()))).sum())
        return found

    # with dynamic sampling the rewards decide how many rounds run: the reward settings and
    # code are part of what the rows depend on
    return STAGE.run(
        params, iteration, inputs={"policy": policy_dir, "prompts": prompts_dir}, build=build, force=force,
        derived={"reward": rewards.key_settings(reward_cfg)} if dynamic else None,
        extra_code=(*rewards.code_modules(), *rewards.user_modules(rewards.functions(reward_cfg))) if dynamic else (),
    )


# Sampling is idempotent (its output only lands when complete), so a retry is safe.
sample_task = STAGE.task(run)
