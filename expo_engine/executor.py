"""Executor: runs a plan's chunks in this process, reading, computing and writing at the same time.

Three stages overlap: one thread reads the next chunk's input bytes (`os.preadv` into reused buffers, with O_DIRECT
where the filesystem allows it, so no input file is ever mapped and the disk writes straight into the buffer),
the calling thread runs the kernel (the fused statistics kernel on two threads), and one thread writes the
previous chunk at its planned offset. `depth` buffer sets rotate between them;
each set is at most three chunk-sized buffers, so the resident memory is a fixed base plus `3 * depth` chunks,
whatever the size of the model or of its largest tensor.

An alpha sweep (several plans of one layout, one per output) reads each input chunk once and computes every
output from it, each into its own output buffer (only the last may overwrite the aligned buffer), and writes each
into its own staging folder: a set then holds 2 + N chunk buffers for N outputs, so the bound becomes a fixed base
plus `(2 + N) * depth` chunks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from . import dtypes, kernels
from .errors import InputChangedError, MismatchError
from .plan import Chunk, Plan, TensorPlan, Unit
from .reading import DEPTH, Buffers, Inputs, direct_io, input_paths
from .writer import Staging, fault_point

if TYPE_CHECKING:
    pass

COMPUTE_THREADS = 2  # the fused statistics kernel runs on this many threads, one torch thread each


def check_copies(plan: Plan) -> None:
    """Non-float tensors are copied from the aligned side only if both sides hold the same values: check that."""
    copies = [t for t in plan.tensors if t.action == "copy"]
    if not copies:
        return
    import torch

    inputs = Inputs(input_paths(plan))
    bufs = Buffers(plan.chunk_bytes)
    try:
        for t in copies:
            step = max(1, plan.chunk_bytes // dtypes.itemsize(t.dtype))
            for start in range(0, t.numel, step):
                stop = min(start + step, t.numel)
                s = inputs.read_into(bufs.sft, t.sft, start, stop)
                a = inputs.read_into(bufs.aligned, t.aligned, start, stop)
                if not torch.equal(s, a):
                    raise MismatchError(
                        f"tensor '{t.name}' ({t.dtype}, not floating point) differs between the checkpoints; "
                        "ExPO can only copy such tensors when both sides are identical"
                    )
    finally:
        inputs.close()


@dataclass
class NonFinite:
    """NaN/Inf found in one tensor by scan_nonfinite: how many output elements became NaN or Inf although both
    inputs were finite there (`produced`, with the first such element), and how many input elements were
    already NaN or Inf on each side."""

    name: str
    produced: int = 0
    in_sft: int = 0
    in_aligned: int = 0
    first: tuple | None = None  # (index, sft value, aligned value, output value, alpha) of the first produced one


def scan_nonfinite(plan: Plan, staging_dir: str, names: list[str]) -> list[NonFinite]:
    """Look at the staged output of the tensors `names` (flagged by the kernels as possibly holding NaN or Inf)
    element by element, next to their inputs. Only flagged tensors are read again, so a normal run pays nothing
    here; memory stays bounded by the plan's chunk size."""
    import torch

    wanted = {plan.tensors.index(t): t for t in plan.tensors if t.name in set(names)}
    found = {}
    inputs = Inputs(input_paths(plan))
    bufs = Buffers(plan.chunk_bytes)
    fds = {}
    try:
        for c in plan.chunks:
            t = wanted.get(c.tensor)
            if t is None:
                continue
            a = inputs.read_into(bufs.aligned, t.aligned, c.start, c.stop)
            s = a if c.sft_span is None else inputs.read_into(bufs.sft, t.sft, *c.sft_span)
            if t.shard not in fds:
                fds[t.shard] = os.open(os.path.join(staging_dir, t.shard), os.O_RDONLY)
            dtype = dtypes.TORCH[t.dtype]
            size = dtype.itemsize
            raw = bufs.out[: (c.stop - c.start) * size]
            mem = memoryview(raw)
            got = 0
            while got < len(mem):
                n = os.preadv(fds[t.shard], [mem[got:]], t.offset + c.start * size + got)
                if n <= 0:
                    raise InputChangedError(f"{staging_dir}/{t.shard}: shorter than planned while checking '{t.name}'")
                got += n
            o = torch.from_numpy(raw).view(dtype)
            fs, fa, fo = torch.isfinite(s), torch.isfinite(a), torch.isfinite(o)
            bad = ~fo & fs & fa
            r = found.setdefault(t.name, NonFinite(t.name))
            r.in_sft += int((~fs).sum())
            r.in_aligned += int((~fa).sum())
            count = int(bad.sum())
            if count and r.first is None:
                i = int(bad.nonzero()[0])
                r.first = (c.start + i, float(s[i]), float(a[i]), float(o[i]), chunk_alpha(t, c))
            r.produced += count
    finally:
        inputs.close()
        for fd in fds.values():
            os.close(fd)
    return [r for r in found.values() if r.produced or r.in_sft or r.in_aligned]


