"""Benchmark: the DASH paper's arms side by side on one machine (the paper's Table 3).

Every arm is a preset (`grpo`, `preemptive`, `dash`, `dash-nokl`, `multi`, `mini`, `sft`)
run through the real flow with the same model, task, prompts and samples per iteration and
max tokens, once per seed. The runs are interleaved: iteration i of every (seed, arm) runs
before iteration i+1 of any (the flow resumes each run), so machine noise hits all arms
alike. Per arm it prints wall time per iteration split into sampling / reward / learner /
overhead, the time reduction against `grpo` (ratio of the arms' mean times in this one
invocation), reward, held-out accuracy of the last policy (base model first), mean
completion length and kept fraction -- each as the mean over seeds with the spread
(min..max) across seeds, since an arm comparison without it says nothing.

    python bench/arms.py --presets grpo,preemptive,dash,dash-nokl -n 4 --seeds 0,1
    python bench/arms.py --tiny                            # seconds; what CI runs

An arm is a preset, optionally with overrides of its own after colons (`PRESET:key=value:...`);
the preset `params` is params.yaml as it is (the default run):
    python bench/arms.py --presets dash,dash:learn.objective=gspo,dash:learn.objective=cispo -n 8 --seeds 0,1,2
    python bench/arms.py --presets 'params,params:reward.functions={"math": {"extraction": "strict"}}' -n 8

Old checkpoints are pruned as the runs go (retention: the last policy, the evaluated ones
and the last optimizer state), and --root is removed at the end unless --keep.

Seeds run in separate invocations (same iterations and overrides) make one table with
`--merge A.json --merge B.json` (accuracy, reward and tokens with their spread over all the
seeds; an (arm, seed) in two files is checked to be the same run; times are left out, as
they compare only within one invocation).

Writes the table's numbers as JSON (--out). Runs live under --root (one directory per arm;
a second invocation with the same root resumes them: pass a fresh --root to re-measure).
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from pathlib import Path

import typer
from _common import ROOT, TINY, gpu_overrides, machine


def _one(run: Path, iterations: int) -> dict:
    """One (arm, seed) run's numbers."""
    from dashflow.core.config import RunLayout

    layout = RunLayout(run)
    metrics = [json.loads(layout.metrics(i).read_text()) for i in range(iterations)]
    base = json.loads(layout.eval_json(-1).read_text())
    final = json.loads(layout.eval_json(iterations - 1).read_text())
    mean = lambda key: statistics.fmean(m["time"][key] for m in metrics)
    sampled = sum(m["rows"] * m["mean_completion_tokens"] for m in metrics)
    kept = sum(m["rows"] * m["kept_fraction"] for m in metrics)
    return {
        "time_s": {k: mean(k) for k in ("sampling", "reward", "learner", "overhead", "total")},
        "reward_mean": statistics.fmean(m["reward_mean"] for m in metrics),
        "reward_last": metrics[-1]["reward_mean"],
        "strict_base": base.get("greedy_strict"), "strict_last": final.get("greedy_strict"),
        "flexible_base": base.get("greedy_flexible"), "flexible_last": final.get("greedy_flexible"),
        # the sampled evaluation (evaluate.samples > 0): the last policy's strict mean@n and pass@n
        **{f"{kind}_strict_last": final.get(f"{kind}@{final.get('samples')}_strict") for kind in ("mean", "pass")},
        "mean_completion_tokens": statistics.fmean(m["mean_completion_tokens"] for m in metrics),
        "kept_fraction": statistics.fmean(m["kept_fraction"] for m in metrics),
        # completion tokens sampled per row the learner got (the cost of a kept row)
        "tokens_per_kept_row": sampled / kept if kept else None,
        "reward_curve": [round(m["reward_mean"], 4) for m in metrics],
        "clip_fraction": statistics.fmean(m["learner"].get("clip_fraction") or 0.0 for m in metrics),
        "optimizer_steps": [m.get("learner", {}).get("optimizer_steps") for m in metrics],
    }


def _row(name: str, runs: dict[int, Path], iterations: int) -> dict:
    """An arm over its seeds: every number as {mean, min, max} across seeds."""
    return _summary(name, {seed: _one(run, iterations) for seed, run in runs.items()}, iterations)


