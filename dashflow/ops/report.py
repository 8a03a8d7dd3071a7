"""`dashflow report`: one PNG (and an HTML page embedding it) that shows a run at a glance.

Panels: reward of the rollouts and eval accuracy (greedy and mean@n, strict solid and flexible
dashed; the base model at iteration -1) per iteration; mean completion length; kept fraction after gradient
filtering; a stacked bar of each iteration's time split (sampling / reward / learner /
overhead), like DASH's timing figure. The data behind the plot is returned and written
beside it as report.json.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from dashflow.core import store


class ReportError(ValueError):
    pass


def collect(run_dir: Path) -> dict:
    """Per-iteration series from iter-*/metrics.json and the eval manifests."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("iter-*/metrics.json"))
    if not files:
        raise ReportError(f"{run_dir}: no iter-*/metrics.json (is this a run directory? run `dashflow run` first)")
    metrics = [json.loads(f.read_text()) for f in files]
    data = {
        "iteration": [m["iteration"] for m in metrics],
        "reward_mean": [m["reward_mean"] for m in metrics],
        "kept_fraction": [m["kept_fraction"] for m in metrics],
        "mean_completion_tokens": [m["mean_completion_tokens"] for m in metrics],
        "time": {k: [m["time"][k] for m in metrics] for k in ("sampling", "reward", "learner", "overhead")},
        "strict_accuracy": [m.get("strict_accuracy") for m in metrics],
        "flexible_accuracy": [m.get("flexible_accuracy") for m in metrics],
        "eval": {"iteration": []},
    }
    evals = [(-1, run_dir / "base" / "eval")] + [(m["iteration"], f.parent / "eval") for m, f in zip(metrics, files)]
    for it, path in evals:
        manifest = store.read_manifest(path) if path.exists() else None
        if manifest is not None:
            data["eval"]["iteration"].append(it)
            mean = next((k.rsplit("_", 1)[0] for k in manifest.stats if k.startswith("mean@")), "mean@n")
            for metric, key in (("greedy", "greedy"), ("mean@n", mean)):
                for ex in ("strict", "flexible"):
                    data["eval"].setdefault(f"{metric}_{ex}", []).append(manifest.stats.get(f"{key}_{ex}"))
    return data


def plot(data: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = data["iteration"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=100)
    ax = axes[0][0]
    ax.plot(its, data["reward_mean"], marker="o", label="rollout reward")
    ev = data["eval"]
    # strict (the paper's checker) solid, flexible dashed, in the same colour per metric
    for key, style, color in (("greedy_strict", "s-", "tab:red"), ("greedy_flexible", "s--", "tab:red"),
                              ("mean@n_strict", "^-", "tab:green"), ("mean@n_flexible", "^--", "tab:green")):
        pts = [(i, v) for i, v in zip(ev["iteration"], ev.get(key, [])) if v is not None]
        if pts:
            ax.plot(*zip(*pts), style, color=color, label=f"eval {key.replace('_', ' ')}")
    ax.set(title="Reward and eval accuracy", xlabel="iteration (-1 = base model)", ylim=(0, 1))
    ax.legend(fontsize=8)
    axes[0][1].plot(its, data["mean_completion_tokens"], marker="o", color="tab:purple")
    axes[0][1].set(title="Mean completion length", xlabel="iteration", ylabel="tokens")
    axes[1][0].plot(its, data["kept_fraction"], marker="o", color="tab:green")
    axes[1][0].set(title="Kept fraction after gradient filtering", xlabel="iteration", ylim=(0, 1.05))
    ax = axes[1][1]
    bottom = [0.0] * len(its)
    for key, color in (("sampling", "tab:blue"), ("reward", "tab:orange"), ("learner", "tab:red"),
                       ("overhead", "tab:gray")):
        ax.bar(its, data["time"][key], bottom=bottom, label=key, color=color)
        bottom = [b + v for b, v in zip(bottom, data["time"][key])]
    ax.set(title="Time per iteration", xlabel="iteration", ylabel="seconds", ylim=(0, 1.3 * max(bottom + [1e-9])))
    ax.legend(fontsize=8, ncol=4, loc="upper left")  # headroom above the bars keeps them visible
    fig.tight_layout()
    fig.savefig(path)
    return fig


def write_report(run_dir: Path, out_dir: Path | None = None) -> dict:
    """Write report.png, report.html and report.json into out_dir (default: the run directory)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = collect(run_dir)
    png = out_dir / "report.png"
    fig = plot(data, png)
    import matplotlib.pyplot as plt

    plt.close(fig)
    (out_dir / "report.json").write_text(json.dumps(data, indent=2))
    encoded = base64.b64encode(png.read_bytes()).decode()
    (out_dir / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>dashflow run {run_dir.name}</title></head>"
        f"<body><h1>dashflow run <code>{run_dir}</code></h1>"
        f"<img alt='reward, accuracy, length, kept fraction and time per iteration' "
        f"src='data:image/png;base64,{encoded}'></body></html>\n"
    )
    return {"png": str(png), "html": str(out_dir / "report.html"), "data": data}
