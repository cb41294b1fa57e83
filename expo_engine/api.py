"""The Python API: resolve sources, plan, check, execute, publish. Every stage is its own module."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from . import __version__, dtypes
from .distributed import DEFAULT_UNIT_BYTES
from .errors import NonFiniteError, OptionError
from .executor import check_copies, execute, scan_nonfinite
from .kernels import Stats
from .plan import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_SHARD_SIZE, Plan, check_alpha, make_plan, make_units, parse_size
from .sources import Checkpoint, open_checkpoint
from .writer import Staging, check_output_path, side_files

FORMULA = "theta_expo = theta_aligned + alpha * (theta_aligned - theta_sft)"


@dataclass(frozen=True)
class Summary:
    """What one extrapolation did."""

    out: str
    alpha: float
    tensors: int
    extrapolated: int
    copied: int
    shards: int
    dtypes: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int  # VmHWM of this process (resource.getrusage), reading, computing and writing included
    files: dict[str, dict]
    executor: str = "in-process"  # or "ray"
    executor_note: str = ""  # why that executor was chosen
    nodes: dict = field(default_factory=dict)  # Ray: node id -> {"host", "units", "bytes", "seconds"}
    phases: dict = field(default_factory=dict)  # seconds per phase
    units: int = 0
    resumed_units: int = 0
    tree_peak_bytes: int = 0  # Ray: peak summed RSS of this process and its children (Ray's and the workers)
    warnings: list[str] = field(default_factory=list)  # e.g. NaN/Inf already in an input, carried through


def extrapolate(
    sft: str,
    aligned: str,
    alpha: float,
    out: str,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    stats: bool = True,
    executor: str = "auto",
    workers: int | None = None,
    ray_address: str | None = None,
    max_memory: int | str | None = None,
    unit_bytes: int = DEFAULT_UNIT_BYTES,
    allow_nonfinite: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
    on_executor: Callable[[str, str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Summary:
    """Build the ExPO model ``aligned + alpha * (aligned - sft)`` in the folder `out`.

    `sft` and `aligned` are folders or Hub repo ids (``org/name[@revision]``), in safetensors or `.bin` format,
    sharded any way. Floats are computed in float32 and rounded once to `dtype` (default: each aligned tensor's
    dtype). Memory is bounded by `chunk_bytes` (a few chunks are in flight), not by the model or its largest
    tensor. Everything is checked before the first output byte; the output folder appears, complete, by rename.
    With `stats` (default), the norms of the change aligned - sft and of the applied update are computed in the
    same pass and stored in the output's expo.json (`expo norms --from OUT` prints them).

    `executor`: "local" (this process: reader, compute and writer threads), "ray" (units of at most `unit_bytes`
    as Ray tasks on `workers` local CPUs, or on the cluster at `ray_address` / RAY_ADDRESS, with at most
    `max_memory` bytes of tasks in flight per node; an interrupted run resumes from its journal), or "auto":
    Ray when a cluster address, `workers` > 1, or an output of RAY_MIN_BYTES or more, else local.

    NaN or Inf produced from finite inputs (alpha too large for the output dtype) is a NonFiniteError naming the
    tensor; NaN or Inf already in an input is carried through with a warning in `Summary.warnings`, unless
    `allow_nonfinite`.

    Raises an :class:`~expo_engine.errors.ExpoError` subclass for every user error.
    """
    started = time.monotonic()
    alpha = check_alpha(alpha)
    sft_ck, aligned_ck = open_checkpoint(sft), open_checkpoint(aligned)
    out_path = check_output_path(out, [sft_ck.path, aligned_ck.path], overwrite)
    plan = make_plan(sft_ck, aligned_ck, alpha, dtype=dtype, max_shard_size=max_shard_size, chunk_bytes=chunk_bytes)
    check_copies(plan)

    side = side_files(aligned_ck, dtypes.CONFIG_NAMES[dtypes.CLI_NAMES[dtype.lower()]] if dtype else None)
    kind, why = choose_executor(executor, plan, workers, ray_address)
    budget = parse_size(max_memory) if max_memory is not None else None
    if on_plan:
        on_plan(plan)
    if on_executor:
        on_executor(kind, why)

    report = None
    phases = {"plan": time.monotonic() - started}
    if kind == "ray":
        from .distributed import execute_ray, journal_key

        units = make_units(plan, unit_bytes)
        with Staging(out_path, plan, journal_key(plan, units, stats)) as staging:
            found, report = execute_ray(plan, units, staging, workers=workers, address=ray_address,
                                        max_memory=budget, stats=stats, on_progress=on_progress)
            warnings = check_finite(plan, staging, found, allow_nonfinite)
            files = _publish(staging, plan, sft_ck, aligned_ck, side, found if stats else None, phases)
        phases = {"plan": phases["plan"], **report.phases, "hash+publish": phases["hash+publish"]}
    else:
        t = time.monotonic()
        with Staging(out_path, plan) as staging:
            found = execute(plan, staging, on_progress, stats=stats)
            phases["compute"] = time.monotonic() - t
            warnings = check_finite(plan, staging, found, allow_nonfinite)
            files = _publish(staging, plan, sft_ck, aligned_ck, side, found if stats else None, phases)
    n_extra = sum(t.action == "extrapolate" for t in plan.tensors)
    return Summary(
        out=out_path,
        alpha=alpha,
        tensors=len(plan.tensors),
        extrapolated=n_extra,
        copied=len(plan.tensors) - n_extra,
        shards=len(plan.shards),
        dtypes=plan.out_dtypes,
        bytes_read=plan.bytes_read,
        bytes_written=sum(f["size"] for f in files.values()),
        seconds=time.monotonic() - started,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        files=files,
        executor=kind,
        executor_note=why,
        nodes=report.nodes if report else {},
        phases=phases,
        units=report.units if report else 0,
        resumed_units=report.resumed if report else 0,
        tree_peak_bytes=report.tree_peak if report else 0,
        warnings=warnings,
    )


RAY_MIN_BYTES = 20 * 10**9  # below this, Ray's start-up (~5 s) and per-task imports outweigh what it adds here


def choose_executor(executor: str, plan: Plan, workers: int | None, address: str | None) -> tuple[str, str]:
    if executor not in ("auto", "local", "ray"):
        raise OptionError(f"executor must be auto, local or ray, not {executor!r}")
    if workers is not None and workers < 1:
        raise OptionError(f"workers must be at least 1, got {workers}")
    address = address or os.environ.get("RAY_ADDRESS")
    if executor == "local":
        if address or (workers or 1) > 1:
            raise OptionError("--workers above 1 and --ray-address need the Ray executor; drop --executor local")
        return "local", "asked for"
    if executor == "ray":
        return "ray", "asked for"
    if address:
        return "ray", f"joining the Ray cluster at {address}"
    if workers is not None:
        return ("ray", f"{workers} local Ray workers") if workers > 1 else ("local", "--workers 1")
    if plan.total_size >= RAY_MIN_BYTES:
        return "ray", f"output of {plan.total_size / 1e9:.0f} GB: local Ray workers on {os.cpu_count()} CPUs"
    return "local", (f"small job ({plan.total_size / 1e9:.2f} GB of output): in this process, without Ray's "
                     "start-up; pass --workers N or --executor ray to use Ray")


def check_finite(plan: Plan, staging: Staging, found: dict[str, tuple[Stats, Stats]], allow: bool) -> list[str]:
    """Before publishing: the tensors whose output the kernels flagged as possibly NaN/Inf are read again and
    looked at element by element. NaN/Inf the formula produced from finite inputs is an error; NaN/Inf that was
    already in an input is carried through and reported as a warning (none with `allow`)."""
    flagged = [name for name, (_, update) in found.items() if not update.finite]
    if not flagged:
        return []
    found_bad = scan_nonfinite(plan, staging.dir, flagged)
    out_dtype = {t.name: t.dtype for t in plan.tensors}
    for r in found_bad:
        if r.produced:
            i, s, a, o = r.first
            raise NonFiniteError(
                f"tensor '{r.name}': the formula gave NaN or Inf at {r.produced} element(s) whose inputs are finite "
                f"(first at index {i}: sft {s:g}, aligned {a:g}, alpha {plan.alpha:g} -> {o:g} in "
                f"{out_dtype[r.name]}); use a smaller alpha or a "
                "wider output dtype (--dtype fp32)"
            )
    if allow:
        return []
    return [f"tensor '{r.name}': NaN or Inf already in the inputs (sft: {r.in_sft}, aligned: {r.in_aligned} "
            "element(s)), carried into the output; --allow-nonfinite silences this" for r in found_bad]


def _publish(staging: Staging, plan: Plan, sft_ck: Checkpoint, aligned_ck: Checkpoint, side: dict,
             found: dict | None, phases: dict) -> dict:
    t = time.monotonic()
    prov = provenance(plan, sft_ck, aligned_ck)
    if found is not None:
        prov["stats"] = stats_record(found, sft_ck, aligned_ck, plan.alpha)
    files = staging.finish(side, prov)
    phases["hash+publish"] = time.monotonic() - t
    return files


def stats_record(found: dict[str, tuple[Stats, Stats]], sft: Checkpoint, aligned: Checkpoint, alpha: float) -> dict:
    """Raw float64 sums per tensor (so every aggregate can be rebuilt exactly) for the two changes."""
    def pair(a: str, b: str, which: int) -> dict:
        total = Stats()
        for st in found.values():
            total.add(st[which])
        return {"a": a, "b": b, "total": total.summary(),
                "tensors": {name: asdict(st[which]) for name, st in found.items()}}

    return {
        "note": "delta = aligned - sft; update = expo - aligned as written (after rounding); sums in float64 of "
                "float32 partial sums over blocks of 262144 elements",
        "delta": pair(sft.source, aligned.source, 0),
        "update": pair(aligned.source, f"expo (alpha={alpha:g})", 1),
    }


def provenance(plan: Plan, sft: Checkpoint, aligned: Checkpoint) -> dict:
    def side(ck: Checkpoint) -> dict:
        return {"source": ck.source, "path": ck.path, "revision": ck.revision, "format": ck.format,
                "files": list(ck.files)}

    return {
        "engine": "expo_engine",
        "engine_version": __version__,
        "formula": FORMULA,
        "alpha": plan.alpha,
        "math": "float32, rounded once to the output dtype",
        "dtypes": plan.out_dtypes,
        "sft": side(sft),
        "aligned": side(aligned),
        "tensors": len(plan.tensors),
        "total_size": plan.total_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
