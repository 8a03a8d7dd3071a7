"""The thin Prefect wrapper every stage module uses to expose its `run` as a task.

Prefect's own task cache is off: the stage key in `_manifest.json` decides skip or run
(Prefect's default key hashes file paths as strings and includes the flow-run id, so
it cannot see that an input file's content changed). A stage whose manifest is up to
date finishes in Prefect's `Cached` state (type COMPLETED), so the UI shows it as cached.

Retries and timeouts come from the `prefect:` section of params.yaml, which no stage
key hashes (changing a timeout never reruns a stage). The learner never retries: a
step must not apply twice.
"""

from __future__ import annotations

from typing import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from dashflow.core.store import Manifest, StageError

NEVER_RETRY = ("learn",)


def summary(manifest: Manifest) -> dict:
    return {
        "stage": manifest.stage,
        "iteration": manifest.iteration,
        "cached": manifest.cached,
        "digest": manifest.digest,
        "stats": manifest.stats,
        "timing": manifest.timing,
    }


def task_options(params, name: str) -> dict:
    """Prefect task options of stage `name` from params.yaml's `prefect:` section."""
    section = params.tree.get("prefect") or {}
    retries = int((section.get("retries") or {}).get(name) or 0)
    if retries and name in NEVER_RETRY:
        raise StageError(f"prefect.retries.{name}: the {name} stage must not retry (a step must not apply twice)")
    timeout = (section.get("timeout_s") or {}).get(name)
    return {"retries": retries, "retry_delay_seconds": 2, "timeout_seconds": float(timeout) if timeout else None}


def stage_task(run: Callable[..., Manifest], name: str):
    """A callable that runs `run(params, iteration, force=...)` as the Prefect task
    `name[iter=I]` and returns the manifest summary (a dict), so flows read like plain calls."""

    def _run(params, iteration: int | None = None, force: bool = False, **kwargs):
        manifest = run(params, iteration, force=force, **kwargs)
        if manifest.cached:
            return Completed(name="Cached", message="manifest up to date", data=summary(manifest))
        return summary(manifest)

    def run_name() -> str:
        from prefect.runtime import task_run

        iteration = task_run.parameters.get("iteration")
        return name if iteration is None else f"{name}[iter={iteration}]"

    _run.__name__ = f"{name}_task"
    prefect_task = task(_run, name=name, task_run_name=run_name, cache_policy=NO_CACHE)

    def call(params, iteration: int | None = None, force: bool = False, **kwargs) -> dict:
        state = prefect_task.with_options(**task_options(params, name))(
            params, iteration, force=force, return_state=True, **kwargs)
        return state.result()

    call.task = prefect_task
    call.__name__ = _run.__name__
    return call
