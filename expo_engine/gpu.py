"""The CUDA path: the ExPO formula and the fused statistics in one Triton kernel, and a pipeline that keeps the disk,
the copy engines and the GPU busy at the same time.

    out = aligned + alpha * (aligned - sft)

in float32, rounded once to out's dtype, the same arithmetic as `kernels.extrapolate_chunk` (torch.lerp), in the form
`kernels.form(alpha)` decides for every backend: fma(coeff, sft - aligned, aligned or sft), or aligned itself at
alpha = 0. On a GPU the arithmetic is free; what costs is moving
bytes: per element itemsize(sft) + itemsize(aligned) read and itemsize(out) written, over host-to-device,
device-to-host and the disk.

The kernel also writes, per program of BLOCK elements, float32 partial sums of the statistics that
`kernels.extrapolate_chunk_stats` returns (the change aligned - sft and the applied update out - aligned, the latter
with out as rounded); they are added in float64 on the device, like the CPU path's float32 blocks.

Triton is optional: without it (or on a GPU it does not support, or for float64 tensors) the same numbers come from
torch ops on the device. On CPU tensors the Triton kernel runs only in Triton's interpreter (TRITON_INTERPRET=1;
slow, for tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable

import torch

from . import dtypes, kernels
from .errors import OptionError
from .executor import chunk_alpha, ring
from .plan import Chunk, Plan, TensorPlan
from .reading import ALIGN, DEPTH

BLOCK = 4096  # elements per Triton program (and per float32 partial sum): 8 warps, 16 elements per thread
NUM_WARPS = 8
# Partial sums per program, in the order of kernels.Sums, padded to 8.
_FIELDS = 8
DEVICE_SETS = 2  # device buffer sets: one being copied in while the other is computed and copied out
KERNELS = ("auto", "triton", "torch")


# --- device selection -----------------------------------------------------------------------------------------

def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(device: str = "auto") -> torch.device:
    """"cpu", "cuda", "cuda:N" or "auto" (cuda when a GPU is visible, else cpu) -> a torch.device.

    Raises OptionError when a GPU is asked for and none is visible, saying why when torch can tell.
    """
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise OptionError(f"device must be cpu, cuda, cuda:N or auto, not {device!r}") from None
        if not cuda_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None and torch.version.hip is None
                   else f"torch {torch.__version__} sees no usable GPU (check the driver and CUDA_VISIBLE_DEVICES)")
            raise OptionError(f"--device {name}: no CUDA GPU is available ({why}); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    raise OptionError(f"device must be cpu, cuda, cuda:N or auto, not {device!r}")


@functools.cache
def triton_available() -> bool:
    """Whether `import triton` works here (a CPU-only torch may have it too: then only its interpreter runs)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # an ImportError, or a triton build that fails to load against this torch
        return False
    return True


def kernel_for(device: torch.device | str) -> str:
    """The kernel "auto" picks on `device`: "triton" on a GPU Triton supports, else "torch"."""
    device = torch.device(device)
    if device.type != "cuda" or not triton_available():
        return "torch"
    if torch.version.hip is None and torch.cuda.get_device_capability(device) < (8, 0):
        return "torch"  # Triton 3.x supports NVIDIA GPUs of compute capability 8.0 (A100) and newer
    return "triton"


# --- the kernel -----------------------------------------------------------------------------------------------

tl = None  # triton.language, imported by _triton_kernel on first use (importing triton takes ~0.4 s)


