"""A memory budget for the requests in flight, so that big bodies wait or get 503 instead of an OOM kill (issue 16).

The container's memory limit comes from its cgroup (v2 `memory.max`, else v1 `memory.limit_in_bytes`), found
through /proc/self/cgroup and /proc/self/mountinfo so it works with and without a cgroup namespace, else from
MEMORY_LIMIT_BYTES (the lower of the two when both are set). Once the model is loaded, a worker's budget is its
share of that limit minus what the process already holds (the model, onnxruntime, Python) and a reserve.

Decoding is where the memory goes: JSON numbers become Python floats on their way to the tensor, measured at 8
bytes per body byte at the peak for float rows. It happens only in the worker's inference pool
(INFERENCE_THREADS at once; bodies under 16 KiB on the event loop, one at a time), so the budget sets aside room
for that many decodes of the largest body, and a request holds only what stays while it waits and runs: its
body and its joined copy, then its body and its tensor, twice the body. It is admitted by its Content-Length
before its body is read (the HTTP server reads no more than 64 KiB of a body the app has not asked for), or by
the bytes read when there is none, and holds its share until its answer is sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

# Memory per byte of body while decoding it, at the peak (measured for JSON float rows; binary V2 bodies need ~1).
DECODE_BYTES_PER_BODY_BYTE = 8
# Memory a request holds per byte of its body from admission to answer: the body and its join, then body + tensor.
HELD_BYTES_PER_BODY_BYTE = 2
# v1 reports "no limit" as the largest page-aligned int64; anything this large is no limit.
UNLIMITED = 1 << 60
MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryLimit:
    bytes: int | None  # None: no limit found
    source: str  # where it came from, for /health: "cgroup v2 /sys/fs/cgroup/memory.max", "MEMORY_LIMIT_BYTES", ...


def container_memory_limit(configured: int = 0, root: Path = Path("/")) -> MemoryLimit:
    """The memory this process's container may use: the cgroup's limit (the tightest up its tree), else
    `configured` (MEMORY_LIMIT_BYTES); the lower of the two when both are set. `root`: where /proc and /sys are
    (tests give a fake tree)."""
    found = _cgroup_limit(root)
    if configured and (found is None or configured < found.bytes):
        return MemoryLimit(configured, "MEMORY_LIMIT_BYTES")
    return found or MemoryLimit(None, "no cgroup memory limit and no MEMORY_LIMIT_BYTES")


def _cgroup_limit(root: Path) -> MemoryLimit | None:
    proc = root / "proc"
    try:
        memberships = (proc / "self" / "cgroup").read_text().splitlines()
        mounts = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    v2_path = v1_path = None
    for line in memberships:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    for version, path, fstype, filename in (("v2", v2_path, "cgroup2", "memory.max"),
                                             ("v1", v1_path, "cgroup", "memory.limit_in_bytes")):  # fmt: skip
        if path is None:
            continue
        for mount_root, mount_point in _mounts(mounts, fstype, needs_memory=version == "v1"):
            limit = _tightest(root, Path(mount_point), _relative(path, mount_root), filename)
            if limit is not None:
                return MemoryLimit(limit[0], f"cgroup {version} {limit[1]}")
    return None


def _mounts(lines: list[str], fstype: str, needs_memory: bool) -> list[tuple[str, str]]:
    """(root within the hierarchy, mount point) of each cgroup filesystem of `fstype` in /proc/self/mountinfo."""
    found = []
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] != fstype:
            continue
        if needs_memory and "memory" not in tail[2].split(","):
            continue
        found.append((_unescape(fields[3]), _unescape(fields[4])))
    return found


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _relative(path: str, mount_root: str) -> str:
    """The cgroup's directory below the mount: without a namespace a container's mount root is its own cgroup
    (/docker/ID) and /proc/self/cgroup shows the same path; with one, both are "/"."""
    path, root = path.rstrip("/") or "/", mount_root.rstrip("/") or "/"
    if root == "/":
        return path.lstrip("/")
    if path == root or path.startswith(root + "/"):
        return path[len(root):].lstrip("/")
    return ""  # a path from another namespace: the mount itself is the best guess


def _tightest(root: Path, mount_point: Path, relative: str, filename: str) -> tuple[int, str] | None:
    """The lowest limit from the cgroup's directory up to the mount point: a parent's limit binds its children."""
    best = None
    directory = mount_point / relative
    while True:
        limit = _read_limit(root / directory.relative_to("/") / filename)
        if limit is not None and (best is None or limit < best[0]):
            best = (limit, str(directory / filename))
        if directory == mount_point or mount_point not in directory.parents:
            return best
        directory = directory.parent


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def resident_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def request_cost(body_bytes: int) -> int:
    return body_bytes * HELD_BYTES_PER_BODY_BYTE


class OverBudget(Exception):
    """A request that cannot be admitted; `status` is 503 (wait and retry) or 413 (never fits)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class MemoryBudget:
    """Admits requests against this worker's memory budget, first come first served; a request waits up to
    `wait_seconds` for room, then is refused."""

    def __init__(self, limit: MemoryLimit, workers: int = 1, wait_seconds: float = 2.0):
        self.limit, self.workers, self.wait_seconds = limit, workers, wait_seconds
        self.total: int | None = None  # set once the model is loaded (`measure`); None: no budget
        self.baseline = 0
        self.decode_reserve = 0
        self.in_use = 0
        self.peak = 0
        self.refused = 0
        self.waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    def measure(self, decoders: int = 0, largest_body: int = 0) -> None:
        """Set the budget from the limit and what this process holds now, with the model loaded, less room for
        `decoders` decodes of the `largest_body` at once."""
        if self.limit.bytes is None:
            return
        share = self.limit.bytes // self.workers
        self.baseline = resident_bytes()
        reserve = max(64 * MIB, share // 8)  # the master, allocator slack, answers being written
        self.decode_reserve = decoders * largest_body * DECODE_BYTES_PER_BODY_BYTE
        self.total = max(0, share - self.baseline - reserve - self.decode_reserve)

    def take_now(self, cost: int) -> int | None:
        """`admit` when it needs no wait: the bytes taken (0 while there is no budget), or None when the request
        must wait or be refused (then `admit` it). Every request goes through here first, without an await."""
        total = self.total
        if total is None or cost <= 0:
            return 0
        in_use = self.in_use + cost
        if in_use <= total and not self.waiters:
            self.in_use = in_use  # `_take`, inline: every request passes here
            if in_use > self.peak:
                self.peak = in_use
            return cost
        return None

    async def admit(self, cost: int) -> int:
        """Reserve `cost` bytes, waiting up to `wait_seconds`; raises OverBudget. Returns the bytes taken, for
        `release`: 0 while there is no budget."""
        taken = self.take_now(cost)
        if taken is not None:
            return taken
        total = self.total
        assert total is not None
        if cost > total:
            self.refused += 1
            raise OverBudget(
                f"this request needs about {cost // MIB} MiB, more than this instance's {total // MIB} MiB "
                "budget for requests in flight; send fewer rows per request, or give the container more memory "
                "(or lower MAX_BODY_BYTES or INFERENCE_THREADS, which set memory aside for decoding)", 413)
        granted = asyncio.get_running_loop().create_future()
        entry = (cost, granted)
        self.waiters.append(entry)
        try:
            done, _ = await asyncio.wait({granted}, timeout=self.wait_seconds)
        except BaseException:  # cancelled while waiting: give back what may have been granted meanwhile
            self._withdraw(entry)
            raise
        if not done:
            self._withdraw(entry)
            self.refused += 1
            raise OverBudget(
                f"busy: the requests in flight hold {self.in_use // MIB} of this instance's {total // MIB} MiB "
                f"budget for request memory and this one needs about {cost // MIB} MiB; retry shortly", 503)
        return cost

    def release(self, cost: int) -> None:
        """Give back what `admit` returned."""
        if cost <= 0:
            return
        self.in_use -= cost
        if self.waiters:
            self._wake()

    def _withdraw(self, entry: tuple[int, asyncio.Future]) -> None:
        """A waiter that gives up (timed out, cancelled): out of the queue, and its cost given back if `_wake`
        granted it in the meantime; those behind it may fit now."""
        cost, granted = entry
        if granted.done() and not granted.cancelled():
            self.in_use -= cost
        else:
            granted.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(entry)
        self._wake()

    def _take(self, cost: int) -> None:
        self.in_use += cost
        self.peak = max(self.peak, self.in_use)

    def _wake(self) -> None:
        while self.waiters and self.total is not None and self.in_use + self.waiters[0][0] <= self.total:
            cost, granted = self.waiters.popleft()
            if not granted.done():
                self._take(cost)
                granted.set_result(None)

    def as_json(self) -> dict:
        return {
            "limit_bytes": self.limit.bytes, "limit_source": self.limit.source, "baseline_bytes": self.baseline,
            "decode_reserve_bytes": self.decode_reserve, "budget_bytes": self.total, "in_use_bytes": self.in_use,
            "peak_in_use_bytes": self.peak,
            "waiting": len(self.waiters), "refused": self.refused,
        }  # fmt: skip
