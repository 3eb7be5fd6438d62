"""One Cloud Storage object into one file, at the network's speed.

A large object is read as ranged reads of its pinned generation, several at a time (one Cloud Storage stream is
far slower than many), each written in place and retried on its own (the client resumes a broken read from its
last byte); the file's sha256 and crc32c are computed in order as its prefix completes, while later slices still
arrive, so no second pass reads the file again, and the crc32c is checked against the object's. A small object,
or a server that ignores Range, gets the single request of the client.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import threading
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c

log = logging.getLogger("service.model")

# Slices of 8-64 MiB, about four per reader: large enough that a read's first-byte latency is small against
# its transfer, small enough that the readers finish together and the in-order hash trails the last byte by
# little (at most one slice per reader is left to hash when the last byte lands).
MIN_SLICE_BYTES = 8 * 1024 * 1024
MAX_SLICE_BYTES = 64 * 1024 * 1024
SLICES_PER_READER = 4
TAIL_DIVISOR = 4
WRITE_BYTES = 1024 * 1024  # a slice's bytes are written (and counted) in pieces of this size
HASH_BYTES = 4 * 1024 * 1024


class DownloadError(Exception):
    """The object's bytes could not be fetched as they are in the bucket; the message says why."""


class GenerationChanged(DownloadError):
    """The object was replaced while its slices were being read: none of the new bytes were mixed in."""


class RangeIgnored(DownloadError):
    """The server answered a ranged read with more than the range (no Range support)."""


class _Cancelled(Exception):
    pass


