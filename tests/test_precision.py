"""`auto` precision (dashflow/core/precision.py): resolved when the parameters load, from a
probe kept per machine; the stages and their keys see the concrete dtype."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from dashflow.core import precision
from dashflow.core.config import Params
from dashflow.tasks import learn, sample


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DASHFLOW_CACHE", str(tmp_path))
    precision._printed.clear()
    return tmp_path / "precision.json"


def _known(cache, forward: float, train: float) -> None:
    key, name, has = precision.machine()
    cache.write_text(json.dumps({key: {"cpu": name, "flags": has, "torch": "x", "forward": forward, "train": train}}))


def test_auto_picks_what_the_recorded_probe_says_for_each_part(cache, capsys):
    key, name, has = precision.machine()
    if not has:  # a CPU without bfloat16 instructions: float32 without a probe
        p = Params.load(ROOT / "params.yaml", {"model.dtype": "auto", "learn.precision": "auto"})
        assert (p["model"]["dtype"], p["learn"]["precision"]) == ("float32", "fp32") and not cache.exists()
        return
    _known(cache, forward=0.8, train=1.5)   # bf16 slower for sampling, faster for training
    p = Params.load(ROOT / "params.yaml", {"model.dtype": "auto", "learn.precision": "auto"})
    assert (p["model"]["dtype"], p["learn"]["precision"]) == ("float32", "bf16-mixed")
    assert "model.dtype -> float32, learn.precision -> bf16-mixed" in capsys.readouterr().err
    _known(cache, forward=1.09, train=1.11)  # the 10% margin
    p = Params.load(ROOT / "params.yaml", {"model.dtype": "auto", "learn@1.precision": "auto"})
    assert p["model"]["dtype"] == "float32" and p.stage("learn", 1)["precision"] == "bf16-mixed"
    assert p["learn"]["precision"] == "fp32"                       # only the overridden iteration


def test_the_probe_runs_once_per_machine_and_stage_keys_hash_the_concrete_dtype(cache, capsys):
    p = Params.load(ROOT / "params.yaml", {"model.dtype": "auto", "learn.precision": "auto"})
    assert p["model"]["dtype"] in ("float32", "bfloat16") and p["learn"]["precision"] in ("fp32", "bf16-mixed")
    key, _, has = precision.machine()
    if has:
        speed = json.loads(cache.read_text())[key]
        assert speed["forward"] > 0 and speed["train"] > 0
        assert ("bfloat16" if speed["forward"] >= precision.MARGIN else "float32") == p["model"]["dtype"]
        stamp = cache.stat().st_mtime_ns
        Params.load(ROOT / "params.yaml", {"model.dtype": "auto"})
        assert cache.stat().st_mtime_ns == stamp                   # not measured again
    assert "precision auto: model.dtype -> " + p["model"]["dtype"] in capsys.readouterr().err
    concrete = Params.load(ROOT / "params.yaml", {"model.dtype": p["model"]["dtype"],
                                                  "learn.precision": p["learn"]["precision"]})
    assert sample.STAGE.key_params(p, 0) == sample.STAGE.key_params(concrete, 0)
    assert learn.STAGE.key_params(p, 0) == learn.STAGE.key_params(concrete, 0)
    assert "auto" not in json.dumps(sample.STAGE.key_params(p, 0))
