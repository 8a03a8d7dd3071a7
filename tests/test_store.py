"""Manifests, stage keys and atomic writes."""

import json

import pyarrow as pa
import pytest

from dashflow.core import schema, store


def _build_rows(n, calls):
    def build(tmp):
        calls.append(n)
        table = pa.table({"prompt_id": [str(i) for i in range(n)], "prompt": ["q"] * n, "answer": ["1"] * n,
                          "solution": [None] * n, "source": ["t"] * n})
        store.write_shard(tmp, 0, table, schema.PROMPTS, stage="t")
        return {"stats": {"rows": n}, "timing": {"work_s": 0.0}}
    return build


def test_skip_when_key_matches_and_rerun_when_params_change(tmp_path):
    calls = []
    out = tmp_path / "stage"
    m1 = store.run_stage("t", 0, out, inputs={}, params={"a": 1}, code="c", build=_build_rows(3, calls))
    m2 = store.run_stage("t", 0, out, inputs={}, params={"a": 1}, code="c", build=_build_rows(3, calls))
    assert calls == [3] and m2.cached and m2.digest == m1.digest
    m3 = store.run_stage("t", 0, out, inputs={}, params={"a": 2}, code="c", build=_build_rows(5, calls))
    assert calls == [3, 5] and not m3.cached
    assert m3.outputs["part-00000.parquet"]["rows"] == 5
    store.run_stage("t", 0, out, inputs={}, params={"a": 2}, code="c2", build=_build_rows(5, calls))
    assert calls == [3, 5, 5]  # code version is part of the key


def test_force_reruns_and_identical_output_keeps_the_digest(tmp_path):
    calls = []
    out = tmp_path / "stage"
    m1 = store.run_stage("t", 0, out, inputs={}, params={}, code="c", build=_build_rows(3, calls))
    m2 = store.run_stage("t", 0, out, inputs={}, params={}, code="c", build=_build_rows(3, calls), force=True)
    assert calls == [3, 3] and not m2.cached and m2.digest == m1.digest


def test_missing_output_file_triggers_rebuild(tmp_path):
    calls = []
    out = tmp_path / "stage"
    store.run_stage("t", 0, out, inputs={}, params={}, code="c", build=_build_rows(3, calls))
    (out / "part-00000.parquet").unlink()
    store.run_stage("t", 0, out, inputs={}, params={}, code="c", build=_build_rows(3, calls))
    assert calls == [3, 3] and (out / "part-00000.parquet").exists()


def test_failed_build_leaves_previous_output_untouched(tmp_path):
    calls = []
    out = tmp_path / "stage"
    good = store.run_stage("t", 0, out, inputs={}, params={}, code="c", build=_build_rows(3, calls))

    def crash(tmp):
        (tmp / "part-00000.parquet").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.run_stage("t", 0, out, inputs={}, params={"x": 1}, code="c", build=crash)
    assert json.loads((out / store.MANIFEST).read_text())["digest"] == good.digest
    assert store.file_digest(out / "part-00000.parquet") == good.outputs["part-00000.parquet"]["md5"]
    assert not (tmp_path / ".stage.tmp").exists()


def test_downstream_key_follows_upstream_content(tmp_path):
    calls, down = [], []
    up = tmp_path / "up"
    store.run_stage("up", 0, up, inputs={}, params={"n": 3}, code="c", build=_build_rows(3, calls))
    store.run_stage("down", 0, tmp_path / "down", inputs={"up": up}, params={}, code="c", build=_build_rows(1, down))
    store.run_stage("down", 0, tmp_path / "down", inputs={"up": up}, params={}, code="c", build=_build_rows(1, down))
    assert down == [1]
    store.run_stage("up", 0, up, inputs={}, params={"n": 4}, code="c", build=_build_rows(4, calls))
    store.run_stage("down", 0, tmp_path / "down", inputs={"up": up}, params={}, code="c", build=_build_rows(1, down))
    assert down == [1, 1]


