"""Stage outputs on disk: manifests, content-addressed stage keys, atomic writes, Parquet IO.

A stage output is a directory of files (Parquet shards `part-00000.parquet`, ... or a
checkpoint) plus `_manifest.json`, the single source of truth for "is this stage done?".
The manifest holds the stage key -- a hash of the inputs' content digests, the stage's
parameter slice and the code version -- and every output file's digest, size and rows.

Each file is hashed once: checkpoints as they are written (`HashedFile`, around the page
cache; the landing records that digest instead of reading the file back), everything else
as it lands. Outputs DVC versions are hashed with md5, DVC's own
hash: the flow hands each digest to DVC's state database (dashflow/ops/versioning.py), so
`dvc commit` reads no byte again. The learner's optimizer state (a `side` output DVC does
not version) is hashed with XXH3-128 (xxhash; ~10x md5's speed here), enough to catch
damage, which is what a digest is for there.

`run_stage` skips a stage whose manifest key matches and whose files all hold the bytes the
manifest records; otherwise it builds the output in a temporary sibling directory and
renames it into place only when complete, so a crash (Ctrl-C, kill -9) never leaves a
half-written stage that looks finished, and a failed rerun never replaces a good output.
An input whose files do not hold their recorded bytes stops the stage that reads it.

Checking content must not rehash gigabytes of checkpoints on every resume: beside each
output, `.<dir>.verified.json` records (size, mtime_ns, inode) of every file as last
hashed. A file whose stat matches its record is trusted; any other file is rehashed
and compared with the manifest -- so damage written in place, which changes the
mtime, is caught, while an untouched run resumes with a stat per file. `DASHFLOW_VERIFY=1`
(`dashflow run --verify`) rehashes every file regardless.

A stage may write a second output directory beside its main one (`side`: the learner's
optimizer state), with its own manifest under the same key. An output removed by the
retention setting (dashflow/ops/retention.py) leaves a pruned record `<dir>.pruned.json` (its
manifest, plus why): the stage still counts as finished and its digest still feeds the
keys downstream, but a stage that must read the files stops with how to restore them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import inspect
import json
import mmap
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from filelock import FileLock, Timeout

from dashflow import __version__
from dashflow.core.schema import SchemaError, validate

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
    _fsync_dir(directory)
    fault_point("mid-retention", f"{directory.parent.name}/{directory.name}")
    shutil.rmtree(directory)
    _fsync_parent(directory)


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


# file digests: md5 for what DVC versions (its hash), xxh128 for what only dashflow checks;
# sha256 for pinned downloads and user files (and manifests written before 0.20)
DIGESTS = {"md5": hashlib.md5, "xxh128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def file_digest(path: Path, algo: str = "md5") -> str:
    h = DIGESTS[algo]()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def recorded_digest(info: dict) -> tuple[str, str]:
    """(algorithm, hex digest) a manifest records for one file."""
    for algo in DIGESTS:
        if algo in info:
            return algo, info[algo]
    raise StageError(f"a manifest entry without a digest: {info}")


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 of an object's canonical JSON (a key made of settings and content digests)."""
    return _hash_json(obj)


def code_digest(*modules: ModuleType) -> str:
    """Code version of a stage: the package version and the source of the modules it runs."""
    return _hash_json([__version__] + [inspect.getsource(m) for m in modules])


def stage_key(stage: str, iteration: int | None, inputs: dict[str, str], params: dict, code: str) -> str:
    return _hash_json({"stage": stage, "iteration": iteration, "inputs": inputs, "params": params, "code": code})


def _verified_record(directory: Path) -> Path:
    directory = Path(directory)
    return directory.parent / f".{directory.name}.verified.json"


