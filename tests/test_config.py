"""params.yaml overrides and stage references."""

import pytest

from conftest import ROOT
from dashflow.config import Params, ParamsError, parse_stage_ref


def test_defaults_and_dotted_override():
    p = Params.load(ROOT / "params.yaml", ["filter.threshold=0.2", "learn.betas=[0.8, 0.9]"])
    assert p["filter"]["threshold"] == 0.2
    assert p["learn"]["betas"] == [0.8, 0.9]
    assert Params.load(ROOT / "params.yaml")["filter"]["threshold"] == 0.1


def test_scoped_override_changes_one_iteration_only():
    p = Params.load(ROOT / "params.yaml", {"filter@2.threshold": 0.3})
    assert p.stage("filter", 2)["threshold"] == 0.3
    assert p.stage("filter", 1)["threshold"] == 0.1
    assert p["filter"]["threshold"] == 0.1


def test_unknown_parameter_is_rejected():
    with pytest.raises(ParamsError, match="unknown parameter 'filter.treshold'"):
        Params.load(ROOT / "params.yaml", ["filter.treshold=0.2"])
    with pytest.raises(ParamsError, match="key=value"):
        Params.load(ROOT / "params.yaml", ["filter.threshold"])


def test_stage_refs():
    assert parse_stage_ref("filter@2") == ("filter", 2)
    assert parse_stage_ref("evaluate@-1") == ("evaluate", -1)
    assert parse_stage_ref("evaluate@base") == ("evaluate", -1)
    assert parse_stage_ref("prepare") == ("prepare", None)
    with pytest.raises(ParamsError):
        parse_stage_ref("filtr@2")


def test_preset_fills_parameters_and_explicit_overrides_win():
    grpo = Params.load(ROOT / "params.yaml", {"run.preset": "grpo"})
    assert grpo["sample"]["batching"] == "per_group" and grpo["learn"]["update"] == "per_group"
    assert grpo["learn"]["kl_coef"] == 0.04 and grpo["filter"]["enabled"] is False
    assert grpo["learn"]["lr"] == Params.load(ROOT / "params.yaml")["learn"]["lr"]  # untouched knobs stay
    mine = Params.load(ROOT / "params.yaml", ["run.preset=grpo", "learn.kl_coef=0.01"])
    assert mine["learn"]["kl_coef"] == 0.01 and mine["sample"]["batching"] == "per_group"
    multi = Params.load(ROOT / "params.yaml", {"run.preset": "multi"})
    assert (multi["learn"]["steps"], multi["learn"]["update"]) == (3, "multi")
    with pytest.raises(ParamsError, match="unknown preset 'ppo'.*grpo"):
        Params.load(ROOT / "params.yaml", {"run.preset": "ppo"})


def test_from_stage_is_that_stage_and_everything_after():
    from dashflow.config import stages_from

    got = stages_from("learn@0", 2)
    assert ("learn", 0) in got and ("evaluate", 0) in got and ("sample", 1) in got and ("evaluate", 1) in got
    assert not got & {("prepare", None), ("evaluate", -1), ("sample", 0), ("filter", 0), ("reference", 0)}
    assert len(stages_from("prepare", 2)) == 2 + 2 * 7
    with pytest.raises(ParamsError, match="not a stage of this run"):
        stages_from("filter@5", 2)
