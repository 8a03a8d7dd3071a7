"""DAPO's dynamic sampling (sample.dynamic_rounds): extra sample rounds inside an iteration
until the batch holds enough groups whose rewards differ; the filter keeps those groups.
Real model, real Parquet, the tiny config; the kill -9 test runs the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, fork_run, tiny_params
from dashflow.core import prompts as prompts_mod
from dashflow.core import schema, store
from dashflow.tasks import advantage, learn, prepare, reward, sample
from dashflow.tasks import filter as filter_stage

pytestmark = pytest.mark.slow

DYNAMIC = {"sample.dynamic_rounds": 2, "sample.dynamic_groups": 4}   # TINY: 4 prompts x 3 samples, 2 groups a shard


@pytest.fixture(scope="module")
def dyn(tmp_path_factory):
    params = tiny_params(tmp_path_factory.mktemp("dynamic") / "runs", **DYNAMIC)
    prepare.run(params)
    for stage in (sample, reward, advantage, filter_stage, learn):
        stage.run(params, 0)
    return params


def _groups(directory, table_schema, stage="test") -> list[tuple[str, list[float], int]]:
    """(prompt_id, rewards, shard index) of each group, in shard order."""
    out: dict[str, tuple[str, list[float], int]] = {}
    for k, path in enumerate(store.shard_paths(directory, needed_by=stage)):
        t = store.read_shard(path, table_schema, stage=stage)
        for pid, r in zip(t.column("prompt_id").to_pylist(), t.column("reward").to_pylist()):
            out.setdefault(pid, (pid, [], k))[1].append(r)
    return list(out.values())


def test_rounds_run_until_the_batch_holds_enough_groups_with_differing_rewards(dyn):
    stats = store.read_manifest(dyn.layout.stage_dir("sample", 0)).stats
    rounds = stats["dynamic_rounds"]
    assert rounds >= 1                                    # round 0 alone did not find 4 (this seed, this model)
    assert stats["rows"] == 12 * (1 + rounds) and stats["prompts"] == 4 * (1 + rounds)
    groups = _groups(dyn.layout.stage_dir("reward", 0), schema.REWARDED)
    assert len({g[0] for g in groups}) == 4 * (1 + rounds)  # every round's prompts are new in this iteration
    first = [p["prompt_id"] for p in prompts_mod.iteration_prompts(prompts_mod.read_prompts(dyn, "train"), 0, 4, 0)]
    assert [g[0] for g in groups[:4]] == sorted(first[:2]) + sorted(first[2:])  # round 0: the iteration's own
    # the sample stage's count (scored as it ran) is the reward stage's: groups whose rewards differ
    mixed = [len(set(r)) > 1 for _, r, _ in groups]
    assert stats["informative_groups"] == sum(mixed)
    per_round = [sum(m for m, (_, _, k) in zip(mixed, groups) if k // 2 == j) for j in range(rounds + 1)]
    found = [sum(per_round[: j + 1]) for j in range(rounds + 1)]
    assert all(f < 4 for f in found[:-1])                 # another round ran only while the batch was short
    assert found[-1] >= 4 or rounds == 2                  # it stopped when full, or at the cap


def test_the_filter_keeps_the_first_groups_with_signal_and_the_learner_normalises_by_them(dyn):
    groups = _groups(dyn.layout.stage_dir("reward", 0), schema.REWARDED)
    batch = [pid for pid, r, _ in groups if len(set(r)) > 1][:4]
    kept_dir = dyn.layout.stage_dir("filter", 0)
    kept = store.read_stage(kept_dir, schema.KEPT, stage="test")
    assert set(kept.column("prompt_id").to_pylist()) <= set(batch)
    recorded = json.loads((kept_dir / "sampled.json").read_text())["groups"]
    assert [g["prompt_id"] for g in recorded] == batch     # the batch as the learner counts it
    filt = store.read_manifest(kept_dir).stats
    assert filt["batch_groups"] == len(batch) and filt["dropped"]["dynamic_sampling"] == 3 * (len(groups) - len(batch))
    assert store.read_manifest(dyn.layout.policy(0)).stats["sampled_rows"] == 3 * len(batch)


def _files(directory) -> dict[str, str]:
    return {p.name: store.file_sha256(p) for p in sorted(directory.iterdir()) if p.name != store.MANIFEST}


def test_kill_9_in_an_extra_round_then_the_rerun_gives_the_same_bytes(dyn, tmp_path):
    """SIGKILL as round 1's first shard is about to be written: nothing looks finished, and
    the rerun samples every round again to the same bytes as the uninterrupted stage."""
    params = tiny_params(tmp_path / "runs", **DYNAMIC)
    fork_run(dyn, params, iteration_stages=())
    sets = []
    for key, value in dict(TINY, **DYNAMIC, **{"run.root": str(tmp_path / "runs"), "run.name": "tiny"}).items():
        sets += ["--set", f"{key}={value}"]
    command = [sys.executable, "-m", "dashflow.app.cli", "stage", "sample", "-i", "0", *sets]
    killed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, DASHFLOW_FAULT="worker-shard@sample@0:2"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    out = params.layout.stage_dir("sample", 0)
    assert store.read_manifest(out) is None
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert _files(out) == _files(dyn.layout.stage_dir("sample", 0))
    assert store.read_manifest(out).key == store.read_manifest(dyn.layout.stage_dir("sample", 0)).key


def test_the_reward_settings_are_part_of_the_sample_key_only_with_dynamic_sampling(dyn, tmp_path):
    """The rewards decide how many rounds run: changing them reruns sample when dynamic
    sampling is on, and leaves it cached when it is off (rerunning the reward alone stays cheap)."""
    strict = {"reward.functions": {"math": {"function": "math", "extraction": "strict"}}}
    params = tiny_params(tmp_path / "on", **DYNAMIC)
    fork_run(dyn, params, iteration_stages=("sample",))
    assert sample.run(params, 0).cached
    again = sample.run(tiny_params(tmp_path / "on", **DYNAMIC, **strict), 0)
    assert not again.cached and again.key != store.read_manifest(dyn.layout.stage_dir("sample", 0)).key
    off = tiny_params(tmp_path / "off")
    fork_run(dyn, off, iteration_stages=())
    first = sample.run(off, 0)
    assert not first.cached and "dynamic_rounds" not in first.stats and first.stats["rows"] == 12
    assert sample.run(tiny_params(tmp_path / "off", **strict), 0).cached