@dataclass
class Done:
    """What an in-process run did: the statistics of each output, and how much of the plan an earlier run that
    stopped had already written (kept from its journal, not read or computed again)."""

    founds: list[dict[str, tuple[kernels.Stats, kernels.Stats]]]
    units: int
    resumed_units: int = 0
    bytes_read: int = 0  # input bytes this run read
    reads: dict = field(default_factory=dict)  # how they were read (reading.Inputs.read_report)


def execute_sweep(plans: list[Plan], stagings: list[Staging], units: tuple[Unit, ...],
                  on_progress: Callable[[int], None] | None = None, stats: bool = True,
                  run: Callable | None = None) -> Done:
    """Compute every chunk of the plans and write plans[j] into stagings[j], from one read of the inputs (an alpha
    sweep: the plans differ only in their alphas; one plan for a single run). Raises InputChangedError if an
    input moved.

    Every finished unit of `units` is journaled in each staging folder once its bytes are on disk; units that a
    resumed staging folder (of every output) already journaled, counted from each shard's start, are kept and
    only the rest is read, computed and written. With `stats`, the fused kernel also returns, per extrapolated
    tensor, the statistics of the change (aligned - sft) and of the applied update (out - aligned), from the same
    pass over the data. `run(plan, chunks, inputs, write, stats)` computes one alpha elsewhere (the api passes
    gpu.run_chunks_cuda bound to a GPU); reading and writing stay here.
    """
    check_same_layout(plans)
    plan = plans[0]
    kept = kept_units(units, stagings)
    founds: list[dict[str, tuple[kernels.Stats, kernels.Stats]]] = [{} for _ in plans]
    for staging, found in zip(stagings, founds, strict=True):
        records = staging.journal_done()
        ends = {}
        for u in units:
            if u.index in kept:
                merge_stats(found, records[u.index]["stats"])
                ends[u.shard] = u.stop  # the units of a shard are kept from its start, in order
        for shard, offset in ends.items():
            staging.resume_at(shard, offset)
        staging.direct_writes()
    todo = [u for u in units if u.index not in kept]
    chunks = [plan.chunks[k] for u in todo for k in range(u.first, u.last)]
    position = {c: k for k, c in enumerate(plan.chunks)}

    def writer(staging: Staging, first: bool):
        journal = _UnitJournal(staging, plan, todo)

        def write(t: TensorPlan, c: Chunk, data: memoryview, chunk_stats) -> None:
            staging.write(t.shard, t.offset + c.start * dtypes.itemsize(t.dtype), data)
            journal.written(t, c, chunk_stats)
            if on_progress:
                on_progress(len(data))
            if first:  # a test switch: die right after this chunk, once its unit is journaled
                fault_point(f"chunk:{position[c]}", staging.journal_drain)
        return write

    writes = [writer(s, j == 0) for j, s in enumerate(stagings)]
    inputs = Inputs(input_paths(plan), direct=direct_io())
    try:
        if run is not None:
            if len(plans) > 1:
                raise ValueError("another compute path runs one alpha at a time")
            new = [run(plan, chunks, inputs, writes[0], stats)]
        else:
            new = run_sweep_chunks(plans, chunks, inputs, writes, stats)
        for staging in stagings:
            staging.flush()
        inputs.check_unchanged()
        reads = inputs.read_report()
    finally:
        inputs.close()
    for found, more in zip(founds, new, strict=True):
        for name, (d, u) in more.items():
            kernels.add_stats(found, name, d, u)
    return Done(founds, len(units), len(kept), sum(chunk_input_bytes(plan, c) for c in chunks), reads)


