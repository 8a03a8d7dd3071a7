"""Benchmark: the DASH paper's arms side by side on one machine (the paper's Table 3).

Every arm is a preset (`grpo`, `preemptive`, `dash`, `dash-nokl`, `multi`, `mini`, `sft`)
run through the real flow with the same model, task, seed, prompts and samples per
iteration and max tokens. The arms are interleaved: iteration i of every arm runs before
iteration i+1 of any (the flow resumes each run), so machine noise hits all arms alike.
Per arm it prints wall time per iteration split into sampling / reward / learner /
overhead, rollouts per second, reward, eval accuracy after the last iteration (base model
first), mean completion length, kept fraction, and the time reduction against `grpo`.

    python bench/arms.py                                   # all arms, 3 iterations, default config
    python bench/arms.py --presets grpo,preemptive,dash -n 4
    python bench/arms.py --tiny                            # seconds; what CI runs

Writes the table's numbers as JSON (--out). Runs live under --root (one directory per arm;
a second invocation with the same root resumes them: pass a fresh --root to re-measure).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import List, Optional

import typer

from _common import ROOT, gpu_overrides, machine


def _row(name: str, run: Path, iterations: int) -> dict:
    from dashflow.config import RunLayout

    layout = RunLayout(run)
    metrics = [json.loads(layout.metrics(i).read_text()) for i in range(iterations)]
    base = json.loads(layout.eval_json(-1).read_text())
    final = json.loads(layout.eval_json(iterations - 1).read_text()) if layout.eval_json(iterations - 1).exists() else {}
    mean = lambda key: statistics.fmean(m["time"][key] for m in metrics)  # noqa: E731
    total = mean("total")
    return {
        "arm": name, "iterations": iterations,
        "time_s": {k: mean(k) for k in ("sampling", "reward", "learner", "overhead", "total")},
        "rollouts_per_s": statistics.fmean(m["rows"] for m in metrics) / total if total else None,
        "reward_mean": statistics.fmean(m["reward_mean"] for m in metrics),
        "reward_last": metrics[-1]["reward_mean"],
        "eval_greedy": (base.get("greedy_accuracy"), final.get("greedy_accuracy")),
        "eval_sampled": (base.get("sampled_accuracy"), final.get("sampled_accuracy")),
        "mean_completion_tokens": statistics.fmean(m["mean_completion_tokens"] for m in metrics),
        "kept_fraction": statistics.fmean(m["kept_fraction"] for m in metrics),
        "optimizer_steps": [m.get("learner", {}).get("optimizer_steps") for m in metrics],
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(rows: list[dict]) -> str:
    grpo = next((r for r in rows if r["arm"] == "grpo"), None)
    out = ["| arm | s/iter | sampling | reward | learner | overhead | rollouts/s | time saved vs grpo | reward (mean / last) "
           "| eval greedy base → last | eval sampled base → last | len | kept |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["time_s"]
        cut = "-" if grpo is None or r is grpo else f"{100 * (1 - t['total'] / grpo['time_s']['total']):.0f}%"
        out.append(
            f"| {r['arm']} | {t['total']:.1f} | {t['sampling']:.1f} | {t['reward']:.1f} | {t['learner']:.1f} "
            f"| {t['overhead']:.1f} | {r['rollouts_per_s']:.2f} | {cut} | {r['reward_mean']:.3f} / {r['reward_last']:.3f} "
            f"| {_pct(r['eval_greedy'][0])} → {_pct(r['eval_greedy'][1])} "
            f"| {_pct(r['eval_sampled'][0])} → {_pct(r['eval_sampled'][1])} "
            f"| {r['mean_completion_tokens']:.1f} | {_pct(r['kept_fraction'])} |")
    return "\n".join(out)


def main(
    presets: str = typer.Option("grpo,preemptive,dash,dash-nokl,multi,mini,sft", help="comma-separated arms"),
    iterations: int = typer.Option(3, "--iterations", "-n"),
    tiny: bool = typer.Option(False, help="the tiny configuration (seconds per arm)"),
    gpu: bool = typer.Option(False, help="the GPU configuration (Qwen2.5-0.5B, GSM8K/MATH; see _common.gpu_overrides)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="extra override key=value for every arm"),
    root: Path = typer.Option(Path("data/bench/arms"), help="where the arms' runs live"),
    out: Path = typer.Option(Path("bench/results/arms.json"), help="JSON with the table's numbers"),
):
    from dashflow.config import PRESETS, TINY, _parse_override
    from flows.dash_rl import dash_rl

    arms = [a.strip() for a in presets.split(",") if a.strip()]
    unknown = [a for a in arms if a not in PRESETS]
    if unknown:
        raise typer.BadParameter(f"unknown arm(s) {unknown}; choose from {', '.join(PRESETS)}")
    base = dict(TINY) if tiny else gpu_overrides() if gpu else {}
    base.update(dict(_parse_override(s) for s in set_ or []))
    started = time.perf_counter()
    for i in range(iterations):  # interleaved: iteration i of every arm, then i + 1
        for arm in arms:
            overrides = dict(base, **{"run.root": str(root), "run.name": arm, "evaluate.every": 0})
            typer.echo(f"== {arm}: iteration {i}")
            dash_rl(params_path=str(ROOT / "params.yaml"), overrides=overrides, iterations=i + 1, preset=arm)
    rows = [_row(arm, root / arm, iterations) for arm in arms]
    text = table(rows)
    typer.echo(f"\n{len(arms)} arms x {iterations} iterations in {time.perf_counter() - started:.0f} s "
               f"({'tiny' if tiny else 'default'} config{', ' + ', '.join(set_) if set_ else ''}; {machine()})\n")
    typer.echo(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"iterations": iterations, "tiny": tiny, "overrides": base, "machine": machine(),
                               "arms": rows}, indent=2))
    typer.echo(f"\nwrote {out}")


if __name__ == "__main__":
    typer.run(main)
