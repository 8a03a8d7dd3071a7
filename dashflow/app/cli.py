"""`dashflow` command line: run the flow, run or force one stage, inspect stage outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from dashflow.core.presets import PRESETS

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

PARAMS = typer.Option("params.yaml", "--params", "-p", help="parameter file")
SET = typer.Option(None, "--set", "-s", help="override a parameter: key=value (repeatable); stage@i.key for one iteration")


def _overrides(items: list[str] | None) -> dict:
    from dashflow.core.config import _parse_override

    return dict(_parse_override(i) for i in items or [])


def _own_processes() -> None:
    """`kill` (SIGTERM) ends the command the way Ctrl-C does, so exit handlers run (Prefect's
    temporary server, a local Ray cluster are stopped); whatever they leave, and everything
    the command started when it is killed with SIGKILL, is stopped by a guard (dashflow/app/reaper.py)."""
    import signal

    from dashflow.app import reaper

    reaper.watch()

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


# Prefect waits 20 s for its temporary server; a first start (a fresh PREFECT_HOME creates and
# migrates its database) takes 10 s on an idle 2-core machine and has passed 20 s under load.
TEMPORARY_SERVER_STARTUP_S = 120


def temporary_server_env(env) -> None:
    """Settings for the temporary local Prefect server `dashflow run` starts when no
    PREFECT_API_URL is set; a value the user set is kept."""
    # its telemetry write races its own start-up ("database is locked")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(TEMPORARY_SERVER_STARTUP_S))


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg="red", err=True)
    raise typer.Exit(1)


@app.command()
def run(
    params: Path = PARAMS,
    set_: list[str] | None = SET,
    rerun: list[str] | None = typer.Option(None, "--rerun", help="force a stage to rerun: STAGE@ITERATION (repeatable)"),
    iterations: int | None = typer.Option(None, "--iterations", "-n", help="number of RL iterations"),
    preset: str | None = typer.Option(None, "--preset", help="a DASH paper arm (docs/presets.md): " + " | ".join(PRESETS)),
    from_stage: str | None = typer.Option(None, "--from-stage", help="force STAGE@ITERATION and every stage after it"),
    verify: bool = typer.Option(False, "--verify", help="rehash every output file against its manifest (default: "
                                                          "only files whose size, mtime or inode changed)"),
    until: int | None = typer.Option(None, "--until", help="stop after iteration I of the schedule (a later run "
                                                               "resumes; what is evaluated stays the schedule's)"),
):
    """Run the DASH flow locally (resumes: finished stages are skipped)."""
    _own_processes()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    if verify:
        os.environ["DASHFLOW_VERIFY"] = "1"
    temporary_server_env(os.environ)
    from dashflow.core.config import ParamsError
    from dashflow.core.store import StageError, run_lock
    from dashflow.flows.dash_rl import dash_rl, prewarm
    from dashflow.ops.versioning import DvcError

    try:  # before Prefect starts: bad parameters, and a run root another run holds, in one line
        from dashflow.core.config import Params

        loaded = Params.load(params, {**_overrides(set_), **({"run.preset": preset} if preset else {})})
        with run_lock(loaded.layout.root):
            pass
    except (ParamsError, StageError) as exc:
        _fail(exc)
    prewarm(str(params), {**_overrides(set_), **({"run.preset": preset} if preset else {})})
    try:
        dash_rl(params_path=str(params), overrides=_overrides(set_), rerun=rerun or [], iterations=iterations,
                preset=preset, from_stage=from_stage, until=until)
    except (ParamsError, StageError, DvcError) as exc:
        _fail(exc)


@app.command()
def serve(
    port: int = typer.Option(4200, help="port of the Prefect server (bound to 127.0.0.1)"),
    pool: str = typer.Option("dashflow-local", help="process work pool the worker serves"),
):
    """Start a local Prefect server and a process worker; Ctrl-C stops both."""
    from dashflow.app.serving import ServeError
    from dashflow.app.serving import serve as _serve

    try:
        raise typer.Exit(_serve(port=port, pool=pool))
    except ServeError as exc:
        _fail(exc)


@app.command()
def deploy(
    api_url: str | None = typer.Option(None, "--api-url", help="Prefect API (default $PREFECT_API_URL or 127.0.0.1:4200)"),
):
    """Register the deployments in prefect.yaml (dash-rl/local, dash-eval/local) with the server."""
    from dashflow.app.serving import ServeError
    from dashflow.app.serving import deploy as _deploy

    try:
        raise typer.Exit(_deploy(Path.cwd(), api_url))
    except ServeError as exc:
        _fail(exc)


@app.command()
def stage(
    name: str = typer.Argument(..., help="prepare | sample | reward | advantage | filter | reference | learn | evaluate"),
    iteration: int = typer.Option(0, "--iteration", "-i", help="iteration (-1 = the base policy, for evaluate)"),
    force: bool = typer.Option(False, "--force", "-f", help="rerun even if the stage's output is up to date"),
    params: Path = PARAMS,
    set_: list[str] | None = SET,
):
    """Run one stage of one iteration (no Prefect), from the outputs already on disk."""
    from dashflow.core.config import Params, ParamsError
    from dashflow.core.schedule import STAGES
    from dashflow.core.store import StageError

    if name not in STAGES:
        _fail(ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}"))
    _own_processes()
    import importlib

    module = importlib.import_module(f"dashflow.tasks.{name}")
    from dashflow.core.store import run_lock

    try:
        p = Params.load(params, _overrides(set_))
        with run_lock(p.layout.root):  # a flow or another stage writing this run: fail clearly, never mix
            manifest = module.run(p, None if name == "prepare" else iteration, force=force)
    except (ParamsError, StageError) as exc:
        _fail(exc)
    state = "cached (up to date)" if manifest.cached else f"ran in {manifest.timing.get('total_s', 0):.1f}s"
    typer.echo(f"{name}@{iteration}: {state}; key {manifest.key[:12]}")
    typer.echo(json.dumps(manifest.stats, indent=2, default=str))


@app.command()
def metrics(
    iteration: int = typer.Option(..., "--iteration", "-i", help="the iteration whose metrics.json to write"),
    params: Path = PARAMS,
    set_: list[str] | None = SET,
):
    """Write iter-i/metrics.json and the run's history.json from the stage outputs (DVC's metrics@i)."""
    from dashflow.core.config import Params, ParamsError
    from dashflow.core.store import StageError, run_lock
    from dashflow.ops import metrics as metrics_mod

    try:
        p = Params.load(params, _overrides(set_))
        with run_lock(p.layout.root):
            row = metrics_mod.write_metrics(p, iteration)
    except (ParamsError, StageError) as exc:
        _fail(exc)
    typer.echo(json.dumps(row, indent=2, default=str))


@app.command()
def schedule(
    iterations: int = typer.Argument(..., help="number of RL iterations"),
    every: int = typer.Option(0, "--every", "-e", help="also evaluate every K-th iteration (the base and the last always)"),
    params: Path = PARAMS,
):
    """Rewrite params.yaml's `schedule` (the iteration list the flow and dvc.yaml share)."""
    from dashflow.core.config import ParamsError
    from dashflow.core.schedule import make_schedule, write_schedule

    try:
        new = make_schedule(iterations, every=every)
        write_schedule(params, new)
    except ParamsError as exc:
        _fail(exc)
    evaluated = ", ".join(new["evaluate"])
    typer.echo(f"{params}: {iterations} iterations; evaluated: {evaluated}")


