"""Reading: the input files of a job, the buffers their chunks are read into, and how the bytes are read.

Every consumer of tensor bytes (the in-process executor, the CUDA path, Ray units, `expo norms`, `expo verify`)
opens its inputs as one :class:`Inputs` and reads ranges of tensors into :class:`Buffers` with it; `read_ahead`
overlaps the next read with the work on the current one. Inputs are read with `preadv` into reused buffers, never
mapped, so memory does not grow with the model. Per range, the page cache decides: a range that is mostly cached
(a pair just downloaded, or read by the previous run) is copied from it; any other is read with O_DIRECT, straight
from the disk into the buffer, where the filesystem allows it (280 GB read once gain nothing from the page cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from . import dtypes
from .errors import InputChangedError
from .pagecache import resident_fraction
from .plan import Chunk, Plan, TensorPlan
from .sources import TensorSlot

if TYPE_CHECKING:
    import torch

DEPTH = 3  # buffer sets in flight in a pipeline: one being read, one computed, one written
ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in multiples of this


def direct_io() -> bool:
    """Read inputs and write shards with O_DIRECT unless EXPO_BUFFERED_IO=1. Measured here: page-cache reads cost
    twice the kernel CPU time (4.7 vs 2.4 s for a 4 GB pair), and buffered writes of 2 GB cost 3.8 s of system CPU
    against 0.1 s with O_DIRECT; a model read or written once gains nothing from the page cache."""
    return os.environ.get("EXPO_BUFFERED_IO") != "1"


CACHED = 0.5  # a range with at least this fraction of its pages in the page cache is read through it


class Inputs:
    """Read-only descriptors of every input file, with the size and mtime they had when opened.

    With `direct`, each range is read with O_DIRECT unless the page cache already holds most of it (CACHED, asked
    with pagecache.resident_fraction just before the read): inputs that are not in memory go from the disk
    straight into the buffers, inputs that are (a warm cache) are copied from memory instead of read again.
    `counts` records, per file, how many bytes went each way."""

    def __init__(self, paths, direct: bool = False):
        self.fds, self.stats, self.direct = {}, {}, {}
        self.counts: dict[str, list[int]] = {}  # path -> [bytes read through the page cache, bytes with O_DIRECT]
        try:
            for path in sorted(set(paths)):
                fd = os.open(path, os.O_RDONLY)
                self.fds[path] = fd
                self.stats[path] = identity(os.fstat(fd))
                if direct and hasattr(os, "O_DIRECT"):
                    try:
                        self.direct[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
                    except OSError:
                        pass  # a filesystem without O_DIRECT (tmpfs): read through the page cache
        except OSError as e:
            self.close()
            raise InputChangedError(f"{e.filename or path}: cannot be opened any more ({e.strerror})") from None

    def read_bytes(self, buf: np.ndarray, slot: TensorSlot, start: int, stop: int) -> np.ndarray:
        """Read elements [start, stop) of `slot` into `buf` (numpy uint8); return the uint8 view that holds them
        (at the front of `buf`, or a few bytes in where O_DIRECT needs an aligned address)."""
        size = dtypes.itemsize(slot.dtype)
        offset, nbytes = slot.offset + start * size, (stop - start) * size
        count = self.counts.setdefault(slot.file, [0, 0])
        if (slot.file in self.direct and offset % size == 0 and nbytes >= ALIGN
                and _direct_room(buf, offset, nbytes) <= len(buf)
                and (resident_fraction(self.fds[slot.file], offset, nbytes) or 0.0) < CACHED):
            count[1] += nbytes
            return self._read_direct(buf, slot, offset, nbytes)
        count[0] += nbytes
        view = buf[:nbytes]
        mem = memoryview(view)
        while mem:
            n = os.preadv(self.fds[slot.file], [mem], offset)
            if n == 0:
                raise InputChangedError(f"{slot.file}: ended early while reading '{slot.name}'; was it truncated?")
            mem, offset = mem[n:], offset + n
        return view

    def read_into(self, buf, slot: TensorSlot, start: int, stop: int) -> torch.Tensor:
        """`read_bytes` into a uint8 torch tensor or numpy array; returns a 1-D torch tensor of the slot's dtype."""
        import torch

        arr = buf if isinstance(buf, np.ndarray) else buf.numpy()
        return torch.from_numpy(self.read_bytes(arr, slot, start, stop)).view(dtypes.TORCH[slot.dtype])

    def _read_direct(self, buf: np.ndarray, slot: TensorSlot, offset: int, nbytes: int) -> np.ndarray:
        """O_DIRECT: the disk writes straight into `buf` (no page-cache copy, no page cache churn). Reads whole
        aligned blocks around the range into an aligned spot of `buf` and returns the range's view."""
        lo, hi = _blocks(offset, nbytes)
        base = -buf.ctypes.data % ALIGN
        mem = memoryview(buf[base: base + hi - lo])
        got, pos = 0, lo
        while got < offset + nbytes - lo:
            n = os.preadv(self.direct[slot.file], [mem[got:]], pos)
            if n == 0:
                raise InputChangedError(f"{slot.file}: ended early while reading '{slot.name}'; was it truncated?")
            got, pos = got + n, pos + n
        first = base + offset - lo
        return buf[first: first + nbytes]

    def read_report(self) -> dict:
        """How the inputs were read, for expo.json: bytes through the page cache and with O_DIRECT, per file."""
        cached, direct = (sum(c[i] for c in self.counts.values()) for i in (0, 1))
        return {"policy": ("per chunk: through the page cache where at least half of the range was cached, else "
                           "O_DIRECT") if self.direct else "through the page cache (no O_DIRECT here, or "
                           "EXPO_BUFFERED_IO=1)",
                "page_cache_bytes": cached, "direct_bytes": direct,
                "files": {path: {"page_cache_bytes": c[0], "direct_bytes": c[1]}
                          for path, c in sorted(self.counts.items())}}

    def prefetch(self, t: TensorPlan, c: Chunk) -> None:
        """Ask the kernel to read a chunk's input ranges into the page cache now (no memory of this process)."""
        ranges = [(t.aligned, c.start)]
        if t.action == "extrapolate" and c.sft_span is not None:
            ranges.append((t.sft, c.sft_span[0]))
        for slot, start in ranges:
            if slot.file in self.direct:
                continue
            size = dtypes.itemsize(slot.dtype)
            os.posix_fadvise(self.fds[slot.file], slot.offset + start * size, (c.stop - c.start) * size,
                             os.POSIX_FADV_WILLNEED)

    def check_unchanged(self) -> None:
        for path, before in self.stats.items():
            try:
                now = identity(os.stat(path))
            except OSError:
                raise InputChangedError(f"{path}: disappeared during the run; the output was not published") from None
            if now != before:
                raise InputChangedError(f"{path}: changed during the run (size or mtime); the output was not published")

    def close(self) -> None:
        for fd in [*self.fds.values(), *self.direct.values()]:
            os.close(fd)
        self.fds.clear()
        self.direct.clear()


