"""The thin Prefect wrapper every stage module uses to expose its `run` as a task.

Prefect's own task cache is off: the stage key in `_manifest.json` decides skip or run
(Prefect's default key hashes file paths as strings and includes the flow-run id, so
it cannot see that an input file's content changed). A cached stage returns at once
and its task run shows `cached: true` in its result.
"""

from __future__ import annotations

from typing import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.store import Manifest


def summary(manifest: Manifest) -> dict:
    return {
        "stage": manifest.stage,
        "iteration": manifest.iteration,
        "cached": manifest.cached,
        "digest": manifest.digest,
        "stats": manifest.stats,
        "timing": manifest.timing,
    }


def stage_task(run: Callable[..., Manifest], name: str, *, retries: int = 0):
    """Prefect task `name[iter=I]` that runs `run(params, iteration, force=...)`."""

    def _run(params, iteration: int | None = None, force: bool = False) -> dict:
        manifest = run(params, iteration, force=force)
        return summary(manifest)

    def run_name() -> str:
        from prefect.runtime import task_run

        iteration = task_run.parameters.get("iteration")
        return name if iteration is None else f"{name}[iter={iteration}]"

    _run.__name__ = f"{name}_task"
    return task(
        _run,
        name=name,
        task_run_name=run_name,
        cache_policy=NO_CACHE,
        retries=retries,
        retry_delay_seconds=2,
    )
