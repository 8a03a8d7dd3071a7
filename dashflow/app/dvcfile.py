"""dvc.yaml, written from the stages' own declarations (`dashflow dvc-yaml`).

Each stage module declares the parameters its cache key hashes and the modules it runs
(tasks/*.py `STAGE`, dashflow/core/stage.py); dvc.yaml's `params` and code `deps` are those,
so `dvc status` / `dvc repro` go stale exactly when the flow's own cache would rerun a stage.
A test fails when the file on disk is not what this writes.
"""

from __future__ import annotations

from pathlib import Path

from dashflow.core.stage import Stage
from dashflow.tasks import advantage, evaluate, learn, prepare, reference, reward, sample
from dashflow.tasks import filter as filter_stage

HEADER = """\
# DVC's view of a dashflow run: the same stages the Prefect flow runs, with the same
# commands, one stage per iteration built with `foreach` from params.yaml's `schedule`
# (the one source of truth for the iteration count). The flow commits each stage it
# finishes to dvc.lock (dashflow/ops/versioning.py), so after a flow run `dvc status` is clean;
# `dvc repro` runs the same chain without Prefect:
#   prepare -> sample@0 -> reward@0 -> advantage@0 -> filter@0 -> reference@0 -> learn@0
#           -> metrics@0, sample@1 -> ...;   evaluate@base, evaluate@3, ... beside the chain.
# Stage outputs are written atomically by dashflow and never edited in place, so they are
# `persist: true` (DVC does not delete a good output before its stage reruns) and the cache
# links instead of copying (.dvc/config: cache.type), so checkpoints are stored once.
#
# WRITTEN BY `dashflow dvc-yaml` from each stage's declaration (tasks/*.py STAGE: the
# parameters its cache key hashes and the modules it runs); edit those, not this file.
"""

RUN = "${run.root}/${run.name}"


def _flow(items: list[str], indent: int) -> str:
    """A YAML flow list wrapped at ~110 columns, continuation lines under the first item."""
    lines, line = [], "["
    for k, item in enumerate(items):
        piece = item + (", " if k < len(items) - 1 else "]")
        if len(line) + len(piece) > 110 - indent and line != "[":
            lines.append(line.rstrip())
            line = " "
        line += piece
    lines.append(line)
    return ("\n" + " " * indent).join(lines)


def _quoted(path: str) -> str:
    return f'"{path}"' if "$" in path else path


def _stage(name: str, specs: list[Stage], root: Path, *, cmd: str, data: list[str], outs: list[str],
           foreach: str | None = None, metrics: list[str] = (), comment: str = "") -> list[str]:
    code = list(dict.fromkeys(p for s in specs for p in s.code_paths(root)))
    params = list(dict.fromkeys(k for s in specs for k in s.params))
    pad = "      " if foreach else "    "
    lines = [f"  {name}:" + (f"  # {comment}" if comment else "")]
    if foreach:
        lines += [f"    foreach: {foreach}", "    do:"]
    deps = code + [_quoted(d) for d in data]
    lines.append(f"{pad}cmd: {cmd}")
    lines.append(f"{pad}deps: " + _flow(deps, len(pad) + 7))
    if params:
        lines.append(f"{pad}params: " + _flow(params, len(pad) + 9))
    lines.append(f"{pad}outs:")
    lines += [f"{pad}  - {out}: {{persist: true}}" for out in outs]
    if metrics:
        lines.append(f"{pad}metrics:")
        lines += [f"{pad}  - {m}: {{persist: true}}" for m in metrics]
    return lines + [""]


def dynamic_sampling(root: Path) -> bool:
    """Whether `root`'s params.yaml turns DAPO's dynamic sampling on (sample.dynamic_rounds > 0)."""
    import yaml

    path = Path(root) / "params.yaml"
    tree = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return bool(((tree.get("sample") or {}).get("dynamic_rounds")) or 0)


def render(root: Path) -> str:
    """dvc.yaml for the project at `root`. With dynamic sampling on in its params.yaml the
    sample stage also depends on the reward's parameters and code (the rewards decide how
    many rounds run), as its cache key does."""
    it = f"{RUN}/${{item.dir}}"
    lines = [HEADER, "stages:"]
    sample_specs = [sample.STAGE, reward.STAGE] if dynamic_sampling(root) else [sample.STAGE]
    lines += _stage("prepare", [prepare.POLICY, prepare.PROMPTS], root, cmd="dashflow stage prepare", data=[],
                    outs=[f"{RUN}/base/prompts", f"{RUN}/base/policy"])
    chain = [
        ("sample", sample_specs, [f"{RUN}/base/prompts", f"{RUN}/${{item.policy}}"], ["rollouts"], ""),
        ("reward", [reward.STAGE], [f"{it}/rollouts"], ["rewarded"], ""),
        ("advantage", [advantage.STAGE], [f"{it}/rewarded"], ["advantaged"], ""),
        ("filter", [filter_stage.STAGE], [f"{it}/advantaged"], ["kept"], ""),
        ("reference", [reference.STAGE], [f"{it}/kept", f"{RUN}/base/policy"], ["reference"],
         "empty output when learn.kl_coef is 0"),
        ("learn", [learn.STAGE], [f"{RUN}/${{item.policy}}", f"{it}/kept", f"{it}/reference", f"{RUN}/base/prompts"],
         ["policy"], "iter-i/optimizer (AdamW's state) is a local cache, not versioned"),
    ]
    for name, specs, data, outs, comment in chain:
        lines += _stage(name, specs, root, cmd=f"dashflow stage {name} -i ${{item.i}}", data=data,
                        outs=[f"{it}/{o}" for o in outs], foreach="${schedule.iterations}", comment=comment)
    metrics_deps = [f"{it}/{d}" for d in ("rollouts", "rewarded", "advantaged", "kept", "policy")]
    lines += [
        "  metrics:",
        "    foreach: ${schedule.iterations}",
        "    do:",
        "      cmd: dashflow metrics -i ${item.i}",
        "      deps: " + _flow(["dashflow/ops/metrics.py"] + [_quoted(d) for d in metrics_deps], 13),
        "      metrics:",
        f"        - {it}/metrics.json: {{persist: true}}",
        "",
    ]
    lines += _stage("evaluate", [evaluate.STAGE], root, cmd="dashflow stage evaluate -i ${item.i}",
                    data=[f"{RUN}/base/prompts", f"{it}/policy"], outs=[f"{it}/eval"],
                    foreach="${schedule.evaluate}", metrics=[f"{it}/eval.json"])
    lines += [
        "plots:",
        "  - reward:",
        "      template: linear",
        "      x: iteration",
        "      y:",
        f"        {RUN}/history.json: [reward_mean, strict_accuracy, flexible_accuracy, kept_fraction]",
        "  - held-out accuracy:",
        "      template: linear",
        "      x: iteration",
        "      y:",
        f"        {RUN}/eval_history.json: [greedy_strict, greedy_flexible]",
    ]
    return "\n".join(lines) + "\n"
