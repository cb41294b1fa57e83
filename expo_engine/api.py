"""The Python API: resolve sources, plan, check, execute, publish. Every stage is its own module."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from . import __version__, dtypes
from .adapters import Adapter, is_adapter, open_adapter, output_side_files, run_lora_chunks
from .errors import Interrupted, NonFiniteError, OptionError
from .executor import check_copies, execute_sweep, kept_units, scan_nonfinite
from .kernels import Stats, native_kernel
from .ownership import OutputLock
from .plan import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_SHARD_SIZE,
    DEFAULT_UNIT_BYTES,
    Plan,
    check_alpha,
    check_alphas,
    make_plan,
    make_units,
    parse_size,
    sweep_folder,
)
from .rules import as_rules
from .sources import Checkpoint, open_checkpoint
from .writer import Staging, check_output_path, check_target, journal_key, side_files

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
    units: int = 0  # units of the plan: the steps of the resume journal (Ray: its tasks)
    resumed_units: int = 0  # units already written by an earlier run that stopped, kept from its journal
    bytes_read_now: int = 0  # input bytes this run read (less than bytes_read when it resumed)
    tree_peak_bytes: int = 0  # Ray: peak summed RSS of this process and its children (Ray's and the workers)
    warnings: list[str] = field(default_factory=list)  # e.g. NaN/Inf already in an input, carried through
    alpha_overrides: dict = field(default_factory=dict)  # {tensor: alpha} where an alpha rule changed `alpha`
    device: str = "cpu"  # where the arithmetic ran: "cpu", or "cuda:N (GPU name, kernel)" / "cuda (Ray GPUs)"
    notes: list[str] = field(default_factory=list)  # what was settled beside the output (a stopped run's leftovers)


@dataclass(frozen=True)
class SweepSummary:
    """What an alpha sweep did: one Summary per alpha, in the order given, and the totals of the one pass."""

    out: str  # the parent folder; runs[i].out is out/alpha-...
    alphas: list[float]
    runs: list[Summary]
    bytes_read: int  # read once for every alpha
    bytes_written: int  # all outputs together
    seconds: float
    peak_rss_bytes: int
    warnings: list[str]
    resumed_units: int = 0  # units every output had already written in an earlier run that stopped
    units: int = 0
    bytes_read_now: int = 0  # input bytes this run read


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
    alpha_rules=None,
    drop=None,
    drop_shared: bool = False,
    vocab: str = "auto",
    device: str = "auto",
    provenance: dict | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    on_executor: Callable[[str, str], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
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

    `alpha_rules` give some tensors another alpha: a list of `PATTERN=VALUE` / `kind:KIND=VALUE` strings,
    rules-file dicts or :class:`~expo_engine.rules.Rule`s, first match wins (see :mod:`expo_engine.rules`); the
    alpha of every tensor that differs from `alpha` is recorded in expo.json (`alpha_by_tensor`). For several
    alphas from one read of the inputs, see :func:`extrapolate_sweep`.

    `device`: where the arithmetic runs: "cpu", "cuda" / "cuda:N" (a fused Triton kernel, or torch ops where
    Triton cannot run, with reads and writes overlapping the transfers; with Ray, one GPU per task), or "auto"
    (cuda when this machine sees a GPU). Reading and writing stay on the host either way.

    `drop`: regexes (searched in tensor names) whose tensors are left out of the output on purpose, e.g. the value
    head of an RLHF checkpoint (`v_head[.]`); recorded in expo.json (`dropped`). A pattern that matches a tensor both
    checkpoints hold is refused (the output would lack a weight its model needs), unless `drop_shared`.

    `vocab`: when the aligned model's vocabulary was resized (its embeddings and head have more rows), which rows
    mean the same token: "auto" decides from the two tokenizers; "aligned-extends-sft" takes the first rows of the
    aligned model as the SFT model's without them. Shared rows are extrapolated, the aligned model's extra rows
    copied; expo.json records which (`vocab`). With "auto", two tokenizers that put the same tokens at other ids
    are matched by token string at equal row counts too (a reordered vocabulary).

    `provenance`: more keys for expo.json (`expo search --write-best` records the search there).

    Raises an :class:`~expo_engine.errors.ExpoError` subclass for every user error.
    """
    started = time.monotonic()
    job = prepare(sft, aligned, alpha, out, alpha_rules=alpha_rules, dtype=dtype, max_shard_size=max_shard_size,
                  chunk_bytes=chunk_bytes, overwrite=overwrite, drop=drop, vocab=vocab, drop_shared=drop_shared)
    options = RunOptions(stats, executor, workers, ray_address, max_memory, unit_bytes, allow_nonfinite, device,
                         (lambda plans: on_plan(plans[0])) if on_plan else None, on_executor, on_notice, on_progress,
                         provenance)
    return _execute(job, started, options)[0]


