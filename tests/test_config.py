"""params.yaml overrides and stage references."""

import shutil

import pytest

from conftest import ROOT
from dashflow.core.config import Params, ParamsError, make_schedule, parse_stage_ref, write_schedule


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
    assert grpo["sample"]["batching"] == "per_group" and (grpo["learn"]["update"], grpo["learn"]["steps"]) == ("multi", 1)
    assert grpo["learn"]["kl_coef"] == 0.04 and grpo["filter"]["enabled"] is False
    assert grpo["learn"]["lr"] == Params.load(ROOT / "params.yaml")["learn"]["lr"]  # untouched knobs stay
    mine = Params.load(ROOT / "params.yaml", ["run.preset=grpo", "learn.kl_coef=0.01"])
    assert mine["learn"]["kl_coef"] == 0.01 and mine["sample"]["batching"] == "per_group"
    multi = Params.load(ROOT / "params.yaml", {"run.preset": "multi"})
    assert (multi["learn"]["steps"], multi["learn"]["update"]) == (3, "multi")
    with pytest.raises(ParamsError, match="unknown preset 'ppo'.*grpo"):
        Params.load(ROOT / "params.yaml", {"run.preset": "ppo"})


def test_from_stage_is_that_stage_and_everything_after():
    from dashflow.core.config import stages_from

    got = stages_from("learn@0", 2)
    assert ("learn", 0) in got and ("evaluate", 0) in got and ("sample", 1) in got and ("evaluate", 1) in got
    assert not got & {("prepare", None), ("evaluate", -1), ("sample", 0), ("filter", 0), ("reference", 0)}
    assert len(stages_from("prepare", 2)) == 2 + 2 * 7
    with pytest.raises(ParamsError, match="not a stage of this run"):
        stages_from("filter@5", 2)


def test_schedule_lists_each_iteration_with_its_previous_policy():
    s = make_schedule(3, every=2)
    assert s["iterations"] == [
        {"i": 0, "dir": "iter-0000", "policy": "base/policy"},
        {"i": 1, "dir": "iter-0001", "policy": "iter-0000/policy"},
        {"i": 2, "dir": "iter-0002", "policy": "iter-0001/policy"},
    ]
    # the base, every 2nd (iteration 1) and the last (2)
    assert s["evaluate"] == {"base": {"i": -1, "dir": "base"}, "1": {"i": 1, "dir": "iter-0001"},
                             "2": {"i": 2, "dir": "iter-0002"}}


def test_params_yaml_schedule_is_the_iteration_count():
    p = Params.load(ROOT / "params.yaml")
    assert p.iterations == 8
    assert [i for i in range(-1, 8) if p.evaluated(i)] == [-1, 3, 7]
    # `--iterations 3` rewrites the schedule for the run: evaluations that still exist, plus the last
    p3 = p.with_overrides({"run.iterations": 3})
    assert p3.iterations == 3 and [i for i in range(-1, 3) if p3.evaluated(i)] == [-1, 2]
    p0 = p.with_overrides({"evaluate.every": 0})
    assert [i for i in range(-1, 8) if p0.evaluated(i)] == [-1, 7]


