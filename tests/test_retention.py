"""Retention of old checkpoints and optimizer states (params.yaml `retention:`): which
outputs go (hand-worked cases), and a real tiny flow run that removes them, resumes over
them and refuses to rebuild from them. DVC's side is in test_dvc.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, tiny_params
from dashflow.core import policy as policy_mod
from dashflow.core import store
from dashflow.core.config import Params, ParamsError
from dashflow.core.optimizer_state import OPTIMIZER_FILE
from dashflow.ops.retention import Retention, to_prune
from dashflow.tasks import learn


def test_to_prune_keeps_the_last_n_and_every_evaluated_policy():
    # after iteration 4, policies 2, evaluated 1 and 3: keep 3, 4 (last two) and 1 -> remove 0, 2
    # optimizers 1: keep 4 -> remove 0..3
    assert to_prune(4, [1, 3], policies=2, optimizers=1) == [
        ("policy", 0), ("policy", 2), ("optimizer", 0), ("optimizer", 1), ("optimizer", 2), ("optimizer", 3)]
    assert to_prune(4, [], policies=None, optimizers=None) == []
    # a flow writes the optimizer state every learn.state_every (here 3: iterations 2, 5) and
    # holds the rest in memory: the last written ones are kept, whatever came after them
    assert to_prune(6, [], policies=None, optimizers=1, written=[2, 5]) == [("optimizer", 2)]
    assert to_prune(4, [], policies=None, optimizers=1, written=[2]) == []
    assert to_prune(6, [], policies=None, optimizers=2, written=[2, 5, 6]) == [("optimizer", 2)]
    assert to_prune(0, [], policies=1, optimizers=1) == []          # the first iteration's outputs are the last
    assert to_prune(2, [], policies=5, optimizers=3) == []          # fewer iterations than kept


@pytest.mark.parametrize("value", [0, -1, "two", 1.5, True])
def test_retention_counts_must_be_all_or_at_least_one(value):
    params = Params.load(ROOT / "params.yaml", {"retention.optimizers": value})
    with pytest.raises(ParamsError, match=r"retention.optimizers must be `all` or a whole number >= 1"):
        Retention.from_params(params)
    with pytest.raises(ParamsError, match=r"retention.dvc must be remote or drop"):
        Retention.from_params(Params.load(ROOT / "params.yaml", {"retention.dvc": "keep"}))


@pytest.mark.slow
def test_a_run_with_retention_removes_old_checkpoints_and_resumes_over_them(prefect_server, tmp_path, capsys):
    from dashflow.flows.dash_rl import dash_rl

    keep = {"retention.policies": 1, "retention.optimizers": 1, "dvc.track": "off"}
    overrides = dict(TINY, **{"run.root": str(tmp_path), "run.name": "tiny"}, **keep)
    # `remote` promises `dvc pull`: a run that is not recorded in DVC cannot keep that promise
    with pytest.raises(ParamsError, match=r"retention.dvc is `remote`, but this run is not recorded in DVC "
                                          r"\(dvc.track is off\).*retention.dvc: drop"):
        dash_rl(params_path=str(ROOT / "params.yaml"), overrides=overrides)
    assert not (tmp_path / "tiny" / "iter-0000").exists()
    keep["retention.dvc"] = "drop"
    overrides.update(keep)
    dash_rl(params_path=str(ROOT / "params.yaml"), overrides=overrides)
    params = tiny_params(tmp_path, **keep)
    layout = params.layout
    # 2 iterations, evaluated: base and 1. Policy 0 is neither the last nor evaluated; optimizer 0 is not the last.
    assert not layout.policy(0).exists() and not layout.optimizer(0).exists()
    assert policy_mod.weight_files(layout.policy(1)) and (layout.optimizer(1) / OPTIMIZER_FILE).exists()
    assert policy_mod.weight_files(layout.policy(-1))
    record = json.loads(store.pruned_record(layout.policy(0)).read_text())
    assert record["stage"] == "learn" and record["iteration"] == 0 and "model.safetensors.index.json" in record["outputs"]
    assert record["pruned"] == "retention.policies: 1, removed after iteration 1; deleted for good"
    # the record stands in for the output: its digest still feeds sample@1's key, so a rerun skips everything
    manifests = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("_manifest.json")}
    dash_rl(params_path=str(ROOT / "params.yaml"), overrides=overrides)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("_manifest.json")} == manifests
    # a stage that must read a removed output stops, naming it and how to restore it
    with pytest.raises(store.StageError, match=r"iter-0000/policy was removed by the retention setting .*deleted for "
                                               r"good\); it cannot be restored: rebuild it"):
        learn.run(params, 1, force=True)
    assert policy_mod.weight_files(layout.policy(1))  # and the good checkpoint stays
    # rebuilding a removed output brings it back and drops its record
    again = learn.run(params, 0, force=True)
    assert again.digest == record["digest"]  # same inputs, same seed, same bytes
    assert (layout.optimizer(0) / OPTIMIZER_FILE).exists()
    assert not store.pruned_record(layout.policy(0)).exists() and not store.pruned_record(layout.optimizer(0)).exists()
    # an optimizer state is a local cache: removed for good, and a learn that needs it says how to replay it
    from dashflow.ops import retention

    policy1 = store.read_manifest(layout.policy(1))
    retention.apply(tiny_params(tmp_path, **dict(keep, **{"retention.policies": "all"})), 1)
    state = store.read_manifest(layout.optimizer(0))
    assert state.pruned == ("retention.optimizers: 1, removed after iteration 1; a local cache, not versioned by "
                            "DVC; deleted for good")
    # a learn that needs it replays the learner from the last state kept (here: the base), and
    # the replay writes the same bytes, so nothing downstream reruns
    policy0 = store.read_manifest(layout.policy(0))
    assert learn.run(params, 1, force=True).digest == policy1.digest
    out = capsys.readouterr().out
    assert ("learn@1: the optimizer state of iteration 0 is removed (retention.optimizers: 1, removed after "
            "iteration 1; a local cache, not versioned by DVC; deleted for good); replaying learn@0") in out
    assert store.read_manifest(layout.policy(0)).digest == policy0.digest
    assert store.read_manifest(layout.optimizer(0)).pruned == ""  # rebuilt (the next prune removes it again)
    # retention killed midway (SIGKILL after the manifest is gone, before the files are): what
    # is left never reads as a finished output, and the next prune finishes the removal
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    command = [sys.executable, "-m", "dashflow.app.cli", "prune", *sets]
    killed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, DASHFLOW_FAULT="mid-retention@iter-0000/optimizer"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert (layout.optimizer(0) / OPTIMIZER_FILE).exists() and not (layout.optimizer(0) / store.MANIFEST).exists()
    assert store.read_manifest(layout.optimizer(0)).pruned  # the record speaks for it
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert not layout.optimizer(0).exists() and store.read_manifest(layout.optimizer(0)).pruned
    assert learn.run(params, 1).cached  # and the stage that wrote it is still done