def _summary(name: str, per_seed: dict[int, dict], iterations: int) -> dict:
    """Every number of the (arm, seed) runs as {mean, min, max} across the seeds."""

    def spread(get) -> dict:
        values = [v for v in (get(r) for r in per_seed.values()) if v is not None]  # e.g. no sampled eval
        if not values:
            return {"mean": None, "min": None, "max": None}
        return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}

    keys = ("reward_mean", "reward_last", "strict_base", "strict_last", "flexible_base", "flexible_last",
            "mean_completion_tokens", "kept_fraction", "tokens_per_kept_row", "clip_fraction",
            "mean_strict_last", "pass_strict_last")
    return {"arm": name, "iterations": iterations, "seeds": sorted(per_seed),
            "time_s": {k: spread(lambda r, k=k: r["time_s"][k])
                       for k in ("sampling", "reward", "learner", "overhead", "total")},
            **{k: spread(lambda r, k=k: r[k]) for k in keys}, "per_seed": per_seed}


def _ms(x: dict, pct: bool = False, digits: int = 1) -> str:
    scale, unit = (100, "%") if pct else (1, "")
    if x["mean"] is None:
        return "-"
    if x["min"] == x["max"]:
        return f"{scale * x['mean']:.{digits}f}{unit}"
    return f"{scale * x['mean']:.{digits}f}{unit} ({scale * x['min']:.{digits}f}..{scale * x['max']:.{digits}f})"


