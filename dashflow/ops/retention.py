"""Retention: which old checkpoints and optimizer states stay on disk (params.yaml `retention:`).

Each iteration's learner writes two outputs: iter-i/policy (the weights, in
model.checkpoint_dtype; versioned by DVC) and iter-i/optimizer (AdamW's state and, with
bfloat16 checkpoints, the float32 master weights' low bits: 2.5x the policy's size, read
only by the next learn; a local cache DVC does not version). With `retention.policies: N`
only the last N policies stay, plus every evaluated one and the base; with
`retention.optimizers: M` (default 1) only the last M optimizer states. The next iteration
needs the last of each, so N and M are at least 1.

A removed output leaves a pruned record `<dir>.pruned.json` (its manifest and why), so the
stage still counts as finished: a resumed run skips it and downstream keys do not change.
A stage that has to read a removed output (a forced rerun) stops and says how to restore it
(an optimizer state: replay the learner from the last one kept, tasks/learn.py `replay_state`).

Removed policies, in a DVC-recorded run: dvc.lock keeps the output's hashes; the files also
leave the local DVC cache (with hard links that is what frees the disk), except objects
another kept output still uses. `retention.dvc: remote` pushes the output to the default
DVC remote first, so `dvc pull PATH` restores it byte for byte; `drop` deletes it for good.
Either way `dvc status` lists the removed outputs as deleted, and `dvc repro
--allow-missing` (or `dvc exp run --allow-missing`) treats their stages as up to date.
Optimizer states are simply deleted (DVC never had them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from dashflow.core import store
from dashflow.core.config import Params, ParamsError

SETTING = {"policy": "policies", "optimizer": "optimizers"}


@dataclass(frozen=True)
class Retention:
    policies: int | None      # None = keep all
    optimizers: int | None
    dvc: str                  # remote | drop

    @classmethod
    def from_params(cls, params: Params) -> Retention:
        section = params.tree.get("retention") or {}
        mode = str(section.get("dvc", "remote"))
        if mode not in ("remote", "drop"):
            raise ParamsError(f"retention.dvc must be remote or drop, not {mode!r}")
        return cls(_count(section, "policies"), _count(section, "optimizers", 1), mode)

    @property
    def active(self) -> bool:
        return self.policies is not None or self.optimizers is not None


# how a pruned record says its files are gone for good (run_stage's message reads it)
DELETED = "deleted for good"
LOCAL = "a local cache, not versioned by DVC"


def check(params: Params, recorder) -> Retention:
    """The run's retention setting, checked before any work: with `dvc: remote` in a
    DVC-recorded run the repository must have a default remote to push removed outputs to."""
    rule = Retention.from_params(params)
    if rule.policies is not None and rule.dvc == "remote":  # optimizer states never go through DVC
        if not recorder.enabled:
            raise ParamsError(
                f"retention.dvc is `remote`, but this run is not recorded in DVC ({recorder.reason}): the "
                "checkpoints retention removes could not be restored with `dvc pull`. Set retention.dvc: drop "
                "to delete them for good, or run it recorded in DVC (its params.yaml as it is, in a DVC repository)")
        recorder.check_remote()
    return rule


def _count(section: dict, key: str, default: int | str = "all") -> int | None:
    value = section.get(key, default)
    if value in ("all", None):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParamsError(f"retention.{key} must be `all` or a whole number >= 1 (the next iteration "
                          f"reads the last one), not {value!r}")
    return value


def to_prune(done: int, evaluated: Iterable[int], policies: int | None, optimizers: int | None,
             written: Iterable[int] | None = None) -> list[tuple[str, int]]:
    """(kind, iteration) of every output to remove once iterations 0..done have learned:
    policies older than the last `policies` that are not evaluated; optimizer states older
    than the last `optimizers` of those written (`written`: the iterations whose state is on
    disk; all of 0..done when None -- a flow writes one every learn.state_every). The base
    policy (iteration -1) is never removed."""
    out = []
    if policies is not None:
        keep = set(range(done - policies + 1, done + 1)) | set(evaluated)
        out += [("policy", i) for i in range(done + 1) if i not in keep]
    if optimizers is not None:
        states = sorted(range(done + 1) if written is None else {i for i in written if i <= done})
        out += [("optimizer", i) for i in states[:max(len(states) - optimizers, 0)]]
    return out


def output_dir(params: Params, kind: str, i: int) -> Path:
    return params.layout.policy(i) if kind == "policy" else params.layout.optimizer(i)


def apply(params: Params, done: int, recorder=None) -> list[tuple[Path, int]]:
    """Remove what the retention setting no longer keeps after iteration `done`.
    Returns (directory, bytes) of each output removed now (already removed ones are skipped).
    `recorder`: the run's versioning.Recorder; when it records in DVC, the removal keeps
    dvc.lock and the DVC cache consistent (see the module docstring)."""
    rule = Retention.from_params(params)
    if not rule.active:
        return []
    evaluated = [i for i in range(done + 1) if params.evaluated(i)]
    doomed = []
    for i in range(done + 1):  # what a kill interrupted: finish removing it
        for directory in (params.layout.policy(i), params.layout.optimizer(i)):
            if directory.exists() and store.pruned_record(directory).exists() and \
                    not (directory / store.MANIFEST).exists():
                store.remove_output(directory)
    written = [i for i in range(done + 1) if (m := store.read_manifest(params.layout.optimizer(i))) and not m.pruned]
    for kind, i in to_prune(done, evaluated, rule.policies, rule.optimizers, written):
        directory = output_dir(params, kind, i)
        manifest = store.read_manifest(directory)
        if manifest is None or manifest.pruned:
            continue  # never finished, or already removed
        doomed.append((directory, f"retention.{SETTING[kind]}: {getattr(rule, SETTING[kind])}, "
                                  f"removed after iteration {done}"))
    if not doomed:
        return []
    recorded = recorder is not None and recorder.enabled
    optimizers = {params.layout.optimizer(i) for i in range(done + 1)}
    fate = {d: (f"{LOCAL}; {DELETED}" if d in optimizers else
                "pushed to the DVC remote" if recorded and rule.dvc == "remote" else DELETED) for d, _ in doomed}
    doomed = [(d, f"{why}; {fate[d]}") for d, why in doomed]
    sizes = [sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d, _ in doomed]
    for directory, why in doomed:
        # the record lands before anything is removed: after a crash in between the output's
        # own manifest wins, and the next prune removes it again
        store.write_pruned_record(directory, why)
    versioned = [d for d, _ in doomed if d not in optimizers]
    if recorded and versioned:
        recorder.flush()  # the removed outputs must be in dvc.lock first
        recorder.evict(versioned, push=rule.dvc == "remote")
    for directory, _ in doomed:
        if directory in optimizers or not recorded:
            store.remove_output(directory)
    return [(d, n) for (d, _), n in zip(doomed, sizes)]


def describe(removed: list[tuple[Path, int]], root: Path, rule: Retention, recorder) -> str:
    pushed = recorder.enabled and rule.dvc == "remote"
    where = " (in the DVC remote: `dvc pull PATH` restores)" if pushed else ""
    names = ", ".join(str(d.relative_to(root)) for d, _ in removed)
    return f"retention: removed {names}, {sum(n for _, n in removed) / 1e9:.2f} GB{where}"
