"""Fan a stage's work out to a Ray cluster through Prefect's Ray task runner (prefect-ray).

`map_on_ray(fn, jobs)` runs `fn(job)` for every job as a Prefect task on Ray, inside a
small Prefect flow `NAME-on-ray` whose task runner is `RayTaskRunner`: the Prefect UI
shows one task run per worker, Ray schedules them. `address=None` starts a local Ray
cluster with one CPU per job (and shuts it down after); `address="ray://host:10001"` or
`"auto"` uses an existing cluster, whose workers must see the run directory (shared storage)
and have dashflow installed.

Failures: an exception in a job is retried by Prefect (`retries`); a worker process that
dies (killed, out of memory) is retried by Ray (`max_retries`). Jobs must therefore be
idempotent: the sample stage's jobs write each shard atomically and skip shards already
written, so a retried job never writes a shard twice or half.

Network: Ray binds its gRPC listeners (gcs_server, raylet, workers, agents) to every
interface and refuses a loopback node address (it resolves 127.0.0.1 to the machine's IP),
so a local cluster cannot be kept on loopback through Ray's API. What stands in the door
instead is Ray's token authentication: the local cluster dashflow starts always requires a
token, generated per process (256 bits) and passed in the environment of the cluster's
processes only (not written to ~/.ray/auth_token, which Ray creates readable by all);
a request without it is refused (UNAUTHENTICATED). `RAY_AUTH_MODE=disabled` is refused for
a local cluster. A cluster of yours (`address`) keeps its own settings.

Ray and prefect-ray are imported here only, when a stage asks for more than one worker.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Callable, Sequence


def _local_cluster_auth(name: str) -> None:
    """Token authentication for the local cluster this process starts (see the module doc)."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        raise RuntimeError(f"{name}: RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']} would start a local Ray cluster "
                           "without authentication, and Ray binds its listeners to every interface; unset "
                           "RAY_AUTH_MODE (dashflow then starts it with a generated token), or give the stage "
                           "the address of a cluster of yours (sample.ray_address)")
    # RAY_AUTH_MODE unset: ray.init turns token mode on itself (and refreshes its cached config)
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))  # one per process: Ray caches the token
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)


def map_on_ray(fn: Callable[[Any], Any], jobs: Sequence[Any], *, name: str, address: str | None = None,
               gpus_per_job: float = 0.0, retries: int = 2) -> list[Any]:
    try:
        from prefect_ray import RayTaskRunner
        from prefect_ray.context import remote_options
    except ImportError as exc:
        raise RuntimeError(f"{name}: more than one worker needs Ray and prefect-ray: pip install 'dashflow[ray]'") from exc
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.settings import PREFECT_API_URL

    if not address:
        _local_cluster_auth(name)
    init = {"include_dashboard": False} if address else {"num_cpus": len(jobs), "include_dashboard": False}
    if PREFECT_API_URL.value():  # workers report to the driver's Prefect server, not a temporary one each
        from prefect.settings import PREFECT_API_AUTH_STRING

        auth = PREFECT_API_AUTH_STRING.value()
        init["runtime_env"] = {"env_vars": {"PREFECT_API_URL": PREFECT_API_URL.value(),
                                            **({"PREFECT_API_AUTH_STRING": auth.get_secret_value()} if auth else {})}}
    worker = task(fn, name=f"{name}-worker", cache_policy=NO_CACHE, retries=retries, retry_delay_seconds=1,
                  task_run_name=f"{name}-worker[{{job.label}}]")

    @flow(name=f"{name}-on-ray", task_runner=RayTaskRunner(address=address, init_kwargs=init), log_prints=True)
    def fan_out() -> list[Any]:
        with remote_options(num_cpus=1, num_gpus=gpus_per_job, max_retries=retries):
            futures = [worker.submit(job) for job in jobs]
        return [f.result() for f in futures]

    return fan_out()

