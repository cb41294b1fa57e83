"""The Python API: resolve sources, plan, check, execute, publish. Every stage is its own module."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from . import __version__, dtypes
from .executor import check_copies, execute
from .kernels import Stats
from .plan import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_SHARD_SIZE, Plan, check_alpha, make_plan
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
    on_plan: Callable[[Plan], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Summary:
    """Build the ExPO model ``aligned + alpha * (aligned - sft)`` in the folder `out`.

    `sft` and `aligned` are folders or Hub repo ids (``org/name[@revision]``), in safetensors or `.bin` format,
    sharded any way. Floats are computed in float32 and rounded once to `dtype` (default: each aligned tensor's
    dtype). Memory is bounded by `chunk_bytes` (a few chunks are in flight), not by the model or its largest
    tensor. Everything is checked before the first output byte; the output folder appears, complete, by rename.
    With `stats` (default), the norms of the change aligned - sft and of the applied update are computed in the
    same pass and stored in the output's expo.json (`expo norms --from OUT` prints them).

    Raises an :class:`~expo_engine.errors.ExpoError` subclass for every user error.
    """
    started = time.monotonic()
    alpha = check_alpha(alpha)
    sft_ck, aligned_ck = open_checkpoint(sft), open_checkpoint(aligned)
    out_path = check_output_path(out, [sft_ck.path, aligned_ck.path], overwrite)
    plan = make_plan(sft_ck, aligned_ck, alpha, dtype=dtype, max_shard_size=max_shard_size, chunk_bytes=chunk_bytes)
    check_copies(plan)

    side = side_files(aligned_ck, dtypes.CONFIG_NAMES[dtypes.CLI_NAMES[dtype.lower()]] if dtype else None)
    if on_plan:
        on_plan(plan)

    with Staging(out_path, plan) as staging:
        found = execute(plan, staging, on_progress, stats=stats)
        prov = provenance(plan, sft_ck, aligned_ck)
        if stats:
            prov["stats"] = stats_record(found, sft_ck, aligned_ck, plan.alpha)
        files = staging.finish(side, prov)
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
    )


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