def kept_units(units: tuple[Unit, ...], stagings: list[Staging], resumed_only: bool = True) -> set[int]:
    """The units journaled in every staging folder, per shard from its first unit up to the first one missing (the
    shard's running checksum continues from there): what a resumed run keeps (with `resumed_only`, only from
    staging folders an earlier run left)."""
    if not units or (resumed_only and not all(st.resumed for st in stagings)):
        return set()
    journaled = set.intersection(*(set(st.journal_done()) for st in stagings))
    kept, broken = set(), set()
    for u in units:
        if u.shard in broken or u.index not in journaled:
            broken.add(u.shard)
        else:
            kept.add(u.index)
    return kept


def chunk_input_bytes(plan: Plan, c: Chunk) -> int:
    t = plan.tensors[c.tensor]
    n = c.stop - c.start
    reads_sft = t.action == "extrapolate" and c.sft_span is not None
    return n * dtypes.itemsize(t.aligned.dtype) + (n * dtypes.itemsize(t.sft.dtype) if reads_sft else 0)


def merge_stats(found: dict, stats: dict | None) -> None:
    """Add a journal record's statistics ({name: [delta, update] as dicts}) into `found`."""
    for name, (d, u) in (stats or {}).items():
        kernels.add_stats(found, name, kernels.Stats(**d), kernels.Stats(**u))


def stats_as_record(found: dict) -> dict:
    return {name: [asdict(d), asdict(u)] for name, (d, u) in found.items()}


class _UnitJournal:
    """Collects, on the writer thread, the statistics of the unit being written, and hands each finished unit to
    the staging folder's journal."""

    def __init__(self, staging: Staging, plan: Plan, units: list[Unit]):
        self.staging = staging
        self.ends = {plan.chunks[u.last - 1]: u for u in units}
        self.found: dict[str, tuple[kernels.Stats, kernels.Stats]] = {}

    def written(self, t: TensorPlan, c: Chunk, chunk_stats) -> None:
        if chunk_stats is not None:
            kernels.add_stats(self.found, t.name, *(replace(st) for st in chunk_stats))
        u = self.ends.get(c)
        if u is not None:
            self.staging.unit_written(u, {"index": u.index, "bytes": u.stop - u.start,
                                          "stats": stats_as_record(self.found)})
            self.found = {}


def check_same_layout(plans: list[Plan]) -> None:
    """The plans of a sweep must lay out the same bytes: the same shards, chunks and tensor slots."""
    first = plans[0]
    for p in plans[1:]:
        if (p.shards != first.shards or p.chunks != first.chunks or p.chunk_bytes != first.chunk_bytes
                or [(t.name, t.sft, t.aligned, t.dtype, t.offset) for t in p.tensors]
                != [(t.name, t.sft, t.aligned, t.dtype, t.offset) for t in first.tensors]):
            raise ValueError("the plans of a sweep must differ only in their alphas")


