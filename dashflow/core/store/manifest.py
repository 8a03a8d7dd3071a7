"""The manifest of a stage output, and the records that stand in for one.

A stage output is a directory of files (Parquet shards `part-00000.parquet`, ... or a
checkpoint) plus `_manifest.json`, the single source of truth for "is this stage done?".
The manifest holds the stage key -- a hash of the inputs' content digests, the stage's
parameter slice and the code version -- and every output file's digest, size and rows.

An output removed by the retention setting (dashflow/ops/retention.py) leaves a pruned
record `<dir>.pruned.json` (its manifest, plus why): the stage still counts as finished and
its digest still feeds the keys downstream, but a stage that must read the files stops with
how to restore them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dashflow.core.store.faults import fault_point
from dashflow.core.store.files import fsync_dir, fsync_parent, write_json

MANIFEST = "_manifest.json"


class StageError(RuntimeError):
    """A stage cannot run or failed; the message names the stage and the offending path."""


@dataclass
class Manifest:
    stage: str
    iteration: int | None
    key: str
    outputs: dict[str, dict]            # file name -> {"md5" | "xxh128", "bytes", "rows"?}
    digest: str                          # hash of the outputs' content hashes: what downstream keys see
    timing: dict[str, float] = field(default_factory=dict)   # seconds: work_s, total_s, ...
    stats: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)     # input name -> digest
    created: str = ""
    pruned: str = ""                     # why the files were removed (only in a pruned record)
    cached: bool = False                 # set when this call skipped the stage (not persisted)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("cached")
        if not data["pruned"]:
            data.pop("pruned")
        return json.dumps(data, indent=2, sort_keys=True, default=float)


def pruned_record(directory: Path) -> Path:
    directory = Path(directory)
    return directory.parent / f"{directory.name}.pruned.json"


def write_pruned_record(directory: Path, why: str) -> None:
    """Record that a finished output's files are being removed (retention): its manifest and why."""
    manifest = require_output(directory, needed_by="retention")
    manifest.pruned = why
    write_json(pruned_record(directory), json.loads(manifest.to_json()))


def remove_output(directory: Path) -> None:
    """Delete a finished output for good: its manifest first (durably), then the rest, so a
    kill midway leaves files that no longer read as a finished output (the pruned record
    beside them speaks for it) -- never a manifest over missing weights."""
    directory = Path(directory)
    if not directory.exists():  # already gone (retention pruned it: only its record is left)
        return
    (directory / MANIFEST).unlink(missing_ok=True)
    fsync_dir(directory)
    fault_point("mid-retention", f"{directory.parent.name}/{directory.name}")
    shutil.rmtree(directory)
    fsync_parent(directory)


def read_manifest(directory: Path) -> Manifest | None:
    """The output's manifest; for an output the retention setting removed, its pruned record."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        path = pruned_record(directory)
        if not path.exists():
            return None
    try:
        data = json.loads(path.read_text())
        return Manifest(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise StageError(f"{path}: unreadable manifest ({exc}); delete {directory} to rebuild it") from exc


def require_output(directory: Path, *, needed_by: str) -> Manifest:
    """The manifest of a finished stage output, or a clear error naming what to run first."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise StageError(
            f"{needed_by}: input {directory} is not a finished stage output (no {MANIFEST}); "
            "run the stage that produces it first (e.g. `dashflow run`)"
        )
    return manifest
