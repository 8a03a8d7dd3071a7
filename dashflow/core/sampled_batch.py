"""kept/sampled.json: the record of the sampled batch's prompt groups, in order, that
filter@i writes beside its kept rows and learn@i reads (the loss normaliser counts the
batch as sampled, not as kept; tasks/filter.py's docstring has the details)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from dashflow.core import store

SAMPLED = "sampled.json"


def sampled_groups(table: pa.Table) -> list[dict[str, Any]]:
    """Each prompt group of an (unfiltered) shard in order: {prompt_id, rows, completion_tokens}."""
    groups: dict[str, dict[str, Any]] = {}
    for pid, tokens in zip(table.column("prompt_id").to_pylist(), table.column("completion_token_ids").to_pylist()):
        g = groups.setdefault(pid, {"prompt_id": pid, "rows": 0, "completion_tokens": 0})
        g["rows"] += 1
        g["completion_tokens"] += len(tokens)
    return list(groups.values())


def write_sampled(directory: Path, groups: list[dict[str, Any]]) -> None:
    """kept/sampled.json: the sampled batch's groups, in order (see the module docstring)."""
    data = {"sequences": sum(g["rows"] for g in groups), "groups": groups}
    (Path(directory) / SAMPLED).write_text(json.dumps(data, indent=1))


def read_sampled(kept_dir: Path, *, needed_by: str) -> list[dict[str, Any]]:
    """The sampled batch's groups recorded by filter@i (see the module docstring)."""
    path = Path(kept_dir) / SAMPLED
    if not path.is_file():
        raise store.StageError(f"{needed_by}: {path} is missing: the filter output predates the sampled-batch "
                               f"record; rerun it (`dashflow stage filter@N --force`)")
    return json.loads(path.read_text())["groups"]
