"""DVC versions a run: a real git + DVC repository in a temporary directory, the tiny
configuration written into its params.yaml, the real flow, then the DVC commands a user
runs (status, dag, metrics, plots, push/pull to a local remote, repro of one stage)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY
from dashflow.core import policy as policy_mod
from dashflow.core import store
from dashflow.core.config import Params, make_schedule

pytestmark = pytest.mark.slow

RUN = Path("data/runs/default")
ITERS = TINY["run.iterations"]
STAGES = ("sample", "reward", "advantage", "filter", "reference", "learn", "metrics")


def _env() -> dict:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `dashflow` for dvc repro
    return env


def sh(repo: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "-m", "dvc", *args, check=check)


def run_flow(repo: Path) -> dict:
    from dashflow.flows.dash_rl import dash_rl

    cwd = os.getcwd()
    os.chdir(repo)
    try:
        return dash_rl(params_path="params.yaml")
    finally:
        os.chdir(cwd)


def digests(directory: Path) -> dict[str, str]:
    """Bytes of every file DVC versions (not dashflow's local stat records, `.X.verified.json`,
    which describe inodes of this checkout and are rebuilt by the next verification)."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".gitignore" and not p.name.endswith(".verified.json")}


def write_params(repo: Path, **changes) -> None:
    tree = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split(".")
        tree[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))


@pytest.fixture(scope="module")
def repo(prefect_server, tmp_path_factory) -> Path:
    """A git + DVC repository holding dashflow's code, dvc.yaml and a tiny params.yaml,
    after one flow run."""
    repo = tmp_path_factory.mktemp("dvcrepo")
    for d in ("tasks", "dashflow", "flows"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / f, repo / f)
    tree = Params.load(ROOT / "params.yaml", {k: v for k, v in TINY.items()}).tree
    tree["dvc"]["track"] = "on"
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "ci@dashflow")
    sh(repo, "git", "config", "user.name", "ci")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "cache.type", "hardlink,copy")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "dashflow, tiny params")
    import dvc_data.hashfile.hash as dvc_hash

    real = dvc_hash.file_md5

    def counted(fname, *args, **kwargs):  # DVC's own md5 of a file, counted
        DVC_HASHED.append(Path(fname))
        return real(fname, *args, **kwargs)

    dvc_hash.file_md5 = counted
    try:
        run_flow(repo)
    finally:
        dvc_hash.file_md5 = real
    return repo


DVC_HASHED: list[Path] = []  # the files DVC hashed itself during the fixture's flow run


def test_flow_run_leaves_dvc_status_clean_and_every_stage_in_the_lock(repo):
    status = dvc(repo, "status", "--json")
    assert json.loads(status.stdout) == {}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    expected = {"prepare", "evaluate@base", f"evaluate@{ITERS - 1}"} | {f"{s}@{i}" for s in STAGES for i in range(ITERS)}
    assert set(lock) == expected
    # the lock's record of a stage output is that output's files
    kept = lock["filter@1"]["outs"][0]
    assert kept["path"] == str(RUN / "iter-0001/kept")
    assert kept["nfiles"] == len([p for p in (repo / RUN / "iter-0001/kept").iterdir() if p.is_file()])
    assert lock["filter@1"]["params"]["params.yaml"]["filter.threshold"] == TINY["filter.threshold"]
    # the DVC cache holds the checkpoint as a hard link of the workspace file: stored once
    assert all(f.stat().st_nlink >= 2 for f in policy_mod.weight_files(repo / RUN / "iter-0001/policy"))


def test_dvc_is_handed_dashflows_md5_and_hashes_no_output_file_again(repo):
    run = repo / RUN
    files = [p for p in run.rglob("*") if p.is_file() and p.name != "_manifest.json" and not p.name.startswith(".")
             and (p.parent / "_manifest.json").exists()]
    assert len(files) > 20 and any(p.name == "model-00001-of-00005.safetensors" for p in files)
    # every file of a stage output (checkpoints, shards) was hashed once, by dashflow as it
    # landed; DVC hashed only the manifests, the small metrics files and its deps (params, code)
    again = sorted({p.relative_to(run).as_posix() for p in DVC_HASHED if p in set(files)})
    assert again == []
    assert any(p.name == "_manifest.json" for p in DVC_HASHED)  # the counter saw DVC hash
    # and the digests DVC recorded are the real md5s: the cache object of a checkpoint is its md5
    weights = run / "iter-0001/policy/model-00001-of-00005.safetensors"
    md5 = hashlib.md5(weights.read_bytes()).hexdigest()
    assert store.read_manifest(weights.parent).outputs[weights.name]["md5"] == md5
    assert (repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).samefile(weights)