def extrapolate_sweep(
    sft: str,
    aligned: str,
    alphas,
    out: str,
    *,
    alpha_rules=None,
    drop=None,
    drop_shared: bool = False,
    vocab: str = "auto",
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    stats: bool = True,
    executor: str = "auto",
    allow_nonfinite: bool = False,
    device: str = "auto",
    on_plan: Callable[[tuple[Plan, ...]], None] | None = None,
    unit_bytes: int = DEFAULT_UNIT_BYTES,
    on_executor: Callable[[str, str], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> SweepSummary:
    """Build one ExPO model per alpha of `alphas` from one read of the inputs: `out/alpha-0.1`, `out/alpha-0.2`, ...
    (the folder names are `plan.sweep_folder(alpha)`; `out` is a plain parent folder, created if missing, and may
    hold other things).

    Each output is complete and independent, with the same guarantees as :func:`extrapolate` (and byte for byte
    the shards and index that a single run with that alpha writes): its own staging folder, index, model card,
    `expo.json` (recording the sweep's alphas) and checksums. Every output is computed and checked (NaN/Inf per
    alpha) before the first is published, each by its own rename; a run refused or failing before then publishes
    none (and removes `out` again if it made it). Every
    target must be absent or empty, unless `overwrite`.

    Memory: each input chunk is read once and every alpha's output is computed into its own output buffer, so
    peak memory is a fixed base plus about 3 * (2 + len(alphas)) chunks of `chunk_bytes` (9 chunks for one
    alpha, 21 for five), not one run's memory times the number of alphas. At most MAX_SWEEP (64) alphas.

    `alpha_rules` apply at every alpha: a rule's number overrides every alpha of the sweep, an `xF` rule scales
    each (see :mod:`expo_engine.rules`). Sweeps run in this process: `executor` "ray" is refused (the Ray
    executor does not run sweeps yet), "auto" runs locally. `on_plan` receives the plans, one per alpha.
    """
    started = time.monotonic()
    job = prepare(sft, aligned, alphas, out, sweep=True, alpha_rules=alpha_rules, dtype=dtype,
                  max_shard_size=max_shard_size, chunk_bytes=chunk_bytes, overwrite=overwrite, drop=drop,
                  vocab=vocab, drop_shared=drop_shared)
    parent = os.path.dirname(job.outs[0])
    # A failed sweep leaves nothing behind: the output locks remove the parent folder again if they made it.
    runs = _execute(job, started, RunOptions(stats, executor, None, None, None, unit_bytes, allow_nonfinite, device,
                                             on_plan, on_executor, on_notice, on_progress))
    return SweepSummary(
        out=parent,
        alphas=[r.alpha for r in runs],
        runs=runs,
        bytes_read=job.plans[0].bytes_read,
        bytes_written=sum(r.bytes_written for r in runs),
        seconds=time.monotonic() - started,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        warnings=[w for r in runs for w in r.warnings],
        resumed_units=min(r.resumed_units for r in runs),
        units=runs[0].units,
        bytes_read_now=runs[0].bytes_read_now,
    )


def scale_adapter(sft: str, aligned: str, alpha: float, out: str, *, overwrite: bool = False) -> dict:
    """`expo extrapolate --as-adapter`: from a LoRA adapter trained on `sft`, a PEFT adapter in `out` whose effect
    is exactly (1 + alpha) times the original's, loadable with `peft.PeftModel.from_pretrained(sft_model, out)`:
    `lora_alpha` (and `alpha_pattern`) times (1 + alpha) in adapter_config.json, A and B byte for byte, modules the
    adapter saved whole extrapolated (float32, one rounding). A few MB instead of a full model. The folder appears
    by rename, complete, with an `expo.json` recording the inputs and the factor. Returns that record."""
    import json
    import shutil
    import tempfile

    from .adapters import write_scaled_adapter

    alpha = check_alpha(alpha)
    sft_ck = open_checkpoint(sft)
    if not is_adapter(aligned):
        raise OptionError(f"--as-adapter needs a LoRA adapter folder as --aligned; {aligned} has no "
                          "adapter_config.json")
    adapter = open_adapter(aligned, sft_ck)
    out_abs = check_output_path(out, [sft_ck.path, adapter.path], overwrite)
    with OutputLock(out_abs) as lock:
        check_target(lock.out, overwrite)
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out_abs)}.expo-adapter-", dir=os.path.dirname(out_abs))
        try:
            files = write_scaled_adapter(adapter, alpha, stage)
            for name in os.listdir(adapter.path):  # the adapter's own tokenizer files, if any
                if name.startswith(("tokenizer", "special_tokens_map", "added_tokens", "chat_template")):
                    shutil.copy2(os.path.join(adapter.path, name), stage)
            record = {"engine": "expo_engine", "engine_version": __version__, "formula": FORMULA, "alpha": alpha,
                      "adapter": {"source": aligned, "path": adapter.path, "lora_alpha_factor": 1 + alpha,
                                  "note": "effect (1 + alpha) x the original's: lora_alpha and alpha_pattern scaled; "
                                          "A and B unchanged; modules_to_save extrapolated"},
                      "sft": {"source": sft_ck.source, "path": sft_ck.path, "revision": sft_ck.revision},
                      "files": sorted(files)}
            with open(os.path.join(stage, "expo.json"), "w") as f:
                json.dump(record, f, indent=2)
            for name in os.listdir(stage):
                fd = os.open(os.path.join(stage, name), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            old = None
            if os.path.lexists(out_abs):
                old = out_abs + ".expo-old-adapter"
                os.rename(out_abs, old)
            os.rename(stage, out_abs)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return record


@dataclass(frozen=True)
class Job:
    """A checked and planned extrapolation, nothing written yet: what :func:`prepare` returns."""

    plans: tuple[Plan, ...]  # one per output, all of one layout (a sweep's plans differ only in their alphas)
    outs: tuple[str, ...]  # the absolute output folders, one per plan
    sft: Checkpoint
    aligned: Checkpoint
    side: dict[str, bytes]  # config, tokenizer and other files copied from the aligned model
    sweep: bool
    overwrite: bool = False
    adapter: Adapter | None = None  # the aligned side is a LoRA adapter on top of the SFT model


def prepare(sft: str, aligned: str, alpha, out: str, *, sweep: bool = False, alpha_rules=None,
            dtype: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES, overwrite: bool = False, drop=None, vocab: str = "auto",
            drop_shared: bool = False) -> Job:
    """Every check and the plans, reading headers (and the few non-float tensors) but writing nothing: what
    `expo extrapolate --dry-run` shows. `alpha` is one alpha, or with `sweep` a list of them."""
    alphas = check_alphas(alpha) if sweep else (check_alpha(alpha),)
    rules = as_rules(alpha_rules)
    sft_ck = open_checkpoint(sft)
    adapter = open_adapter(aligned, sft_ck) if is_adapter(aligned) else None
    if adapter and sweep:
        raise OptionError("an adapter as the aligned side runs one alpha at a time (no sweeps yet)")
    sft_ck = adapter.sft if adapter else sft_ck  # with the head written out where the adapter unties it
    aligned_ck = adapter.aligned if adapter else open_checkpoint(aligned)
    targets = [os.path.join(out, sweep_folder(a)) for a in alphas] if sweep else [out]
    outs = tuple(check_output_path(t, [sft_ck.path, aligned_ck.path], overwrite) for t in targets)
    plans = tuple(make_plan(sft_ck, aligned_ck, a, dtype=dtype, max_shard_size=max_shard_size,
                            chunk_bytes=chunk_bytes, rules=rules, drop=drop, vocab=vocab, drop_shared=drop_shared)
                  for a in alphas)
    check_copies(plans[0])
    config_dtype = dtypes.CONFIG_NAMES[dtypes.CLI_NAMES[dtype.lower()]] if dtype else None
    side = side_files(aligned_ck, config_dtype)
    if adapter:  # the SFT model's config and tokenizer, with the tokenizer files the adapter folder has
        side = side_files(sft_ck, config_dtype) | {k: v for k, v in side.items() if k != "config.json"}
        side = output_side_files(adapter, side)  # config.json untied where the adapter unties the head
    return Job(plans, outs, sft_ck, aligned_ck, side, sweep, overwrite, adapter)


@dataclass(frozen=True)
class RunOptions:
    """How a prepared Job runs (what :func:`extrapolate` and :func:`extrapolate_sweep` take besides the plan's
    own options): see :func:`extrapolate` for each."""

    stats: bool = True
    executor: str = "auto"
    workers: int | None = None
    ray_address: str | None = None
    max_memory: int | str | None = None
    unit_bytes: int = DEFAULT_UNIT_BYTES
    allow_nonfinite: bool = False
    device: str = "auto"
    on_plan: Callable[[tuple[Plan, ...]], None] | None = None  # receives every plan (one per alpha)
    on_executor: Callable[[str, str], None] | None = None
    on_notice: Callable[[str], None] | None = None
    on_progress: Callable[[int], None] | None = None
    provenance: dict | None = None  # more to record in expo.json (e.g. the search that chose the alpha)


def _execute(job: Job, started: float, o: RunOptions) -> list[Summary]:
    notes: list[str] = []
    stats, on_progress = o.stats, o.on_progress

    def say(note: str) -> None:
        notes.append(note)
        if o.on_notice:
            o.on_notice(note)

    # Own every output before anything else (a second run stops here, touching nothing), then check again what is
    # at the output path: another run may have published there since it was planned.
    with contextlib.ExitStack() as stack:
        locks = [stack.enter_context(OutputLock(o)) for o in job.outs]
        for lock in locks:
            check_target(lock.out, job.overwrite)
            for note in lock.notes:
                say(note)
        plans = job.plans
        plan = plans[0]
        if job.adapter:  # merged from a LoRA adapter: in this process, on the CPU
            if o.executor == "ray" or o.workers or o.ray_address:
                raise OptionError("an adapter as the aligned side runs in this process (not on Ray yet)")
            kind, why = "local", "a LoRA adapter merged in this process: B @ A a row block at a time"
            for note in job.adapter.notes:
                say(note)
            dev, device_name = None, "cpu"
        else:
            kind, why = choose_executor(o.executor, plan, o.workers, o.ray_address,
                                        sweep=len(plans) if job.sweep else 0)
            dev, device_name = choose_device(o.device, kind, len(plans))
        if device_name != "cpu":
            why += f"; arithmetic on {device_name}"
        budget = parse_size(o.max_memory) if o.max_memory is not None else None
        if o.on_plan:
            o.on_plan(plans)
        if o.on_executor:
            o.on_executor(kind, why)

        report = done = None
        phases = {"plan": time.monotonic() - started}
        units = make_units(plan, o.unit_bytes)
        if kind == "ray":
            from .distributed import execute_ray

            staging = stack.enter_context(Staging(job.outs[0], plan, locks[0],
                                                  journal_key(plan, units, stats, "ray")))
            if staging.note:
                say(staging.note)
            found, report = execute_ray(plan, units, staging, workers=o.workers, address=o.ray_address,
                                        max_memory=budget, stats=stats, on_progress=on_progress,
                                        device="cuda" if device_name != "cpu" else "cpu")
            founds, stagings = [found], [staging]
        else:
            t = time.monotonic()
            key = f"local {device_name}" + (" lora" if job.adapter else "")
            stagings = [stack.enter_context(Staging(out, p, lock, journal_key(p, units, stats, key)))
                        for out, p, lock in zip(job.outs, plans, locks, strict=True)]
            for staging in stagings:
                if staging.note:
                    say(staging.note)
            try:
                run = functools.partial(run_lora_chunks, adapter=job.adapter) if job.adapter else _on(dev)
                done = execute_sweep(list(plans), stagings, units, on_progress, stats=stats, run=run)
            except KeyboardInterrupt:
                for staging in stagings:
                    staging.keep = True
                    with contextlib.suppress(Exception):
                        staging.journal_drain()  # what is on disk is journaled before it is counted
                kept = len(kept_units(units, stagings, resumed_only=False))
                where = stagings[0].dir if len(stagings) == 1 else f"{len(stagings)} staging folders"
                raise Interrupted(f"interrupted; {kept} of {len(units)} units are kept in {where}; run the same "
                                  "command again to resume") from None
            founds = done.founds
            phases["compute"] = time.monotonic() - t
        # Every output is checked before the first is published: a sweep publishes all of its outputs or none
        # (short of a failure between the renames themselves).
        warnings = [check_finite(p, st, f, o.allow_nonfinite) for p, st, f in zip(plans, stagings, founds,
                                                                                strict=True)]
        extra = ({"reads": done.reads} if done else {}) | (o.provenance or {})
        if job.adapter and job.adapter.record:
            extra["adapter"] = job.adapter.record
        if done and done.resumed_units:
            extra["resumed"] = {"units": done.resumed_units, "of": done.units,
                                "note": "written by an earlier run that stopped, kept from its journal"}
        t = time.monotonic()
        files = [_finish(st, p, job, f if stats else None, device_name, extra)
                 for p, st, f in zip(plans, stagings, founds, strict=True)]
        for staging in stagings:  # every output of a sweep finished before the first is renamed into place
            staging.publish(job.overwrite)
        phases["hash+publish"] = time.monotonic() - t
        if report:
            phases = {"plan": phases["plan"], **report.phases, "hash+publish": phases["hash+publish"]}
    n_extra = sum(t.action == "extrapolate" for t in plan.tensors)
    return [Summary(
        out=out_path,
        alpha=p.alpha,
        tensors=len(p.tensors),
        extrapolated=n_extra,
        copied=len(p.tensors) - n_extra,
        shards=len(p.shards),
        dtypes=p.out_dtypes,
        bytes_read=p.bytes_read,
        bytes_written=sum(f["size"] for f in fs.values()),
        seconds=time.monotonic() - started,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        files=fs,
        executor=kind,
        executor_note=why,
        nodes=report.nodes if report else {},
        phases=phases,
        units=len(units),
        resumed_units=report.resumed if report else done.resumed_units,
        bytes_read_now=p.bytes_read if report else done.bytes_read,
        tree_peak_bytes=report.tree_peak if report else 0,
        warnings=w,
        alpha_overrides=p.alpha_overrides,
        device=device_name,
        notes=notes,
    ) for out_path, p, fs, w in zip(job.outs, plans, files, warnings, strict=True)]


def _on(dev):
    """The compute step for a CUDA device (None: the CPU pipeline of the executor)."""
    if dev is None:
        return None
    from .gpu import run_chunks_cuda

    return functools.partial(run_chunks_cuda, device=dev)


def choose_device(device: str, kind: str, outputs: int):
    """(torch.device or None, name) for where the arithmetic runs; an OptionError for what cannot run."""
    name = str(device).strip().lower()
    if name in ("auto", "cpu") and (name == "cpu" or no_gpu_here()):
        return None, "cpu"  # without importing torch (~3 s): the compiled kernel needs none
    from .gpu import cuda_available, kernel_for, resolve_device

    if kind == "ray":
        # Ray assigns the GPUs: only "cuda" (one per task) makes sense; "auto" asks whether this machine has one.
        if name.startswith("cuda:"):
            raise OptionError(f"--device {name}: on Ray each task gets a GPU from Ray; use --device cuda")
        if name == "cuda" or (name == "auto" and cuda_available()):
            return None, "cuda (one Ray GPU per task)"
        if name not in ("cpu", "auto"):
            raise OptionError(f"device must be cpu, cuda, cuda:N or auto, not {device!r}")
        return None, "cpu"
    if outputs > 1:
        if name != "auto" and name != "cpu":
            resolve_device(name)  # a bad name or an absent GPU is reported as such
            raise OptionError("alpha sweeps run on the CPU for now (the CUDA path computes one alpha at a time); "
                              "drop --device or run one alpha at a time on the GPU")
        return None, "cpu"
    dev = resolve_device(name)
    if dev.type != "cuda":
        return None, "cpu"
    import torch

    return dev, f"{dev} ({torch.cuda.get_device_name(dev)}, {kernel_for(dev)} kernel)"


def no_gpu_here() -> bool:
    """True on a Linux machine with no NVIDIA or AMD GPU device node, where torch would find no GPU either: then
    `--device auto` is the CPU at once, without importing torch."""
    nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in nodes)


