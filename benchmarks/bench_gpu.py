"""Benchmark the CUDA path (expo_engine.gpu) against the CPU path and against the bytes-moved floors, on one machine.

    python benchmarks/bench_gpu.py --workdir /scratch/bench-gpu [--size-gb 8] [--chunk-mb 64] [--markdown FILE]
    python benchmarks/bench_gpu.py --sft DIR --aligned DIR --workdir DIR      # an existing pair
    python benchmarks/bench_gpu.py --workdir /tmp/b --size-gb 0.2 --device cpu   # dry run without a GPU

Builds (once, cached in --workdir) a Llama-shaped bf16 pair of about --size-gb GB in all, then measures:

- the floors: cold sequential read of every input file (O_DIRECT, or after dropping the page cache when allowed),
  sequential write + fsync of as many bytes as the output, and host-to-device / device-to-host copies from
  page-locked memory (the pipeline's kind of buffer);
- the kernel alone on one chunk on the device (Triton with and without the statistics, and the torch fallback):
  time per chunk and GB/s of bytes moved (2 reads + 1 write);
- end to end, each with a cold cache when the page cache can be dropped: `expo_engine.extrapolate` (the CPU path,
  as the CLI runs it), the same plan through this file's harness with executor.run_chunks and with
  gpu.run_chunks_cuda (plan, staging, write, publish: what `execute` does), and the CUDA pipeline with the writes
  thrown away (its ceiling without the disk); the kernel's share of the CUDA run (CUDA events around every kernel);
- a check of the CUDA output: `expo_engine.verify` on a sample of chunks against the float64 formula.

Prints a markdown table (and appends it with the command, date and machine to --markdown FILE). With --device cpu
the GPU rows are skipped and the CUDA pipeline runs its CPU form: a check that the script works, not a benchmark.
Keep --workdir outside the repository: it holds the pair and one output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_extrapolate  # noqa: E402  (the pair writer and the engine's revision)

from expo_engine import ExpoError, dtypes, extrapolate, gpu, verify  # noqa: E402
from expo_engine.api import provenance  # noqa: E402
from expo_engine.executor import run_chunks  # noqa: E402
from expo_engine.ownership import OutputLock  # noqa: E402
from expo_engine.plan import make_plan  # noqa: E402
from expo_engine.reading import Inputs, direct_io, input_paths  # noqa: E402
from expo_engine.sources import open_checkpoint  # noqa: E402
from expo_engine.writer import Staging, check_output_path, side_files  # noqa: E402

ALPHA = 0.3
VOCAB = 32000


# --- the pair -------------------------------------------------------------------------------------------------

def shapes_for(size_gb: float) -> tuple[dict[str, tuple[int, ...]], int]:
    """Llama-shaped tensors (hidden 4096 like a 7B model from 8 GB up, narrower below) filling ~size_gb / 2 per
    model in bf16."""
    h = 4096 if size_gb >= 8 else 2048 if size_gb >= 2 else 512
    inter = h * 11 // 4
    fixed = 2 * 2 * VOCAB * h
    per_layer = 2 * (4 * h * h + 3 * h * inter + 2 * h)
    layers = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))
    shapes = {"model.embed_tokens.weight": (VOCAB, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}, layers


def ensure_pair(workdir: str, size_gb: float) -> tuple[str, str]:
    shapes, layers = shapes_for(size_gb)
    root = os.path.join(workdir, f"gpu-pair-{size_gb:g}gb")
    stamp, info = os.path.join(root, "pair.json"), {"shapes": {k: list(v) for k, v in shapes.items()}}
    if os.path.exists(stamp) and json.load(open(stamp)) == info:
        print(f"reusing the cached pair in {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.monotonic()
        bench_extrapolate.write_checkpoint(os.path.join(root, "sft"), shapes, 2, False, layers)
        bench_extrapolate.write_checkpoint(os.path.join(root, "aligned"), shapes, 3, True, layers)
        with open(stamp, "w") as f:
            json.dump(info, f)
        print(f"built the pair in {root} in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return os.path.join(root, "sft"), os.path.join(root, "aligned")


# --- floors ---------------------------------------------------------------------------------------------------

def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_read(paths: list[str]) -> tuple[float, int, str]:
    """Read every file once, sequentially, in 16 MiB blocks; O_DIRECT when the filesystem takes it."""
    cold = drop_caches()
    buf = torch.empty((16 << 20) + 4096, dtype=torch.uint8)
    base = -buf.data_ptr() % 4096
    mem = memoryview(buf[base:base + (16 << 20)].numpy())
    total, how = 0, set()
    t0 = time.perf_counter()
    for path in paths:
        try:
            fd, kind = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)), "O_DIRECT"
        except OSError:
            fd, kind = os.open(path, os.O_RDONLY), "buffered"
        how.add(kind)
        try:
            pos = 0
            while n := os.preadv(fd, [mem], pos):
                pos += n
            total += pos
        finally:
            os.close(fd)
    seconds = time.perf_counter() - t0
    return total / seconds / 1e9, total, f"{'+'.join(sorted(how))}, {'cold' if cold else 'page cache NOT dropped'}"


def disk_write(folder: str, nbytes: int) -> float:
    path = os.path.join(folder, "write-floor.tmp")
    block = torch.randint(0, 255, (16 << 20,), dtype=torch.uint8).numpy().tobytes()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < nbytes:
            done += os.write(fd, block[: min(len(block), nbytes - done)])
        os.fsync(fd)
    finally:
        os.close(fd)
        seconds = time.perf_counter() - t0
        os.remove(path)
    return nbytes / seconds / 1e9


def cuda_time(fn, repeat: int = 20) -> float:
    """Median seconds of fn() on the current stream, by CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int) -> dict[str, float]:
    """GB/s host-to-device and device-to-host, page-locked (registered, as the pipeline does) and pageable."""
    host = torch.empty(nbytes, dtype=torch.uint8)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    res = {"h2d pageable": nbytes / cuda_time(lambda: dev.copy_(host, non_blocking=True), 5) / 1e9,
           "d2h pageable": nbytes / cuda_time(lambda: host.copy_(dev, non_blocking=True), 5) / 1e9}
    locked = gpu._HostSet(nbytes, pin=True)
    try:
        buf = locked.aligned[:nbytes]
        res["h2d page-locked"] = nbytes / cuda_time(lambda: dev.copy_(buf, non_blocking=True)) / 1e9
        res["d2h page-locked"] = nbytes / cuda_time(lambda: buf.copy_(dev, non_blocking=True)) / 1e9
        torch.cuda.synchronize()
    finally:
        locked.close()
    return res