@app.command()
def prune(
    params: Path = PARAMS,
    set_: list[str] | None = SET,
):
    """Apply params.yaml's `retention:` to a run's finished iterations now (the flow does it
    after each iteration): remove old policies / optimizer states, keeping DVC consistent."""
    from dashflow.core import store
    from dashflow.core.config import Params, ParamsError
    from dashflow.ops import retention
    from dashflow.ops.versioning import DvcError, Recorder

    try:
        overrides = _overrides(set_)
        p = Params.load(params, overrides)
        done = [i for i in range(p.iterations) if store.read_manifest(p.layout.policy(i)) is not None]
        if not done:
            raise ParamsError(f"{p.layout.root}: no finished iteration to prune")
        recorder = Recorder(p, params, overrides)
        keep = retention.check(p, recorder)
        with store.run_lock(p.layout.root):
            removed = retention.apply(p, done[-1], recorder)
    except (ParamsError, DvcError, store.StageError) as exc:
        _fail(exc)
    if not keep.active:
        typer.echo("retention keeps everything (retention.policies and retention.optimizers are `all`)")
    else:
        typer.echo(retention.describe(removed, p.layout.root, keep, recorder) if removed
                   else "retention: nothing to remove")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="a stage output directory or a Parquet file"),
    where: str | None = typer.Option(None, "--where", "-w", help='row filter, e.g. "reward < 0.5 and finish_reason == \'stop\'"'),
    prompt_id: str | None = typer.Option(None, "--prompt-id", help="only this prompt's rows"),
    limit: int = typer.Option(3, "--limit", "-l", help="example completions to show (best, worst, random)"),
    rev: str | None = typer.Option(None, "--rev", help="read the output as of this git revision, through DVC"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    full_prompt: bool = typer.Option(False, "--full-prompt", help="show each example's whole rendered prompt "
                                     "(chat template, system message, demonstration turns)"),
):
    """Summarise any stage output: rows, groups, reward, accuracy, lengths, errors, examples."""
    from dashflow.app.inspecting import InspectError, render, summarize

    try:
        summary = summarize(path, rev=rev, where=where, prompt_id=prompt_id, limit=limit)
    except InspectError as exc:
        _fail(exc)
    typer.echo(json.dumps(summary, indent=2, default=str) if as_json else render(summary, full_prompt=full_prompt))