@dataclass(frozen=True)
class SlicePlan:
    """How an object is read: `concurrency` ranged reads at a time of `slice_bytes` each (0: chosen by size)."""

    concurrency: int = 8
    slice_bytes: int = 0

    def slices(self, size: int) -> list[tuple[int, int]]:
        """[start, end) of each ranged read; one slice means the single request."""
        step = self.slice_bytes or min(MAX_SLICE_BYTES, max(MIN_SLICE_BYTES, size // (self.concurrency * SLICES_PER_READER)))
        if self.concurrency <= 1 or size <= step:
            return [(0, size)]
        # In a large file the last slices, the ones in flight when the last byte lands, are a quarter of the size:
        # less is left to hash then, for one more first-byte wait per reader.
        tail_start = size - self.concurrency * step if size > 2 * self.concurrency * step else size
        tail_step = max(step // TAIL_DIVISOR, min(step, 1024 * 1024))
        bounds = [*range(0, tail_start, step), *range(tail_start, size, tail_step), size]
        return list(zip(bounds, bounds[1:]))


def fetch_object(blob: Any, path: Path, progress: Any, name: str, retry: Any, pool: Executor, plan: SlicePlan) -> str:
    """Download `blob` (its metadata loaded: generation, size, crc32c) into `path`; returns the file's sha256.

    `progress.done[name]` counts the bytes written. Ranged reads run on `pool`. Raises GenerationChanged when the
    object is replaced during the download, DownloadError on a checksum mismatch."""
    slices = plan.slices(blob.size)
    if len(slices) > 1 and blob.content_encoding != "gzip":  # a gzip-stored object's ranges are of its compressed bytes
        try:
            return _SlicedDownload(blob, path, progress, name, retry, pool, slices).run()
        except RangeIgnored:
            log.warning("storage ignored a ranged read; downloading %s as one stream", name)
    return _single_stream(blob, path, progress, name, retry)


def _single_stream(blob: Any, path: Path, progress: Any, name: str, retry: Any) -> str:
    from google.api_core.exceptions import NotFound, PreconditionFailed

    progress.done[name] = 0
    with path.open("wb") as file:
        writer = _HashingWriter(file, progress, name)
        try:
            # Pinning the generation read before means a concurrent overwrite cannot mix two objects.
            blob.download_to_file(
                writer, checksum="crc32c", retry=retry, timeout=(10, 120), if_generation_match=blob.generation
            )
        except (NotFound, PreconditionFailed):
            raise GenerationChanged(f"{blob.name} generation {blob.generation} was replaced or deleted during the download") from None
    return writer.digest.hexdigest()


class _HashingWriter:
    """The download's file, hashing what is written to it and counting it for /health: the sha256 comes with the
    download, not a second read."""

    def __init__(self, file: BinaryIO, progress: Any, name: str):
        self.file, self.digest = file, hashlib.sha256()
        self.progress, self.name = progress, name

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.progress.done[self.name] += len(data)
        return self.file.write(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        # The client rewinds only to write a transcoded object again from its start.
        if (offset, whence) != (0, os.SEEK_SET):
            raise io.UnsupportedOperation(f"seek({offset}, {whence}) while hashing a download")
        self.digest = hashlib.sha256()
        self.progress.done[self.name] = 0
        self.file.truncate(0)
        return self.file.seek(0)


class _SlicedDownload:
    def __init__(self, blob: Any, path: Path, progress: Any, name: str, retry: Any, pool: Executor,
                 slices: list[tuple[int, int]]):  # fmt: skip
        self.blob, self.path, self.progress, self.name, self.retry, self.pool = blob, path, progress, name, retry, pool
        self.slices = slices
        self.written = [0] * len(slices)  # bytes of each slice on disk
        self.changed = threading.Condition()
        self.cancelled = False
        self.complete = 0  # slices before this one are all on disk
        self.last_byte: float | None = None

    def run(self) -> str:
        started = time.perf_counter()
        size = self.blob.size
        self.progress.done[self.name] = 0
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self.fd, size)
            futures = [self.pool.submit(self._read, i) for i in range(len(self.slices))]
            try:
                sha256, crc32c = self._hash_in_order(size, futures)
            except BaseException:
                with self.changed:
                    self.cancelled = True
                for future in futures:
                    future.cancel()
                errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
                # The cause that explains the rest: a replaced object or ignored ranges before a cancelled slice.
                for kind in (GenerationChanged, RangeIgnored):
                    if any(isinstance(e, kind) for e in errors):
                        raise next(e for e in errors if isinstance(e, kind)) from None
                raise
            last_byte = self.last_byte or time.perf_counter()
        finally:
            os.close(self.fd)
        expected = self.blob.crc32c
        actual = base64.b64encode(crc32c.digest()).decode()
        if expected and actual != expected:
            raise DownloadError(
                f"crc32c mismatch: the object has {expected}, the {size} bytes received have {actual} "
                "(the bytes were altered on the way); the model is not served, restart to download it again"
            )
        now = time.perf_counter()
        log.info(
            "downloaded %s: %d bytes in %d ranged reads, %.2f s (%.1f MB/s), hashed %.3f s after the last byte",
            self.name, size, len(self.slices), now - started, size / 1e6 / max(last_byte - started, 1e-9),
            now - last_byte,
        )  # fmt: skip
        return sha256.hexdigest()

    def _hash_in_order(self, size: int, futures: list[Future]) -> tuple[Any, Any]:
        sha256, crc32c = hashlib.sha256(), google_crc32c.Checksum()
        hashed = 0
        while hashed < size:
            with self.changed:
                while (ready := self._prefix()) <= hashed:
                    self.changed.wait(0.5)
                    for future in futures:
                        if future.done() and future.exception():
                            raise future.exception()
            while hashed < ready:
                chunk = os.pread(self.fd, min(HASH_BYTES, ready - hashed), hashed)  # from the page cache
                sha256.update(chunk)
                crc32c.update(chunk)
                hashed += len(chunk)
        for future in futures:
            future.result()  # every slice ended (a slice's last write may precede its return)
        return sha256, crc32c

    def _prefix(self) -> int:
        """The end of the file's prefix that is on disk (under self.changed)."""
        while self.complete < len(self.slices):
            start, end = self.slices[self.complete]
            if start + self.written[self.complete] < end:
                return start + self.written[self.complete]
            self.complete += 1
        return self.slices[-1][1]

    def _read(self, index: int) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed
        from google.cloud.storage import Blob

        start, end = self.slices[index]
        if self.cancelled:
            raise _Cancelled()
        # A Blob of its own per read: a download rewrites the blob's properties from the answer's headers. It
        # names the generation, and the read is conditional on it, so a replaced object cannot mix in.
        blob = Blob(self.blob.name, self.blob.bucket, generation=self.blob.generation)
        writer = _SliceWriter(self, index, start, end)
        try:
            blob.download_to_file(
                writer, start=start, end=end - 1, raw_download=True, checksum=None, retry=self.retry,
                timeout=(10, 120), if_generation_match=self.blob.generation,
            )  # fmt: skip
        except (NotFound, PreconditionFailed):
            raise GenerationChanged(
                f"{self.blob.name} generation {self.blob.generation} was replaced or deleted during the download"
            ) from None
        writer.flush()
        if writer.offset != end:
            raise DownloadError(f"bytes {start}-{end - 1} of {self.blob.name}: the answer ended at byte {writer.offset}")

    def wrote(self, index: int, count: int) -> None:
        with self.changed:
            self.written[index] += count
            self.progress.done[self.name] += count
            if self.progress.done[self.name] == self.blob.size:
                self.last_byte = time.perf_counter()
            self.changed.notify_all()


class _SliceWriter:
    """The file-like one ranged read writes to: its bytes go to their place in the file, a piece at a time."""

    def __init__(self, download: _SlicedDownload, index: int, start: int, end: int):
        self.download, self.index, self.offset, self.end = download, index, start, end
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        if self.download.cancelled:
            raise _Cancelled()
        if self.offset + len(self.buffer) + len(data) > self.end:
            raise RangeIgnored(f"a ranged read of {self.download.name} returned more than its range")
        self.buffer += data
        if len(self.buffer) >= WRITE_BYTES:
            self.flush()
        return len(data)

    def flush(self) -> None:
        view = memoryview(self.buffer)
        while view:
            written = os.pwritev(self.download.fd, [view], self.offset)
            view = view[written:]
            self.offset += written
            self.download.wrote(self.index, written)
        view.release()
        self.buffer.clear()