def test_unfinished_input_is_a_clear_error(tmp_path):
    (tmp_path / "up").mkdir()
    with pytest.raises(store.StageError, match=r"down@0: input .*up is not a finished stage output"):
        store.run_stage("down", 0, tmp_path / "down", inputs={"up": tmp_path / "up"}, params={}, code="c",
                        build=_build_rows(1, []))


def test_schema_violation_names_stage_file_and_column(tmp_path):
    table = pa.table({"prompt_id": ["a"]})
    with pytest.raises(store.StageError, match=r"t: .*part-00000.parquet: missing column 'prompt'"):
        store.write_shard(tmp_path, 0, table, schema.PROMPTS, stage="t")


def test_bytes_that_are_not_parquet_are_named(tmp_path):
    """A file with a .parquet name that is not Parquet: not listed by any manifest, it is
    never read (the stage that wrote it would not have landed it: the landing reads its
    footer)."""
    path = tmp_path / "part-00000.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(store.StageError, match=r"part-00000.parquet: not listed in its directory's manifest"):
        store.read_shard(path, schema.PROMPTS, stage="reward@0")


def test_run_lock_is_exclusive(tmp_path):
    with store.run_lock(tmp_path):
        with pytest.raises(store.StageError, match="another dashflow run is using"):
            with store.run_lock(tmp_path):
                pass
    with store.run_lock(tmp_path):  # released
        pass


