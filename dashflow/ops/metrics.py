"""Per-iteration metrics: read the iteration's stage manifests, write iter-i/metrics.json.

Time split (seconds), as in DASH's timing figure:
- sampling: the sampler's generation time      - reward: answer checking time
- learner : forward/backward/optimizer time     - overhead: everything else in the
  iteration's stages (model loading, Parquet IO, hashing, checkpoint writing) plus, when
  the iteration ran in this invocation, the orchestration time between stages.
"""

from __future__ import annotations

import json
from pathlib import Path

from dashflow.core import answers, store
from dashflow.core.config import Params

TRAIN_STAGES = ("sample", "reward", "advantage", "filter", "learn")
LEARNER_METRICS = ("loss", "grad_norm", "lr", "clip_fraction", "approx_kl_to_sampling", "entropy", "tokens_per_s",
                   "sampler_mismatch", "tis_weight", "mismatch_masked", "kl_to_reference", "optimizer_steps",
                   "precision", "rows", "sampled_rows")


def iteration_metrics(params: Params, iteration: int, wall_s: float | None = None) -> dict:
    layout = params.layout
    m = {s: store.require_output(layout.stage_dir(s, iteration), needed_by=f"metrics@{iteration}") for s in TRAIN_STAGES}
    if params.needs_reference(iteration):
        m["reference"] = store.require_output(layout.stage_dir("reference", iteration), needed_by=f"metrics@{iteration}")
    work = {k: m[s].timing.get("work_s", 0.0) for k, s in (("sampling", "sample"), ("reward", "reward"), ("learner", "learn"))}
    # the reference forward pass is learner-side work (GRPO's baseline pays it too)
    work["learner"] += m["reference"].timing.get("work_s", 0.0) if "reference" in m else 0.0
    stage_total = sum(x.timing.get("total_s", 0.0) for x in m.values())
    orchestration = max(wall_s - stage_total, 0.0) if wall_s is not None else 0.0
    out = {
        "iteration": iteration,
        "reward_mean": m["reward"].stats["reward_mean"],
        "accuracy": m["reward"].stats["accuracy"],
        "strict_accuracy": m["reward"].stats.get("strict_accuracy"),
        "flexible_accuracy": m["reward"].stats.get("flexible_accuracy"),
        "kept_fraction": m["filter"].stats["kept_fraction"],
        "dropped": m["filter"].stats.get("dropped"),
        # dynamic sampling: extra rounds run, groups with differing rewards found, the batch's groups
        "dynamic_rounds": m["sample"].stats.get("dynamic_rounds"),
        "informative_groups": m["sample"].stats.get("informative_groups"),
        "batch_groups": m["filter"].stats.get("batch_groups"),
        "reward_overlong_mean": m["reward"].stats.get("reward_overlong_mean"),
        "mean_completion_tokens": m["sample"].stats["mean_completion_tokens"],
        "rows": m["sample"].stats["rows"],
        "mixed_group_fraction": m["advantage"].stats["mixed_group_fraction"],
        "updated": m["learn"].stats.get("updated", True),
        "learner": {k: m["learn"].stats.get(k) for k in LEARNER_METRICS},
        "time": {**work, "overhead": stage_total - sum(work.values()) + orchestration,
                 "total": stage_total + orchestration},
    }
    ev = store.read_manifest(layout.eval(iteration))
    if ev is not None:
        out["eval"] = {k: v for k, v in ev.stats.items() if answers.is_accuracy(k)}
    return out


def write_metrics(params: Params, iteration: int, wall_s: float | None = None) -> dict:
    """Write iter-i/metrics.json atomically. If the iteration was entirely cached, keep the
    existing file (its orchestration time was measured when the iteration really ran)."""
    path = params.layout.metrics(iteration)
    out = iteration_metrics(params, iteration, wall_s)
    if wall_s is None and path.exists():
        previous = json.loads(path.read_text())
        out["time"] = previous.get("time", out["time"])
    # the file holds only what this iteration's training stages determine (dvc.yaml's
    # metrics@i depends on them alone); eval accuracies live in <iter>/eval.json
    store.write_json(path, {k: v for k, v in out.items() if k != "eval"})
    write_history(params)
    return out


HISTORY_FIELDS = ("reward_mean", "accuracy", "strict_accuracy", "flexible_accuracy", "kept_fraction",
                  "mean_completion_tokens")


def write_history(params: Params) -> dict[str, Path]:
    """history.json (one row per finished iteration) and eval_history.json (one row per
    evaluated policy, base = -1) at the run's root: the curves `dvc plots show` draws."""
    layout = params.layout
    rows, evals = [], []
    for i in range(-1, params.iterations):
        if i >= 0 and layout.metrics(i).exists():
            m = json.loads(layout.metrics(i).read_text())
            rows.append({"iteration": i, **{k: m.get(k) for k in HISTORY_FIELDS}})
        ev = store.read_manifest(layout.eval(i))
        if ev is not None:
            evals.append({"iteration": i, **{k: v for k, v in ev.stats.items() if answers.is_accuracy(k)}})
    paths = {"history": Path(layout.root) / "history.json", "eval_history": Path(layout.root) / "eval_history.json"}
    store.write_json(paths["history"], rows)
    store.write_json(paths["eval_history"], evals)
    return paths


def publish_artifact(params: Params, row: dict) -> None:
    """A Prefect table artifact for the iteration (key `<run>-iter-<i>`): one row of metrics."""
    import re

    from prefect.artifacts import create_table_artifact

    t, ev = row["time"], row.get("eval", {})
    table = [{
        "iteration": row["iteration"], "reward": round(row["reward_mean"], 4), "accuracy": round(row["accuracy"], 4),
        **{k: round(row[k], 4) for k in ("strict_accuracy", "flexible_accuracy") if row.get(k) is not None},
        "kept_fraction": round(row["kept_fraction"], 4), "mean_len": round(row["mean_completion_tokens"], 1),
        **{f"{k}_s": round(t[k], 2) for k in ("sampling", "reward", "learner", "overhead", "total")},
        **{f"eval_{k}": round(v, 4) for k, v in ev.items()},
    }]
    key = re.sub(r"[^a-z0-9-]+", "-", f"{params['run']['name']}-iter-{row['iteration']}".lower())
    create_table_artifact(table=table, key=key, description=f"dashflow run {params.layout.root}, "
                                                           f"iteration {row['iteration']}")


def base_eval(params: Params) -> dict | None:
    ev = store.read_manifest(params.layout.eval(-1))
    return None if ev is None else ev.stats


def run_summary(params: Params, iterations: list[dict]) -> dict:
    """The run's summary.json: per-iteration metrics, base and final eval, where things are."""
    layout = params.layout
    evals = [(it["iteration"], it["eval"]) for it in iterations if "eval" in it]
    summary = {
        "run": str(layout.root),
        "iterations": iterations,
        "base_eval": base_eval(params),
        "final_eval": evals[-1][1] if evals else None,
        "final_eval_iteration": evals[-1][0] if evals else None,
        "final_policy": str(layout.policy(iterations[-1]["iteration"])) if iterations else None,
    }
    path = Path(layout.root) / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary
