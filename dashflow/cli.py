"""`dashflow` command line: run the flow, run or force one stage, inspect stage outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

PARAMS = typer.Option("params.yaml", "--params", "-p", help="parameter file")
SET = typer.Option(None, "--set", "-s", help="override a parameter: key=value (repeatable); stage@i.key for one iteration")


def _overrides(items: Optional[List[str]]) -> dict:
    from dashflow.config import _parse_override

    return dict(_parse_override(i) for i in items or [])


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg="red", err=True)
    raise typer.Exit(1)


@app.command()
def run(
    params: Path = PARAMS,
    set_: Optional[List[str]] = SET,
    rerun: Optional[List[str]] = typer.Option(None, "--rerun", help="force a stage to rerun: STAGE@ITERATION (repeatable)"),
    iterations: Optional[int] = typer.Option(None, "--iterations", "-n", help="number of RL iterations"),
):
    """Run the DASH flow locally (resumes: finished stages are skipped)."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # the temporary local server's telemetry write races its own start-up ("database is locked")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from dashflow.config import ParamsError
    from flows.dash_rl import dash_rl
    from tasks.store import StageError

    try:
        dash_rl(params_path=str(params), overrides=_overrides(set_), rerun=rerun or [], iterations=iterations)
    except (ParamsError, StageError) as exc:
        _fail(exc)


@app.command()
def stage(
    name: str = typer.Argument(..., help="prepare | sample | reward | advantage | filter | learn | evaluate"),
    iteration: int = typer.Option(0, "--iteration", "-i", help="iteration (-1 = the base policy, for evaluate)"),
    force: bool = typer.Option(False, "--force", "-f", help="rerun even if the stage's output is up to date"),
    params: Path = PARAMS,
    set_: Optional[List[str]] = SET,
):
    """Run one stage of one iteration (no Prefect), from the outputs already on disk."""
    from dashflow.config import STAGES, Params, ParamsError
    from tasks.store import StageError

    if name not in STAGES:
        _fail(ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}"))
    import importlib

    module = importlib.import_module(f"tasks.{name}")
    try:
        p = Params.load(params, _overrides(set_))
        manifest = module.run(p, None if name == "prepare" else iteration, force=force)
    except (ParamsError, StageError) as exc:
        _fail(exc)
    state = "cached (up to date)" if manifest.cached else "ran"
    typer.echo(f"{name}@{iteration}: {state} in {manifest.timing.get('total_s', 0):.1f}s; key {manifest.key[:12]}")
    typer.echo(json.dumps(manifest.stats, indent=2, default=str))


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="a stage output directory or a Parquet file"),
    limit: int = typer.Option(3, "--limit", "-l", help="completions to show"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
):
    """Summarise a stage output: rows, groups, reward/accuracy, lengths, a few completions."""
    from dashflow.inspecting import InspectError, render, summarize

    try:
        summary = summarize(path, limit=limit)
    except InspectError as exc:
        _fail(exc)
    typer.echo(json.dumps(summary, indent=2, default=str) if as_json else render(summary))


if __name__ == "__main__":
    app()
