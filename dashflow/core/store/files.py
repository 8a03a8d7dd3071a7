"""Small file helpers under everything else in the store: the hidden staging name a file or
an output directory is written under before its rename, fsyncs that make writes and renames
durable, an atomic `write_json`, and `link_or_copy`."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any


def staging(path: Path, unique: bool = False) -> Path:
    """The hidden sibling where a file or an output directory is written before it is
    renamed into place (readers see the old one or the new one, never half). Output
    directories have one fixed name (their writers hold the run lock, and a stale one is
    removed before a rebuild); files get a name of their own per writer (`unique`), so two
    attempts of one Ray job can never write into each other's partial file."""
    if unique:
        return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    return path.parent / f".{path.name}.tmp"


def fsync_parent(path: Path) -> None:
    """Make a rename in `path`'s directory durable (the directory entry itself)."""
    fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Flush every file under `directory` to disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    """Write a small JSON file atomically (readers see the old or the new file, never half)."""
    path = Path(path)
    tmp = staging(path, unique=True)
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_parent(path)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a (read-only by convention) file; copy where links are not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
