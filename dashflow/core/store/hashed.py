"""Writing large files (checkpoints) hashed on their way to the disk: `HashedFile`,
`write_hashed`. Each file is hashed once: a file written here is not read back to be
hashed when its stage lands (`digest_written`)."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dashflow.core.store.digests import DIGESTS

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
    so the stage's landing records it without reading the file back (`digest_written`);
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

    def __enter__(self) -> HashedFile:
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


def digest_written(path: Path, algo: str) -> str | None:
    """The digest a HashedFile took of `path` as it wrote it, if the file is untouched since
    (same device, inode, size and mtime); each is used once."""
    with _written_lock:
        found = _written.pop(_identity(path.stat()), None)
    return found[1] if found is not None and found[0] == algo else None
