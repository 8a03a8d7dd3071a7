"""Experiment tracking: each iteration's metrics and each evaluation, sent where researchers
look, through the trackers' own libraries (`pip install '.[tracking]'`).

    tracking.backend: tensorboard   event files in <run>/tensorboard/ (`tensorboard --logdir <run>/tensorboard`)
    tracking.backend: mlflow        one MLflow run per dashflow run, in tracking.mlflow_uri
                                    (default: sqlite:///<run>/mlflow.db; `mlflow ui --backend-store-uri ...`)

The step is the number of iterations trained: iteration i's metrics and the evaluation of
the policy it wrote are step i + 1; the base model's evaluation is step 0. Names:
`reward_mean`, `strict_accuracy`, `flexible_accuracy`, `kept_fraction`, ..., `time/<part>`,
`learner/<metric>`, `eval/<set>/<metric>` (e.g. eval/heldout/greedy_strict; MLflow allows no
`@` in names, so pass@4_strict is sent as pass_at_4_strict by both backends). What was sent
is recorded in <run>/tracking.json, so a resumed or re-printed run never sends a step twice,
and MLflow's run id is kept there to continue the same MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path

from dashflow.core import answers, store
from dashflow.core.config import Params

RECORD = "tracking.json"
SCALARS = ("reward_mean", "accuracy", "strict_accuracy", "flexible_accuracy", "kept_fraction",
           "mean_completion_tokens", "mixed_group_fraction")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def iteration_values(row: dict) -> dict[str, float]:
    """The scalars of one iteration's metrics row (metrics.json), by tracker name."""
    out = {k: float(row[k]) for k in SCALARS if _number(row.get(k))}
    out.update({f"time/{k}": float(v) for k, v in (row.get("time") or {}).items() if _number(v)})
    out.update({f"learner/{k}": float(v) for k, v in (row.get("learner") or {}).items() if _number(v)})
    return out


def eval_values(stats: dict) -> dict[str, float]:
    """An evaluation's stats (eval.json) by tracker name: eval/<set>/<metric>."""
    return {f"eval/{name}/{k.replace('@', '_at_')}": float(v) for name, st in answers.set_stats(stats).items()
            for k, v in st.items() if _number(v)}


class Tracker:
    def __init__(self, params: Params):
        cfg = params["tracking"]
        self.backend = cfg["backend"]
        self.root = Path(params.layout.root)
        self.record_path = self.root / RECORD
        self.cfg = cfg
        self.name = params["run"]["name"]

    def _record(self) -> dict:
        return json.loads(self.record_path.read_text()) if self.record_path.exists() else {}

    def send(self, kind: str, step: int, values: dict[str, float]) -> bool:
        """Send one step's values unless this (kind, step) was sent before; True if sent."""
        if self.backend == "none" or not values:
            return False
        record = self._record()
        sent = record.setdefault(self.backend, {}).setdefault("sent", [])
        if f"{kind}:{step}" in sent:
            return False
        if self.backend == "tensorboard":
            self._tensorboard(step, values)
        elif self.backend == "mlflow":
            self._mlflow(record, step, values)
        else:
            raise store.StageError(f"tracking.backend = {self.backend!r}: choose none, tensorboard or mlflow")
        sent.append(f"{kind}:{step}")
        self.root.mkdir(parents=True, exist_ok=True)
        store.write_json(self.record_path, record)
        return True

    def _tensorboard(self, step: int, values: dict[str, float]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise store.StageError(f"tracking.backend = tensorboard needs the tensorboard package "
                                   f"(pip install '.[tracking]'): {exc}") from exc
        with SummaryWriter(log_dir=str(self.root / "tensorboard")) as writer:
            for name, value in values.items():
                writer.add_scalar(name, value, global_step=step)

    def mlflow_uri(self) -> str:
        return self.cfg.get("mlflow_uri") or f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    def _mlflow(self, record: dict, step: int, values: dict[str, float]) -> None:
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise store.StageError(f"tracking.backend = mlflow needs mlflow (pip install '.[tracking]'): {exc}") from exc
        import time

        client = MlflowClient(tracking_uri=self.mlflow_uri())
        mine = record["mlflow"]
        if "run_id" not in mine:
            name = self.cfg.get("experiment") or "dashflow"
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            run = client.create_run(experiment_id, run_name=self.name, tags={"dashflow.run_dir": str(self.root)})
            mine.update(run_id=run.info.run_id, uri=self.mlflow_uri())
        now = int(time.time() * 1000)
        client.log_batch(mine["run_id"], metrics=[Metric(k, v, now, step) for k, v in values.items()])


def log_iteration(params: Params, row: dict) -> None:
    tracker = Tracker(params)
    tracker.send("iteration", row["iteration"] + 1, iteration_values(row))


def log_eval(params: Params, iteration: int, stats: dict) -> None:
    Tracker(params).send("eval", iteration + 1, eval_values(stats))
