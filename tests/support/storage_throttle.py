"""A stand-in for Cloud Storage's network in front of gcp-storage-emulator: each connection's downloads are capped
at `rate` bytes/s after a first-byte delay, as one Cloud Storage stream is, so that ranged reads several at a time
win here as they do there.

The emulator serves one request at a time, so the stand-in never makes it wait on a slow client: it reads each
answer at once (an object's bytes are read once per generation and kept), and paces only what it sends. It
serves Range itself (or ignores it: `ranges=False`), enforces the `generation`/`ifGenerationMatch` of a read as
Cloud Storage does without object versioning (the emulator ignores both), and can fail the Nth ranged read with a
503 or a broken connection and alter a byte, for the tests. Everything else (uploads, metadata) passes through
unpaced with its Host header, so the objects' mediaLinks point at the stand-in.

In-process for tests (`throttled_storage(emulator, ...)`, a thread of its own) or as a process for the bench:
`python -m tests.support.storage_throttle --upstream http://127.0.0.1:PORT --port P --rate-mb 16 --delay-ms 50`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

MEDIA_PATH = re.compile(r"^/download/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<object>.+)$")
RANGE = re.compile(r"^\s*bytes=(?P<start>\d+)-(?P<end>\d*)\s*$")
SEND_BYTES = 64 * 1024


@dataclass
class StorageThrottle:
    upstream_port: int
    rate: float = 0.0  # bytes/s per connection; 0: unpaced
    first_byte_delay: float = 0.0  # seconds before a download's first byte
    ranges: bool = True  # False: answer a ranged read with the whole object (a server without Range support)
    fail_ranged: set[int] = field(default_factory=set)  # these ranged reads (1 = the first) answer 503
    break_ranged: set[int] = field(default_factory=set)  # these send half their bytes, then close the connection
    corrupt_offset: int | None = None  # this byte of every object is altered in what is sent
    port: int = 0
    ranged_reads: int = 0
    media_reads: int = 0
    objects: dict = field(default_factory=dict)  # (bucket, object) -> (generation, bytes)
    reading: dict = field(default_factory=dict)  # (bucket, object) -> the lock of the one read from the emulator
    connections: set = field(default_factory=set)

    # ---- running it ----
    async def serve(self, ready: threading.Event | None = None) -> None:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        if ready:
            ready.set()
        async with self.server:
            await self.server.serve_forever()

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- HTTP ----
    async def stop(self) -> None:
        self.server.close()
        for writer in list(self.connections):
            writer.transport.abort()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.add(writer)
        try:
            while True:
                request = await _read_message(reader, request=True)
                if request is None:
                    return
                method, target, headers, body = request
                media = MEDIA_PATH.match(urlsplit(target).path)
                if method == "GET" and media and "alt=media" in target:
                    if not await self._download(writer, target, headers, unquote(media["bucket"]), unquote(media["object"])):
                        return
                else:
                    status, answer_headers, answer = await self._upstream(method, target, headers, body)
                    await _send(writer, status, answer_headers, answer)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.connections.discard(writer)
            writer.close()

    async def _upstream(self, method: str, target: str, headers: list, body: bytes) -> tuple[int, list, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            head = [f"{method} {target} HTTP/1.1"]
            head += [f"{k}: {v}" for k, v in headers if k.lower() not in ("connection", "content-length", "transfer-encoding")]
            head += [f"Content-Length: {len(body)}", "Connection: close"]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            answer = await _read_message(reader, request=False, head=method == "HEAD")
            assert answer is not None, "the emulator closed the connection without an answer"
            _, status, answer_headers, answer_body = answer
            return int(status), answer_headers, answer_body
        finally:
            writer.close()

    async def _object(self, bucket: str, name: str) -> tuple[dict | None, bytes]:
        """The object's current metadata and bytes (None, b"" when it does not exist)."""
        async with self.reading.setdefault((bucket, name), asyncio.Lock()):
            return await self._read_object(bucket, name)

    async def _read_object(self, bucket: str, name: str) -> tuple[dict | None, bytes]:
        path = f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"
        for _ in range(5):
            status, _, body = await self._upstream("GET", path, [("Host", f"127.0.0.1:{self.port}")], b"")
            if status != 200:
                return None, b""
            meta = json.loads(body)
            cached = self.objects.get((bucket, name))
            if cached and cached[0] == meta["generation"]:
                return meta, cached[1]
            status, _, data = await self._upstream("GET", f"/download{path}?alt=media", [("Host", f"127.0.0.1:{self.port}")], b"")
            _, _, again = await self._upstream("GET", path, [("Host", f"127.0.0.1:{self.port}")], b"")
            if status == 200 and json.loads(again)["generation"] == meta["generation"]:
                self.objects[(bucket, name)] = (meta["generation"], data)
                return meta, data
        raise RuntimeError(f"{bucket}/{name} kept changing while the stand-in read it")

    async def _download(self, writer: asyncio.StreamWriter, target: str, headers: list, bucket: str, name: str) -> bool:
        """Answer a media read, paced; False when the connection was broken on purpose."""
        self.media_reads += 1
        query = parse_qs(urlsplit(target).query)
        meta, data = await self._object(bucket, name)
        wanted = {k: query[k][0] for k in ("generation", "ifGenerationMatch") if k in query}
        if meta is None or wanted.get("generation", meta["generation"]) != meta["generation"]:
            await _send(writer, 404, [], _error(404, f"No such object: {bucket}/{name}"))
            return True
        if wanted.get("ifGenerationMatch", meta["generation"]) != meta["generation"]:
            await _send(writer, 412, [], _error(412, "At least one of the pre-conditions you specified did not hold."))
            return True
        range_header = next((v for k, v in headers if k.lower() == "range"), None)
        match = RANGE.match(range_header) if range_header else None
        start, end, status = 0, len(data), 200
        if match:
            self.ranged_reads += 1
            number = self.ranged_reads
            if number in self.fail_ranged:
                await _send(writer, 503, [], _error(503, "stand-in: this ranged read fails once"))
                return True
            if self.ranges:
                start = int(match["start"])
                end = min(len(data), int(match["end"]) + 1) if match["end"] else len(data)
                status = 206
        body = memoryview(data)[start:end]
        if self.corrupt_offset is not None and start <= self.corrupt_offset < end:
            altered = bytearray(body)
            altered[self.corrupt_offset - start] ^= 0xFF
            body = memoryview(bytes(altered))
        answer_headers = [
            ("Content-Type", "application/octet-stream"),
            ("x-goog-generation", meta["generation"]),
            ("x-goog-stored-content-length", str(len(data))),
        ]
        if status == 206:
            answer_headers.append(("Content-Range", f"bytes {start}-{end - 1}/{len(data)}"))
        elif meta.get("crc32c"):
            answer_headers.append(("x-goog-hash", f"crc32c={meta['crc32c']},md5={meta.get('md5Hash')}"))
        await asyncio.sleep(self.first_byte_delay)
        cut = len(body) // 2 if match and number in self.break_ranged else None
        await _send(writer, status, answer_headers, body, rate=self.rate, cut=cut)
        return cut is None


