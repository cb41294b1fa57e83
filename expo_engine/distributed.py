"""Distributed executor: the plan's units as Ray tasks, a journal for resume, one memory budget per node.

The driver sends each task the plan (once, through the object store) and a unit index, never tensor data. A task
reads its unit's input ranges, computes, writes its byte range of the preallocated staging shard with `pwrite`,
fdatasyncs it, and returns the range's sha256 and the fused statistics. The driver keeps at most a budgeted
number of tasks in flight (`ray.wait`), appends each finished unit to a journal in the staging folder, and
publishes nothing until every unit is written and every shard is hashed. A rerun of an interrupted job skips
the units whose journal entry still matches the bytes on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field

from . import dtypes, kernels
from .errors import ExpoError, Interrupted, OptionError, OutputError, SourceError
from .executor import merge_stats, run_chunks, stats_as_record
from .plan import Chunk, Plan, TensorPlan, Unit
from .reading import DEPTH, Inputs, direct_io, hash_range, input_paths, pwrite_all
from .writer import Staging

STOP_WAIT = 300.0  # seconds an interrupted run on a joined cluster waits for its in-flight units
FAULT_KILL = "EXPO_FAULT_KILL_UNIT"  # test switch: the worker running this unit index dies on its first attempt
FAULT_STOP = "EXPO_FAULT_STOP_AFTER"  # test switch: the driver stops, as if interrupted, after this many units
FAULT_DELAY = "EXPO_FAULT_DELAY_S"  # test switch: every task sleeps this long before computing
WORKER_BASE = 400 * 2**20  # a worker process with torch imported, before any chunk buffer


@dataclass
class RunReport:
    units: int = 0
    resumed: int = 0  # units skipped because the journal and the bytes on disk agreed
    nodes: dict[str, dict] = field(default_factory=dict)  # node id -> {"host", "units", "bytes", "seconds"}
    phases: dict[str, float] = field(default_factory=dict)
    max_in_flight: int = 0
    tree_peak: int = 0  # peak summed RSS of the driver and all its descendants (a local Ray's processes)


class _TreeMemory:
    """Samples the summed RSS of this process and its descendants every 0.2 s on a daemon thread."""

    def __init__(self):
        import threading

        import psutil

        self.peak, self._stop = 0, threading.Event()
        self._root = psutil.Process()
        self._thread = threading.Thread(target=self._run, name="expo-memory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                procs = [self._root]
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def task_memory(plan: Plan) -> int:
    """What one task holds: a worker's base plus DEPTH sets of three chunk buffers."""
    return WORKER_BASE + DEPTH * 3 * plan.chunk_bytes