def _stage_path(ref: str, run_dir: Path, stage: str) -> Path:
    """`3` / `base` / a path -> the stage output directory to compare."""
    if Path(ref).exists():
        return Path(ref)
    from dashflow.core.layout import RunLayout

    layout = RunLayout(run_dir)
    i = -1 if ref == "base" else int(ref)
    return layout.eval(i) if stage == "eval" else layout.stage_dir(stage, i)


@app.command()
def diff(
    a: str = typer.Argument(..., help="iteration number, `base`, or a stage output path"),
    b: str = typer.Argument(..., help="iteration number, `base`, or a stage output path"),
    run_dir: Path = typer.Option(Path("data/runs/default"), "--run-dir", help="the run directory"),
    stage: str = typer.Option("eval", "--stage", help="eval (same held-out prompts) or a stage: reward, filter, ..."),
    mode: str = typer.Option("greedy", "--mode", help="eval mode to compare: greedy | sampled"),
    limit: int = typer.Option(10, "--limit", "-l", help="changed prompts to list"),
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
):
    """For the prompts two outputs share: how rewards, lengths and answers changed."""
    from dashflow.app.inspecting import InspectError, render_diff
    from dashflow.app.inspecting import diff as diff_outputs

    try:
        result = diff_outputs(_stage_path(a, run_dir, stage), _stage_path(b, run_dir, stage), mode=mode, limit=limit)
    except (InspectError, ValueError) as exc:
        _fail(exc)
    typer.echo(json.dumps(result, indent=2, default=str) if as_json else render_diff(result))


@app.command()
def report(
    run_dir: Path = typer.Option(Path("data/runs/default"), "--run-dir", help="the run directory"),
    out: Path | None = typer.Option(None, "--out", help="where to write (default: the run directory)"),
):
    """Write report.png / report.html: reward, accuracy, length, kept fraction and time per iteration."""
    from dashflow.ops.report import ReportError, write_report

    try:
        result = write_report(run_dir, out)
    except ReportError as exc:
        _fail(exc)
    typer.echo(f"report: {result['png']}\n        {result['html']}")


@app.command("dvc-yaml")
def dvc_yaml(
    check: bool = typer.Option(False, "--check", help="exit 1 if dvc.yaml is not what the stages declare; write nothing"),
    path: Path = typer.Option(Path("dvc.yaml"), "--path", help="the file to write or check"),
):
    """Write dvc.yaml from the stages' declarations (tasks/*.py STAGE: the parameters each
    stage's cache key hashes and the modules it runs)."""
    from dashflow.app.dvcfile import render

    text = render(Path(__file__).resolve().parents[2])
    if check:
        if not path.is_file() or path.read_text() != text:
            _fail(f"{path} is not what the stages declare; run `dashflow dvc-yaml` to rewrite it")
        typer.echo(f"{path}: up to date")
        return
    path.write_text(text)
    typer.echo(f"wrote {path}")


@app.command("params")
def params_cmd(
    write: bool = typer.Option(False, "--write", help="rewrite params.yaml's comments from the declarations (values kept)"),
    docs: Path | None = typer.Option(None, "--docs", help="write the parameter reference (docs/parameters.md) here"),
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="the parameter file"),
):
    """Check a parameter file against the declarations (dashflow/core/parameters.py): every key
    known and allowed; --write renders its comments, --docs the reference page."""
    from dashflow.core import parameters
    from dashflow.core.config import Params, ParamsError, load_yaml
    from dashflow.core.schedule import render_schedule

    try:
        loaded = Params.load(params_path)
    except ParamsError as exc:
        _fail(exc)
    if write:
        tree = load_yaml(params_path.read_text())
        params_path.write_text(parameters.render_yaml(tree, render_schedule(tree["schedule"])))
        typer.echo(f"wrote {params_path}")
    if docs is not None:
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(parameters.markdown())
        typer.echo(f"wrote {docs}")
    if not write and docs is None:
        typer.echo(f"{params_path}: {len(parameters.PARAMS)} parameters, all known and allowed "
                   f"({loaded.iterations} iterations scheduled)")


@app.command()
def layers(
    root: Path = typer.Option(Path("."), "--root", help="the project directory"),
):
    """Print dashflow's layers (top first) and check the import rule: no import back up, no
    circle, no stage importing a stage. Exits 1, listing each offending import, when broken."""
    from dashflow.app.layers import table, violations

    for layer, folder, count, lines, what in table(root):
        typer.echo(f"{layer:<6} {folder:<15} {count:>2} modules {lines:>5} lines  {what}")
    problems = violations(root)
    if problems:
        _fail("the import rule is broken:\n  " + "\n  ".join(problems))
    typer.echo("import rule: ok (each layer imports only the layers below it; no stage imports a stage; no circle)")


if __name__ == "__main__":
    app()
