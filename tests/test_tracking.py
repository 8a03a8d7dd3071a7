"""Experiment tracking through TensorBoard's and MLflow's own libraries, read back with them."""

from __future__ import annotations

import pytest

from conftest import tiny_params
from dashflow.ops import tracking

ROW = {"iteration": 2, "reward_mean": 0.375, "accuracy": 0.25, "strict_accuracy": 0.125, "flexible_accuracy": 0.25,
       "kept_fraction": 0.5, "mean_completion_tokens": 31.5, "mixed_group_fraction": 0.5, "updated": True,
       "time": {"sampling": 10.0, "learner": 4.5}, "learner": {"loss": -0.03, "grad_norm": 1.5, "precision": "fp32"}}
EVAL = {"greedy_strict": 0.25, "greedy_flexible": 0.5, "mean@2_strict": 0.125, "prompts": 4,
        "gsm8k/greedy_strict": 0.0, "sets": {"heldout": {"key": "k", "shard": "part-00000.parquet"}}}


def test_the_values_and_their_names():
    values = tracking.iteration_values(ROW)
    assert values["reward_mean"] == 0.375 and values["time/learner"] == 4.5 and values["learner/grad_norm"] == 1.5
    assert "learner/precision" not in values and "updated" not in values
    assert tracking.eval_values(EVAL) == {"eval/heldout/greedy_strict": 0.25, "eval/heldout/greedy_flexible": 0.5,
                                          "eval/heldout/mean_at_2_strict": 0.125, "eval/heldout/prompts": 4.0,
                                          "eval/gsm8k/greedy_strict": 0.0}


def test_tensorboard_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    params = tiny_params(tmp_path, **{"tracking.backend": "tensorboard"})
    tracking.log_iteration(params, ROW)
    tracking.log_iteration(params, dict(ROW, iteration=3, reward_mean=0.5))
    tracking.log_eval(params, -1, EVAL)
    tracking.log_iteration(params, dict(ROW, reward_mean=0.9))  # step 3 again (a resume): not sent twice
    events = EventAccumulator(str(params.layout.root / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(3, 0.375), (4, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/gsm8k/greedy_strict")] == [(0, 0.0)]
    assert [e.value for e in events.Scalars("learner/grad_norm")] == [1.5, 1.5]


def test_mlflow_tracking_store_reads_back(tmp_path):
    from mlflow.tracking import MlflowClient

    params = tiny_params(tmp_path, **{"tracking.backend": "mlflow"})
    tracking.log_eval(params, -1, EVAL)
    tracking.log_iteration(params, ROW)
    tracking.log_iteration(params, ROW)  # not sent twice
    tracker = tracking.Tracker(params)
    record = tracker._record()["mlflow"]
    client = MlflowClient(tracking_uri=tracker.mlflow_uri())
    run = client.get_run(record["run_id"])
    assert run.info.run_name == "tiny" and client.get_experiment(run.info.experiment_id).name == "dashflow"
    history = client.get_metric_history(record["run_id"], "reward_mean")
    assert [(m.step, m.value) for m in history] == [(3, 0.375)]
    assert [(m.step, m.value) for m in client.get_metric_history(record["run_id"], "eval/heldout/greedy_strict")] == [(0, 0.25)]
    # a second Tracker (a resumed run) continues the same MLflow run
    tracking.log_iteration(params, dict(ROW, iteration=3, reward_mean=0.5))
    assert [(m.step, m.value) for m in client.get_metric_history(record["run_id"], "reward_mean")] == [(3, 0.375), (4, 0.5)]


def test_an_unknown_backend_is_refused(tmp_path):
    from dashflow.core.config import ParamsError

    with pytest.raises(ParamsError, match="tracking.backend = 'wandb' is not allowed"):
        tiny_params(tmp_path, **{"tracking.backend": "wandb"})