def _damage_in_place(path, offset=100):
    """Overwrite bytes of a file in place: same size, different content."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(8)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def test_same_size_damage_to_an_output_is_not_cached(tmp_path):
    calls = []
    out = tmp_path / "stage"
    first = store.run_stage("t", 0, out, inputs={}, params={}, code="c", build=_build_rows(3, calls))
    good = (out / "part-00000.parquet").read_bytes()
    _damage_in_place(out / "part-00000.parquet")
    assert (out / "part-00000.parquet").stat().st_size == len(good)
    again = store.run_stage("t", 0, out, inputs={}, params={}, code="c", build=_build_rows(3, calls))
    assert calls == [3, 3] and not again.cached and again.digest == first.digest
    assert (out / "part-00000.parquet").read_bytes() == good


def test_damaged_or_missing_input_stops_the_reader_naming_the_file(tmp_path):
    calls = []
    up, down = tmp_path / "up", tmp_path / "down"
    store.run_stage("up", 0, up, inputs={}, params={}, code="c", build=_build_rows(3, calls))
    _damage_in_place(up / "part-00000.parquet")
    with pytest.raises(store.StageError, match=r"down@0: input .*up is not what its manifest says: .*part-00000.parquet "
                                               r"does not hold the bytes its manifest records"):
        store.run_stage("down", 0, down, inputs={"up": up}, params={}, code="c", build=_build_rows(1, calls))
    (up / "part-00000.parquet").unlink()
    with pytest.raises(store.StageError, match=r"part-00000.parquet is missing"):
        store.run_stage("down", 0, down, inputs={"up": up}, params={}, code="c", build=_build_rows(1, calls))
    assert calls == [3] and not down.exists()


def test_a_reader_hashes_the_bytes_it_reads_and_stops_on_damage_that_kept_size_and_mtime(tmp_path):
    """Text changed inside a shard, size and mtime kept: the input check trusts the stat, but
    the reader hashes what it reads against the manifest and stops naming the file; nothing
    is built from the damaged bytes."""
    import os

    calls = []
    up, down = tmp_path / "up", tmp_path / "down"
    store.run_stage("up", 0, up, inputs={}, params={}, code="c", build=_build_rows(3, calls))
    shard = up / "part-00000.parquet"
    assert len(store.read_shard(shard, schema.PROMPTS, stage="down@0")) == 3
    st = shard.stat()
    _damage_in_place(shard, offset=st.st_size // 2)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))

    def build(tmp):
        for _ in store.map_shards(up, tmp, lambda t, p: t, reads=schema.PROMPTS, writes=schema.PROMPTS, stage="down@0"):
            pass
        return {}
    with pytest.raises(store.StageError, match=r"down@0: .*up/part-00000.parquet: its bytes are not those its "
                                               r"manifest records \(xxh128|md5"):
        store.run_stage("down", 0, down, inputs={"up": up}, params={}, code="c", build=build)
    assert not down.exists()
    (up / "stray.parquet").write_bytes(shard.read_bytes())   # a file no manifest lists is never read
    with pytest.raises(store.StageError, match=r"stray.parquet: not listed in its directory's manifest"):
        store.read_shard(up / "stray.parquet", schema.PROMPTS, stage="down@0")


def test_an_untouched_output_is_trusted_by_its_stat_and_rehashed_when_it_changes(tmp_path, monkeypatch):
    calls, hashed = [], []
    out = tmp_path / "stage"
    store.run_stage("t", 0, out, inputs={}, params={}, code="c", build=_build_rows(3, calls))
    real = store.file_digest
    monkeypatch.setattr(store.digests, "file_digest", lambda p, algo="md5": hashed.append(p.name) or real(p, algo))
    assert store.run_stage("t", 0, out, inputs={}, params={}, code="c", build=_build_rows(3, calls)).cached
    assert hashed == []                      # resume: a stat per file, no rehash
    import os
    path = out / "part-00000.parquet"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # touched, bytes unchanged
    assert store.run_stage("t", 0, out, inputs={}, params={}, code="c", build=_build_rows(3, calls)).cached
    assert hashed == ["part-00000.parquet"]  # rehashed once, found good, remembered
    assert store.run_stage("t", 0, out, inputs={}, params={}, code="c", build=_build_rows(3, calls)).cached
    assert hashed == ["part-00000.parquet"]
    monkeypatch.setenv("DASHFLOW_VERIFY", "1")  # dashflow run --verify: every file, every time
    assert store.run_stage("t", 0, out, inputs={}, params={}, code="c", build=_build_rows(3, calls)).cached
    assert hashed == ["part-00000.parquet"] * 2 and calls == [3]


def test_replacing_an_output_is_one_atomic_exchange(tmp_path):
    """The old output and the new one trade places in one step (renameat2 RENAME_EXCHANGE):
    no moment without an output, and nothing left beside it."""
    out, staged = tmp_path / "out", tmp_path / ".out.tmp"
    out.mkdir()
    (out / "a").write_text("old")
    staged.mkdir()
    (staged / "a").write_text("new")
    assert store.landing._exchange(staged, out)  # supported here (Linux, glibc >= 2.28)
    assert (out / "a").read_text() == "new" and (staged / "a").read_text() == "old"
    store.landing._exchange(staged, out)
    store.landing._swap(staged, out)
    assert (out / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_remove_output_killed_midway_never_leaves_a_manifest_over_missing_files(tmp_path):
    """Retention's deletion, killed with SIGKILL at several moments: whatever is left either is
    the whole output (manifest and every file) or no longer reads as a finished output."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    for attempt, delay in enumerate((0.05, 0.1, 0.2, 0.3, 0.5)):
        out = tmp_path / f"out{attempt}"

        def build(tmp):
            for k in range(3000):
                (tmp / f"f{k:04d}.bin").write_bytes(b"x" * 512)
            return {}

        m = store.run_stage("learn", 0, out, inputs={}, params={}, code="t", build=build)
        store.write_pruned_record(out, "test")
        proc = subprocess.Popen([sys.executable, "-c", f"from dashflow.core import store; store.remove_output({str(out)!r})"],
                                cwd=ROOT)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not out.exists():
            continue
        left = {p.name for p in out.iterdir()}
        if (out / store.MANIFEST).exists():
            assert left >= set(m.outputs), "a manifest over missing files"
        else:
            assert store.read_manifest(out).pruned == "test"  # the record speaks for it