def stat_key(st: os.stat_result) -> list[int]:
    """What lets an unchanged file be trusted without rehashing: size, mtime_ns, inode."""
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def content_problem(directory: Path, manifest: Manifest) -> str | None:
    """None when every recorded output file holds its recorded bytes; else what is wrong.
    A pruned output (retention) has no files to check. See the module docstring for when
    a file is rehashed."""
    if manifest.pruned:
        return None
    directory = Path(directory)
    record_path = _verified_record(directory)
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    full = os.environ.get("DASHFLOW_VERIFY") == "1"
    fresh, suspect = {}, {}
    for name, info in manifest.outputs.items():
        path = directory / name
        try:
            st = path.stat()
        except OSError:
            return f"{path} is missing"
        if st.st_size != info["bytes"]:
            return f"{path} has {st.st_size} bytes, its manifest says {info['bytes']}"
        fresh[name] = stat_key(st)
        if full or record.get(name) != fresh[name]:
            suspect.setdefault(recorded_digest(info)[0], []).append(path)
    for algo, paths in suspect.items():
        digests = hash_files(paths, algo)
        for path in paths:
            if digests[path] != recorded_digest(manifest.outputs[path.relative_to(directory).as_posix()])[1]:
                return f"{path} does not hold the bytes its manifest records ({algo} differs; modified in place?)"
    if suspect or set(record) != set(fresh):
        try:
            write_json(record_path, fresh)
        except OSError:
            pass  # a read-only copy: verified, just not remembered
    return None