def table(rows: list[dict]) -> str:
    grpo = next((r for r in rows if r["arm"] == "grpo"), None)
    out = ["| arm | s/iter | sampling | reward | learner | overhead | time saved vs grpo | reward (mean over iters) "
           "| greedy acc strict base → last | greedy acc flexible base → last | last mean@n / pass@n strict "
           "| len | kept | tokens / kept row |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["time_s"]
        cut = ("-" if grpo is None or r is grpo or None in (t["total"]["mean"], grpo["time_s"]["total"]["mean"])
               else f"{100 * (1 - t['total']['mean'] / grpo['time_s']['total']['mean']):.0f}%")
        out.append(
            f"| {r['arm']} | {_ms(t['total'])} | {_ms(t['sampling'])} | {_ms(t['reward'])} | {_ms(t['learner'])} "
            f"| {_ms(t['overhead'])} | {cut} | {_ms(r['reward_mean'], digits=3)} "
            f"| {_ms(r['strict_base'], True)} → {_ms(r['strict_last'], True)} "
            f"| {_ms(r['flexible_base'], True)} → {_ms(r['flexible_last'], True)} "
            f"| {_ms(r['mean_strict_last'], True)} / {_ms(r['pass_strict_last'], True)} "
            f"| {_ms(r['mean_completion_tokens'])} | {_ms(r['kept_fraction'], True)} | {_ms(r['tokens_per_kept_row'])} |")
    return "\n".join(out)


# what makes two results of one (arm, seed) the same run: its trajectory and its evaluations
SAME_RUN = ("reward_curve", "strict_base", "strict_last", "flexible_base", "flexible_last",
            "mean_strict_last", "pass_strict_last", "tokens_per_kept_row")
# what every merged file must share (else their seeds are not one arm's)
SAME_SETUP = ("iterations", "tiny", "overrides")


def merge(files: list[Path]) -> tuple[list[dict], list[str]]:
    """Arms over the seeds of several invocations (their --out JSON): one run per (arm, seed).

    An (arm, seed) found in two files is kept once, and said whether it is the same run
    (SAME_RUN equal) or not. Times are dropped: they are ratios within one invocation only,
    so compare them in each invocation's own table."""
    first: tuple[Path, dict] | None = None  # the first file and its setup (files is not empty)
    runs: dict[str, dict[int, tuple[Path, dict]]] = {}
    said: list[str] = []
    for path in files:
        try:
            data = json.loads(path.read_text())
            setup = {key: data[key] for key in SAME_SETUP}
            arms = [(arm["arm"], {int(s): r for s, r in arm["per_seed"].items()}) for arm in data["arms"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise typer.BadParameter(f"{path}: not a bench/arms.py --out JSON with per-seed results ({err!r})") from err
        if first is None:
            first = (path, setup)
        for key in SAME_SETUP:
            if setup[key] != first[1][key]:
                raise typer.BadParameter(f"{path}: {key} is {setup[key]!r} but {first[0]} has {first[1][key]!r}; "
                                         "seeds of one arm must share the setup")
        for arm, per_seed in arms:
            for seed, result in sorted(per_seed.items()):
                seen = runs.setdefault(arm, {}).get(seed)
                if seen is None:
                    runs[arm][seed] = (path, result)
                    continue
                differs = [key for key in SAME_RUN if seen[1].get(key) != result.get(key)]
                said.append(f"{arm} seed {seed} is in {seen[0]} and {path}: "
                            + (f"not the same run (differs in {', '.join(differs)}); the first is kept"
                               if differs else "the same run (reward curve and evaluations equal)"))
    iterations = first[1]["iterations"]
    rows = []
    for arm, by_seed in runs.items():
        per_seed = {seed: dict(result, time_s={key: None for key in result["time_s"]})
                    for seed, (_, result) in sorted(by_seed.items())}
        row = _summary(arm, per_seed, iterations)
        row["from"] = {seed: str(path) for seed, (path, _) in sorted(by_seed.items())}
        rows.append(row)
    return rows, said


def arm_spec(arm: str, presets: dict, parse) -> tuple[str, dict]:
    """`PRESET[:key=value:...]` -> (preset, its own overrides); the preset `params` -> None (params.yaml as is)."""
    preset, *sets = re.split(r":(?=[A-Za-z_][\w.@]*=)", arm)  # a value may hold colons (YAML)
    if preset != "params" and preset not in presets:
        raise typer.BadParameter(f"unknown arm {arm!r}: {preset!r} is not a preset; "
                                 f"choose from params, {', '.join(presets)}")
    return (None if preset == "params" else preset), dict(parse(x) for x in sets)


def main(
    presets: str = typer.Option("grpo,preemptive,dash,dash-nokl,multi,mini,sft",
                                help="comma-separated arms: PRESET or PRESET:key=value:... (its own overrides)"),
    iterations: int = typer.Option(3, "--iterations", "-n"),
    tiny: bool = typer.Option(False, help="the tiny configuration (seconds per arm)"),
    gpu: bool = typer.Option(False, help="the GPU configuration (Qwen2.5-0.5B, GSM8K/MATH; see _common.gpu_overrides)"),
    seeds: str = typer.Option("0", help="comma-separated run.seed values: every arm runs once per seed"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="extra override key=value for every arm"),
    root: Path = typer.Option(Path("data/bench/arms"), help="where the arms' runs live"),
    keep: bool = typer.Option(False, help="keep --root afterwards (checkpoints: GBs)"),
    out: Path = typer.Option(Path("bench/results/arms.json"), help="JSON with the table's numbers"),
    merge_: list[Path] | None = typer.Option(
        None, "--merge", help="run nothing: one table over the seeds of earlier invocations' --out JSON files "
                              "(repeat it; times left out: compare them within one invocation)"),
):
    if merge_:
        rows, said = merge(merge_)
        for line in said:
            typer.echo(line)
        seeds_of = "; ".join(f"{r['arm']}: {r['seeds']}" for r in rows)
        return _report(f"{len(rows)} arms merged from {len(merge_)} invocations; mean (min..max) over seeds "
                       f"({seeds_of}); times left out (see each invocation's table)",
                       rows, out, {"merged": [str(f) for f in merge_], "said": said})
    from dashflow.core.config import PRESETS, _parse_override
    from dashflow.flows.dash_rl import dash_rl

    arms = [a.strip() for a in presets.split(",") if a.strip()]
    specs = {a: arm_spec(a, PRESETS, _parse_override) for a in arms}
    seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    base = dict(TINY) if tiny else gpu_overrides() if gpu else {}
    base.update({"retention.policies": 1, "retention.optimizers": 1, "retention.dvc": "drop"})
    base.update(dict(_parse_override(s) for s in set_ or []))
    started = time.perf_counter()
    name = lambda arm, seed: f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', arm)}-seed{seed}"
    try:
        for i in range(iterations):  # interleaved: iteration i of every run, then i + 1
            for seed in seed_list:
                for arm in arms:
                    preset, own = specs[arm]
                    overrides = dict(base, **own, **{"run.root": str(root), "run.name": name(arm, seed),
                                                     "run.seed": seed})
                    typer.echo(f"== {arm} seed {seed}: iteration {i}")
                    # the whole schedule (the base and the last policy evaluated), run up to iteration i
                    dash_rl(params_path=str(ROOT / "params.yaml"), overrides=overrides, iterations=iterations,
                            preset=preset, until=i)
        rows = [_row(arm, {seed: root / name(arm, seed) for seed in seed_list}, iterations) for arm in arms]
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    _report(f"{len(arms)} arms x {len(seed_list)} seeds x {iterations} iterations in "
            f"{time.perf_counter() - started:.0f} s ({'tiny' if tiny else 'default'} config"
            f"{', ' + ', '.join(set_) if set_ else ''}; {machine()}); mean (min..max) over seeds {seed_list}",
            rows, out, {"iterations": iterations, "seeds": seed_list, "tiny": tiny, "overrides": base,
                        "machine": machine()})


def _report(title: str, rows: list[dict], out: Path, payload: dict) -> None:
    """Print the title and the arms' table; write the rows with `payload` as JSON to `out`."""
    typer.echo(f"\n{title}\n")
    typer.echo(table(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**payload, "arms": rows}, indent=2, default=str))
    typer.echo(f"\nwrote {out}")


if __name__ == "__main__":
    typer.run(main)