def run_chunks(plan: Plan, chunks, inputs: Inputs, write: Callable, stats: bool = True
               ) -> dict[str, tuple[kernels.Stats, kernels.Stats]]:
    """Read, compute and write `chunks` (of `plan`) with the three stages overlapped; `write(tensor, chunk, bytes,
    chunk_stats)` runs on one thread, in chunk order (chunk_stats: the chunk's (delta, update) statistics, None
    for a copied tensor). Returns the fused statistics per tensor (partial sums over these chunks only)."""
    return run_sweep_chunks([plan], chunks, inputs, [write], stats)[0]


def run_sweep_chunks(plans: list[Plan], chunks, inputs: Inputs, writes: list[Callable], stats: bool = True
                     ) -> list[dict[str, tuple[kernels.Stats, kernels.Stats]]]:
    """`run_chunks` for the outputs of a sweep: each chunk is read once (through plans[0]'s slots) and computed
    with each plan's alphas; writes[j] gets plans[j]'s bytes. Returns the statistics of each output."""
    founds: list[dict[str, tuple[kernels.Stats, kernels.Stats]]] = [{} for _ in plans]
    sets = [Buffers(plans[0].chunk_bytes, len(plans)) for _ in range(DEPTH)]
    if not any(_needs_torch(t, stats) for p in plans for t in p.tensors):
        _pipeline(plans, chunks, inputs, writes, stats, founds, sets)  # the compiled kernel does all the math
        return founds
    import torch

    # One torch thread per compute thread: the reader and writer threads keep the other cores busy, and torch's
    # intra-op threads would spin at a barrier for every small block while those hold the cores (measured: 2.5x
    # slower runs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _pipeline(plans, chunks, inputs, writes, stats, founds, sets)
        return founds
    finally:
        torch.set_num_threads(threads)


def _needs_torch(t: TensorPlan, stats: bool) -> bool:
    return t.action == "extrapolate" and not kernels.native_handles(t.dtype, t.sft.dtype, t.aligned.dtype, stats)


def _write_outputs(writes: list[Callable], ts: list[TensorPlan], c: Chunk, outs: list) -> None:
    for write, t, (out, chunk_stats) in zip(writes, ts, outs, strict=True):
        write(t, c, memoryview(out), chunk_stats)


def ring(n: int, read: Callable[[int], object], compute: Callable[[int, object], object],
         finish: Callable[[int, object], None], prefetch: Callable[[int], None] | None = None) -> None:
    """The overlapped pipeline, once for every compute path: for k = 0 .. n-1, `read(k)` on a reader thread,
    `compute(k, read's result)` on the calling thread, `finish(k, compute's result)` on a writer thread, in order.
    While k is computed, k + 1 is read and k - 1 finished. Step k uses buffer set k mod DEPTH: k + 1 is read only
    once step k + 1 - DEPTH has finished with that set. `prefetch(k)` (optional) runs just before read(k - 1), so
    the disk can fetch what k needs meanwhile. A failure in any stage stops the ring and is raised here."""
    def read_next(k: int):
        if prefetch and k + 1 < n:
            prefetch(k + 1)
        return read(k)

    failed = []

    def finish_in_order(k: int, done) -> None:
        if failed:  # a step after a failed one must not run (its bytes would sit beside a hole): the same error
            raise failed[0]
        try:
            finish(k, done)
        except BaseException as e:
            failed.append(e)
            raise

    with ThreadPoolExecutor(1, "expo-read") as reader, ThreadPoolExecutor(1, "expo-write") as writer:
        finishing = {}
        pending = reader.submit(read_next, 0) if n else None
        for k in range(n):
            got = pending.result()
            if k + 1 < n:
                if k + 1 - DEPTH in finishing:  # that buffer set is free once its step has finished
                    finishing.pop(k + 1 - DEPTH).result()
                pending = reader.submit(read_next, k + 1)
            finishing[k] = writer.submit(finish_in_order, k, compute(k, got))
            for j in [j for j, f in finishing.items() if f.done()]:
                finishing.pop(j).result()  # surfaces a failed write early
        for f in finishing.values():  # in order: the first failure is the one raised
            f.result()