def test_the_lock_dashflow_writes_is_byte_for_byte_what_dvcs_own_dump_writes(repo, tmp_path):
    """versioning._write_lock reads dvc.lock with DVC's fast loader instead of its round-trip
    one; written in two commits (the second merging into the first), the file is the one
    DVC's `dump_stages` writes."""
    from dvc.dvcfile import load_file
    from dvc.repo import Repo

    from dashflow.ops import versioning

    lock = repo / "dvc.lock"
    recorded = lock.read_bytes()
    names = list(yaml.safe_load(recorded)["stages"])
    assert len(names) == 2 + len(STAGES) * ITERS + 1
    written = {}
    try:
        with Repo(str(repo)) as r:
            loader = load_file(r, str(repo / "dvc.yaml")).stages
            stages = [loader[n] for n in reversed(names)]  # another order than the flow's commits
            for label, write in (("dvc", lambda part: part[0].dvcfile.dump_stages(part, update_pipeline=False)),
                                 ("dashflow", lambda part: versioning._write_lock(r, part))):
                lock.unlink()
                write(stages[:5])
                write(stages[3:])  # two stages again: replaced in place
                written[label] = lock.read_bytes()
    finally:
        lock.write_bytes(recorded)
    assert written["dashflow"] == written["dvc"]
    assert yaml.safe_load(written["dashflow"]) == yaml.safe_load(recorded)