RAY_MIN_BYTES = 20 * 10**9  # below this, Ray's start-up (~5 s) and per-task imports outweigh what it adds here


def choose_executor(executor: str, plan: Plan, workers: int | None, address: str | None,
                    sweep: int = 0) -> tuple[str, str]:
    """("local" or "ray", why). `sweep`: the number of alphas of a sweep, which only the local executor runs."""
    if executor not in ("auto", "local", "ray"):
        raise OptionError(f"executor must be auto, local or ray, not {executor!r}")
    if workers is not None and workers < 1:
        raise OptionError(f"workers must be at least 1, got {workers}")
    if sweep:
        if executor == "ray" or address or (workers or 1) > 1:
            raise OptionError("alpha sweeps run in this process only (the Ray executor does not run them yet); "
                              "drop --executor ray, --workers and --ray-address, or run one alpha at a time on Ray")
        return "local", (f"alpha sweep of {sweep}: in this process, one read of the inputs for every alpha"
                         if executor == "auto" else "asked for")
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
            i, s, a, o, alpha = r.first
            raise NonFiniteError(
                f"tensor '{r.name}': the formula gave NaN or Inf at {r.produced} element(s) whose inputs are finite "
                f"(first at index {i}: sft {s:g}, aligned {a:g}, alpha {alpha:g} -> {o:g} in "
                f"{out_dtype[r.name]}); use a smaller alpha or a "
                "wider output dtype (--dtype fp32)"
            )
    if allow:
        return []
    return [f"tensor '{r.name}': NaN or Inf already in the inputs (sft: {r.in_sft}, aligned: {r.in_aligned} "
            "element(s)), carried into the output; --allow-nonfinite silences this" for r in found_bad]


