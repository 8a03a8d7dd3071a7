"""Benchmark: orchestration overhead -- the share of an iteration spent outside the work
itself (sampling, answer checking, the learner's forward/backward/step), split into model
loading, checkpoint writing, other stage IO (Parquet, hashing, fsync, manifests) and
orchestration between stages (Prefect task runs, metrics).

    python bench/overhead.py                        # runs the tiny and the default config (2 iterations each)
    python bench/overhead.py --run-dir data/runs/default   # analyse an existing run instead
    python bench/overhead.py --tiny                 # the tiny config only; what CI runs

Orchestration is measured only for iterations that really ran in one flow invocation (a
cached iteration keeps the numbers of the run that computed it).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from _common import ROOT, TINY, emit, scratch

STAGES = ("sample", "reward", "advantage", "filter", "reference", "learn")


def iteration_split(it_dir: Path) -> dict:
    from dashflow.core.config import RunLayout

    layout, i = RunLayout(it_dir.parent), int(it_dir.name.split("-")[1])
    t = json.loads(layout.metrics(i).read_text())["time"]
    load = save = stage_total = 0.0
    for stage in STAGES:
        manifest = layout.stage_dir(stage, i) / "_manifest.json"
        if manifest.exists():
            timing = json.loads(manifest.read_text())["timing"]
            load += timing.get("load_s", 0.0)
            save += timing.get("save_s", 0.0)
            stage_total += timing.get("total_s", 0.0)
    work = t["sampling"] + t["reward"] + t["learner"]
    io = stage_total - work - load - save
    orchestration = t["total"] - stage_total
    return {"total": t["total"], "work": work, "load": load, "save": save, "io": io, "orchestration": orchestration,
            "overhead_share": (t["total"] - work) / t["total"] if t["total"] else 0.0}


def analyse(run_dir: Path, label: str) -> list[list]:
    rows = []
    for it in sorted(Path(run_dir).glob("iter-*")):
        if not (it / "metrics.json").exists():
            continue
        s = iteration_split(it)
        rows.append([label, it.name, round(s["total"], 1), round(s["work"], 1), round(s["load"], 1),
                     round(s["save"], 1), round(s["io"], 1), round(s["orchestration"], 1),
                     f"{100 * s['overhead_share']:.1f}%"])
    return rows


def run_config(label: str, overrides: dict, iterations: int, root: Path) -> Path:
    from dashflow.flows.dash_rl import dash_rl, prewarm

    overrides = dict(overrides, **{"run.root": str(root), "run.name": label, "run.iterations": iterations,
                                   "schedule.evaluate": {}})  # timing only: no evaluation
    prewarm(str(ROOT / "params.yaml"), overrides)  # as `dashflow run` does (once per process)
    dash_rl(params_path=str(ROOT / "params.yaml"), overrides=overrides)
    return root / label


def main(
    run_dir: list[Path] | None = typer.Option(None, "--run-dir", help="analyse existing run directories"),
    iterations: int = typer.Option(2, "--iterations", "-n"),
    tiny: bool = typer.Option(False, help="the tiny config only"),
    out: Path = typer.Option(Path("bench/results/overhead.json")),
):

    rows = []
    if run_dir:
        for d in run_dir:
            rows += analyse(d, d.name)
    else:
        configs = [("tiny", dict(TINY))] + ([] if tiny else [("default", {})])
        with scratch("overhead") as root:
            for label, overrides in configs:
                rows += analyse(run_config(label, overrides, iterations, root), label)
    emit("Orchestration overhead per iteration (seconds; share = (total - work) / total)",
         ["config", "iteration", "total", "work", "model load", "checkpoint save", "other stage IO", "orchestration",
          "overhead share"], rows, out)


if __name__ == "__main__":
    typer.run(main)