def test_a_hand_edited_schedule_that_disagrees_is_rejected(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    bad = tmp_path / "params.yaml"
    bad.write_text(text.replace("{i: 2, dir: iter-0002, policy: iter-0001/policy}",
                                "{i: 2, dir: iter-0002, policy: iter-0000/policy}"))
    with pytest.raises(ParamsError, match=r"schedule.iterations\[2\].*expected.*iter-0001/policy.*dashflow schedule"):
        Params.load(bad)
    bad.write_text(text.replace("'7': {i: 7, dir: iter-0007}", "'9': {i: 9, dir: iter-0009}"))
    with pytest.raises(ParamsError, match="schedule.evaluate.9"):
        Params.load(bad)


def test_write_schedule_replaces_only_that_section(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    write_schedule(path, make_schedule(10, every=5))
    p = Params.load(path)
    assert p.iterations == 10 and [i for i in range(-1, 10) if p.evaluated(i)] == [-1, 4, 9]
    old, new = (ROOT / "params.yaml").read_text(), path.read_text()
    head = old[: old.index("# The schedule:")]
    assert new.startswith(head)  # every other line and comment as it was
    assert new.count("schedule:\n") == 1 and "{i: 9, dir: iter-0009, policy: iter-0008/policy}" in new


def test_numbers_are_read_the_way_people_write_them(tmp_path):
    """YAML 1.1 (PyYAML) reads `2e-5` as a string; it reached torch and crashed learn@0."""
    p = Params.load(ROOT / "params.yaml", ["learn.lr=2e-5", "filter@1.threshold=1E-1", "advantage.epsilon=+1e-4"])
    assert p["learn"]["lr"] == 2e-5 and isinstance(p["learn"]["lr"], float)
    assert p.stage("filter", 1)["threshold"] == 0.1 and p["advantage"]["epsilon"] == 1e-4
    text = (ROOT / "params.yaml").read_text().replace("lr: 2.0e-5", "lr: 3e-6")
    assert "lr: 3e-6" in text
    (tmp_path / "params.yaml").write_text(text)
    assert Params.load(tmp_path / "params.yaml")["learn"]["lr"] == 3e-6
    # other strings stay strings
    assert Params.load(ROOT / "params.yaml", ["run.name=e5"])["run"]["name"] == "e5"


BAD_PARAMETERS = [
    ("learn.lr", "'2e-5'", "learn.lr = '2e-5' is not allowed: expected a finite number > 0 (a quoted number is a string"),
    ("learn.lr", "0", "learn.lr = 0 is not allowed: expected a finite number > 0"),
    ("learn.max_grad_norm", "-1", "learn.max_grad_norm = -1 is not allowed: expected a finite number >= 0"),
    ("learn.max_grad_norm", ".nan", "learn.max_grad_norm = nan is not allowed: expected a finite number >= 0"),
    ("learn.tis_cap", "-1", "learn.tis_cap = -1 is not allowed: expected a finite number >= 0"),
    ("learn.objective", "grpo", "learn.objective = 'grpo' is not allowed: expected one of ppo, gspo, cispo"),
    ("learn.tis_mode", "seq", "learn.tis_mode = 'seq' is not allowed: expected one of token_truncate, token_mask"),
    ("reward.overlong_buffer", "1.5", "reward.overlong_buffer = 1.5 is not allowed: expected an integer >= 0"),
    ("filter.threshold", ".nan", "filter.threshold = nan is not allowed: expected a finite number >= 0"),
    ("advantage.epsilon", "0", "advantage.epsilon = 0 is not allowed: expected a finite number > 0"),
    ("sample.prompts_per_iteration", "0", "sample.prompts_per_iteration = 0 is not allowed: expected an integer >= 1"),
    ("sample.samples_per_prompt", "0", "sample.samples_per_prompt = 0 is not allowed: expected an integer >= 1"),
    ("sample.groups_per_shard", "0", "sample.groups_per_shard = 0 is not allowed: expected an integer >= 1"),
    ("sample.groups_per_shard", "2.5", "sample.groups_per_shard = 2.5 is not allowed: expected an integer >= 1"),
    ("sample.top_p", "0", "sample.top_p = 0 is not allowed: expected a finite number > 0 and <= 1"),
    ("sample.temperature", "0", "sample.temperature = 0 is not allowed: expected a finite number > 0"),
    ("reward.timeout_s", "0", "reward.timeout_s = 0 is not allowed: expected an integer >= 1"),
    ("reward.timeout_s", "0.5", "reward.timeout_s = 0.5 is not allowed: expected an integer >= 1"),
    ("reward.max_chars", "0", "reward.max_chars = 0 is not allowed: expected an integer >= 1"),
    ("sandbox.timeout_s", "0", "sandbox.timeout_s = 0 is not allowed: expected a finite number > 0 and <= 600"),
    ("sandbox.memory_mb", "10", "sandbox.memory_mb = 10 is not allowed: expected an integer >= 64"),
    ("sandbox.processes", "0", "sandbox.processes = 0 is not allowed: expected an integer >= 1"),
    ("sandbox.workers", "0", "sandbox.workers = 0 is not allowed: expected an integer >= 1"),
    ("task.hub_format", "apps", "task.hub_format = 'apps' is not allowed: expected null, mbpp or humaneval"),
    ("learn.precision", "bf16", "learn.precision = 'bf16' is not allowed: expected one of fp32, bf16-mixed"),
    ("learn.betas", "[0.9]", "learn.betas = [0.9] is not allowed: expected a list of two numbers in [0, 1)"),
    ("filter.enabled", "'yes'", "filter.enabled = 'yes' is not allowed: expected true or false"),
    ("learn@2.lr", "-1", "learn@2.lr = -1 is not allowed: expected a finite number > 0"),
    ("dvc.commit_every", "0", "dvc.commit_every = 0 is not allowed: expected an integer >= 1"),
    ("learn.state_every", "0", "learn.state_every = 0 is not allowed: expected an integer >= 1"),
]


@pytest.mark.parametrize("key,value,message", BAD_PARAMETERS, ids=[f"{k}={v}" for k, v, _ in BAD_PARAMETERS])
def test_bad_parameters_are_refused_when_loaded_with_key_value_and_what_is_allowed(key, value, message):
    with pytest.raises(ParamsError) as err:
        Params.load(ROOT / "params.yaml", [f"{key}={value}"])
    assert message in str(err.value)


def test_a_bad_value_in_the_file_names_the_file(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace(
        "samples_per_prompt: 4", "samples_per_prompt: four"))
    with pytest.raises(ParamsError, match=r"params.yaml: sample.samples_per_prompt = 'four' is not allowed"):
        Params.load(tmp_path / "params.yaml")


@pytest.mark.parametrize("text, message", [
    ("run:\n  name: [unclosed\n", r"params.yaml: not valid YAML at line 3, column 1: expected ',' or ']'"),
    ("run:\n  name: a\0b\n", r"params.yaml: a NUL byte on line 2; a params file is YAML text"),
    ("- run\n- sample\n", r"params.yaml: the top level must be a mapping of sections .* not a list"),
    (b"run:\n  name: \xff\n", r"params.yaml: not UTF-8 text \(line 2, byte 13 of the file\)"),
])
def test_a_params_file_that_is_not_a_yaml_mapping_is_named_in_one_line(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ParamsError, match=message) as err:
        Params.load(path)
    assert "\n" not in str(err.value)


def test_rows_per_iteration_are_bounded_before_anything_runs():
    with pytest.raises(ParamsError, match=r"sample.prompts_per_iteration x sample.samples_per_prompt = "
                                          r"16,000,000,000 rows per iteration; at most 1,000,000"):
        Params.load(ROOT / "params.yaml", ["sample.samples_per_prompt=1000000000"])


@pytest.mark.parametrize("overrides, message", [
    (["learn.tis_cap=2", "learn.tis_min=3"], "learn.tis_min = 3 is above learn.tis_cap = 2"),
    (["reward.overlong_buffer=64"], "reward.overlong_buffer = 64 must be below sample.max_new_tokens = 64"),
])
def test_settings_that_contradict_each_other_are_refused_when_loaded(overrides, message):
    with pytest.raises(ParamsError, match=message):
        Params.load(ROOT / "params.yaml", overrides)


def test_dynamic_sampling_needs_one_planned_step_count():
    with pytest.raises(ParamsError, match="sample.dynamic_rounds = 2 needs learn.update: multi"):
        Params.load(ROOT / "params.yaml", ["sample.dynamic_rounds=2", "learn.update=mini"])
