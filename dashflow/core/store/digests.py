"""Digests: of files, of JSON (stage keys) and of code; and checking that an output's files
still hold the bytes its manifest records.

Outputs DVC versions are hashed with md5, DVC's own hash: the flow hands each digest to
DVC's state database (dashflow/ops/versioning.py), so `dvc commit` reads no byte again. The
learner's optimizer state (a `side` output DVC does not version) is hashed with XXH3-128
(xxhash; ~10x md5's speed here), enough to catch damage, which is what a digest is for there.

Checking content must not rehash gigabytes of checkpoints on every resume: beside each
output, `.<dir>.verified.json` records (size, mtime_ns, inode) of every file as last
hashed. A file whose stat matches its record is trusted; any other file is rehashed
and compared with the manifest -- so damage written in place, which changes the
mtime, is caught, while an untouched run resumes with a stat per file. `DASHFLOW_VERIFY=1`
(`dashflow run --verify`) rehashes every file regardless.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import xxhash

from dashflow import __version__
from dashflow.core.store.files import write_json
from dashflow.core.store.manifest import Manifest, StageError, read_manifest

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


def json_digest(obj: Any) -> str:
    """sha256 of an object's canonical JSON (a key made of settings and content digests)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_digest(*modules: ModuleType) -> str:
    """Code version of a stage: the package version and the source of the modules it runs."""
    return json_digest([__version__] + [inspect.getsource(m) for m in modules])


def stage_key(stage: str, iteration: int | None, inputs: dict[str, str], params: dict, code: str) -> str:
    return json_digest({"stage": stage, "iteration": iteration, "inputs": inputs, "params": params, "code": code})


def verified_record(directory: Path) -> Path:
    """`.<dir>.verified.json` beside an output: the stat of each of its files as last hashed."""
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
    record_path = verified_record(directory)
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
        record = json.loads(verified_record(directory).read_text())
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