def trusted_digests(directory: Path, algo: str = "md5") -> dict[Path, str]:
    """path -> digest of every file of a finished output whose digest is `algo` and whose
    stat still matches the record taken when it was hashed (the trust rule of
    content_problem): what DVC can be handed instead of hashing the file again."""
    manifest = read_manifest(directory)
    if manifest is None or manifest.pruned:
        return {}
    try:
        record = json.loads(_verified_record(directory).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    found = {}
    for name, info in manifest.outputs.items():
        path = Path(directory) / name
        try:
            trusted = record.get(name) == stat_key(path.stat())
        except OSError:
            continue
        if trusted and algo in info:
            found[path] = info[algo]
    return found


def outputs_verify(directory: Path, manifest: Manifest) -> bool:
    """Every recorded output file is present with its recorded content (see content_problem)."""
    return content_problem(directory, manifest) is None


def hash_files(paths: list[Path], algo: str = "md5") -> dict[Path, str]:
    """Each file's digest, one file per core at a time (hashlib and xxhash release the GIL),
    largest first: a checkpoint written as shards (dashflow/core/policy.py: SHARD_SIZE) is hashed
    in about 1/cores of the time of one file."""
    paths = sorted(paths, key=lambda p: p.stat().st_size, reverse=True)
    if len(paths) < 2 or sum(p.stat().st_size for p in paths) < (8 << 20):
        return {p: file_digest(p, algo) for p in paths}
    with ThreadPoolExecutor(max_workers=min(len(paths), len(os.sched_getaffinity(0)))) as hashers:
        return dict(zip(paths, hashers.map(lambda p: file_digest(p, algo), paths)))


# Large files (checkpoints) are written through `HashedFile`: hashed on their way to the disk
# and written around the page cache. On this VM (a balloon driver that hands freed memory
# back to the host), every fresh page of page cache costs a slow first touch: a 0.54 GB
# buffered write + fsync took 2.9-3.3 s, the same bytes with O_DIRECT 0.7-0.9 s
# (bench/RESULTS.md).
_DIRECT_ALIGN = 4096          # O_DIRECT wants offsets, lengths and addresses in whole blocks
_DIRECT_CHUNK = 16 << 20      # one staging buffer per file being written at once
_staging_free: list[np.ndarray] = []  # buffers allocated once and kept: fresh pages are what is slow
_staging_lock = threading.Lock()
_written: dict[tuple[int, int, int, int], tuple[str, str]] = {}  # stat identity -> (algo, digest)
_written_lock = threading.Lock()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class HashedFile:
    """A new file `path` written around the page cache and digested with `algo` on the way
    (`write` / `close`, or a `with` block; torch.save accepts it as a file object). With
    `direct` (and an OS and file system that allow it) the bytes bypass the page cache
    (O_DIRECT, through a page-aligned staging buffer; the last block padded, then the
    file truncated to its size); otherwise they are written as usual. Not flushed: the
    landing fsyncs it. On close the digest (`.digest`) is remembered with the file's stat,
    so the stage's landing records it without reading the file back (`_describe_outputs`);
    a file touched after that has another mtime and is hashed from disk like any other."""

    def __init__(self, path: Path, algo: str = "md5", direct: bool = True):
        self.path, self.algo, self.digest = Path(path), algo, None
        self._hash = DIGESTS[algo]()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self._direct = getattr(os, "O_DIRECT", 0) if direct else 0
        try:
            self._fd = os.open(self.path, flags | self._direct, 0o644)
        except OSError as e:
            if not self._direct or e.errno != errno.EINVAL:
                raise
            self._fd, self._direct = os.open(self.path, flags, 0o644), 0  # no O_DIRECT here (tmpfs)
        with _staging_lock:  # a kept buffer, else a new one (kept after this file)
            self._buf = _staging_free.pop() if _staging_free else np.frombuffer(mmap.mmap(-1, _DIRECT_CHUNK), np.uint8)
        self._fill = self._size = 0

    def write(self, data: Any) -> int:
        src = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        self._hash.update(src)
        self._size += len(src)
        offset = 0
        while offset < len(src):
            k = min(len(src) - offset, _DIRECT_CHUNK - self._fill)
            self._buf[self._fill:self._fill + k] = src[offset:offset + k]
            self._fill, offset = self._fill + k, offset + k
            if self._fill == _DIRECT_CHUNK:
                self._write(self._buf[:self._fill])
                self._fill = 0
        return len(src)

    def flush(self) -> None:
        """Nothing: bytes reach the file in whole staging buffers, and at close."""

    def _write(self, data: np.ndarray) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except OSError as e:
                if not self._direct or e.errno != errno.EINVAL:
                    raise
                # opened with O_DIRECT but refused at write (some FUSE and overlay file
                # systems): go on with buffered writes from the same offset
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~self._direct)
                self._direct = 0

    def close(self) -> str:
        if self.digest is not None:
            return self.digest
        try:
            end = -(-self._fill // _DIRECT_ALIGN) * _DIRECT_ALIGN if self._direct else self._fill
            if end:
                self._buf[self._fill:end] = 0
                self._write(self._buf[:end])
            if end != self._fill:
                os.ftruncate(self._fd, self._size)  # the last block's padding
            st = os.fstat(self._fd)
        finally:
            self._release()
        self.digest = self._hash.hexdigest()
        with _written_lock:
            _written[_identity(st)] = (self.algo, self.digest)
        return self.digest

    def __enter__(self) -> "HashedFile":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self._release()  # the partial file stays in the staging directory, which is removed

    def _release(self) -> None:
        os.close(self._fd)
        with _staging_lock:
            _staging_free.append(self._buf)


def write_hashed(path: Path, pieces: Iterable[Any], algo: str = "md5", direct: bool = True) -> str:
    """Write the concatenated `pieces` (anything with the buffer protocol) as the new file
    `path` through a HashedFile; returns their digest."""
    with HashedFile(path, algo, direct) as f:
        for piece in pieces:
            f.write(piece)
    return f.digest


def _digest_written(path: Path, algo: str) -> str | None:
    """The digest a HashedFile took of `path` as it wrote it, if the file is untouched since
    (same device, inode, size and mtime); each is used once."""
    with _written_lock:
        found = _written.pop(_identity(path.stat()), None)
    return found[1] if found is not None and found[0] == algo else None


def _describe_outputs(directory: Path, algo: str) -> dict[str, dict]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {p: d for p in files if (d := _digest_written(p, algo)) is not None}
    digests.update(hash_files([p for p in files if p not in digests], algo))
    outputs = {}
    for path in files:
        info = {algo: digests[path], "bytes": path.stat().st_size}
        if path.suffix == ".parquet":
            info["rows"] = pq.ParquetFile(path).metadata.num_rows
        outputs[path.relative_to(directory).as_posix()] = info
    return outputs


FAULT_ENV = "DASHFLOW_FAULT"
SIDE_DIGEST = "xxh128"  # side outputs (the optimizer state) are not versioned by DVC


def fault_point(point: str, label: str, *, once_in: Path | None = None) -> None:
    """Fault injection for the fault-matrix tests: with DASHFLOW_FAULT=POINT@LABEL (e.g.
    mid-swap@filter@0) this process kills itself with SIGKILL when it reaches that point of
    that stage. Points: mid-shard (a shard's partial file written, not renamed), after-shards
    (the build finished, nothing sealed), mid-swap (the new output exchanged into place, the
    old one not yet removed), mid-checkpoint (learn: weights written, optimizer state not),
    mid-state (a flow's held optimizer state written, not landed: tasks/learn.py `flush`),
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
            _remove(_staging(path))
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

    tmp = _staging(out_dir)
    for path in (tmp, *map(_staging, side.values())):
        _remove(path)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    try:
        result = build(tmp) or {}
        landing, unwritten = {}, []
        for name, path in side.items():
            staged = _staging(path)
            if not (tmp / name).is_dir():
                unwritten.append(path)  # a cache the build kept in memory (land_side writes it later)
                continue
            os.replace(tmp / name, staged)
            landing[path] = staged
    except BaseException:
        for path in (tmp, *map(_staging, side.values())):
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


def land_side(path: Path, main: Manifest, write: Callable[[Path], None]) -> Manifest:
    """Land a side output of a finished stage after the fact (`write(tmp_dir)` writes its
    files), under the main output's key, atomically as run_stage lands one."""
    path = Path(path)
    staged = _staging(path)
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
    write_json(_verified_record(directory),
               {name: stat_key((Path(directory) / name).stat()) for name in manifest.outputs})


def _staging(path: Path, unique: bool = False) -> Path:
    """The hidden sibling where a file or an output directory is written before it is
    renamed into place (readers see the old one or the new one, never half). Output
    directories have one fixed name (their writers hold the run lock, and a stale one is
    removed before a rebuild); files get a name of their own per writer (`unique`), so two
    attempts of one Ray job can never write into each other's partial file."""
    if unique:
        return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    return path.parent / f".{path.name}.tmp"


def _drop_leftovers(directory: Path) -> None:
    for leftover in [p for p in directory.rglob(".*") if p.is_file()]:
        leftover.unlink()  # partial files of an attempt that died (see write_shard)


def _contents(directory: Path, algo: str = "md5") -> dict:
    _drop_leftovers(directory)
    outputs = _describe_outputs(directory, algo)
    return {"outputs": outputs, "digest": _hash_json({n: o[algo] for n, o in outputs.items()})}


def _landing_contents(directories: list[tuple[Path, str]]) -> list[dict]:
    """_contents of each (directory, digest algorithm) about to land, while one thread flushes
    all their files to disk (fsync waits on the disk, not the CPU), so _seal's fsync finds
    them clean."""
    for directory, _ in directories:
        _drop_leftovers(directory)  # before the flusher lists the files
    with ThreadPoolExecutor(max_workers=1) as flusher:
        flushed = flusher.submit(lambda: [_fsync_dir(directory) for directory, _ in directories])
        contents = [_contents(directory, algo) for directory, algo in directories]
        flushed.result()
    return contents


def directory_digest(directory: Path) -> str:
    """The digest a manifest of these files would record (what downstream keys see)."""
    return _contents(directory)["digest"]


def _seal(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST).write_text(manifest.to_json())
    _fsync_dir(directory)


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
    _fsync_parent(out_dir)
    record = pruned_record(out_dir)
    if record.exists():
        record.unlink()  # the output is back: its record is stale


def _fsync_parent(path: Path) -> None:
    """Make a rename in `path`'s directory durable (the directory entry itself)."""
    fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


# ---------------------------------------------------------------- Parquet shards


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_paths(directory: Path, *, needed_by: str) -> list[Path]:
    """The Parquet shards of a finished stage output, in order."""
    manifest = require_output(directory, needed_by=needed_by)
    return [Path(directory) / n for n in sorted(manifest.outputs) if n.endswith(".parquet")]


def vouched_bytes(path: Path, *, stage: str) -> bytes:
    """The bytes of a stage output's file, hashed on the way in and checked against what its
    manifest records: a reader never reads bytes its manifest does not vouch for (a file
    changed in place, size and mtime kept, is caught here, not only by `--verify`)."""
    path = Path(path)
    manifest = read_manifest(path.parent)
    info = manifest.outputs.get(path.name) if manifest is not None else None
    if info is None:
        raise StageError(f"{stage}: {path}: not listed in its directory's manifest; a stage reads only the "
                         "files its input's manifest records")
    algo, expected = recorded_digest(info)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StageError(f"{stage}: {path}: cannot be read ({exc})") from exc
    got = DIGESTS[algo](data).hexdigest()
    if got != expected:
        raise StageError(f"{stage}: {path}: its bytes are not those its manifest records ({algo} {got[:12]}, "
                         f"recorded {expected[:12]}): the file changed after its stage wrote it. Rerun the stage "
                         "that wrote it (`dashflow run --rerun STAGE@I`, or `dashflow run --verify`)")
    return data


def read_shard(path: Path, schema: pa.Schema, *, stage: str) -> pa.Table:
    data = vouched_bytes(path, stage=stage)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise StageError(f"{stage}: {path}: not a readable Parquet file ({exc})") from exc
    try:
        return validate(table, schema, stage=stage, path=path)
    except SchemaError as exc:
        raise StageError(str(exc)) from exc


def read_stage(directory: Path, schema: pa.Schema, *, stage: str) -> pa.Table:
    tables = [read_shard(p, schema, stage=stage) for p in shard_paths(directory, needed_by=stage)]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="default")


