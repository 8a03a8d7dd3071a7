"""Benchmark: time per iteration as the rollouts per iteration grow (prompts x G).

    python bench/scaling.py                         # 32, 64, 128, 256 rollouts (G = 4), DASH defaults, CPU
    python bench/scaling.py --rollouts 32,128,512   # up to the issue's 512 (about 10 minutes of CPU)
    python bench/scaling.py --rollouts 512 --iterations 3   # iteration 1: neither first nor last
    python bench/scaling.py --tiny                  # seconds; what CI runs

Each size is a fresh one-iteration run of the flow (same seed, same model, same task) on
`params.yaml` with `sample.prompts_per_iteration = rollouts / G`; `--set` adds overrides
(e.g. `--set run.preset=grpo` to see how standard GRPO scales).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from _common import ROOT, TINY, emit, gpu_overrides, scratch


def main(
    rollouts: str = typer.Option("32,64,128,256", help="rollouts per iteration"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="extra override key=value"),
    iterations: int = typer.Option(1, help="iterations per size; a row each (the first pays the base policy's "
                                           "loads, the last the optimizer state's write)"),
    tiny: bool = typer.Option(False),
    gpu: bool = typer.Option(False, help="the GPU configuration (Qwen2.5-0.5B, GSM8K/MATH; see _common.gpu_overrides)"),
    out: Path = typer.Option(Path("bench/results/scaling.json")),
):
    from dashflow.core.config import Params, _parse_override
    from dashflow.flows.dash_rl import dash_rl, prewarm

    base = dict(TINY) if tiny else gpu_overrides() if gpu else {}
    base.update(dict(_parse_override(s) for s in set_ or []))
    g = Params.load(ROOT / "params.yaml", base)["sample"]["samples_per_prompt"]
    sizes = [6, 12] if tiny else [int(x) for x in rollouts.split(",")]
    with scratch("scaling") as root:
        rows = []
        for n in sizes:
            name = f"r{n}"
            overrides = dict(base, **{"run.root": str(root), "run.name": name, "run.iterations": iterations,
                                      "schedule.evaluate": {},  # timing only: no evaluation
                                      "sample.prompts_per_iteration": max(n // g, 1), "task.num_train": max(n // g, 8)})
            prewarm(str(ROOT / "params.yaml"), overrides)  # as `dashflow run` does (once per process)
            dash_rl(params_path=str(ROOT / "params.yaml"), overrides=overrides)
            for i in range(iterations):
                m = json.loads((root / name / f"iter-{i:04d}" / "metrics.json").read_text())
                t = m["time"]
                rows.append([m["rows"], i, round(t["total"], 1), round(t["sampling"], 1), round(t["reward"], 2),
                             round(t["learner"], 1), round(t["overhead"], 1), f"{100 * t['overhead'] / t['total']:.1f}%",
                             f"{100 * m['kept_fraction']:.0f}%", round(m["rows"] / t["total"], 2),
                             round(t["total"] / m["rows"], 3)])
    emit(f"Time per iteration against rollouts per iteration ({iterations} iteration(s) each)",
         ["rollouts", "iteration", "total s", "sampling s", "reward s", "learner s", "overhead s", "overhead share",
          "kept", "rollouts/s", "s per rollout"], rows, out, overrides=base)


if __name__ == "__main__":
    typer.run(main)
