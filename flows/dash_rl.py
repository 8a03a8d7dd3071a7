"""The DASH RL flow: N iterations of sample -> reward -> advantage -> filter -> learn.

    policy_i --> sample --> rollouts --> reward --> rewarded --> advantage --> advantaged
                                                                                   |
    policy_i+1 <-- learn (micro-batches, grad accumulation) <-- kept <-- filter <--+
                     |                        ^
                     |                        +-- reference (only with a KL penalty)
                     +--> evaluate (every k iterations, the base model and the last)

The iterations and the evaluated policies come from params.yaml's `schedule` (which
dvc.yaml reads too). Every stage is a Prefect task named `stage[iter=i]` whose output
directory carries a manifest; a stage whose inputs, parameters and code are unchanged is skipped, so running
the flow again resumes where it stopped. `rerun` forces named stages (`filter@2`);
their downstream stages then rerun only if their inputs changed. `from_stage` forces a
stage and everything after it (`reward@2`). Each iteration publishes a Prefect table
artifact with its metrics. In a DVC repository each finished stage is committed to
dvc.lock (`dvc`, dashflow/ops/versioning.py), so `dvc status` is clean after the run. After each
iteration the retention setting removes the checkpoints it no longer keeps (dashflow/ops/retention.py).
"""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dashflow.core import models, store
from dashflow.core.config import Params, parse_stage_ref, stages_from
from dashflow.core.optimizer_state import HeldState
from dashflow.ops import metrics, retention, tracking
from dashflow.ops.console import print_iteration, print_summary
from dashflow.ops.report import write_report
from dashflow.ops.versioning import Recorder
from dashflow.tasks.advantage import advantage_task
from dashflow.tasks.evaluate import evaluate_task
from dashflow.tasks.filter import filter_task
from dashflow.tasks.learn import learn_task
from dashflow.tasks.prepare import prepare_task
from dashflow.tasks.reference import reference_task
from dashflow.tasks.reward import reward_task
from dashflow.tasks.sample import sample_task


@task(name="metrics", task_run_name="metrics[iter={iteration}]", cache_policy=NO_CACHE)
def metrics_task(params: Params, iteration: int, wall_s: float | None) -> dict:
    row = metrics.write_metrics(params, iteration, wall_s)
    metrics.publish_artifact(params, row)
    tracking.log_iteration(params, row)  # each step once, however often the run resumes
    if "eval" in row:
        tracking.log_eval(params, iteration, store.read_manifest(params.layout.eval(iteration)).stats)
    return row


@task(name="report", cache_policy=NO_CACHE)
def report_task(run_dir) -> str:
    return write_report(run_dir)["png"]


def prewarm(params_path: str = "params.yaml", overrides: dict | None = None) -> None:
    """Before calling the flow in this process (`dashflow run`, the benches): start importing
    transformers' model code in a thread (dashflow/core/models.py `prewarm`) while Prefect starts its
    temporary server. Prefect's own start-up imports are done here first, so the two threads
    import disjoint sets of modules; the flow waits for the thread before its first stage."""
    import prefect.flow_engine
    import prefect.task_engine
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        import prefect.server.api.server  # noqa: F401  (the temporary server's client side)
    try:
        name = Params.load(params_path, overrides or {}).stage("model")["name"]
    except Exception:  # noqa: BLE001 -- the flow loads them again and reports what is wrong
        return
    models.prewarm(name)


@flow(name="dash-rl", log_prints=True)
def dash_rl(
    params_path: str = "params.yaml",
    overrides: dict | None = None,
    rerun: list[str] | None = None,
    iterations: int | None = None,
    preset: str | None = None,
    from_stage: str | None = None,
    until: int | None = None,
) -> dict:
    """`until`: run iterations 0..until of the schedule and stop (a later call resumes; the
    schedule, and so what is evaluated, stays that of the whole run)."""
    models.prewarmed()  # no stage imports transformers while prewarm's thread does
    overrides = {**(overrides or {}), **({"run.preset": preset} if preset else {}),
                 **({"run.iterations": iterations} if iterations is not None else {})}
    params = Params.load(params_path, overrides)
    n = params.iterations
    forced = {parse_stage_ref(r) for r in (rerun or [])} | (stages_from(from_stage, n) if from_stage else set())
    dvc = Recorder(params, params_path, overrides)
    print(dvc.describe())
    keep = retention.check(params, dvc)  # before hours of work, not after the first iteration

    def force(stage: str, i: int | None) -> bool:
        return (stage, i) in forced

    # learn@i hands its state to learn@i+1 in memory (dashflow/core/optimizer_state.py); what
    # is held is written when the run ends, stops or fails
    with store.run_lock(params.layout.root), HeldState(params) as held:
        dvc(prepare_task(params, None, force=force("prepare", None)))
        if params.evaluated(-1):
            tracking.log_eval(params, -1, dvc(evaluate_task(params, -1, force=force("evaluate", -1)))["stats"])
        dvc.flush()
        history = []
        commit_every = int(params["dvc"].get("commit_every") or 1)
        # dvc.lock every dvc.commit_every iterations, and whatever an end, a stop or a failure left queued
        try:
            for i in range(n if until is None else min(n, until + 1)):
                started = time.perf_counter()
                ran = [
                    dvc(sample_task(params, i, force=force("sample", i))),
                    dvc(reward_task(params, i, force=force("reward", i))),
                    dvc(advantage_task(params, i, force=force("advantage", i))),
                    dvc(filter_task(params, i, force=force("filter", i))),
                    # the frozen base model scores the kept rows (an empty output when KL is off)
                    dvc(reference_task(params, i, force=force("reference", i))),
                    dvc(learn_task(params, i, force=force("learn", i), held=held)),
                ]
                if (i + 1) % commit_every == 0:
                    dvc.flush()  # the iterations' stages into dvc.lock (counted in the orchestration time)
                # every learn.state_every: the optimizer state learn@i holds, written in a thread
                # while the next stages compute (after the commit, whose CPU it would slow)
                held.write_due()
                fresh = not any(r["cached"] for r in ran)
                wall = time.perf_counter() - started
                if params.evaluated(i):
                    dvc(evaluate_task(params, i, force=force("evaluate", i)))
                if keep.optimizers is not None:
                    # retention keeps the state being written, not the one before: wait for it
                    # to land, and count the wait in the iteration (it is its bookkeeping)
                    wall += held.wait()
                row = dvc(metrics_task(params, i, wall if fresh else None), stage="metrics")
                history.append(row)
                print_iteration(row, cached=all(r["cached"] for r in ran))
                if keep.active:
                    removed = retention.apply(params, i, dvc)
                    if removed:
                        print(retention.describe(removed, params.layout.root, keep, dvc))
        finally:
            dvc.flush()
        summary = metrics.run_summary(params, history)
        summary["report"] = report_task(params.layout.root)
        print_summary(summary)
        return summary