def test_an_output_of_several_large_files_is_hashed_file_by_file_on_every_core(tmp_path, monkeypatch):
    """A checkpoint in shards: each file gets its own digest (DVC's md5, one file per core),
    the same as hashing it alone; damage to one shard of a finished output is named."""
    import hashlib
    import os
    import threading

    sizes = [9 << 20, 3 << 20, 5 << 20]  # 17 MiB: over the threshold for the thread pool
    blobs = [os.urandom(n) for n in sizes]

    def build(tmp):
        for i, blob in enumerate(blobs):
            (tmp / f"model-{i + 1:05d}-of-00003.safetensors").write_bytes(blob)
        return {}

    threads, real = set(), store.file_digest
    monkeypatch.setattr(store.digests, "file_digest",
                        lambda p, algo="md5": threads.add(threading.get_ident()) or real(p, algo))
    out = tmp_path / "policy"
    m = store.run_stage("learn", 0, out, inputs={}, params={}, code="c", build=build)
    assert {name: info["md5"] for name, info in m.outputs.items()} == {
        f"model-{i + 1:05d}-of-00003.safetensors": hashlib.md5(b).hexdigest() for i, b in enumerate(blobs)}
    assert [m.outputs[f"model-{i + 1:05d}-of-00003.safetensors"]["bytes"] for i in range(3)] == sizes
    assert len(threads) == min(3, len(os.sched_getaffinity(0)))  # not one after the other on one thread
    shard = out / "model-00002-of-00003.safetensors"
    _damage_in_place(shard)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))
    assert store.content_problem(out, m) == (f"{shard} does not hold the bytes its manifest records "
                                             "(md5 differs; modified in place?)")


@pytest.mark.parametrize("direct", [True, False])
def test_write_hashed_writes_the_pieces_and_returns_their_digest(tmp_path, direct):
    """Pieces of odd sizes crossing the 16 MiB staging buffer, ending off a block boundary:
    the file holds exactly their concatenation (no padding left by O_DIRECT) and the digest
    is hashlib's / xxhash's of those bytes."""
    import hashlib
    import os

    import numpy as np
    import xxhash

    pieces = [os.urandom(5), np.frombuffer(os.urandom(20 << 20), dtype=np.uint8), b"", os.urandom(4097),
              memoryview(os.urandom((16 << 20) - 3))]
    whole = b"".join(bytes(memoryview(p).cast("B")) for p in pieces)
    path = tmp_path / "blob.safetensors"
    assert store.write_hashed(path, iter(pieces), "md5", direct=direct) == hashlib.md5(whole).hexdigest()
    assert path.stat().st_size == len(whole) == (36 << 20) + 4099
    assert path.read_bytes() == whole
    again = tmp_path / "again"
    assert store.write_hashed(again, [whole], "xxh128", direct=direct) == xxhash.xxh3_128(whole).hexdigest()
    assert again.read_bytes() == whole


def test_a_landing_records_the_digest_taken_while_writing_and_rehashes_a_touched_file(tmp_path):
    """A file written by write_hashed lands with the digest taken on its way to the disk,
    without being read back: bytes changed behind a restored mtime stay unseen (the same
    stat trust rule as a resume's). A file touched after writing (new mtime) is hashed from
    disk like any other, and a digest taken with another algorithm is not used."""
    import hashlib
    import os

    written = os.urandom(3 << 20)

    def build(damage_keeping_stat: bool, touch: bool):
        def write(tmp):
            shard = tmp / "model.safetensors"
            store.write_hashed(shard, [written])
            if damage_keeping_stat:
                st = shard.stat()
                _damage_in_place(shard)
                os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
            if touch:
                _damage_in_place(shard)
                os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))
            store.write_hashed(tmp / "state.bin", [written], "xxh128")  # not md5: hashed from disk
            return {}
        return write

    def landed(name, **how):
        out = tmp_path / name
        m = store.run_stage("learn", 0, out, inputs={}, params={}, code="c", build=build(**how))
        return m.outputs["model.safetensors"]["md5"], m.outputs["state.bin"]["md5"], (out / "model.safetensors").read_bytes()

    md5, state_md5, on_disk = landed("unread", damage_keeping_stat=True, touch=False)
    assert md5 == state_md5 == hashlib.md5(written).hexdigest() != hashlib.md5(on_disk).hexdigest()
    md5, _, on_disk = landed("touched", damage_keeping_stat=False, touch=True)
    assert md5 == hashlib.md5(on_disk).hexdigest() != hashlib.md5(written).hexdigest()


