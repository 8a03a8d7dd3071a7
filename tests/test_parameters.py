"""Each parameter declared once (dashflow/core/parameters.py): params.yaml, docs/parameters.md,
the stage keys and dvc.yaml all follow the declarations."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY
from dashflow.app import dvcfile
from dashflow.core import parameters, presets
from dashflow.core.config import PRESETS, Params, ParamsError, load_yaml, render_schedule
from dashflow.tasks import evaluate, learn, prepare, reward, sample

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_comments_and_values_are_the_declarations():
    text = (ROOT / "params.yaml").read_text()
    tree = load_yaml(text)
    assert text == parameters.render_yaml(tree, render_schedule(tree["schedule"]))
    shipped = {p.key: tree[p.section][p.name] for p in parameters.PARAMS}
    assert shipped == {p.key: p.default for p in parameters.PARAMS}
    assert parameters.unknown_keys(tree) == []


def test_every_default_is_allowed_and_every_preset_key_declared():
    assert [p.key for p in parameters.PARAMS if not p.allowed[0](p.default)] == []
    named = set(TINY) | {k for preset in PRESETS.values() for k in preset}
    assert sorted(named - set(parameters.BY_KEY) - {"run.iterations"}) == []


def test_the_parameter_page_is_current():
    assert (ROOT / "docs" / "parameters.md").read_text() == parameters.markdown()


def _table(path: Path, header: str) -> str:
    """The markdown table of `path` that starts with `header`, up to the blank line after it."""
    text = path.read_text()
    start = text.index(header)
    return text[start: text.index("\n\n", start) + 1]


def test_the_preset_tables_are_written_from_the_declarations():
    # one declaration (dashflow/core/presets.py): each preset's line, its values and the tables from them
    assert list(presets.SUMMARIES) == list(PRESETS)
    fix = 'python -c "from dashflow.core import presets; print(presets.summary_table()); print(presets.markdown())"'
    assert _table(ROOT / "README.md", "| preset | what it is |") == presets.summary_table(), fix
    assert _table(ROOT / "docs" / "presets.md", "| preset | generation call") == presets.markdown(), fix
    note = parameters.BY_KEY["run.preset"].note
    assert all(f"  {name} " in note for name in PRESETS)


def test_the_tiny_params_file_is_the_tiny_overrides(tmp_path):
    """`dashflow run --params params/tiny.yaml` runs what the tests' tiny_params run."""
    where = {"run.root": str(tmp_path), "run.name": "tiny"}
    assert Params.load(ROOT / "params" / "tiny.yaml", where) == Params.load(ROOT / "params.yaml", dict(TINY, **where))


def test_dvc_yaml_is_what_the_stages_declare():
    assert (ROOT / "dvc.yaml").read_text() == dvcfile.render(ROOT)


def test_the_drifted_declarations_are_now_in_dvc_yaml():
    stages = load_yaml((ROOT / "dvc.yaml").read_text())["stages"]
    assert "dashflow/core/answers.py" in stages["reward"]["do"]["deps"]     # the answer checker
    assert "sandbox.memory_mb" in stages["reward"]["do"]["params"]
    assert "sample.top_k" in stages["evaluate"]["do"]["params"]
    assert "model.dtype" in stages["evaluate"]["do"]["params"]             # the samplers' dtype
    assert "reward.functions" not in stages["evaluate"]["do"]["params"]    # evaluate checks answers itself


def test_a_stage_key_moves_with_its_declared_parameters_only(tmp_path):
    base = Params.load(ROOT / "params.yaml", {"run.root": str(tmp_path)})
    key = sample.STAGE.key_params(base, 0)
    assert key["sample.temperature"] == 0.9 and set(key) == set(sample.STAGE.params)
    hotter = sample.STAGE.key_params(base.with_overrides({"sample.temperature": 1.1}), 0)
    assert hotter["sample.temperature"] == 1.1 and hotter != key
    assert sample.STAGE.key_params(base.with_overrides({"sample.workers": 4}), 0) == key     # how, not what
    assert learn.STAGE.key_params(base.with_overrides({"learn.nproc": 4}), 0) == learn.STAGE.key_params(base, 0)
    scoped = base.with_overrides({"filter@1.threshold": 0.3})
    assert reward.STAGE.key_params(scoped, 1) == reward.STAGE.key_params(base, 1)
    derived = reward.STAGE.key_params(base, 0, functions={"math": {}})
    assert derived["derived.functions"] == {"math": {}}


def test_a_declaration_naming_an_unknown_parameter_is_refused():
    with pytest.raises(ParamsError, match=r"stage x declares unknown parameters \['sample.temprature'\]"):
        type(sample.STAGE)("x", __name__, params=("sample.temprature",), code=())


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("\nsample:\n", "\nsample:\n  temprature: 1.0\n", 1), "unknown parameter 'sample.temprature'"),
    (lambda t: t + "\nbogus:\n  x: 1\n", "unknown parameter 'bogus'"),
])
def test_an_unknown_key_in_a_params_file_is_refused_by_name(tmp_path, edit, message):
    path = tmp_path / "params.yaml"
    path.write_text(edit((ROOT / "params.yaml").read_text()))
    with pytest.raises(ParamsError, match=f"{path}: {message}"):
        Params.load(path)


def test_prepare_and_evaluate_declare_what_their_keys_hash():
    assert "task.instruction" in prepare.PROMPTS.params and "model.name" in prepare.POLICY.params
    assert "evaluate.sets" in evaluate.STAGE.params
    assert all(m.__name__.startswith("dashflow.core.") for s in (prepare.PROMPTS, evaluate.STAGE) for m in s.code)


def test_with_dynamic_sampling_dvc_yaml_makes_sample_depend_on_the_reward(monkeypatch, tmp_path):
    """The sample key then holds the reward settings and code (the rewards decide the rounds);
    dvc.yaml must say so, and a run is not recorded against a dvc.yaml written without it."""
    import yaml

    from dashflow.ops import versioning

    params = Params.load(ROOT / "params.yaml", ["sample.dynamic_rounds=2"])
    assert "run `dashflow dvc-yaml`" in versioning._stale_dynamic(ROOT, params)   # the committed file: off
    assert versioning._stale_dynamic(ROOT, Params.load(ROOT / "params.yaml")) is None
    monkeypatch.setattr(dvcfile, "dynamic_sampling", lambda root: True)
    text = dvcfile.render(ROOT)
    stage = yaml.safe_load(text)["stages"]["sample"]["do"]
    assert {"reward.functions", "reward.overlong_buffer", "sample.dynamic_rounds"} <= set(stage["params"])
    assert "dashflow/core/rewards.py" in stage["deps"]
    (tmp_path / "dvc.yaml").write_text(text)
    assert versioning._stale_dynamic(tmp_path, params) is None
