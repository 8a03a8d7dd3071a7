"""Fault injection for the fault-matrix tests: `fault_point` kills this process with SIGKILL
at a named point of a named stage when DASHFLOW_FAULT asks for it."""

from __future__ import annotations

import os
from pathlib import Path

FAULT_ENV = "DASHFLOW_FAULT"


def fault_point(point: str, label: str, *, once_in: Path | None = None) -> None:
    """Fault injection for the fault-matrix tests: with DASHFLOW_FAULT=POINT@LABEL (e.g.
    mid-swap@filter@0) this process kills itself with SIGKILL when it reaches that point of
    that stage. Points: mid-shard (a shard's partial file written, not renamed), after-shards
    (the build finished, nothing sealed), mid-swap (the new output exchanged into place, the
    old one not yet removed), mid-checkpoint (learn: weights written, optimizer state not),
    mid-state (a flow's held optimizer state written, not landed: dashflow/core/optimizer_state.py `HeldState.flush`),
    mid-retention (an output's manifest removed, its files not; the label is
    `iter-0000/optimizer`), mid-dvc-commit (dashflow/ops/versioning.py: an iteration's md5s
    handed to DVC, dvc.lock not yet written; the label is any stage in that commit),
    worker-shard (a sampling worker about to write shard K; the label is `sample@0:K`).
    With `once_in` the kill happens once per that directory (a marker file remembers it), so
    the retried worker gets through. Does nothing when the variable is unset."""
    if os.environ.get(FAULT_ENV) != f"{point}@{label}":
        return
    if once_in is not None:
        marker = Path(once_in) / f".fault-{point}-{label.replace('@', '-').replace(':', '-')}"
        if marker.exists():
            return
        marker.touch()
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
