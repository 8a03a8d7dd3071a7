"""Stage outputs on disk: manifests, content-addressed stage keys, atomic writes, Parquet IO.

Everything is importable from here (`store.run_stage`, `from dashflow.core.store import
Manifest`); each concern lives in its own module:

    manifest  the manifest (`_manifest.json`), StageError, pruned records, remove_output
    digests   file / JSON / code digests, stage keys, the verified-stat record that lets
              an untouched file be trusted, content_problem, hash_files
    hashed    HashedFile / write_hashed: large files hashed as they are written (O_DIRECT)
    faults    fault_point: the kill points of the fault-matrix tests
    landing   run_stage / land_side: build in a staging directory, swap into place, fsync;
              the run lock
    shards    Parquet shards: write, check, read what the manifest vouches for
    files     staging names, fsync, write_json, link_or_copy
"""

from dashflow.core.store.digests import (
                                         DIGESTS,
                                         code_digest,
                                         content_problem,
                                         file_digest,
                                         file_sha256,
                                         hash_files,
                                         json_digest,
                                         outputs_verify,
                                         recorded_digest,
                                         stage_key,
                                         stat_key,
                                         trusted_digests,
)
from dashflow.core.store.faults import FAULT_ENV, fault_point
from dashflow.core.store.files import link_or_copy, write_json
from dashflow.core.store.hashed import HashedFile, write_hashed
from dashflow.core.store.landing import SIDE_DIGEST, directory_digest, disk_errors, land_side, run_lock, run_stage
from dashflow.core.store.manifest import (
                                         MANIFEST,
                                         Manifest,
                                         StageError,
                                         pruned_record,
                                         read_manifest,
                                         remove_output,
                                         require_output,
                                         write_pruned_record,
)
from dashflow.core.store.shards import (
                                         check_shards,
                                         map_shards,
                                         read_shard,
                                         read_stage,
                                         shard_name,
                                         shard_paths,
                                         vouched_bytes,
                                         write_shard,
)

__all__ = [
    "DIGESTS", "FAULT_ENV", "MANIFEST", "SIDE_DIGEST", "HashedFile", "Manifest", "StageError",
    "check_shards", "code_digest", "content_problem", "directory_digest", "disk_errors", "fault_point",
    "file_digest", "file_sha256", "hash_files", "json_digest", "land_side", "link_or_copy", "map_shards",
    "outputs_verify", "pruned_record", "read_manifest", "read_shard", "read_stage", "recorded_digest",
    "remove_output", "require_output", "run_lock", "run_stage", "shard_name", "shard_paths", "stage_key",
    "stat_key", "trusted_digests", "vouched_bytes", "write_hashed", "write_json", "write_pruned_record",
    "write_shard",
]