def _finish(staging: Staging, plan: Plan, job: Job, found: dict | None, device: str = "cpu",
            extra: dict | None = None) -> dict:
    cpu_kernel = f"compiled ({native_kernel()})" if native_kernel() else "torch ops"
    prov = provenance(plan, job.sft, job.aligned) | {"device": device, "cpu_kernel": cpu_kernel} | (extra or {})
    if job.sweep:
        prov["sweep"] = {"alphas": [p.alpha for p in job.plans],
                         "note": "one of the outputs of an alpha sweep, all written from one read of the inputs"}
    if found is not None:
        prov["stats"] = stats_record(found, job.sft, job.aligned, plan.alpha)
    return staging.finish(job.side, prov)


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
                "float32 partial sums, each over at most 128 elements with the compiled CPU kernel (8 lanes, added "
                "into float64 every 1024 elements), 4096 with the Triton GPU kernel, 262144 with torch ops; in "
                "float64 throughout when a tensor is float64",
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
    } | ({"alpha_rules": list(plan.alpha_rules), "alpha_by_tensor": plan.alpha_overrides} if plan.alpha_rules
         else {}) | ({"dropped": {"patterns": list(plan.drop), "tensors": list(plan.dropped),
                                  "drop_shared": plan.drop_shared,
                                  "note": "left out of the output on purpose (--drop)"}} if plan.drop else {}) | (
        {"vocab": plan.vocab.record(list(plan.vocab_tensors))} if plan.vocab else {})
