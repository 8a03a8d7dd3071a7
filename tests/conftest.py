"""Shared fixtures: the tiny configuration (real model, few prompts, few tokens) and one
Prefect test server for the whole session (starting one costs seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dashflow.core.config import Params, overlay

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

# The tiny configuration (params/tiny.yaml): every stage runs on the real SmolLM2 model, in seconds.
# TINY is its dotted overrides, applied on top of params.yaml.
TINY = overlay(ROOT / "params" / "tiny.yaml")


def tiny_params(root: Path, name: str = "tiny", **extra) -> Params:
    overrides = dict(TINY, **{"run.root": str(root), "run.name": name})
    overrides.update(extra)
    return Params.load(ROOT / "params.yaml", overrides)


def fork_run(src_params: Params, params: Params, iteration_stages=("sample", "reward", "advantage", "filter")) -> None:
    """Give `params`' run the prepared base and iteration 0's outputs of another run (hard links)."""
    from dashflow.core import store

    for name in ("policy", "prompts"):
        for f in (src_params.layout.base / name).iterdir():
            store.link_or_copy(f, params.layout.base / name / f.name)
    for s in iteration_stages:
        for f in src_params.layout.stage_dir(s, 0).iterdir():
            store.link_or_copy(f, params.layout.stage_dir(s, 0) / f.name)


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server (SQLite, loopback) for the session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), read from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
