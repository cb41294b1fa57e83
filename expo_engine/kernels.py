"""Kernels: the ExPO formula on one chunk, and its float64 reference.

    out = aligned + alpha * (aligned - sft)

computed in float32 (float64 when an input or the output is float64) and rounded once to `out`'s dtype. The
kernels know nothing of files; they take 1-D tensors of equal length and write into `out`.

Bytes moved per element: itemsize(sft) + itemsize(aligned) read, itemsize(out) written. On this project's 2-core
machine the math costs ~20-40 ms per 128 MB, against ~300 ms to write 128 MB, so the engine is I/O-bound.

Two implementations of the same arithmetic:
- the compiled kernel (`_fused.c`, built at install when a C compiler is there): one pass over memory, with the
  statistics and the NaN/Inf flags for free; used for bfloat16, float16 and float32 in any combination;
- torch ops (the `*_torch` functions): float64 data, and any install without the compiled kernel. The statistics
  then cost ~14 passes over every block. `EXPO_KERNEL=torch` forces this path.
Both compute torch.lerp's float32 arithmetic and round once, so their output bytes agree (tested).
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import dtypes

if TYPE_CHECKING:
    import numpy as np
    import torch

# torch is imported by the functions that use it, not here: the engine's own path (numpy buffers and the compiled
# kernel) runs without it and so starts ~3 s sooner.

# Mixed-dtype chunks are widened through reused scratch of this many elements, so no chunk-sized float32 copy is
# ever allocated (page faults on fresh buffers cost more than the math).
BLOCK = 1 << 20


_CODES = {"BF16": 0, "F16": 1, "F32": 2}  # the dtype codes of _fused.c


def _load_native(kind: str = ""):
    """The compiled kernel's entry point, or None (not built, or `kind` "torch"). `kind` (default: EXPO_KERNEL)
    "generic" takes the untuned loop whatever the CPU."""
    kind = (kind or os.environ.get("EXPO_KERNEL", "")).strip().lower()
    if kind == "torch":
        return None
    try:
        from . import _fused

        lib = ctypes.CDLL(_fused.__file__)
        fn = lib.expo_extrapolate_generic if kind == "generic" else lib.expo_extrapolate
        diff = lib.expo_diff_stats
        check = lib.expo_error_steps
        target = lib.expo_kernel_target
    except (ImportError, OSError, AttributeError):
        # not built, or built from an older _fused.c (an editable install not rebuilt after a pull): torch ops
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.POINTER(ctypes.c_double),
                   ctypes.POINTER(ctypes.c_int)]
    fn.restype = ctypes.c_int
    diff.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                     ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int)]
    diff.restype = ctypes.c_int
    fn.diff = diff
    check.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                      ctypes.c_int64, ctypes.c_double, ctypes.POINTER(ctypes.c_double)]
    check.restype = ctypes.c_int
    fn.check = check
    target.restype = ctypes.c_char_p
    fn.target = "generic" if kind == "generic" else target().decode()
    # The untuned loop is slower than torch's own kernels (measured 3x): by default it runs only when asked.
    return fn if fn.target == "avx2" or kind == "generic" else None


_NATIVE = _load_native()


def native_status() -> tuple[bool, str]:
    """(usable, what to tell the user) about the compiled kernel: in use; not built; built from an older _fused.c
    (a stale editable install); refused on this CPU; or switched off with EXPO_KERNEL=torch."""
    if _NATIVE is not None:
        return True, f"compiled kernel in use: {_NATIVE.target}"
    if os.environ.get("EXPO_KERNEL", "").strip().lower() == "torch":
        return True, "compiled kernel switched off (EXPO_KERNEL=torch): torch ops do the arithmetic"
    try:
        from . import _fused
    except ImportError:
        return False, ("compiled kernel not built (the install found no C compiler): torch ops do the arithmetic, "
                       "about 3x slower statistics; install a C compiler and run `pip install .` again")
    lib = ctypes.CDLL(_fused.__file__)
    missing = [name for name in ("expo_extrapolate", "expo_extrapolate_generic", "expo_diff_stats",
                                 "expo_error_steps", "expo_kernel_target") if not hasattr(lib, name)]
    if missing:
        return False, (f"compiled kernel {_fused.__file__} is stale (built from an older _fused.c: it lacks "
                       f"{', '.join(missing)}): torch ops do the arithmetic; rebuild it with `pip install -e .` "
                       "(or `pip install .`) again")
    return True, (f"compiled kernel built ({_fused.__file__}) but not used on this CPU (no AVX2: its untuned loop "
                  "is slower than torch ops); EXPO_KERNEL=generic forces it")


def native_kernel() -> str | None:
    """Which compiled kernel runs on this machine ("avx2" or "generic"), or None when torch ops do the work."""
    return _NATIVE.target if _NATIVE is not None else None


def native_handles(out_dtype: str, sft_dtype: str, aligned_dtype: str, stats: bool) -> bool:
    """Whether the compiled kernel computes this dtype triple (safetensors names) here."""
    triple = (out_dtype, sft_dtype, aligned_dtype)
    if _NATIVE is None or not all(d in _CODES for d in triple):
        return False
    # float16 rounding costs the compiled loop ~3x bfloat16's (85 vs 26 ms per 32 M elements): without
    # statistics torch.lerp (33 ms with its NaN/Inf check) is faster
    return stats or "F16" not in triple


def _call_native(out: int, out_dtype: str, sft: int, sft_dtype: str, aligned: int, aligned_dtype: str, n: int,
                 alpha: float, stats: bool):
    """The compiled kernel on raw addresses: (7 sums, NaN/Inf flags), or None for a dtype this build lacks."""
    res, flags = (ctypes.c_double * 7)(), ctypes.c_int(0)
    if _NATIVE(out, _CODES[out_dtype], sft, _CODES[sft_dtype], aligned, _CODES[aligned_dtype], n, alpha,
               int(stats), res, ctypes.byref(flags)):
        return None  # an unknown dtype code
    return list(res), flags.value


def _native(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float, stats: bool):
    """Run the compiled kernel if it handles these tensors: returns (7 sums, NaN/Inf flags), else None."""
    names = [dtypes.NAME.get(t.dtype) for t in (out, sft, aligned)]
    if not (native_handles(*names, stats) and all(t.device.type == "cpu" and t.is_contiguous()
                                                  for t in (out, sft, aligned))):
        return None
    return _call_native(out.data_ptr(), names[0], sft.data_ptr(), names[1], aligned.data_ptr(), names[2],
                        out.numel(), alpha, stats)


def _stats_of(n: int, done) -> tuple[Stats, Stats]:
    (ss, aa, oo, dd, uu, max_d, max_u), flags = done
    return Stats(n, dd, ss, aa, max_d, not flags & 3), Stats(n, uu, aa, oo, max_u, not flags & 6)


def diff_stats_bytes(a: np.ndarray, a_dtype: str, b: np.ndarray, b_dtype: str) -> Stats | None:
    """`expo norms`' statistics of b - a over elements held in numpy uint8 arrays, summed in float64 by the
    compiled kernel in one pass; None when it does not handle these dtypes (the caller uses torch ops)."""
    if _NATIVE is None or a_dtype not in _CODES or b_dtype not in _CODES:
        return None
    n = len(a) // dtypes.itemsize(a_dtype)
    res, flags = (ctypes.c_double * 4)(), ctypes.c_int(0)
    if _NATIVE.diff(a.ctypes.data, _CODES[a_dtype], b.ctypes.data, _CODES[b_dtype], n, res, ctypes.byref(flags)):
        return None
    return Stats(n, res[2], res[0], res[1], res[3], not flags.value & 3)


def extrapolate_bytes(out: np.ndarray, out_dtype: str, sft: np.ndarray, sft_dtype: str, aligned: np.ndarray,
                      aligned_dtype: str, alpha: float, stats: bool) -> tuple[Stats, Stats]:
    """The engine's entry: the formula on elements held in numpy uint8 arrays (the executor's buffers), with their
    safetensors dtype names. Returns (delta, update) statistics; without `stats` only their counts and whether the
    output may hold NaN or Inf (for the overflow check). `out` may be `aligned` itself.

    The compiled kernel when it handles the dtypes, else torch ops on zero-copy views of the same bytes.
    """
    n = len(out) // dtypes.itemsize(out_dtype)
    if native_handles(out_dtype, sft_dtype, aligned_dtype, stats):
        done = _call_native(out.ctypes.data, out_dtype, sft.ctypes.data, sft_dtype, aligned.ctypes.data,
                            aligned_dtype, n, alpha, stats)
        if done is not None:
            return _stats_of(n, done) if stats else (Stats(n), Stats(n, finite=not done[1] & 4))
    import torch

    o, s, a = (torch.from_numpy(x).view(dtypes.TORCH[d])
               for x, d in ((out, out_dtype), (sft, sft_dtype), (aligned, aligned_dtype)))
    if stats:
        return extrapolate_chunk_stats(o, s, a, alpha)
    return Stats(n), Stats(n, finite=not extrapolate_chunk_checked(o, s, a, alpha))


def extrapolate_chunk(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float) -> None:
    """Write `aligned + alpha * (aligned - sft)` into `out`, with one rounding to out's dtype.

    `out` may alias `aligned` (the engine computes in place when the dtypes agree). All three are 1-D, same length.
    """
    if _native(out, sft, aligned, alpha, False) is None:
        extrapolate_chunk_torch(out, sft, aligned, alpha)


def extrapolate_chunk_checked(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float) -> bool:
    """`extrapolate_chunk`, returning whether `out` may hold a NaN or an Inf (free with the compiled kernel, one
    min/max pass with torch)."""
    done = _native(out, sft, aligned, alpha, False)
    if done is not None:
        return bool(done[1] & 4)
    extrapolate_chunk_torch(out, sft, aligned, alpha)
    return maybe_nonfinite(out)


def lerp(out: torch.Tensor, aligned: torch.Tensor, sft: torch.Tensor, alpha: float) -> torch.Tensor:
    """`torch.lerp(aligned, sft, -alpha, out=out)`, except that alpha = 0 copies `aligned` (rounded once to out's
    dtype): lerp's a + 0 * d turns an aligned -0.0 into +0.0 where sft < aligned, and alpha = 0 must give the
    aligned model bit for bit."""
    if alpha == 0:
        return out.copy_(aligned)
    import torch

    return torch.lerp(aligned, sft, -alpha, out=out)


def extrapolate_chunk_torch(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float) -> None:
    """`extrapolate_chunk` with torch ops."""
    import torch

    if sft.dtype == aligned.dtype == out.dtype:
        # lerp(a, s, w) = a + w * (s - a); with w = -alpha that is the formula itself. For bf16/fp16 torch computes
        # it in float32 and rounds once; alpha = 0 returns aligned bit for bit.
        lerp(out, aligned, sft, alpha)
        return
    wide = torch.float64 if torch.float64 in (sft.dtype, aligned.dtype, out.dtype) else torch.float32
    n = out.numel()
    a_buf = torch.empty(min(n, BLOCK), dtype=wide)
    s_buf = torch.empty(min(n, BLOCK), dtype=wide)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        a = a_buf[: stop - start].copy_(aligned[start:stop])
        s = s_buf[: stop - start].copy_(sft[start:stop])
        lerp(a, a, s, alpha)
        out[start:stop].copy_(a)  # the one rounding (round to nearest even)


@dataclass
class Stats:
    """Sums over a set of elements for the change B - A (D = B - A); mergeable, so aggregates are exact sums of
    their tensors' sums. Accumulated in float64."""

    n: int = 0
    d2: float = 0.0  # sum D^2
    a2: float = 0.0
    b2: float = 0.0
    max_abs: float = 0.0  # max |D|
    finite: bool = True  # False if A or B may hold a NaN or an Inf (then some sums are not finite either)

    def add(self, other: Stats) -> None:
        self.n += other.n
        self.finite = self.finite and other.finite
        self.d2 += other.d2
        self.a2 += other.a2
        self.b2 += other.b2
        self.max_abs = max(self.max_abs, other.max_abs)

    def summary(self) -> dict[str, float]:
        """The report's numbers. The cosine comes from |D|^2 = |A|^2 + |B|^2 - 2 A.B, arranged as
        1 - (|D|^2 - (|A| - |B|)^2) / (2 |A| |B|): its error is that of |D|^2, small even when A and B
        differ by 1e-5 of their norm (A.B itself would lose those digits to rounding)."""
        fro = math.sqrt(self.d2)
        na, nb = math.sqrt(self.a2), math.sqrt(self.b2)
        cosine = 1 - (self.d2 - (na - nb) ** 2) / (2 * na * nb) if na and nb else (1.0 if na == nb else 0.0)
        return {
            "n": self.n,
            "fro": fro,
            "rms": fro / math.sqrt(self.n) if self.n else 0.0,
            "fro_per_n": fro / self.n if self.n else 0.0,
            "relative": fro / na if na else (0.0 if fro == 0 else math.inf),
            "cosine": cosine,
            "max_abs": self.max_abs,
        }


