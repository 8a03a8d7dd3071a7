"""The Prefect flow end to end on the tiny config with the real model and a real Prefect
server: a full run, a fully cached rerun, forced and parameter-driven stage reruns, and
a run killed with SIGKILL in the middle of a stage that resumes to identical outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY
from dashflow.core import store
from dashflow.core.config import Params

pytestmark = pytest.mark.slow

STAGES = ("sample", "reward", "advantage", "filter", "learn")


def _overrides(root: Path) -> dict:
    # tracking is read by no stage (it never reruns one): the flow sends to TensorBoard here
    return dict(TINY, **{"run.root": str(root), "run.name": "tiny", "tracking.backend": "tensorboard"})


def _scalars(root: Path, name: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "tiny" / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(name)]


def _manifests(root: Path) -> dict[str, tuple[int, str]]:
    """stage@i -> (manifest mtime_ns, output digest) for every finished stage of the run."""
    layout = Params.load(ROOT / "params.yaml", _overrides(root)).layout
    out = {}
    for i in range(TINY["run.iterations"]):
        for s in STAGES:
            path = layout.stage_dir(s, i) / store.MANIFEST
            if path.exists():
                out[f"{s}@{i}"] = (path.stat().st_mtime_ns, json.loads(path.read_text())["digest"])
    for name, path in (("evaluate@-1", layout.eval(-1)), ("evaluate@1", layout.eval(1))):
        if (path / store.MANIFEST).exists():
            out[name] = ((path / store.MANIFEST).stat().st_mtime_ns, json.loads((path / store.MANIFEST).read_text())["digest"])
    return out


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.type.value for r in runs}


@pytest.fixture(scope="module")
def reference_run(prefect_server, tmp_path_factory):
    from dashflow.flows.dash_rl import dash_rl

    root = tmp_path_factory.mktemp("flow")
    state = dash_rl(params_path=str(ROOT / "params.yaml"), overrides=_overrides(root), return_state=True)
    return root, state


def test_flow_runs_every_stage_as_a_named_prefect_task(reference_run):
    root, state = reference_run
    assert state.is_completed()
    summary = state.result()
    assert len(summary["iterations"]) == 2
    assert summary["base_eval"]["prompts"] == 4 and summary["final_eval_iteration"] == 1
    runs = _task_runs(state.state_details.flow_run_id)
    for i in range(2):
        for s in STAGES:
            assert runs[f"{s}[iter={i}]"] == "COMPLETED"
    assert runs["evaluate[iter=-1]"] == "COMPLETED" and runs["evaluate[iter=1]"] == "COMPLETED"
    metrics = json.loads((root / "tiny" / "iter-0001" / "metrics.json").read_text())
    assert set(metrics["time"]) == {"sampling", "reward", "learner", "overhead", "total"}
    assert 0.0 <= metrics["kept_fraction"] <= 1.0 and metrics["rows"] == 12
    # each iteration's metrics and each evaluation reached TensorBoard (step = iterations trained)
    rewards = [json.loads((root / "tiny" / f"iter-{i:04d}" / "metrics.json").read_text())["reward_mean"] for i in (0, 1)]
    assert _scalars(root, "reward_mean") == [(1, pytest.approx(rewards[0])), (2, pytest.approx(rewards[1]))]
    evals = [json.loads((root / "tiny" / d / "eval.json").read_text())["greedy_strict"] for d in ("base", "iter-0001")]
    assert _scalars(root, "eval/heldout/greedy_strict") == [(0, pytest.approx(evals[0])), (2, pytest.approx(evals[1]))]


def test_second_run_is_fully_cached(reference_run):
    from dashflow.flows.dash_rl import dash_rl

    root, _ = reference_run
    before = _manifests(root)
    assert len(before) == 2 * len(STAGES) + 2
    state = dash_rl(params_path=str(ROOT / "params.yaml"), overrides=_overrides(root), return_state=True)
    assert state.is_completed()
    assert _manifests(root) == before
    assert [step for step, _ in _scalars(root, "reward_mean")] == [1, 2]  # nothing sent twice


def test_forced_rerun_of_one_stage_leaves_upstream_alone(reference_run):
    from dashflow.flows.dash_rl import dash_rl

    root, _ = reference_run
    before = _manifests(root)
    dash_rl(params_path=str(ROOT / "params.yaml"), overrides=_overrides(root), rerun=["filter@1"])
    after = _manifests(root)
    assert after["filter@1"][0] != before["filter@1"][0]          # it ran ...
    assert after["filter@1"][1] == before["filter@1"][1]          # ... and made the same rows
    changed = {k for k in before if after[k][0] != before[k][0]}
    assert changed == {"filter@1"}                                # identical input: learn@1 stays cached


def test_new_threshold_for_one_iteration_reruns_it_and_downstream(reference_run):
    from dashflow.flows.dash_rl import dash_rl

    root, _ = reference_run
    before = _manifests(root)
    overrides = dict(_overrides(root), **{"filter@1.threshold": 100.0})   # keep nothing in iteration 1
    dash_rl(params_path=str(ROOT / "params.yaml"), overrides=overrides)
    after = _manifests(root)
    changed = {k for k in before if after[k][0] != before[k][0]}
    assert {"filter@1"} <= changed <= {"filter@1", "learn@1", "evaluate@1"}
    assert not changed & ({f"{s}@0" for s in STAGES} | {"sample@1", "reward@1", "advantage@1"})
    kept = json.loads((root / "tiny" / "iter-0001" / "kept" / store.MANIFEST).read_text())
    assert kept["stats"]["rows_kept"] == 0
    # back to the shared threshold: iteration 1 returns to the reference outputs
    dash_rl(params_path=str(ROOT / "params.yaml"), overrides=_overrides(root))
    assert {k: v[1] for k, v in _manifests(root).items()} == {k: v[1] for k, v in before.items()}


def _cli_run(root: Path, api_url: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "dashflow.app.cli", "run", "--params", str(ROOT / "params.yaml")]
    for k, v in _overrides(root).items():
        args += ["--set", f"{k}={v}"]
    env = dict(os.environ, PREFECT_API_URL=api_url)
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)


def test_kill_9_mid_stage_then_resume_gives_identical_outputs(reference_run, prefect_server, tmp_path):
    ref_root, _ = reference_run
    proc = _cli_run(tmp_path, prefect_server)
    partial = tmp_path / "tiny" / "iter-0000" / ".policy.tmp"   # learn@0 is writing its checkpoint
    deadline = time.time() + 300
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "tiny" / "iter-0000" / "policy" / store.MANIFEST).exists()
    killed = _manifests(tmp_path)
    assert set(killed) == {"evaluate@-1", "sample@0", "reward@0", "advantage@0", "filter@0"}

    proc = _cli_run(tmp_path, prefect_server)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    resumed = _manifests(tmp_path)
    for k, v in killed.items():
        assert resumed[k][0] == v[0], f"{k} was recomputed on resume"
    reference = _manifests(ref_root)
    assert {k: v[1] for k, v in resumed.items()} == {k: v[1] for k, v in reference.items()}
    assert "iter   1" in out and "checkpoints" in out
