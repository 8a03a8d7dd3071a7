"""Parquet shards of a stage output: naming (`part-00000.parquet`, ...), writing each shard
whole or not at all, and reading them only as the bytes their manifest vouches for,
validated against the data contract (dashflow/core/schema.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dashflow.core.schema import SchemaError, validate
from dashflow.core.store.digests import DIGESTS, recorded_digest
from dashflow.core.store.faults import fault_point
from dashflow.core.store.files import staging
from dashflow.core.store.manifest import StageError, read_manifest, require_output


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
    partial = staging(path, unique=True)
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
