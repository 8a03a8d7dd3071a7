"""The schedule and the stages of a run.

`schedule:` in params.yaml is the one source of truth for how many iterations a run has
and which policies are evaluated; the flow and dvc.yaml (`foreach`) both read it. This
module writes it (`make_schedule`, `render_schedule`, `write_schedule`), checks a hand
edit (`check_schedule`), and names the stages in execution order (`STAGES`, stage
references such as `filter@2` for `--from-stage` and `dashflow stage`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import yaml

from dashflow.core.params_file import ParamsError

STAGES = ("prepare", "sample", "reward", "advantage", "filter", "reference", "learn", "evaluate")


def iteration_dir(i: int) -> str:
    return "base" if i < 0 else f"iter-{i:04d}"


def make_schedule(iterations: int, every: int = 0, keep: Iterable[int] = ()) -> dict:
    """The `schedule` section for `iterations` iterations. Evaluated: the base policy, every
    `every`-th iteration, the last, and the iterations in `keep` that still exist."""
    if iterations < 1:
        raise ParamsError(f"a run needs at least 1 iteration, not {iterations}")
    items = [{"i": i, "dir": iteration_dir(i), "policy": f"{iteration_dir(i - 1)}/policy"} for i in range(iterations)]
    due = {-1, iterations - 1} | {i for i in keep if -1 <= i < iterations}
    if every > 0:
        due |= {i for i in range(iterations) if (i + 1) % every == 0}
    evaluate = {("base" if i < 0 else str(i)): {"i": i, "dir": iteration_dir(i)} for i in sorted(due)}
    return {"iterations": items, "evaluate": evaluate}


def check_schedule(tree: dict, source: str = "params.yaml") -> None:
    """Every schedule item must be the one `make_schedule` writes: dvc.yaml builds its stage
    paths from these strings, so a hand edit that disagrees would split DVC from the flow."""
    fix = "rewrite it with `dashflow schedule N --every K`"
    sched = tree.get("schedule")
    if not isinstance(sched, Mapping) or not isinstance(sched.get("iterations"), list) or not sched["iterations"]:
        raise ParamsError(f"{source}: `schedule.iterations` must list the run's iterations; {fix}")
    n = len(sched["iterations"])
    expected = make_schedule(n)["iterations"]
    for k, (item, want) in enumerate(zip(sched["iterations"], expected)):
        if item != want:
            raise ParamsError(f"{source}: schedule.iterations[{k}] is {item}, expected {want}; {fix}")
    for name, item in (sched.get("evaluate") or {}).items():
        i = item.get("i") if isinstance(item, Mapping) else None
        want_name = "base" if i == -1 else str(i)
        if not isinstance(i, int) or not -1 <= i < n or str(name) != want_name or item != {"i": i, "dir": iteration_dir(i)}:
            raise ParamsError(f"{source}: schedule.evaluate.{name} is {item}; entries look like "
                              f"'3': {{i: 3, dir: iter-0003}} for an iteration below {n}; {fix}")


def parse_stage_ref(ref: str) -> tuple[str, int | None]:
    """`filter@2` -> ("filter", 2); `prepare` -> ("prepare", None); `evaluate@base` -> ("evaluate", -1)."""
    if ref == "prepare":
        return "prepare", None
    stage, sep, it = ref.partition("@")
    it = "-1" if it == "base" else it
    if not sep or not it.lstrip("-").isdigit() or stage not in STAGES:
        raise ParamsError(f"stage reference {ref!r} must look like STAGE@ITERATION with STAGE in {STAGES}")
    return stage, int(it)


def stage_sequence(iterations: int) -> list[tuple[str, int | None]]:
    """Every stage of a run in execution order (reference and evaluate listed even where
    they do not run; forcing a stage that does not run does nothing)."""
    seq: list[tuple[str, int | None]] = [("prepare", None), ("evaluate", -1)]
    for i in range(iterations):
        seq += [(s, i) for s in STAGES if s != "prepare"]
    return seq


def stages_from(ref: str, iterations: int) -> set[tuple[str, int | None]]:
    """`from_stage`: the named stage and every stage after it (`reward@2` -> reward@2,
    advantage@2, ..., learn@2, evaluate@2, sample@3, ...)."""
    start = parse_stage_ref(ref)
    seq = stage_sequence(iterations)
    if start not in seq:
        raise ParamsError(f"from_stage {ref!r} is not a stage of this run ({iterations} iterations)")
    return set(seq[seq.index(start):])


SCHEDULE_HEADER = """\
# The schedule: the one source of truth for how many iterations a run has. The flow runs
# exactly these iterations and dvc.yaml makes its stages from them (`foreach`), so the two
# never disagree. Iteration i samples with `policy` (the policy written by iteration i-1).
# `evaluate` lists the policies evaluated on the held-out prompts (stage evaluate@NAME).
# Rewrite this section with `dashflow schedule N --every K`; `dvc repro` then runs only
# the new stages. `--iterations N` / `--set run.iterations=N` change it for one run.
"""


def render_schedule(schedule: dict) -> str:
    lines = [SCHEDULE_HEADER.rstrip("\n"), "schedule:", "  iterations:"]
    lines += [f"    - {{i: {it['i']}, dir: {it['dir']}, policy: {it['policy']}}}" for it in schedule["iterations"]]
    lines.append("  evaluate:")
    lines += [f"    {name if name == 'base' else repr(str(name))}: {{i: {e['i']}, dir: {e['dir']}}}"
              for name, e in schedule["evaluate"].items()]
    return "\n".join(lines) + "\n"


def write_schedule(path: str | Path, schedule: dict) -> None:
    """Replace the `schedule:` section of a params file (and its comment header), keeping
    every other line and comment as it is; append it where the file has none."""
    path = Path(path)
    lines = path.read_text().splitlines(keepends=True)
    start = next((k for k, line in enumerate(lines) if line.startswith("schedule:")), None)
    if start is None:
        text = "".join(lines).rstrip("\n") + "\n\n" + render_schedule(schedule)
    else:
        end = next((k for k in range(start + 1, len(lines)) if lines[k].strip() and not lines[k][0].isspace()
                    and not lines[k].startswith("#")), len(lines))
        header = start
        while header > 0 and lines[header - 1].startswith("#"):
            header -= 1
        text = "".join(lines[:header]) + render_schedule(schedule) + "\n" + "".join(lines[end:]).lstrip("\n")
    tree = yaml.safe_load(text)
    check_schedule(tree, str(path))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    tmp.replace(path)