def _expo_kernel(sft_ptr, aligned_ptr, out_ptr, parts_ptr, n, coeff,
                 FROM_SFT: tl.constexpr, KEEP: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr):
    """One program: BLOCK elements of the output and, with STATS, their row of partial sums (kernels.Sums' order).
    coeff, FROM_SFT and KEEP are kernels.form(alpha)'s fields."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(sft_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(aligned_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = s - a  # torch.lerp's (end - self); -(aligned - sft)
    if KEEP:  # alpha = 0: aligned itself (a + 0 * d would turn -0.0 into +0.0 where d > 0)
        o = a
    elif FROM_SFT:
        o = tl.fma(d, coeff, s)
    else:
        o = tl.fma(d, coeff, a)
    r = o.to(out_ptr.dtype.element_ty)  # the one rounding (round to nearest even on a GPU)
    tl.store(out_ptr + offs, r, mask=mask)
    if STATS:
        q = r.to(tl.float32)  # the output as rounded: the update as applied
        u = q - a
        row = parts_ptr + pid * 8
        tl.store(row + 0, tl.sum(s * s, axis=0))
        tl.store(row + 1, tl.sum(a * a, axis=0))
        tl.store(row + 2, tl.sum(q * q, axis=0))
        tl.store(row + 3, tl.sum(d * d, axis=0))
        tl.store(row + 4, tl.sum(u * u, axis=0))
        tl.store(row + 5, tl.max(tl.abs(d), axis=0))
        tl.store(row + 6, tl.max(tl.abs(u), axis=0))


@functools.cache
def _triton_kernel():
    """The kernel, through triton.jit on first use, so that importing this module never imports triton. With
    TRITON_INTERPRET=1 set before triton is imported, triton.jit gives Triton's interpreter, which runs on CPU
    tensors (the interpreter is chosen for the whole process: triton's own library functions are wrapped at import)."""
    global tl
    import triton
    import triton.language

    tl = triton.language  # the kernel body names `tl`; triton resolves it from this module's globals
    return triton.jit(_expo_kernel)


def _check(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor) -> None:
    if not (out.dim() == sft.dim() == aligned.dim() == 1 and out.numel() == sft.numel() == aligned.numel()):
        raise ValueError("out, sft and aligned must be 1-D tensors of the same length")
    if not (out.device == sft.device == aligned.device):
        raise ValueError(f"tensors on different devices: {out.device}, {sft.device}, {aligned.device}")


def _pick(kernel: str, *ts: torch.Tensor) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    wide = any(t.dtype == torch.float64 for t in ts)
    if kernel == "auto":
        kernel = "torch" if wide else kernel_for(ts[0].device)
    if kernel == "triton" and wide:
        raise ValueError("the Triton kernel takes bf16, fp16 and fp32; float64 goes through kernel='torch'")
    if kernel == "triton" and not all(t.is_contiguous() for t in ts):
        raise ValueError("the Triton kernel takes contiguous tensors")
    return kernel


def _launch_triton(out, sft, aligned, alpha: float, parts: torch.Tensor | None) -> None:
    n = out.numel()
    if n == 0:
        return
    f = kernels.form(alpha)
    if out.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton kernel runs on CPU tensors only in Triton's interpreter: set "
                         "TRITON_INTERPRET=1 before triton is imported, or use kernel='torch'")
    grid = (-(-n // BLOCK),)
    _triton_kernel()[grid](sft, aligned, out, out if parts is None else parts, n, f.coeff,
                           FROM_SFT=f.from_sft, KEEP=f.keep, STATS=parts is not None, BLOCK=BLOCK,
                           num_warps=NUM_WARPS)


def _sums(out, sft, aligned, alpha: float, kernel: str, parts: torch.Tensor | None = None) -> torch.Tensor:
    """Compute `out` and return the statistics' 7 float64 sums on the device, without waiting for them."""
    if kernel == "torch":
        return kernels.torch_sums(out, sft, aligned, alpha, True)
    blocks = -(-out.numel() // BLOCK)
    if parts is None or parts.shape[0] < blocks:
        parts = torch.empty(blocks, _FIELDS, dtype=torch.float32, device=out.device)
    parts = parts[:blocks]
    _launch_triton(out, sft, aligned, alpha, parts)
    return kernels.reduce_parts(parts)


def extrapolate_chunk(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float,
                      kernel: str = "auto") -> None:
    """`kernels.extrapolate_chunk` on any device: `aligned + alpha * (aligned - sft)` into `out`, rounded once.

    `kernel`: "triton" (CUDA tensors: compiled; CPU tensors: Triton's interpreter, TRITON_INTERPRET=1), "torch"
    (torch ops on the tensors' device), or "auto" (Triton on a GPU it supports, torch otherwise and for float64).
    All three 1-D, contiguous, same length and device; dtypes bf16/fp16/fp32 (float64 only with "torch"), may
    differ; `out` may alias `aligned`. Asynchronous on a GPU, like any kernel launch.
    """
    _check(out, sft, aligned)
    if _pick(kernel, out, sft, aligned) == "torch":
        kernels.torch_sums(out, sft, aligned, alpha, False)
    else:
        _launch_triton(out, sft, aligned, alpha, None)


def extrapolate_chunk_stats(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float,
                            kernel: str = "auto") -> tuple[kernels.Stats, kernels.Stats]:
    """`extrapolate_chunk` fused with the statistics of `kernels.extrapolate_chunk_stats`, in one pass: returns
    (delta, update), delta for aligned - sft (A = sft, B = aligned), update for out - aligned (A = aligned, B = out
    as rounded). Float32 partial sums per block of BLOCK (Triton) or STATS_BLOCK (torch) elements, added in
    float64. Waits for the device (it returns numbers); the pipeline uses the asynchronous form.
    A NaN in the inputs makes the sums NaN; the maxima may skip it on a GPU (the CPU path's may not).
    """
    _check(out, sft, aligned)
    sums = _sums(out, sft, aligned, alpha, _pick(kernel, out, sft, aligned))
    return kernels.Sums(*sums.tolist()).stats(out.numel())


# --- the pipeline ---------------------------------------------------------------------------------------------

class _HostSet:
    """Page-locked host buffers for one chunk: the inputs are read into them and copied to the device from them;
    the output comes back into the aligned buffer (its input has been copied out by then).

    They are ordinary tensors registered with cudaHostRegister rather than `pin_memory=True`: torch's pinned
    allocator rounds every block up to a power of two (a 64 MiB chunk plus alignment room would lock 128 MiB) and
    keeps it cached after use."""

    def __init__(self, nbytes: int, pin: bool):
        nbytes = max(nbytes, 8) + 3 * ALIGN  # as reading.Buffers: room to align O_DIRECT reads
        self.sft = torch.empty(nbytes, dtype=torch.uint8)
        self.aligned = torch.empty(nbytes, dtype=torch.uint8)
        self.sums = torch.empty(7, dtype=torch.float64, pin_memory=pin)
        self.registered = []
        if pin:
            for buf in (self.sft, self.aligned):
                err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0))
                if err:
                    self.close()
                    raise RuntimeError(f"cudaHostRegister of a {buf.numel()}-byte host buffer failed (cudaError "
                                       f"{err}): cannot page-lock memory for the transfers")
                self.registered.append(buf)

    def close(self) -> None:
        """Unlock the buffers (after the device has finished with them)."""
        while self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.registered.pop().data_ptr())


