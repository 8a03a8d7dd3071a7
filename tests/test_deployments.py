"""Deployments for real: `dashflow serve` (a Prefect server + a process worker), `dashflow
deploy` (prefect.yaml), `prefect deployment run`, stage reruns through deployment
parameters, the evaluation deployment, and a clean stop that leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, descendants
from dashflow.app.serving import healthy
from dashflow.core import policy as policy_mod

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    out = open(home / "serve.out", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "dashflow.app.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    worker_log = home / "dashflow-serve" / "worker.log"
    try:
        deadline = time.time() + 240
        while not (healthy(url) and worker_log.exists() and "started" in worker_log.read_text()):
            assert proc.poll() is None and time.time() < deadline, (home / "serve.out").read_text()
            time.sleep(1)
        # the API wants the auth string serve generated (0600 file); only /health answers without it
        auth_path = home / "dashflow-serve" / "api-auth"
        assert auth_path.stat().st_mode & 0o777 == 0o600
        import urllib.error
        import urllib.request
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/deployments/filter", data=b"{}", timeout=10)
        assert refused.value.code == 401
        env["PREFECT_API_URL"] = url
        deployed = subprocess.run([sys.executable, "-m", "dashflow.app.cli", "deploy"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=180)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert "dash-rl/local" in deployed.stdout and "dash-eval/local" in deployed.stdout
        env["PREFECT_API_AUTH_STRING"] = _AUTH[url] = auth_path.read_text()   # `prefect deployment run`, _client
        yield {"url": url, "env": env, "home": home, "proc": proc}
    finally:
        # kill -9 of `dashflow serve` (no handler runs): its guards stop the server (and the
        # uvicorn under it) and the worker, so nothing is left running
        pids = [int(p) for p in re.findall(r"pid (\d+)", (home / "serve.out").read_text())]
        family = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        deadline = time.time() + 30
        while any(_alive(p) for p in family) and time.time() < deadline:
            time.sleep(0.5)
        leftover = [p for p in family if _alive(p)]
        for p in leftover:
            os.kill(p, signal.SIGKILL)
        assert len(pids) == 2 and set(pids) <= set(family) and not leftover, (pids, family, leftover)


def _overrides(root: Path) -> dict:
    return dict(TINY, **{"run.root": str(root), "run.name": "tiny"})


_AUTH: dict[str, str] = {}  # API URL -> the auth string its `dashflow serve` generated


def _client(url):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Ctx:
        def __enter__(self):
            from prefect.settings import PREFECT_API_AUTH_STRING

            self.settings = temporary_settings({PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: _AUTH.get(url)})
            self.settings.__enter__()
            self.client = get_client(sync_client=True)
            return self.client.__enter__()

        def __exit__(self, *exc):
            self.client.__exit__(*exc)
            self.settings.__exit__(*exc)

    return _Ctx()


def _last_run(url: str, deployment: str):
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    flow_name, name = deployment.split("/")
    with _client(url) as c:
        dep = c.read_deployment_by_name(deployment)
        run = c.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [dep.id]}),
                               sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return run, {t.name: t.state.name for t in tasks}


def _deployment_run(served, deployment: str, params: dict) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "prefect", "deployment", "run", deployment, "--watch", "--watch-timeout", "600"]
    for k, v in params.items():
        args += ["--param", f"{k}={v if isinstance(v, (str, int)) else json.dumps(v)}"]
    return subprocess.run(args, cwd=ROOT, env=served["env"], capture_output=True, text=True, timeout=660)


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.parent.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("_manifest.json")}


@pytest.fixture(scope="module")
def first_run(served, tmp_path_factory):
    root = tmp_path_factory.mktemp("deployed")
    started = time.perf_counter()
    done = _deployment_run(served, "dash-rl/local", {"iterations": 2, "preset": "dash", "overrides": _overrides(root)})
    wall = time.perf_counter() - started
    print(f"deployment run -> Completed: {wall:.1f} s")
    assert done.returncode == 0 and "Completed" in done.stdout, done.stdout + done.stderr
    return root / "tiny"


def test_deployment_run_completes_with_named_task_runs_and_artifacts(served, first_run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    run, tasks = _last_run(served["url"], "dash-rl/local")
    assert run.state.is_completed() and run.parameters["preset"] == "dash"
    for i in range(2):
        for s in ("sample", "reward", "advantage", "filter", "reference", "learn"):
            assert tasks[f"{s}[iter={i}]"] == "Completed", (s, i, tasks)
    assert tasks["evaluate[iter=-1]"] == "Completed" and tasks["evaluate[iter=1]"] == "Completed"
    with _client(served["url"]) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-iter-0", "tiny-iter-1"])))
    assert sorted(a.key for a in arts) == ["tiny-iter-0", "tiny-iter-1"]
    row = json.loads(arts[0].data)[0]
    assert {"reward", "accuracy", "kept_fraction", "sampling_s", "learner_s", "overhead_s"} <= set(row)
    assert policy_mod.weight_files(first_run / "iter-0001" / "policy")


def test_rerun_parameter_reruns_only_that_stage_and_shows_the_rest_cached(served, first_run):
    before = _mtimes(first_run)
    done = _deployment_run(served, "dash-rl/local", {"iterations": 2, "preset": "dash",
                                                     "overrides": _overrides(first_run.parent), "rerun": ["filter@1"]})
    assert done.returncode == 0, done.stdout + done.stderr
    _, tasks = _last_run(served["url"], "dash-rl/local")
    assert tasks["filter[iter=1]"] == "Completed"
    assert tasks["sample[iter=0]"] == tasks["learn[iter=1]"] == tasks["evaluate[iter=1]"] == "Cached"
    after = _mtimes(first_run)
    assert {k for k in before if after[k] != before[k]} == {"iter-0001/kept"}


def test_from_stage_reruns_that_stage_and_everything_after(served, first_run):
    before = _mtimes(first_run)
    done = _deployment_run(served, "dash-rl/local", {"iterations": 2, "preset": "dash",
                                                     "overrides": _overrides(first_run.parent), "from_stage": "learn@1"})
    assert done.returncode == 0, done.stdout + done.stderr
    _, tasks = _last_run(served["url"], "dash-rl/local")
    assert tasks["learn[iter=1]"] == tasks["evaluate[iter=1]"] == "Completed"
    assert tasks["reference[iter=1]"] == tasks["learn[iter=0]"] == "Cached"
    after = _mtimes(first_run)
    assert {k for k in before if after[k] != before[k]} == {"iter-0001/policy", "iter-0001/optimizer", "iter-0001/eval"}


def test_evaluation_deployment_of_one_checkpoint(served, first_run):
    done = _deployment_run(served, "dash-eval/local", {"checkpoint": str(first_run / "iter-0000" / "policy"),
                                                       "overrides": _overrides(first_run.parent)})
    assert done.returncode == 0, done.stdout + done.stderr
    run, tasks = _last_run(served["url"], "dash-eval/local")
    assert run.state.is_completed() and tasks["evaluate"] == "Completed"
    (out,) = [p for p in (first_run / "evals").iterdir() if not p.name.startswith(".")]  # not its .verified record
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["stats"]["prompts"] == TINY["evaluate.num_prompts"]


def test_clear_errors_without_server_or_deployment(served):
    env = dict(served["env"], PREFECT_API_URL=f"http://127.0.0.1:{_free_port()}/api")
    dead = subprocess.run([sys.executable, "-m", "dashflow.app.cli", "deploy"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert dead.returncode == 1 and "no Prefect server answers" in dead.stderr and "dashflow serve" in dead.stderr
    missing = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "dash-rl/nope"], cwd=ROOT,
                             env=served["env"], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "not found" in missing.stdout + missing.stderr