@pytest.mark.parametrize("every, fault, committed, not_yet", [
    # killed inside a commit: the iteration's outputs in DVC's cache, dvc.lock not yet written
    (1, "mid-dvc-commit@sample@1", "learn@0", "sample@1"),
    # killed between commits, as sample@1 is found finished (dvc.commit_every 4: nothing of
    # iterations 0-1 is committed before the run ends)
    (4, None, "evaluate@base", "learn@0"),
], ids=["mid-commit", "between-commits"])
def test_sigkill_then_the_rerun_records_the_same_lock(repo, prefect_server, every, fault, committed, not_yet):
    """The flow killed (SIGKILL) inside a DVC commit or between two: the rerun records what
    the killed run finished and the lock is the uninterrupted one."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    (repo / "dvc.lock").unlink()
    env = dict(_env(), PREFECT_API_URL=prefect_server)  # the session's server: no temporary one to orphan
    command = [sys.executable, "-m", "dashflow.app.cli", "run", "--set", f"dvc.commit_every={every}"]
    if fault:
        killed = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600,
                                env=dict(env, DASHFLOW_FAULT=fault))
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    else:
        proc = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "Task run 'sample[iter=1]' - Finished" in line:
                proc.kill()
                break
        assert proc.wait(60) == -signal.SIGKILL, "".join(seen)
    partial = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert committed in partial and not_yet not in partial
    assert not_yet in json.loads(dvc(repo, "status", "--json").stdout)
    rerun = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert yaml.safe_load((repo / "dvc.lock").read_text()) == lock
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}


def test_dag_chains_the_iterations(repo):
    dot = dvc(repo, "dag", "--dot", "learn@1").stdout
    edges = {tuple(part.strip().strip('";') for part in line.split("->")) for line in dot.splitlines() if "->" in line}
    for edge in (("prepare", "sample@0"), ("learn@0", "sample@1"), ("sample@1", "reward@1"), ("reward@1", "advantage@1"),
                 ("advantage@1", "filter@1"), ("filter@1", "reference@1"), ("reference@1", "learn@1")):
        assert edge in edges, dot


def test_metrics_show_the_runs_numbers_and_plots_render(repo):
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    m1 = json.loads((repo / RUN / "iter-0001/metrics.json").read_text())
    assert files[str(RUN / "iter-0001/metrics.json")]["data"]["reward_mean"] == m1["reward_mean"]
    assert files[str(RUN / "iter-0001/metrics.json")]["data"]["kept_fraction"] == m1["kept_fraction"]
    ev = json.loads((repo / RUN / "base/eval.json").read_text())
    assert files[str(RUN / "base/eval.json")]["data"]["greedy_strict"] == ev["greedy_strict"]
    assert files[str(RUN / "base/eval.json")]["data"]["greedy_flexible"] == ev["greedy_flexible"]
    history = json.loads((repo / RUN / "history.json").read_text())
    assert [r["iteration"] for r in history] == list(range(ITERS))
    dvc(repo, "plots", "show", "-o", "plots")
    html = (repo / "plots/index.html").read_text()
    assert "reward" in html and "held-out accuracy" in html


def test_committing_the_lock_pins_the_run_and_old_rollouts_read_back_by_revision(repo):
    sh(repo, "git", "add", "dvc.lock", "params.yaml")
    sh(repo, "git", "commit", "-qm", "run: tiny, 2 iterations")
    import dvc.api

    path = RUN / "iter-0001/kept/part-00000.parquet"
    with dvc.api.open(str(path), repo=str(repo), rev="HEAD", mode="rb") as f:
        assert f.read() == (repo / path).read_bytes()


def test_push_delete_pull_restores_every_byte_and_the_flow_skips_everything(repo, tmp_path):
    dvc(repo, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    dvc(repo, "push")
    before = digests(repo / RUN / "iter-0001") | digests(repo / RUN / "base")
    assert any(k.startswith("optimizer/") for k in before)
    shutil.rmtree(repo / "data")
    dvc(repo, "pull")
    after = digests(repo / RUN / "iter-0001") | digests(repo / RUN / "base")
    # every policy, shard and metric comes back byte for byte; the optimizer state (a local
    # cache of the machine that ran the learner, not versioned) does not
    assert after == {k: v for k, v in before.items() if not k.startswith("optimizer/")} and len(after) > 10
    assert not (repo / RUN / "iter-0001/optimizer").exists()
    manifests = {p: p.stat().st_mtime_ns for p in (repo / RUN).rglob("_manifest.json")}
    run_flow(repo)  # every stage is still done: nothing reruns for want of the optimizer state
    assert {p: p.stat().st_mtime_ns for p in (repo / RUN).rglob("_manifest.json")} == manifests
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}
    # what a learn continuing the run here finds (it replays learn@0, learn@1 first: test_retention)
    from dashflow.core import optimizer_state

    with pytest.raises(store.StageError, match=r"learn@2: the optimizer state of iteration 1 .* is not on disk "
                                               r"\(a local cache: .*`dvc pull` restores the policies only"):
        optimizer_state.previous_state(repo / RUN / "iter-0001/optimizer", 2, "learn@2")


def test_an_extended_schedule_adds_only_the_new_iterations_stages(repo):
    original = (repo / "params.yaml").read_text()
    tree = yaml.safe_load(original)
    tree["schedule"] = make_schedule(ITERS + 1, keep=[ITERS - 1])
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    try:
        changed = json.loads(dvc(repo, "status", "--json").stdout)  # what `dvc repro` would run
    finally:
        (repo / "params.yaml").write_text(original)
    assert set(changed) == {f"{s}@{ITERS}" for s in STAGES} | {f"evaluate@{ITERS}"}, changed


def test_repro_of_one_stage_reruns_it_alone(repo):
    kept_at_head = json.loads((repo / RUN / "iter-0001/kept/_manifest.json").read_text())["stats"]["rows_kept"]
    write_params(repo, **{"filter.threshold": 1.0})
    changed = json.loads(dvc(repo, "status", "--json").stdout)
    assert {"filter@0", "filter@1"} <= set(changed) and "advantage@1" not in changed
    out = dvc(repo, "repro", "-s", "filter@1").stdout
    assert "Running stage 'filter@1'" in out and "filter@0'" not in out
    kept = json.loads((repo / RUN / "iter-0001/kept/_manifest.json").read_text())
    assert kept["params"]["filter.threshold"] == 1.0
    advantaged = json.loads((repo / RUN / "iter-0001/advantaged/_manifest.json").read_text())
    assert kept["stats"]["rows_kept"] < kept["stats"]["rows_in"] == advantaged["stats"]["rows"]  # |A| > 1 keeps fewer rows than |A| > 0.1
    changed = json.loads(dvc(repo, "status", "--json").stdout)
    assert "filter@1" not in changed and "filter@0" in changed and "reference@1" in changed
    # the committed revision still holds the old shard
    from dashflow.app.inspecting import summarize

    cwd = os.getcwd()
    os.chdir(repo)
    try:
        then = summarize(RUN / "iter-0001/kept", rev="HEAD")
    finally:
        os.chdir(cwd)
    assert then["rows"] == kept_at_head


def test_recording_is_refused_with_the_reason_and_the_fix(tmp_path):
    from dashflow.core.config import ParamsError
    from dashflow.ops.versioning import Recorder

    params = Params.load(ROOT / "params.yaml", {"dvc.track": "on"})
    with pytest.raises(ParamsError, match=r"is not a DVC repository; run `dvc init` there"):
        Recorder(params, tmp_path / "params.yaml", root=tmp_path)
    # auto: the project repository, but an override params.yaml does not hold -> not recorded, and why
    auto = Recorder(Params.load(ROOT / "params.yaml"), ROOT / "params.yaml", {"filter.threshold": 0.3}, root=ROOT)
    assert not auto.enabled and "filter.threshold" in auto.reason and "dvc exp run -S" in auto.reason
    # overrides no stage depends on do not stop recording
    assert Recorder(Params.load(ROOT / "params.yaml"), ROOT / "params.yaml", {"sample.workers": 2}, root=ROOT).enabled
    n = len(Params.load(ROOT / "params.yaml").tree["schedule"]["iterations"])
    assert Recorder(Params.load(ROOT / "params.yaml"), ROOT / "params.yaml", {"run.iterations": n}, root=ROOT).enabled
    # but other iterations than the schedule's are not what dvc.yaml's stages are (their
    # commit would fail at the first evaluation dvc.yaml does not have)
    fewer = Recorder(Params.load(ROOT / "params.yaml"), ROOT / "params.yaml", {"run.iterations": 2}, root=ROOT)
    assert not fewer.enabled and "`dashflow schedule 2`" in fewer.reason and "--until" in fewer.reason


def _cache_object(repo: Path, path: Path) -> Path:
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]


def test_retention_removes_old_checkpoints_and_keeps_dvc_consistent(repo):
    # back to the committed run (an earlier test changed params.yaml and reran filter@1)
    sh(repo, "git", "checkout", "params.yaml", "dvc.lock")
    dvc(repo, "checkout")
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}
    policy0 = repo / RUN / "iter-0000/policy"
    weights = _cache_object(repo, policy0 / "model-00001-of-00005.safetensors")
    shared = _cache_object(repo, policy0 / "tokenizer.json")  # the same bytes in every policy
    before = digests(policy0)
    assert weights.exists() and shared.exists()

    out = sh(repo, "dashflow", "prune", "--set", "retention.policies=1").stdout
    assert "retention: removed iter-0000/policy" in out and "dvc pull" in out
    # gone from the workspace and the local cache; objects a kept policy shares stay
    assert not policy0.exists() and not weights.exists()
    assert shared.exists() and policy_mod.weight_files(repo / RUN / "iter-0001/policy")
    # dvc.lock keeps the hashes: status names exactly the removed output and the stages reading it
    status = json.loads(dvc(repo, "status", "--json").stdout)
    assert set(status) == {"learn@0", "sample@1", "learn@1", "metrics@0"}, status
    assert set(status["learn@0"][0]["changed outs"].values()) == {"not in cache"}
    assert "modified" not in json.dumps(status)
    assert "Running stage" not in dvc(repo, "repro", "--allow-missing", "--dry").stdout
    # the flow skips every stage over the pruned records and records nothing new
    lock = (repo / "dvc.lock").read_text()
    manifests = {p: p.stat().st_mtime_ns for p in (repo / RUN).rglob("_manifest.json")}
    run_flow(repo)
    assert {p: p.stat().st_mtime_ns for p in (repo / RUN).rglob("_manifest.json")} == manifests
    assert (repo / "dvc.lock").read_text() == lock
    # the default remote held it: pull brings the policy back byte for byte
    dvc(repo, "pull", str(RUN / "iter-0000/policy"))
    assert digests(policy0) == before