def _pipeline(plans, chunks, inputs, writes, stats, founds, sets):
    plan, last = plans[0], len(plans) - 1
    with ThreadPoolExecutor(COMPUTE_THREADS, "expo-compute") as pool:

        def compute(k: int, got):
            s, a = got
            c, bufs = chunks[k], sets[k % DEPTH]
            ts = [p.tensors[c.tensor] for p in plans]
            # Every output from the same input buffers; only the last may overwrite the aligned one, after the
            # others have read it.
            return ts, [_compute(t, chunk_alpha(t, c), s, a, bufs.outs[j], j == last, founds[j], stats, pool,
                                 c.sft_span is not None) for j, t in enumerate(ts)]

        ring(len(chunks),
             read=lambda k: _read(inputs, plan.tensors[chunks[k].tensor], chunks[k], sets[k % DEPTH]),
             compute=compute,
             finish=lambda k, done: _write_outputs(writes, done[0], chunks[k], done[1]),
             prefetch=lambda k: inputs.prefetch(plan.tensors[chunks[k].tensor], chunks[k]))


def chunk_alpha(t: TensorPlan, c: Chunk) -> float:
    """The alpha of chunk `c` of tensor `t`: the tensor's, or 0 for rows only the aligned model has (copied)."""
    return t.alpha if c.sft_span is not None else 0.0


def _read(inputs: Inputs, t: TensorPlan, c: Chunk, bufs: Buffers):
    a = inputs.read_bytes(bufs.aligned, t.aligned, c.start, c.stop)
    if t.action != "extrapolate":
        return None, a
    # rows only the aligned model has: aligned as both sides, at alpha 0 (aligned itself, rounded once)
    return (a if c.sft_span is None else inputs.read_bytes(bufs.sft, t.sft, *c.sft_span)), a


def _compute(t: TensorPlan, alpha: float, s: np.ndarray | None, a: np.ndarray, out_buf: np.ndarray, in_place: bool,
             found: dict, stats: bool, pool: ThreadPoolExecutor, shared: bool = True
             ) -> tuple[np.ndarray, tuple | None]:
    """One output of one chunk (uint8 arrays of its elements), with the tensor's alpha: over the aligned buffer
    when `in_place` allows and the dtypes agree, else into `out_buf`. Adds the chunk's statistics to `found` and
    returns them too ((delta, update) of this chunk; None for a copy). `shared`: False for vocabulary rows only the
    aligned model has, whose change aligned - sft does not exist (it is left out of the statistics)."""
    if t.action == "copy":
        return a, None
    so, ss, sa = (dtypes.itemsize(d) for d in (t.dtype, t.sft.dtype, t.aligned.dtype))
    n = len(a) // sa
    out = a if in_place and t.aligned.dtype == t.dtype else out_buf[: n * so]
    # Split the chunk over the compute threads (the compiled kernel and torch release the GIL), each on whole blocks.
    step = -(-n // (COMPUTE_THREADS * kernels.STATS_BLOCK)) * kernels.STATS_BLOCK
    parts = [pool.submit(kernels.extrapolate_bytes, out[i * so:(i + step) * so], t.dtype, s[i * ss:(i + step) * ss],
                         t.sft.dtype, a[i * sa:(i + step) * sa], t.aligned.dtype, alpha, stats)
             for i in range(0, n, step)]
    piece: dict[str, tuple[kernels.Stats, kernels.Stats]] = {}
    for p in parts:
        kernels.add_stats(piece, t.name, *p.result())
    delta, update = piece.get(t.name) or (kernels.Stats(), kernels.Stats())
    if not shared:  # vocabulary rows only the aligned model has: no SFT value, so no change to count
        delta = kernels.Stats()
    kernels.add_stats(found, t.name, replace(delta), replace(update))
    return out, (delta, update)
