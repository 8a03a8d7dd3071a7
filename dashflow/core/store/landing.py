"""Landing a stage's output: `run_stage`, `land_side`, and the run lock.

`run_stage` skips a stage whose manifest key matches and whose files all hold the bytes the
manifest records; otherwise it builds the output in a temporary sibling directory and
renames it into place only when complete, so a crash (Ctrl-C, kill -9) never leaves a
half-written stage that looks finished, and a failed rerun never replaces a good output.
An input whose files do not hold their recorded bytes stops the stage that reads it.

A stage may write a second output directory beside its main one (`side`: the learner's
optimizer state), with its own manifest under the same key.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from dashflow.core.store.digests import (
    content_problem,
    hash_files,
    json_digest,
    outputs_verify,
    stage_key,
    stat_key,
    verified_record,
)
from dashflow.core.store.faults import fault_point
from dashflow.core.store.files import fsync_dir, fsync_parent, staging, write_json
from dashflow.core.store.hashed import digest_written
from dashflow.core.store.manifest import (
    MANIFEST,
    Manifest,
    StageError,
    pruned_record,
    read_manifest,
    remove_output,
    require_output,
)

SIDE_DIGEST = "xxh128"  # side outputs (the optimizer state) are not versioned by DVC


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def run_stage(
    stage: str,
    iteration: int | None,
    out_dir: Path,
    *,
    inputs: dict[str, Path],
    params: dict,
    code: str,
    build: Callable[[Path], dict],
    force: bool = False,
    extra_inputs: dict[str, str] | None = None,
    side: dict[str, Path] | None = None,
) -> Manifest:
    """Run `build(tmp_dir)` unless `out_dir` already holds this exact stage result.

    inputs: name -> upstream stage directory (its manifest digest enters the key).
    extra_inputs: name -> a digest of something that is not a stage output (e.g. a source file).
    build: writes the output files into tmp_dir and returns {"stats": {...}, "timing": {...}}.
    side: name -> a second output directory; build writes its files into tmp_dir/<name>/,
    and it lands (with its own manifest, same key) just before the main output. A side
    output is a cache for the next stage: one that is gone altogether leaves the stage done,
    and a build may leave it unwritten (land_side writes it later).
    """
    out_dir = Path(out_dir)
    side = {name: Path(path) for name, path in (side or {}).items()}
    label = stage if iteration is None or iteration < 0 else f"{stage}@{iteration}"
    manifests = {name: require_output(path, needed_by=label) for name, path in inputs.items()}
    for name, m in manifests.items():
        problem = content_problem(inputs[name], m)
        if problem:
            raise StageError(f"{label}: input {inputs[name]} is not what its manifest says: {problem}; "
                             f"rerun the stage that wrote it (`dashflow run` does, or `dashflow stage ... --force`)")
    input_digests = {name: m.digest for name, m in manifests.items()}
    input_digests.update(extra_inputs or {})
    key = stage_key(stage, iteration, input_digests, params, code)

    def done(directory: Path) -> Manifest | None:
        found = read_manifest(directory)
        return found if found is not None and found.key == key and outputs_verify(directory, found) else None

    def side_done(path: Path) -> bool:
        # a side output that is gone altogether (a local cache removed, or never there: a
        # `dvc pull` elsewhere) does not undo the stage; one that is there must be this result
        return done(path) is not None or (read_manifest(path) is None and not path.exists())

    existing = done(out_dir)
    if existing is not None and not force and all(side_done(path) for path in side.values()):
        for path in (out_dir, *side.values()):  # what a writer killed after its swap left (we hold the lock)
            _remove(staging(path))
            _remove(path.parent / f".{path.name}.old")
        existing.cached = True
        return existing
    for name, m in manifests.items():
        if m.pruned and "deleted for good" in m.pruned:
            raise StageError(
                f"{label}: input {inputs[name]} was removed by the retention setting ({m.pruned}); it cannot be "
                f"restored: rebuild it (`dashflow run --from-stage` the stage that wrote it), or keep more "
                "checkpoints (params.yaml `retention:`)")
        if m.pruned:
            raise StageError(
                f"{label}: input {inputs[name]} was removed by the retention setting ({m.pruned}); restore it "
                f"with `dvc pull {inputs[name]}` (or `dvc checkout` while the DVC cache holds it), "
                "or keep more checkpoints (params.yaml `retention:`)")

    with disk_errors(out_dir, label):
        return _build_and_land(stage, iteration, out_dir, label, key, params, input_digests, build, side)


def _build_and_land(stage: str, iteration: int | None, out_dir: Path, label: str, key: str, params: dict,
                    input_digests: dict, build: Callable[[Path], dict], side: dict[str, Path]) -> Manifest:
    """run_stage's second half: build into a staging directory, seal, swap into place."""
    tmp = staging(out_dir)
    for path in (tmp, *map(staging, side.values())):
        _remove(path)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    try:
        result = build(tmp) or {}
        landing, unwritten = {}, []
        for name, path in side.items():
            staged = staging(path)
            if not (tmp / name).is_dir():
                unwritten.append(path)  # a cache the build kept in memory (land_side writes it later)
                continue
            os.replace(tmp / name, staged)
            landing[path] = staged
    except BaseException:
        for path in (tmp, *map(staging, side.values())):
            _remove(path)  # nothing half-written survives; the previous output (if any) is untouched
        raise
    fault_point("after-shards", label)
    timing = dict(result.get("timing", {}))
    timing["total_s"] = time.perf_counter() - started
    fields = dict(stage=stage, iteration=iteration, key=key, params=params, inputs=input_digests,
                  created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    *sides, main = _landing_contents([(staged, SIDE_DIGEST) for staged in landing.values()] + [(tmp, "md5")])
    landed = {path: Manifest(**fields, **contents) for path, contents in zip(landing, sides)}
    manifest = Manifest(**fields, **main, timing=timing, stats=result.get("stats", {}))
    for path, staged in landing.items():
        _seal(staged, landed[path])
    _seal(tmp, manifest)
    # Swap into place: each finished output is either the old one or the new one, never a
    # mix; the main output (whose manifest says the stage is done) lands last.
    for path, staged in landing.items():
        _swap(staged, path)
        _remember(path, landed[path])
    for path in unwritten:  # what is there belongs to an earlier result
        if path.exists() or pruned_record(path).exists():
            remove_output(path)
            pruned_record(path).unlink(missing_ok=True)
    _swap(tmp, out_dir, label)
    _remember(out_dir, manifest)
    return manifest


@contextmanager
def disk_errors(where: Path, label: str):
    """Operating-system errors a user fixes on the machine, not in the code -- no space, a
    read-only file system, no permission -- as one StageError naming the path and what to do.
    Whatever the stage had staged is removed by then: nothing half-written looks finished."""
    try:
        yield
    except OSError as exc:
        where = Path(where)
        # the path the failing call wrote: a copy names its source first and its target second
        named = Path(exc.filename2 or exc.filename) if exc.filename2 or exc.filename else None
        # a path of the run's (the output or beside it), or one the stage uses elsewhere (a cache, /tmp)
        in_run = named is None or named.is_relative_to(where.parent)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            existing = next(p for p in (where, *where.parents) if p.exists())  # `df` needs a path that is there
            also = "" if in_run else f" (or on the one holding {named}, which the failing call named)"
            why = (f"no space left on the device holding {where}{also} (`df -h {existing}`): free space -- older "
                   "checkpoints (params.yaml `retention:`, `dashflow prune`), scratch runs -- and run the same "
                   "command again; finished stages are kept")
        elif exc.errno == errno.EROFS:
            why = (f"{named or where} is on a read-only file system: point run.root at a writable directory "
                   "(--set run.root=DIR)" if in_run else
                   f"{named} is on a read-only file system (outside the run directory: the stage needs to write it)")
        elif exc.errno in (errno.EACCES, errno.EPERM) and named is not None:  # a file's, not a process's
            why = (f"no permission to write {named}: run as the directory's owner, or point run.root at a directory "
                   "you can write (--set run.root=DIR)" if in_run else
                   f"no permission to write {named} (outside the run directory: the stage needs to write it)")
        else:
            raise
        raise StageError(f"{label}: {why}") from exc


def land_side(path: Path, main: Manifest, write: Callable[[Path], None]) -> Manifest:
    """Land a side output of a finished stage after the fact (`write(tmp_dir)` writes its
    files), under the main output's key, atomically as run_stage lands one."""
    path = Path(path)
    staged = staging(path)
    _remove(staged)
    staged.mkdir(parents=True)
    try:
        write(staged)
    except BaseException:
        _remove(staged)
        raise
    manifest = Manifest(stage=main.stage, iteration=main.iteration, key=main.key, params=main.params,
                        inputs=main.inputs, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        **_landing_contents([(staged, SIDE_DIGEST)])[0])
    _seal(staged, manifest)
    _swap(staged, path)
    _remember(path, manifest)
    return manifest


def _remember(directory: Path, manifest: Manifest) -> None:
    """Record the stats of files just hashed (the swap keeps inodes and mtimes)."""
    write_json(verified_record(directory),
               {name: stat_key((Path(directory) / name).stat()) for name in manifest.outputs})


def _describe_outputs(directory: Path, algo: str) -> dict[str, dict]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {p: d for p in files if (d := digest_written(p, algo)) is not None}
    digests.update(hash_files([p for p in files if p not in digests], algo))
    outputs = {}
    for path in files:
        info = {algo: digests[path], "bytes": path.stat().st_size}
        if path.suffix == ".parquet":
            info["rows"] = pq.ParquetFile(path).metadata.num_rows
        outputs[path.relative_to(directory).as_posix()] = info
    return outputs


def _drop_leftovers(directory: Path) -> None:
    for leftover in [p for p in directory.rglob(".*") if p.is_file()]:
        leftover.unlink()  # partial files of an attempt that died (see write_shard)


def _contents(directory: Path, algo: str = "md5") -> dict:
    _drop_leftovers(directory)
    outputs = _describe_outputs(directory, algo)
    return {"outputs": outputs, "digest": json_digest({n: o[algo] for n, o in outputs.items()})}


def _landing_contents(directories: list[tuple[Path, str]]) -> list[dict]:
    """_contents of each (directory, digest algorithm) about to land, while one thread flushes
    all their files to disk (fsync waits on the disk, not the CPU), so _seal's fsync finds
    them clean."""
    for directory, _ in directories:
        _drop_leftovers(directory)  # before the flusher lists the files
    with ThreadPoolExecutor(max_workers=1) as flusher:
        flushed = flusher.submit(lambda: [fsync_dir(directory) for directory, _ in directories])
        contents = [_contents(directory, algo) for directory, algo in directories]
        flushed.result()
    return contents


def directory_digest(directory: Path) -> str:
    """The digest a manifest of these files would record (what downstream keys see)."""
    return _contents(directory)["digest"]


def _seal(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST).write_text(manifest.to_json())
    fsync_dir(directory)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a file system or kernel without it: the two-rename fallback
    raise OSError(err, f"renameat2({a}, {b}): {os.strerror(err)}")


def _swap(staged: Path, out_dir: Path, label: str = "") -> None:
    """Put a finished output in place. Where an old one exists the two are exchanged in one
    atomic step, so a kill at any moment leaves the old output or the new one, never
    neither; the old one, now at the staging name, is removed after."""
    if out_dir.exists() and _exchange(staged, out_dir):
        fault_point("mid-swap", label)
        _remove(staged)
    else:
        old = out_dir.parent / f".{out_dir.name}.old"
        _remove(old)
        if out_dir.exists():
            os.replace(out_dir, old)
            fault_point("mid-swap", label)
        os.replace(staged, out_dir)
        _remove(old)
    fsync_parent(out_dir)
    record = pruned_record(out_dir)
    if record.exists():
        record.unlink()  # the output is back: its record is stale


@contextmanager
def run_lock(root: Path):
    """Hold an exclusive lock on a run directory (released even on kill -9: it is an flock).
    A run's outputs are written under it (so an output's staging directory can have one
    fixed name: files.staging)."""
    root = Path(root)
    lock = FileLock(root / ".lock")
    try:
        with disk_errors(root, "dashflow"):
            root.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=0)
    except Timeout as exc:
        raise StageError(f"another dashflow run is using {root}; wait for it to finish or stop it") from exc
    try:
        yield
    finally:
        lock.release()