class _DeviceSet:
    def __init__(self, nbytes: int, device: torch.device):
        nbytes = max(nbytes, 8)
        self.sft = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.aligned = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.out = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.parts = torch.empty(-(-nbytes // BLOCK), _FIELDS, dtype=torch.float32, device=device)
        self.free = None  # event: the last chunk that used this set has been copied back


def _view(buf: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
    return buf[: n * dtype.itemsize].view(dtype)


class _Streams:
    """Copy-in, compute and copy-out streams on a GPU; on the CPU everything runs in order and events are None."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.h2d, self.compute, self.d2h = ((torch.cuda.Stream(device) for _ in range(3)) if self.cuda
                                            else (None, None, None))

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def record(self, stream):
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    @staticmethod
    def wait(stream, event) -> None:
        if event is not None:
            stream.wait_event(event)


def run_chunks_cuda(plan: Plan, chunks, inputs, write: Callable[[TensorPlan, Chunk, memoryview], None],
                    stats: bool = True, device: str | torch.device = "cuda",
                    kernel: str = "auto") -> dict[str, tuple[kernels.Stats, kernels.Stats]]:
    """`executor.run_chunks` with the arithmetic on `device` (a GPU; "cpu" runs the same steps in order, for tests).

    Per chunk k: a reader thread reads its inputs (`inputs.read_into`) into page-locked host set k mod DEPTH; the
    copy-in stream sends them to device set k mod DEVICE_SETS; the compute stream runs the kernel (the output and
    the partial sums); the copy-out stream brings the output back into the host set; the writer thread waits for
    that copy's event and calls `write` (one thread, chunk order). While chunk k is on the GPU, chunk k+1 is read
    and chunk k-1 written. Host memory: DEPTH sets of two page-locked chunk buffers (the CPU path touches as
    many); device memory: DEVICE_SETS sets of three chunk buffers. "copy" chunks go from the read buffer to
    `write`. `kernel`: "auto", "triton" or "torch", as in `extrapolate_chunk`.
    Returns the statistics per tensor (partial sums over these chunks only), as `run_chunks`.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    found: dict[str, tuple[kernels.Stats, kernels.Stats]] = {}
    hosts: list[_HostSet] = []
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        try:
            for _ in range(DEPTH):
                hosts.append(_HostSet(plan.chunk_bytes, device.type == "cuda"))
            devs = [_DeviceSet(plan.chunk_bytes, device) for _ in range(DEVICE_SETS)]
            streams = _Streams(device)
            _pipeline(plan, chunks, inputs, write, stats, kernel, found, hosts, devs, streams)
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # nothing may still copy into buffers that are about to be freed
            for h in hosts:
                h.close()
    return found


def _pipeline(plan, chunks, inputs, write, stats, kernel, found, hosts, devs, streams):
    def read(k: int):
        c = chunks[k]
        t, h = plan.tensors[c.tensor], hosts[k % DEPTH]
        a = inputs.read_into(h.aligned, t.aligned, c.start, c.stop)
        if t.action != "extrapolate":
            return None, a
        return (a if c.sft_span is None else inputs.read_into(h.sft, t.sft, *c.sft_span)), a  # see executor._read

    def compute(k: int, got):
        """Queue the chunk's copies and kernel (returns at once); `finish` waits for them."""
        s_h, a_h = got
        t = plan.tensors[chunks[k].tensor]
        if t.action == "copy":
            return a_h, None, None
        return _on_device(t, chunk_alpha(t, chunks[k]), s_h, a_h, hosts[k % DEPTH], devs[k % DEVICE_SETS], kernel,
                          streams)

    def finish(k: int, queued) -> None:
        out, done, sums = queued
        c = chunks[k]
        t = plan.tensors[c.tensor]
        if done is not None:
            done.synchronize()
        chunk_stats = None
        if sums is not None:
            delta, update = kernels.Sums(*sums.tolist()).stats(c.stop - c.start)
            if not stats:  # as run_chunks: only the count, and whether the output may hold NaN or Inf
                delta, update = kernels.Stats(delta.n), kernels.Stats(update.n, finite=update.finite)
            if c.sft_span is None:  # as run_chunks: aligned-only vocabulary rows have no change to count
                delta = kernels.Stats()
            chunk_stats = (delta, update)
            kernels.add_stats(found, t.name, dataclasses.replace(delta), dataclasses.replace(update))
        write(t, c, memoryview(out.view(torch.uint8).numpy()), chunk_stats)

    ring(len(chunks), read, compute, finish,
         prefetch=lambda k: inputs.prefetch(plan.tensors[chunks[k].tensor], chunks[k]))


def _on_device(t: TensorPlan, alpha: float, s_h, a_h, h: _HostSet, d: _DeviceSet, kernel: str, streams: _Streams):
    """Queue copy-in, kernel and copy-out of one chunk, with the tensor's alpha; return (host output view, its
    event, host sums).

    The statistics are always computed: on a GPU they cost nothing next to the memory traffic, and even without
    `stats` the caller needs to know whether the output may hold NaN or Inf."""
    n, dtype = a_h.numel(), dtypes.TORCH[t.dtype]
    with streams.on(streams.h2d):
        streams.wait(streams.h2d, d.free)  # the device set's previous chunk has left it
        s_d = _view(d.sft, s_h.dtype, n).copy_(s_h, non_blocking=True)
        a_d = _view(d.aligned, a_h.dtype, n).copy_(a_h, non_blocking=True)
        copied_in = streams.record(streams.h2d)
    with streams.on(streams.compute):
        streams.wait(streams.compute, copied_in)
        o_d = _view(d.out, dtype, n)
        sums = _sums(o_d, s_d, a_d, alpha, _pick(kernel, o_d, s_d, a_d), d.parts)
        computed = streams.record(streams.compute)
    with streams.on(streams.d2h):
        streams.wait(streams.d2h, computed)
        out_h = _view(h.aligned, dtype, n).copy_(o_d, non_blocking=True)  # a_h has been copied in by now
        sums_h = h.sums.copy_(sums, non_blocking=True)
        d.free = streams.record(streams.d2h)
    if streams.cuda:
        sums.record_stream(streams.d2h)  # made on the compute stream, read on this one: not to be reused before
    return out_h, d.free, sums_h