def write_shard(directory: Path, index: int, table: pa.Table, schema: pa.Schema, *, stage: str) -> Path:
    path = Path(directory) / shard_name(index)
    try:
        table = validate(table, schema, stage=stage, path=path)
    except SchemaError as exc:
        raise StageError(str(exc)) from exc
    partial = _staging(path, unique=True)
    pq.write_table(table, partial)
    fault_point("mid-shard", stage)
    os.replace(partial, path)  # a shard is whole or absent, even when its writer dies mid-write
    return path


def check_shards(directory: Path, expected: dict[int, int], *, stage: str) -> None:
    """Every expected shard (index -> rows) is present with its row count, and nothing else."""
    directory = Path(directory)
    found = {p.name for p in directory.glob("part-*.parquet")}
    for index, rows in expected.items():
        path = directory / shard_name(index)
        if path.name not in found:
            raise StageError(f"{stage}: shard {path.name} was not written (a worker failed past its retries)")
        got = pq.ParquetFile(path).metadata.num_rows
        if got != rows:
            raise StageError(f"{stage}: {path.name} has {got} rows, expected {rows}")
    extra = found - {shard_name(i) for i in expected}
    if extra:
        raise StageError(f"{stage}: unexpected shards {sorted(extra)} in {directory}")


def map_shards(src: Path, dst: Path, transform: Callable[[pa.Table, Path], pa.Table], *,
               reads: pa.Schema, writes: pa.Schema, stage: str) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Shard by shard: read (validated), transform, write under the same shard index.
    Yields (input, output) tables so the stage can gather its stats."""
    for index, path in enumerate(shard_paths(src, needed_by=stage)):
        table = read_shard(path, reads, stage=stage)
        out = transform(table, path)
        write_shard(dst, index, out, writes, stage=stage)
        yield table, out


def write_json(path: Path, obj: Any) -> None:
    """Write a small JSON file atomically (readers see the old or the new file, never half)."""
    path = Path(path)
    tmp = _staging(path, unique=True)
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_parent(path)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a (read-only by convention) file; copy where links are not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextmanager
def run_lock(root: Path):
    """Hold an exclusive lock on a run directory (released even on kill -9: it is an flock)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise StageError(f"another dashflow run is using {root}; wait for it to finish or stop it") from exc
    try:
        yield
    finally:
        lock.release()