def _error(code: int, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "errors": [{"message": message}]}}).encode()


async def _read_message(reader: asyncio.StreamReader, request: bool, head: bool = False):
    """(method or status, target or reason, headers, body) of one HTTP/1.1 message; None at a clean end."""
    try:
        block = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    lines = block.decode("latin-1").split("\r\n")
    first, second, *_ = lines[0].split(" ", 2) + [""]
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if ":" in line]
    values = {k.lower(): v for k, v in headers}
    if head:
        body = b""
    elif "chunked" in values.get("transfer-encoding", "").lower():
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    elif "content-length" in values:
        body = await reader.readexactly(int(values["content-length"]))
    else:
        body = b"" if request else await reader.read()
    return first, second, headers, body


async def _send(writer: asyncio.StreamWriter, status: int, headers: list, body, rate: float = 0.0,
                cut: int | None = None) -> None:  # fmt: skip
    skip = ("content-length", "transfer-encoding", "connection", "content-range" if status != 206 else "")
    head = [f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}"]
    head += [f"{k}: {v}" for k, v in headers if k.lower() not in skip]
    head += [f"Content-Length: {len(body)}"]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    started, sent = time.perf_counter(), 0
    limit = len(body) if cut is None else cut
    while sent < limit:
        piece = body[sent : min(sent + SEND_BYTES, limit)]
        writer.write(piece)
        await writer.drain()
        sent += len(piece)
        if rate:
            ahead = started + sent / rate - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)
    await writer.drain()
    if cut is not None:
        writer.transport.abort()


@contextlib.contextmanager
def throttled_storage(emulator, rate: float = 0.0, first_byte_delay: float = 0.0, **options) -> Iterator[StorageThrottle]:
    """The stand-in in front of a running StorageEmulator, on a thread of its own; stopped on exit."""
    throttle = StorageThrottle(emulator.port, rate, first_byte_delay, **options)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    task_box: list[asyncio.Task] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        task_box.append(loop.create_task(throttle.serve(ready)))
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task_box[0])
        pending = asyncio.all_tasks(loop)  # connections still open: end them too
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    thread = threading.Thread(target=run, name="storage-throttle", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the storage stand-in did not start")
    try:
        yield throttle
    finally:
        asyncio.run_coroutine_threadsafe(throttle.stop(), loop).result(10)
        loop.call_soon_threadsafe(task_box[0].cancel)
        thread.join(10)
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the emulator, http://127.0.0.1:PORT")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port, printed)")
    parser.add_argument("--rate-mb", type=float, default=0.0, help="MB/s per connection (0: unpaced)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="milliseconds before a download's first byte")
    args = parser.parse_args()
    throttle = StorageThrottle(int(args.upstream.rsplit(":", 1)[1]), args.rate_mb * 1e6, args.delay_ms / 1000,
                               port=args.port)  # fmt: skip
    ready = threading.Event()
    threading.Thread(target=lambda: (ready.wait(), print(f"listening on {throttle.port}", flush=True)), daemon=True).start()
    asyncio.run(throttle.serve(ready))


if __name__ == "__main__":
    main()
