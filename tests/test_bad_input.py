"""Bad input stops a stage with the file, row or column named, and loses nothing."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import tiny_params
from dashflow.core import policy as policy_mod
from dashflow.core import sampled_batch, store
from dashflow.tasks import advantage, learn, prepare, reward
from dashflow.tasks import filter as filter_stage

pytestmark = pytest.mark.slow


def _fake_output(params, stage, iteration, table, schema_name="bad"):
    def build(tmp):
        pq.write_table(table, tmp / "part-00000.parquet")
        if stage == "filter":
            sampled_batch.write_sampled(tmp, sampled_batch.sampled_groups(table))
        return {}
    return store.run_stage(stage, iteration, params.layout.stage_dir(stage, iteration), inputs={}, params={},
                           code=schema_name, build=build)


def _rows(n_groups=1, g=2, **extra):
    rows = []
    for p in range(n_groups):
        for s in range(g):
            row = {"run": "t", "iteration": 0, "prompt_id": f"p{p}", "sample_index": s, "prompt": "q", "answer": "2",
                   "prompt_token_ids": [1, 2], "completion_token_ids": [3, 2], "completion": "\\boxed{2}",
                   "sampler_logprobs": [-0.1, -0.2], "finish_reason": "stop", "policy_version": "x",
                   "reward": float(s == 0), "correct": s == 0, "parsed_answer": "2", "reward_error": None,
                   "strict_correct": s == 0, "flexible_correct": s == 0,
                   "advantage": 1.0 if s == 0 else -1.0, "group_mean": 0.5, "group_std": 0.7}
            row.update(extra)
            rows.append(row)
    return rows


@pytest.mark.parametrize("stage,upstream,column", [
    (reward, "sample", "completion"),
    (advantage, "reward", "reward"),
    (filter_stage, "advantage", "advantage"),
])
def test_missing_column_is_named(tmp_path, stage, upstream, column):
    params = tiny_params(tmp_path)
    table = pa.Table.from_pylist(_rows()).drop_columns([column])
    _fake_output(params, upstream, 0, table)
    name = stage.__name__.split(".")[-1]
    with pytest.raises(store.StageError, match=rf"{name}@0: .*part-00000.parquet: missing column '{column}'"):
        stage.run(params, 0)
    assert not params.layout.stage_dir(name, 0).exists()


def test_incomplete_group_is_named(tmp_path):
    params = tiny_params(tmp_path)
    _fake_output(params, "reward", 0, pa.Table.from_pylist(_rows(n_groups=2)[:3]))
    with pytest.raises(store.StageError, match=r"prompt group 'p1' has 1 rows, others have 2"):
        advantage.run(params, 0)


def test_bad_dataset_row_stops_prepare_with_file_row_field(tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": "#### 4"}\n'
                    '{"question": "3+3?"}\n')
    params = tiny_params(tmp_path, **{"task.kind": "gsm8k", "task.path": str(data)})
    with pytest.raises(store.StageError, match=r"gsm.jsonl: row 3: missing field 'answer'"):
        prepare.prepare_prompts(params)
    assert not (params.layout.base / "prompts").exists()


def test_non_utf8_dataset_names_the_file_row_and_fix(tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_bytes(b'{"question": "1+1?", "answer": "#### 2"}\n'
                     + '{"question": "caf\u00e9 costs 3+3?", "answer": "#### 6"}\n'.encode("latin-1"))
    params = tiny_params(tmp_path, **{"task.kind": "gsm8k", "task.path": str(data)})
    with pytest.raises(store.StageError, match=r"gsm.jsonl: row 2: not UTF-8 \(byte 0xe9 at column 18\).*iconv"):
        prepare.prepare_prompts(params)
    assert not (params.layout.base / "prompts").exists()


def test_sample_without_a_policy_says_what_to_run(tmp_path):
    from dashflow.tasks import sample

    params = tiny_params(tmp_path)
    with pytest.raises(store.StageError, match=r"sample@0: input .*base/policy is not a finished stage output"):
        sample.run(params, 0)


def test_non_finite_update_keeps_the_good_checkpoint(tmp_path):
    """A learner step with a non-finite loss writes nothing; the previous policy stays."""
    params = tiny_params(tmp_path)
    prepare.prepare_policy(params)
    good = _fake_output(params, "filter", 0, pa.Table.from_pylist(_rows()), "good")
    first = learn.run(params, 0)
    assert first.stats["updated"] and good.digest
    _fake_output(params, "filter", 0, pa.Table.from_pylist(_rows(advantage=float("inf"))), "inf")
    with pytest.raises(store.StageError, match="non-finite loss"):
        learn.run(params, 0)
    kept = store.read_manifest(params.layout.policy(0))
    assert kept.digest == first.digest
    shards = policy_mod.weight_files(params.layout.policy(0))
    assert shards and all(store.file_digest(f) == first.outputs[f.name]["md5"] for f in shards)


def test_evaluate_of_a_policy_not_trained_yet_says_what_to_run(tmp_path):
    """`dashflow stage evaluate` (iteration 0) on a run that has only `prepare` done."""
    params = tiny_params(tmp_path)
    prepare.run(params)
    from dashflow.tasks import evaluate

    with pytest.raises(store.StageError, match=r"evaluate@0: input .*iter-0000/policy is not a finished stage output"):
        evaluate.run(params, 0)
    assert not params.layout.eval(0).exists()


def test_max_new_tokens_beyond_the_models_context_is_refused_naming_the_prompt(tmp_path):
    params = tiny_params(tmp_path, **{"sample.max_new_tokens": 1_000_000_000})
    prepare.run(params)
    from dashflow.tasks import sample

    with pytest.raises(store.StageError, match=r"sample@0: prompt '.*' is [\d,]+ tokens; with sample.max_new_tokens = "
                                               r"1,000,000,000 it needs [\d,]+, more than the model's context of 8,192"):
        sample.run(params, 0)
    assert not params.layout.stage_dir("sample", 0).exists()