def test_torch_save_into_a_hashed_file_writes_what_it_writes_to_any_file_object(tmp_path):
    """The learner's optimizer state goes through torch.save into a HashedFile: the file is
    byte for byte what torch.save writes to any file object (a path would name the archive
    after the file instead of `archive/`), torch.load reads it, and the xxh128 of those
    bytes is remembered for the landing."""
    import io

    import torch
    import xxhash

    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5 << 20)},  # 20 MiB: 2 buffers
                       1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(7, 3)}},
             "param_groups": [{"lr": 1e-6, "params": [0, 1]}]}
    library = io.BytesIO()
    torch.save(state, library)
    with store.HashedFile(tmp_path / "ours.pt", store.SIDE_DIGEST) as f:
        torch.save(state, f)
    ours = (tmp_path / "ours.pt").read_bytes()
    assert ours == library.getvalue()
    assert f.digest == xxhash.xxh3_128(ours).hexdigest() == store.hashed.digest_written(tmp_path / "ours.pt", "xxh128")
    assert torch.equal(torch.load(tmp_path / "ours.pt")["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


def test_a_file_system_that_refuses_o_direct_at_write_gets_buffered_writes(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT at open and refuse it (EINVAL) at write: the file is
    then written buffered from the same offset, padding-free, with the same digest. (This
    machine's ext4 accepts O_DIRECT, so the refusal is injected at the first direct write.)"""
    import errno
    import fcntl
    import hashlib
    import os

    real_write, refused = os.write, []

    def write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and not refused:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(store.hashed.os, "write", write)
    blob = os.urandom((16 << 20) + 5)
    path = tmp_path / "shard.safetensors"
    assert store.write_hashed(path, [blob[:7], blob[7:]]) == hashlib.md5(blob).hexdigest()
    assert refused == [16 << 20] and path.read_bytes() == blob


def test_an_optional_column_a_table_lacks_reads_as_null_and_a_required_one_stops(tmp_path):
    from dashflow.core.schema import SchemaError, validate

    table = pa.table({"prompt_id": ["p0"], "prompt": ["q"], "answer": ["1"], "solution": [None], "source": ["s"]})
    out = validate(table, schema.PROMPTS, stage="t", path="x.parquet")
    assert out.column("context").to_pylist() == [None]
    with pytest.raises(SchemaError, match=r"t: x.parquet: missing column 'answer'"):
        validate(table.drop(["answer"]), schema.PROMPTS, stage="t", path="x.parquet")


def test_a_rerun_that_leaves_a_pruned_side_output_unwritten_lands(tmp_path):
    """Retention removed learn@0's optimizer (its pruned record is left); `--rerun learn@0`
    keeps the new state in memory (unwritten): the landing drops the stale record instead of
    failing on the directory that is not there (every retry failed the same way before)."""
    out, side = tmp_path / "learn", tmp_path / "optimizer"

    def build(write_side: bool):
        def run(tmp):
            (tmp / "w.bin").write_bytes(b"w")
            if write_side:
                (tmp / "optimizer").mkdir()
                (tmp / "optimizer" / "s.bin").write_bytes(b"s")
            return {}
        return run
    store.run_stage("learn", 0, out, inputs={}, params={"a": 1}, code="c", build=build(True), side={"optimizer": side})
    store.write_pruned_record(side, "removed by the retention setting")
    store.remove_output(side)
    assert not side.exists() and store.pruned_record(side).exists()
    m = store.run_stage("learn", 0, out, inputs={}, params={"a": 2}, code="c", build=build(False),
                        side={"optimizer": side})
    assert not m.cached and store.read_manifest(out).key == m.key
    assert not side.exists() and not store.pruned_record(side).exists()