def default_budget() -> int:
    import psutil

    return int(min(4 * 2**30, psutil.virtual_memory().available // 2))


def start_ray(workers: int | None, address: str | None):
    """Join `address` (or RAY_ADDRESS) if given, else start a local instance on loopback. Returns ray, and whether
    this call started it (and so must shut it down)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps a local Ray on 127.0.0.1
    try:
        import ray
    except ImportError:
        raise OptionError("the Ray executor needs ray: pip install 'ray>=2.9'") from None
    if ray.is_initialized():
        return ray, False
    address = address or os.environ.get("RAY_ADDRESS")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False,
                     logging_level="ERROR", log_to_driver=False, object_store_memory=128 * 2**20,
                     _node_ip_address="127.0.0.1")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise OptionError(f"cannot start or join Ray at {address or 'a local instance'}: {e}") from None
    if threading.current_thread() is threading.main_thread() and callable(previous):
        # ray.init replaces SIGTERM's handler with one that exits at once; keep ours (a clean, resumable stop)
        signal.signal(signal.SIGTERM, previous)
    return ray, True


def _alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _probe(paths: dict[str, int], staging_dir: str) -> dict:
    """On one node: can it see every input file with its size, and write into the staging folder?"""
    problems = []
    for path, size in paths.items():
        try:
            if os.stat(path).st_size != size:
                problems.append(f"{path} has another size there")
        except OSError as e:
            problems.append(f"cannot see {path} ({e.strerror})")
    probe = os.path.join(staging_dir, f".expo-probe-{os.getpid()}-{socket.gethostname()}")
    try:
        with open(probe, "x"):
            pass
        os.remove(probe)
    except OSError as e:
        problems.append(f"cannot write in {staging_dir} ({e.strerror})")
    return {"host": socket.gethostname(), "problems": problems}


def probe_nodes(ray, plan: Plan, staging_dir: str) -> list[dict]:
    """Run `_probe` once on every alive node; fail, naming the node, if one cannot see the files."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths = {p: os.path.getsize(p) for p in sorted(set(input_paths(plan)))}
    task = ray.remote(num_cpus=0)(_probe)
    nodes = _alive_nodes(ray)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(paths, staging_dir) for n in nodes]
    results = ray.get(refs)
    for node, r in zip(nodes, results, strict=True):
        if r["problems"]:
            raise SourceError(
                f"Ray node {node['NodeManagerAddress']} ({r['host']}, {node['NodeID'][:12]}) {r['problems'][0]}"
                + (f" (and {len(r['problems']) - 1} more)" if len(r["problems"]) > 1 else "")
                + "; input and output folders must be on a filesystem every node of the cluster sees")
    return results


def run_unit(plan: Plan, unit: Unit, staging_dir: str, stats: bool, expect: str | None = None,
             faults: dict | None = None, device: str = "cpu") -> dict:
    """Compute one unit and write it at its planned bytes of the staging shard (idempotent).

    With `expect` (a sha256 from the journal), first hash what is on disk: if it matches, the unit is done.
    """
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    started = time.monotonic()
    path = os.path.join(staging_dir, unit.shard)
    fd = os.open(path, os.O_RDWR)
    try:
        if expect is not None:
            if hash_range(fd, unit.start, unit.stop).hexdigest() == expect:
                return {"index": unit.index, "sha256": expect, "skipped": True, "node": node,
                        "host": socket.gethostname(), "bytes": unit.stop - unit.start, "stats": None,
                        "seconds": time.monotonic() - started}
        _maybe_fail(unit, faults or {})
        chunks = plan.chunks[unit.first:unit.last]
        h = hashlib.sha256()

        def write(t: TensorPlan, c: Chunk, data: memoryview, _chunk_stats=None) -> None:
            offset = t.offset + c.start * dtypes.itemsize(t.dtype)
            pwrite_all(fd, data, offset)
            os.posix_fadvise(fd, offset, len(data), os.POSIX_FADV_DONTNEED)  # start writeback now
            h.update(data)  # chunks of a unit are contiguous and written in order

        inputs = Inputs({slot.file for c in chunks for slot in (plan.tensors[c.tensor].sft,
                                                                  plan.tensors[c.tensor].aligned)},
                        direct=direct_io())
        try:
            if device == "cuda":  # Ray gave this task one GPU (num_gpus=1) and set CUDA_VISIBLE_DEVICES to it
                from .gpu import resolve_device, run_chunks_cuda

                found = run_chunks_cuda(plan, chunks, inputs, write, stats, device=resolve_device("cuda"))
            else:
                found = run_chunks(plan, chunks, inputs, write, stats)
            inputs.check_unchanged()
        finally:
            inputs.close()
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return {"index": unit.index, "sha256": h.hexdigest(), "skipped": False, "node": node,
            "host": socket.gethostname(), "bytes": unit.stop - unit.start, "seconds": time.monotonic() - started,
            "stats": stats_as_record(found)}


def _maybe_fail(unit: Unit, faults: dict) -> None:
    """Fault injection for tests, switched on by environment variables the driver reads (FAULT_*)."""
    time.sleep(faults.get("delay", 0.0))
    if faults.get("kill") != unit.index:
        return
    try:
        with open(faults["marker"], "x"):
            pass
    except FileExistsError:
        return  # this is the retry
    os._exit(17)  # the worker process dies mid-task, as a killed or OOM-ed worker would


def execute_ray(plan: Plan, units: tuple[Unit, ...], staging: Staging, *, workers: int | None = None,
                address: str | None = None, max_memory: int | None = None, stats: bool = True,
                on_progress=None, device: str = "cpu") -> tuple[dict, RunReport]:
    """Run every unit on Ray, journaling each one; returns the merged statistics and a report.

    With `device` "cuda" every task asks Ray for one GPU (`num_gpus=1`), so each GPU of each node runs one unit at
    a time; nodes without GPUs take none."""
    report = RunReport(units=len(units))
    t0 = time.monotonic()
    memory = _TreeMemory()
    ray, started = start_ray(workers, address)
    try:
        report.phases["ray start"] = time.monotonic() - t0
        t1 = time.monotonic()
        probe_nodes(ray, plan, staging.dir)
        report.phases["probe"] = time.monotonic() - t1
        per_task = task_memory(plan)
        budget = max_memory or default_budget()
        nodes = _alive_nodes(ray)
        per_node = max(1, budget // per_task)
        cap = sum(min(per_node, max(1, int(n["Resources"].get("CPU", 1)))) for n in nodes)
        if device == "cuda":
            gpus = sum(int(n["Resources"].get("GPU", 0)) for n in nodes)
            if not gpus:
                raise OptionError("--device cuda on Ray: no node of the cluster has a GPU; use --device cpu")
            cap = sum(min(per_node, int(n["Resources"].get("GPU", 0))) for n in nodes)
        if not address and not os.environ.get("RAY_ADDRESS") and workers:
            cap = min(cap, workers)
        report.max_in_flight = cap
        task = ray.remote(num_cpus=1, num_gpus=1 if device == "cuda" else 0, max_retries=3,
                          memory=per_task)(run_unit)
        plan_ref = ray.put(plan)
        found: dict[str, tuple[kernels.Stats, kernels.Stats]] = {}
        done = staging.journal_done()
        stop_after = int(os.environ.get(FAULT_STOP, "0") or 0)
        faults = {"delay": float(os.environ.get(FAULT_DELAY, "0") or 0)}
        if os.environ.get(FAULT_KILL):
            faults |= {"kill": int(os.environ[FAULT_KILL]),
                       "marker": os.path.join(tempfile.gettempdir(), f"expo-fault-{os.getpid()}-{time.time_ns()}")}
        todo = list(units)
        pending: dict = {}
        finished = 0
        t2 = time.monotonic()
        try:
            while todo or pending:
                while todo and len(pending) < cap:
                    u = todo.pop(0)
                    prior = done.get(u.index)
                    pending[task.remote(plan_ref, u, staging.dir, stats, prior["sha256"] if prior else None,
                                        faults, device)] = u
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    u = pending.pop(ref)
                    r = ray.get(ref)
                    if r["skipped"]:
                        r = {**done[u.index], "skipped": True, "node": r["node"], "host": r["host"]}
                        report.resumed += 1
                    else:
                        staging.journal_add({k: r[k] for k in ("index", "sha256", "bytes", "stats")})
                    merge_stats(found, r["stats"])
                    node = report.nodes.setdefault(r["node"], {"host": r["host"], "units": 0, "bytes": 0,
                                                               "seconds": 0.0})
                    node["units"] += 1
                    node["bytes"] += r["bytes"]
                    node["seconds"] += r.get("seconds", 0.0)
                    if on_progress:
                        on_progress(u.stop - u.start)
                    finished += 1
                    if stop_after and finished >= stop_after and (todo or pending):
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            if not started and pending:
                # A cluster we joined keeps running: let our in-flight tasks (a few units) finish before we let go of
                # the output. Not ray.cancel: cancelling a task as it finishes trips a check inside Ray 2.60 that
                # aborts this process (seen in CI: "Tried to complete task that was not pending").
                with contextlib.suppress(Exception):
                    ray.wait(list(pending), num_returns=len(pending), timeout=STOP_WAIT)
            staging.keep = True
            raise Interrupted(f"interrupted; {len(staging.journal_done())} of {len(units)} units are kept in "
                              f"{staging.dir}; run the same command again to resume") from None
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ExpoError):  # a user error inside a task (an input changed): not resumable
                raise e.cause from None
            staging.keep = True
            raise OutputError(f"a Ray task failed ({type(e.cause).__name__}: {e.cause}); finished units are kept "
                              f"in {staging.dir}; run the same command again to resume") from None
        except ray.exceptions.RayError as e:
            staging.keep = True
            raise OutputError(f"a Ray task failed after its retries ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              f"finished units are kept in {staging.dir}; run the same command again to resume"
                              ) from None
        report.phases["compute"] = time.monotonic() - t2
    finally:
        if started:
            ray.shutdown()
        report.tree_peak = memory.stop()
    return found, report