def add_stats(found: dict[str, tuple[Stats, Stats]], name: str, delta: Stats, update: Stats) -> None:
    """Add one piece's (delta, update) statistics to tensor `name`'s running sums in `found`."""
    if name in found:
        found[name][0].add(delta)
        found[name][1].add(update)
    else:
        found[name] = (delta, update)


# The torch ops path (extrapolate_chunk_stats_torch, and gpu.py's torch fallback) takes one float32 dot product per
# block of this many elements and adds the blocks in float64 (float64 throughout when a tensor is float64). The
# compiled kernel's float32 sums are shorter: 8 lanes of 128 elements, added into float64 every 1024 elements
# (_fused.c's BLOCK); the Triton kernel's cover gpu.BLOCK (4096) elements. Relative error of the sums of squares
# against float64, measured on 786k bfloat16 elements: up to ~7e-6 with torch ops, ~1e-7 compiled (tests allow 1e-4
# and 1e-6).
STATS_BLOCK = 1 << 18


def extrapolate_chunk_stats(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor,
                            alpha: float) -> tuple[Stats, Stats]:
    """`extrapolate_chunk` fused with the statistics of the norm reports, in one pass over the chunk.

    Returns (delta, update): the change D = aligned - sft (A = sft, B = aligned) and the applied update
    out - aligned (A = aligned, B = out, after rounding to out's dtype). The output bytes are identical to
    `extrapolate_chunk`'s. `out` may alias `aligned`. With the compiled kernel, `finite` is exact: False only if
    that side holds a NaN or an Inf.
    """
    done = _native(out, sft, aligned, alpha, True)
    if done is None:
        return extrapolate_chunk_stats_torch(out, sft, aligned, alpha)
    return _stats_of(out.numel(), done)


