"""Typed stage configs (dashflow/core/stage_configs.py): what `Params.stage` returns."""

import dataclasses
from typing import Any

import pytest

from conftest import ROOT
from dashflow.core import stage_configs
from dashflow.core.config import Params
from dashflow.core.stage_configs import LearnConfig, SampleConfig


def test_a_config_has_one_typed_field_per_declared_parameter():
    fields = {f.name: f.type for f in dataclasses.fields(LearnConfig)}
    assert (fields["lr"], fields["steps"], fields["betas"], fields["gradient_checkpointing"], fields["precision"]) == \
        (float, int, list, bool, str)
    assert fields["tis_cap"] is float                      # declared default 0, but 1.5 is allowed
    sample = {f.name: f.type for f in dataclasses.fields(SampleConfig)}
    assert sample["top_k"] is int and sample["dynamic_groups"] == int | None and sample["vllm_compile"] == str | bool
    # checked where it is read (retention.optimizers: `all` or N): no type guessed, no coercion
    assert {f.name: f.type for f in dataclasses.fields(stage_configs.CONFIGS["retention"])}["optimizers"] is Any
    assert stage_configs.make("retention", {"optimizers": 3}).optimizers == 3


def test_params_stage_returns_the_typed_config_with_the_iteration_override_and_floats_as_floats():
    p = Params.load(ROOT / "params.yaml", ["learn.lr=1", "learn@2.lr=0.5", "learn@2.steps=3"])
    base, two = p.stage("learn"), p.stage("learn", 2)
    assert isinstance(base, LearnConfig) and type(base.lr) is float and base.lr == 1.0   # YAML's int 1, as a float
    assert (two.lr, two.steps, p.stage("learn", 1).steps) == (0.5, 3, 1)
    assert base["lr"] == base.lr and base.get("nproc") == base.nproc and dict(base)["steps"] == 1  # a Mapping too
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.lr = 2.0
    with pytest.raises(KeyError, match="learn.nope"):
        base["nope"]
    assert base.replace(steps=2).steps == 2 and base.steps == 1


def test_a_missing_key_is_none_as_before_and_an_undeclared_one_keeps_a_dict():
    cfg = stage_configs.make("filter", {"threshold": 0})
    assert (cfg.threshold, type(cfg.threshold), cfg.enabled, cfg.drop_truncated) == (0.0, float, None, None)
    assert stage_configs.make("evaluate", {}).sets is None           # null: the task's own sets, not the default's
    assert stage_configs.make("filter", {"threshold": 0.2, "extra": 1}) == {"threshold": 0.2, "extra": 1}
    assert stage_configs.make("schedule", {"iterations": []}) == {"iterations": []}