def kernel_times(chunk_bytes: int, device: str) -> dict[str, tuple[float, float]]:
    """{kernel: (seconds per chunk, GB/s)} for one chunk of bf16 (sft, aligned -> out) on the device."""
    n = chunk_bytes // 2
    g = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(n, generator=g, device=device) * 0.02).bfloat16()
    a = (s.float() + torch.randn(n, generator=g, device=device) * 0.002).bfloat16()
    out = torch.empty_like(a)
    runs = {"torch (fallback), with stats": lambda: gpu._sums(out, s, a, ALPHA, "torch")}
    if gpu.kernel_for(device) == "triton":
        parts = torch.empty(-(-n // gpu.BLOCK), 8, dtype=torch.float32, device=device)
        runs = {"triton, with stats": lambda: gpu._sums(out, s, a, ALPHA, "triton", parts),
                "triton, no stats": lambda: gpu.extrapolate_chunk(out, s, a, ALPHA, kernel="triton"), **runs}
    res = {}
    for name, fn in runs.items():
        if device == "cuda":
            sec = cuda_time(fn)
        else:
            fn()
            t0 = time.perf_counter()
            fn()
            sec = time.perf_counter() - t0
        res[name] = (sec, 3 * 2 * n / sec / 1e9)
    return res


# --- end to end -----------------------------------------------------------------------------------------------

def run_e2e(sft: str, aligned: str, out: str, chunk_bytes: int, runner, discard: bool = False,
            timed_kernels: list | None = None, **kw) -> float:
    """What api.extrapolate does on its local path, with `runner` in place of executor.run_chunks: plan, staging,
    the chunks, publish. With `discard`, the chunks are computed but nothing is written or published."""
    t0 = time.perf_counter()
    sft_ck, aligned_ck = open_checkpoint(sft), open_checkpoint(aligned)
    plan = make_plan(sft_ck, aligned_ck, ALPHA, chunk_bytes=chunk_bytes)
    inputs = Inputs(input_paths(plan), direct=direct_io())
    if timed_kernels is not None:  # CUDA events around every kernel (and its reduction), on the compute stream
        real = gpu._sums

        def timed(*args, **kwargs):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            r = real(*args, **kwargs)
            e1.record()
            timed_kernels.append((e0, e1))
            return r

        gpu._sums = timed
    try:
        if discard:
            runner(plan, plan.chunks, inputs, lambda t, c, data, chunk_stats: None, True, **kw)
        else:
            path = check_output_path(out, [sft_ck.path, aligned_ck.path], True)
            with OutputLock(path) as lock, Staging(path, plan, lock) as staging:
                staging.direct_writes()  # as the in-process executor writes

                def write(t, c, data, chunk_stats):
                    staging.write(t.shard, t.offset + c.start * dtypes.itemsize(t.dtype), data)

                runner(plan, plan.chunks, inputs, write, True, **kw)
                inputs.check_unchanged()
                staging.finish(side_files(aligned_ck, None), provenance(plan, sft_ck, aligned_ck))
    finally:
        inputs.close()
        if timed_kernels is not None:
            gpu._sums = real
    return time.perf_counter() - t0


def measure(name: str, fn, repeat: int, results: dict, out: str) -> None:
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        cold = drop_caches()
        sec = fn()
        results.setdefault(name, []).append((sec, cold))
        print(f"{name}: {sec:.2f} s ({'cold' if cold else 'WARM'} cache)", file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="scratch folder outside the repo (pair cache and output)")
    p.add_argument("--size-gb", type=float, default=8.0, help="SFT + aligned size in GB (default %(default)g)")
    p.add_argument("--sft", help="an existing SFT checkpoint folder (with --aligned) instead of building a pair")
    p.add_argument("--aligned")
    p.add_argument("--chunk-mb", type=float, default=64, help="chunk size in MiB (default %(default)g)")
    p.add_argument("--repeat", type=int, default=3, help="end-to-end runs of each kind (default %(default)s)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu (dry run) or auto (default)")
    p.add_argument("--markdown", metavar="FILE", help="append the report to FILE")
    args = p.parse_args()
    if (args.sft is None) != (args.aligned is None):
        p.error("give both --sft and --aligned, or neither")
    try:
        device = gpu.resolve_device(args.device)
    except ExpoError as e:
        sys.exit(f"bench_gpu: {e}")
    cuda = device.type == "cuda"
    os.makedirs(workdir := os.path.abspath(args.workdir), exist_ok=True)
    sft, aligned = (args.sft, args.aligned) if args.sft else ensure_pair(workdir, args.size_gb)
    out, chunk_bytes = os.path.join(workdir, "out"), max(1, int(args.chunk_mb * 2**20))
    plan = make_plan(open_checkpoint(sft), open_checkpoint(aligned), ALPHA, chunk_bytes=chunk_bytes)
    read_b, write_b = plan.bytes_read, plan.total_size
    gb = (read_b + write_b) / 1e9

    rows = []  # (what, seconds or "", GB/s, note)
    rd_gbs, rd_bytes, rd_note = disk_read(sorted(set(input_paths(plan))))
    rows.append(("disk read floor (inputs once)", rd_bytes / rd_gbs / 1e9, rd_gbs, rd_note))
    wr_gbs = disk_write(workdir, write_b)
    rows.append(("disk write floor (output size, fsync)", write_b / wr_gbs / 1e9, wr_gbs, "sequential"))
    floors = [read_b / rd_gbs / 1e9, write_b / wr_gbs / 1e9]
    if cuda:
        bw = copy_bandwidth(min(256 << 20, max(chunk_bytes, 1 << 20)))
        for k, v in bw.items():
            rows.append((f"{k} copy", "", v, "256 MiB, CUDA events"))
        floors += [read_b / bw["h2d page-locked"] / 1e9, write_b / bw["d2h page-locked"] / 1e9]
    for name, (sec, gbs) in kernel_times(chunk_bytes, str(device)).items():
        rows.append((f"kernel {name}, one {args.chunk_mb:g} MiB chunk", sec, gbs,
                     "bytes moved: 2 reads + 1 write, bf16" + ("" if cuda else ", CPU")))
    floor = max(floors)  # the stages overlap: the slowest one bounds the whole

    results, events = {}, []
    measure("expo_engine.extrapolate (CPU path, as the CLI)",
            lambda: extrapolate(sft, aligned, ALPHA, out, chunk_bytes=chunk_bytes, executor="local",
                                overwrite=True).seconds, args.repeat, results, out)
    measure("harness + executor.run_chunks (CPU)",
            lambda: run_e2e(sft, aligned, out, chunk_bytes, run_chunks), args.repeat, results, out)
    gpu_name = f"harness + gpu.run_chunks_cuda ({device}, kernel {gpu.kernel_for(device)})"
    measure(gpu_name, lambda: run_e2e(sft, aligned, out, chunk_bytes, gpu.run_chunks_cuda, device=device,
                                      timed_kernels=events if cuda else None), args.repeat, results, out)
    report = verify(out, sft, aligned, sample=0.05)  # the last CUDA run's output
    shutil.rmtree(out, ignore_errors=True)
    t_discard = run_e2e(sft, aligned, out, chunk_bytes, gpu.run_chunks_cuda, discard=True, device=device)
    kernel_s = sum(e0.elapsed_time(e1) for e0, e1 in events) / 1e3 / max(1, args.repeat) if events else None

    gpu_med = statistics.median(s for s, _ in results[gpu_name])
    lines = [
        f"### CUDA path: {gb:.2f} GB moved ({read_b / 1e9:.2f} GB read, {write_b / 1e9:.2f} GB written), "
        f"chunks of {args.chunk_mb:g} MiB",
        "",
        f"- command: `python benchmarks/bench_gpu.py {' '.join(sys.argv[1:])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM, {platform.platform()}; "
        f"device: {torch.cuda.get_device_name(device) if cuda else 'none (dry run on the CPU)'}; torch "
        f"{torch.__version__}; triton {_triton_version()}; engine: {bench_extrapolate.engine_revision()}",
        f"- output of the CUDA path checked with expo_engine.verify on 5 % of the chunks against the float64 "
        f"formula: {'ok' if report.ok else 'FAILED'} (worst {report.worst_steps:.2f} step(s), at most 1 allowed)",
        f"- bytes-moved floor (slowest of disk read, disk write{', H2D, D2H' if cuda else ''}, each measured "
        f"above): {floor:.2f} s",
        f"- kernel time in the CUDA run: {kernel_s:.3f} s per run, {kernel_s / gpu_med:.1%} of its wall time"
        if kernel_s is not None else "- kernel time share: not measured (no GPU)",
        f"- CUDA pipeline with the writes thrown away (inputs warm after the runs above): {t_discard:.2f} s, "
        f"{gb / t_discard:.2f} GB/s",
        "",
        "| what | seconds | GB/s (end to end: bytes read + written per second) | note |",
        "|---|---|---|---|",
    ]
    for what, sec, gbs, note in rows:
        lines.append(f"| {what} | {sec if sec == '' else f'{sec:.4f}'} | {gbs:.2f} | {note} |")
    for name, rs in results.items():
        med = statistics.median(s for s, _ in rs)
        walls = ", ".join(f"{s:.2f}" for s, _ in rs)
        cold = "cold" if all(c for _, c in rs) else "WARM cache"
        lines.append(f"| {name} | {med:.2f} ({walls}) | {gb / med:.2f} | {cold}; {med / floor:.2f}x the floor |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n\n")


def _triton_version() -> str:
    if not gpu.triton_available():
        return "not installed"
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