def extrapolate_chunk_stats_torch(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor,
                                  alpha: float) -> tuple[Stats, Stats]:
    """`extrapolate_chunk_stats` with torch ops: each block of STATS_BLOCK elements is widened once, used for the
    output and all the sums, and dropped. `finite` is False when a sum or a maximum is not finite."""
    import torch

    wide = torch.float64 if torch.float64 in (sft.dtype, aligned.dtype, out.dtype) else torch.float32
    n = out.numel()
    m = min(n, STATS_BLOCK)
    x, y, z = torch.empty(3, m, dtype=wide)
    parts = torch.empty(-(-n // STATS_BLOCK), 5, dtype=wide)
    low = torch.empty(parts.shape[0], 2, dtype=wide)
    high = torch.empty(parts.shape[0], 2, dtype=wide)
    for i, start in enumerate(range(0, n, STATS_BLOCK)):
        stop = min(start + STATS_BLOCK, n)
        s, a, o, r = x[: stop - start], y[: stop - start], z[: stop - start], parts[i]
        s.copy_(sft[start:stop])
        a.copy_(aligned[start:stop])
        lerp(o, a, s, alpha)  # the same float32 (float64) arithmetic as extrapolate_chunk
        if out.dtype != wide:
            out[start:stop].copy_(o)  # the one rounding
            o.copy_(out[start:stop])  # the update as applied: rounded values
        else:
            out[start:stop].copy_(o)
        torch.dot(s, s, out=r[0])
        torch.dot(a, a, out=r[1])
        torch.dot(o, o, out=r[2])
        s.sub_(a)  # sft - aligned = -D
        torch.dot(s, s, out=r[3])
        o.sub_(a)  # the applied update
        torch.dot(o, o, out=r[4])
        torch.aminmax(s, out=(low[i, 0], high[i, 0]))
        torch.aminmax(o, out=(low[i, 1], high[i, 1]))
    ss, aa, oo, dd, uu = parts.double().sum(0).tolist()
    max_d, max_u = torch.maximum(-low.min(0).values, high.max(0).values).double().tolist()
    return (Stats(n, dd, ss, aa, max_d, math.isfinite(max_d) and math.isfinite(aa)),
            Stats(n, uu, aa, oo, max_u, math.isfinite(max_u) and math.isfinite(oo)))


def maybe_nonfinite(x: torch.Tensor) -> bool:
    """True if `x` may hold a NaN or an Inf: one min/max pass (NaN propagates), ~12 ms per 64 MiB of bf16 here."""
    import torch

    if x.numel() == 0:
        return False
    low, high = torch.aminmax(x)
    return not (math.isfinite(low.item()) and math.isfinite(high.item()))


def reference(sft: torch.Tensor, aligned: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """The float64 formula, rounded once to `dtype`: what every output element must equal within one step."""

    a, s = aligned.double(), sft.double()
    return (a + alpha * (a - s)).to(dtype)


def _ulp(r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One step of `dtype` at each value of `r` (float64 values representable in `dtype`)."""
    import torch

    finfo = torch.finfo(dtype)
    _, exp = torch.frexp(r)
    return torch.ldexp(torch.full_like(r, finfo.eps), exp - 1).clamp_min(finfo.tiny * finfo.eps)


def steps_off(out: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|out - expected| in steps of out's dtype at `expected` (0 where equal, inf where only one is NaN)."""
    import torch

    x, r = out.double(), expected.to(out.dtype).double()
    same = (x == r) | (torch.isnan(x) & torch.isnan(r))
    diff = torch.where(same, torch.zeros_like(r), (x - r).abs())
    return torch.nan_to_num(diff / _ulp(r, out.dtype), nan=float("inf"))


def error_counts(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float) -> tuple[float, int]:
    """(worst steps, elements more than one step off) of `error_steps` over contiguous CPU tensors: one pass of the
    compiled checker where it handles the dtypes (no float64 copies), else torch ops in blocks."""
    names = [dtypes.NAME.get(t.dtype) for t in (out, sft, aligned)]
    if (_NATIVE is not None and all(n in _CODES for n in names) and out.numel() == sft.numel() == aligned.numel()
            and all(t.device.type == "cpu" and t.is_contiguous() for t in (out, sft, aligned))):
        res = (ctypes.c_double * 2)()
        if not _NATIVE.check(out.data_ptr(), _CODES[names[0]], sft.data_ptr(), _CODES[names[1]], aligned.data_ptr(),
                             _CODES[names[2]], out.numel(), alpha, res):
            return res[0], int(res[1])
    worst, bad = 0.0, 0
    for start in range(0, out.numel(), BLOCK):  # float64 scratch stays small
        stop = start + BLOCK
        steps = error_steps(out[start:stop], sft[start:stop], aligned[start:stop], alpha)
        worst = max(worst, steps.max().item())
        bad += int((steps > 1).sum().item())
    return worst, bad


def error_steps(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float) -> torch.Tensor:
    """How far `out` is from the float64 formula rounded once, in output steps, beyond float32's own error.

    The kernel computes in float32 (float64 if anything is float64): the difference, the product and the sum are
    each rounded there, which costs up to u * (|result| + 3 |alpha (aligned - sft)|) with u = eps/2. Where the
    result cancels to near zero that is more than a step of the result, so it is forgiven; what is left must be
    at most 1 (one rounding to the output dtype).
    """
    import torch

    a, s = aligned.double(), sft.double()
    exact = a + alpha * (a - s)
    wide = torch.float64 if torch.float64 in (out.dtype, sft.dtype, aligned.dtype) else torch.float32
    slack = torch.finfo(wide).eps * (exact.abs() + 3 * abs(alpha) * (a - s).abs())
    r = exact.to(out.dtype).double()
    x = out.double()
    same = (x == r) | (torch.isnan(x) & torch.isnan(r))
    excess = torch.where(same, torch.zeros_like(r), ((x - r).abs() - slack).clamp_min(0))
    return torch.nan_to_num(excess / _ulp(r, out.dtype), nan=float("inf"))