def _blocks(offset: int, nbytes: int) -> tuple[int, int]:
    """The whole ALIGN blocks around [offset, offset + nbytes): (first byte, end)."""
    return offset - offset % ALIGN, -(-(offset + nbytes) // ALIGN) * ALIGN


def _direct_room(buf: np.ndarray, offset: int, nbytes: int) -> int:
    """Bytes of `buf` a direct read of [offset, offset + nbytes) uses: alignment of the address, then whole blocks."""
    lo, hi = _blocks(offset, nbytes)
    return -buf.ctypes.data % ALIGN + hi - lo


def identity(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns


class Buffers:
    """One set of chunk buffers (numpy uint8). `np.empty` reserves address space only; pages become resident when
    used. `outputs` output buffers (`out` is the first), one per output of a sweep."""

    def __init__(self, nbytes: int, outputs: int = 1):
        # one element of the widest dtype; room for a direct read: up to ALIGN - 1 bytes to reach an aligned address,
        # then whole blocks from below the range's start to above its end (< nbytes + 2 * ALIGN)
        nbytes = max(nbytes, 8) + 3 * ALIGN
        self.sft = np.empty(nbytes, dtype=np.uint8)
        self.aligned = np.empty(nbytes, dtype=np.uint8)
        self.outs = [np.empty(nbytes, dtype=np.uint8) for _ in range(max(1, outputs))]
        self.out = self.outs[0]


@contextlib.contextmanager
def read_ahead(n: int, read: Callable[[int], object]):
    """Iterate over read(0), ..., read(n - 1), read(k + 1) running in a thread while the caller works on read(k)'s
    result; `read` must alternate between two buffer sets. Leaving the block waits for the read in flight, so the
    caller may close its files after it."""
    with ThreadPoolExecutor(1, "expo-read-ahead") as reader:
        def results():
            pending = reader.submit(read, 0) if n else None
            for k in range(n):
                result = pending.result()
                if k + 1 < n:
                    pending = reader.submit(read, k + 1)
                yield result

        yield results()


def input_paths(plan: Plan) -> list[str]:
    return [slot.file for t in plan.tensors for slot in (t.sft, t.aligned)]


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def hash_range(fd: int, start: int = 0, stop: int | None = None):
    """The sha256 object of bytes [start, stop) of an open file (to its end by default), read in 16 MiB pieces."""
    h = hashlib.sha256()
    while (stop is None or start < stop) and (
            block := os.pread(fd, 16 << 20 if stop is None else min(16 << 20, stop - start), start)):
        h.update(block)
        start += len(block)
    return h


def file_sha256(path: str) -> str:
    """The sha256 of a whole (small) file: side files, prompts, a reward's script, an output shard. Model weights
    being searched are identified by size and mtime instead: hashing them would read the model again."""
    with open(path, "rb") as f:
        return hash_range(f.fileno()).hexdigest()
