"""Kernels: the ExPO formula on one chunk, and its float64 reference.

    out = aligned + alpha * (aligned - sft)

computed in float32 (float64 when an input or the output is float64) and rounded once to `out`'s dtype. The
kernels know nothing of files; they take 1-D tensors of equal length and write into `out`.

Bytes moved per element: itemsize(sft) + itemsize(aligned) read, itemsize(out) written. On this project's 2-core
machine the math costs ~20-40 ms per 128 MB, against ~300 ms to write 128 MB, so the engine is I/O-bound.

The form of the arithmetic (which lerp branch, the alpha = 0 rule) is decided once, by `form`, and the layout of the
statistics once, by `Sums`; every backend takes them from here:
- the compiled kernel (`_fused.c`, a CPython extension built at install when a C compiler is there): one pass over
  memory, with the statistics and the NaN/Inf flags for free; used for bfloat16, float16 and float32 in any
  combination;
- torch ops (`torch_sums`, on the CPU and on a GPU without Triton): float64 data, and any install without the
  compiled kernel. The statistics then cost ~14 passes over every block. `EXPO_KERNEL=torch` forces this path;
- the Triton kernel (gpu.py), on a GPU.
All compute torch.lerp's float32 arithmetic and round once, so their output bytes agree (tested), and all are
tested against the float64 `reference` and `error_steps` at the end of this module.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from . import dtypes

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that use it, not here: the engine's own path (numpy buffers and the compiled
# kernel) runs without it and so starts ~3 s sooner.

# Mixed-dtype chunks are widened through reused scratch of this many elements, so no chunk-sized float32 copy is
# ever allocated (page faults on fresh buffers cost more than the math).
BLOCK = 1 << 20


# --- the form of the formula, for every backend ------------------------------------------------------------------

@dataclass(frozen=True)
class Form:
    """How every backend (the compiled kernel, Triton, torch ops) computes out for one alpha: torch.lerp's float32
    arithmetic, lerp(aligned, sft, w) with w = float32(-alpha) and d = sft - aligned,

        from_sft False: out = fma(coeff, d, aligned)   (|w| < 0.5: coeff = w)
        from_sft True:  out = fma(coeff, d, sft)       (|w| >= 0.5: coeff = w - 1, rounded in float32)
        keep:           out = aligned                  (w = 0: lerp's a + 0 * d would turn an aligned -0.0 into
                                                        +0.0 where sft < aligned; alpha = 0 must give the aligned
                                                        model bit for bit)

    then one rounding to the output dtype."""

    coeff: float
    from_sft: bool
    keep: bool


def form(alpha: float) -> Form:
    """The Form of `alpha` (see Form)."""
    w = np.float32(-alpha)
    if w == 0:
        return Form(0.0, False, True)
    if abs(w) < 0.5:
        return Form(float(w), False, False)
    return Form(float(w - np.float32(1)), True, False)


class Sums(NamedTuple):
    """The statistics' sums over a chunk, in the order every backend produces them (s = sft, a = aligned, o = out
    as rounded, d = s - a): five sums of squares, then two maxima."""

    sft2: float
    aligned2: float
    out2: float
    delta2: float
    update2: float
    max_delta: float
    max_update: float

    def stats(self, n: int, nonfinite: int | None = None) -> tuple[Stats, Stats]:
        """(delta, update): the change aligned - sft (A = sft, B = aligned) and the applied update out - aligned
        (A = aligned, B = out). `nonfinite`: the compiled kernel's NONFINITE_* bits, exact; None: a pair counts
        as finite when all its sums are (a NaN or an Inf in A or B makes its sum of squares NaN or Inf, whatever a
        GPU's max does with NaN)."""
        if nonfinite is None:
            delta_ok = all(map(math.isfinite, (self.sft2, self.aligned2, self.delta2, self.max_delta)))
            update_ok = all(map(math.isfinite, (self.aligned2, self.out2, self.update2, self.max_update)))
        else:
            delta_ok = not nonfinite & (NONFINITE_SFT | NONFINITE_ALIGNED)
            update_ok = not nonfinite & (NONFINITE_ALIGNED | NONFINITE_OUT)
        return (Stats(n, self.delta2, self.sft2, self.aligned2, self.max_delta, delta_ok),
                Stats(n, self.update2, self.aligned2, self.out2, self.max_update, update_ok))


# The compiled kernel's NaN/Inf bits: which side holds a NaN or an Inf somewhere (its FLAGS names them in order).
NONFINITE_SFT, NONFINITE_ALIGNED, NONFINITE_OUT = 1, 2, 4


# --- the compiled kernel ------------------------------------------------------------------------------------------

ABI = 2  # the interface version of _fused.c this module calls (its ABI constant)
NATIVE_DTYPES = ("BF16", "F16", "F32")
NATIVE_KINDS = ("compiled", "generic", "torch")


@dataclass(frozen=True)
class Native:
    """The compiled kernel (`_fused`, a CPython extension) as this module calls it: `generic` takes its untuned
    loop whatever the CPU. Its functions take buffer objects (numpy arrays here), check their lengths, dtypes,
    writability and overlap, raise ValueError on a mismatch and release the GIL."""

    module: object
    generic: bool

    @property
    def target(self) -> str:
        return "generic" if self.generic else self.module.target()

    def extrapolate(self, out, out_dtype: str, sft, sft_dtype: str, aligned, aligned_dtype: str, alpha: float,
                    stats: bool) -> tuple[Sums, int]:
        f = form(alpha)
        sums, nonfinite = self.module.extrapolate(out, out_dtype, sft, sft_dtype, aligned, aligned_dtype, f.coeff,
                                                  f.from_sft, f.keep, stats, self.generic)
        return Sums(*sums), nonfinite


def _stale(module) -> str | None:
    """Why a built `_fused` is not the one this module calls, or None."""
    if getattr(module, "ABI", None) != ABI:
        return f"its interface is version {getattr(module, 'ABI', 1)}, this expo_engine calls version {ABI}"
    if tuple(getattr(module, "SUMS", ())) != Sums._fields or tuple(getattr(module, "FLAGS", ())) != (
            "sft", "aligned", "out"):
        return "its statistics are laid out differently from kernels.Sums"
    return None


def load_native(kind: str = "") -> Native | None:
    """The compiled kernel, or None (not built, stale, or `kind` "torch"). `kind` (default: EXPO_KERNEL):
    "compiled" (the loop this CPU is tuned for), "generic" (the untuned loop whatever the CPU) or "torch"."""
    kind = (kind or os.environ.get("EXPO_KERNEL", "")).strip().lower()
    if kind == "torch":
        return None
    try:
        from . import _fused
    except ImportError:
        return None
    if _stale(_fused):  # built from an older _fused.c (an editable install not rebuilt after a pull): torch ops
        return None
    native = Native(_fused, kind == "generic")
    # The untuned loop is slower than torch's own kernels (measured 3x): by default it runs only when asked.
    return native if native.target == "avx2" or kind == "generic" else None


_NATIVE = load_native()


@contextlib.contextmanager
def using(kind: str):
    """Run the block with kernel `kind` ("compiled", "generic" or "torch"), for tests and benchmarks. Yields
    False (and changes nothing) when the compiled kernel is asked for and not built here."""
    global _NATIVE
    if kind not in NATIVE_KINDS:
        raise ValueError(f"kernel must be one of {NATIVE_KINDS}, not {kind!r}")
    native = load_native(kind)
    if kind != "torch" and native is None:
        yield False
        return
    old, _NATIVE = _NATIVE, native
    try:
        yield True
    finally:
        _NATIVE = old


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
    why = _stale(_fused)
    if why:
        return False, (f"compiled kernel {_fused.__file__} is stale (built from an older _fused.c: {why}): torch "
                       "ops do the arithmetic; rebuild it with `pip install -e .` (or `pip install .`) again")
    return True, (f"compiled kernel built ({_fused.__file__}) but not used on this CPU (no AVX2: its untuned loop "
                  "is slower than torch ops); EXPO_KERNEL=generic forces it")


def native_kernel() -> str | None:
    """Which compiled kernel runs on this machine ("avx2" or "generic"), or None when torch ops do the work."""
    return _NATIVE.target if _NATIVE is not None else None


def native_handles(out_dtype: str, sft_dtype: str, aligned_dtype: str, stats: bool) -> bool:
    """Whether the compiled kernel computes this dtype triple (safetensors names) here."""
    triple = (out_dtype, sft_dtype, aligned_dtype)
    if _NATIVE is None or not all(d in NATIVE_DTYPES for d in triple):
        return False
    # float16 rounding costs the compiled loop ~3x bfloat16's (85 vs 26 ms per 32 M elements): without
    # statistics torch.lerp (33 ms with its NaN/Inf check) is faster
    return stats or "F16" not in triple


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous 1-D CPU tensor's bytes as a numpy uint8 array (no copy)."""
    import torch

    return t.view(torch.uint8).numpy()


def _native(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float, stats: bool):
    """Run the compiled kernel if it handles these tensors: returns (Sums, NaN/Inf bits), else None."""
    names = [dtypes.NAME.get(t.dtype) for t in (out, sft, aligned)]
    if not (native_handles(*names, stats) and all(t.device.type == "cpu" and t.is_contiguous()
                                                  for t in (out, sft, aligned))):
        return None
    return _NATIVE.extrapolate(_bytes(out), names[0], _bytes(sft), names[1], _bytes(aligned), names[2], alpha, stats)


def diff_stats_bytes(a: np.ndarray, a_dtype: str, b: np.ndarray, b_dtype: str) -> Stats | None:
    """`expo norms`' statistics of b - a over elements held in numpy uint8 arrays, summed in float64 by the
    compiled kernel in one pass; None when it does not handle these dtypes (the caller uses torch ops)."""
    if _NATIVE is None or a_dtype not in NATIVE_DTYPES or b_dtype not in NATIVE_DTYPES:
        return None
    (aa, bb, dd, max_d), nonfinite = _NATIVE.module.diff_stats(a, a_dtype, b, b_dtype)
    return Stats(len(a) // dtypes.itemsize(a_dtype), dd, aa, bb, max_d, not nonfinite & 3)


def extrapolate_bytes(out: np.ndarray, out_dtype: str, sft: np.ndarray, sft_dtype: str, aligned: np.ndarray,
                      aligned_dtype: str, alpha: float, stats: bool) -> tuple[Stats, Stats]:
    """The engine's entry: the formula on elements held in numpy uint8 arrays (the executor's buffers), with their
    safetensors dtype names. Returns (delta, update) statistics; without `stats` only their counts and whether the
    output may hold NaN or Inf (for the overflow check). `out` may be `aligned` itself.

    The compiled kernel when it handles the dtypes, else torch ops on zero-copy views of the same bytes.
    """
    n = len(out) // dtypes.itemsize(out_dtype)
    if native_handles(out_dtype, sft_dtype, aligned_dtype, stats):
        sums, nonfinite = _NATIVE.extrapolate(out, out_dtype, sft, sft_dtype, aligned, aligned_dtype, alpha, stats)
        return sums.stats(n, nonfinite) if stats else (Stats(n), Stats(n, finite=not nonfinite & NONFINITE_OUT))
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
    """`torch.lerp(aligned, sft, -alpha, out=out)` (which is `Form`'s arithmetic itself), with Form's keep rule:
    where it says keep (alpha = 0), `aligned` is copied (rounded once to out's dtype)."""
    if form(alpha).keep:
        return out.copy_(aligned)
    import torch

    return torch.lerp(aligned, sft, -alpha, out=out)


def extrapolate_chunk_torch(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float) -> None:
    """`extrapolate_chunk` with torch ops."""
    torch_sums(out, sft, aligned, alpha, False)


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


# The torch ops path (torch_sums, on the CPU and on a GPU without Triton) takes one float32 dot product per block of
# this many elements and adds the blocks in float64 (float64 throughout when a tensor is float64). The compiled
# kernel's float32 sums are shorter: 8 lanes of 128 elements, added into float64 every 1024 elements (_fused.c's
# BLOCK); the Triton kernel's cover gpu.BLOCK (4096) elements. Relative error of the sums of squares against float64,
# measured on 786k bfloat16 elements: up to ~7e-6 with torch ops, ~1e-7 compiled (tests allow 1e-4 and 1e-6).
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
    sums, nonfinite = done
    return sums.stats(out.numel(), nonfinite)


def extrapolate_chunk_stats_torch(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor,
                                  alpha: float) -> tuple[Stats, Stats]:
    """`extrapolate_chunk_stats` with torch ops. `finite` is False when a sum or a maximum is not finite."""
    return Sums(*torch_sums(out, sft, aligned, alpha, True).tolist()).stats(out.numel())


def torch_sums(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float,
               stats: bool) -> torch.Tensor | None:
    """The formula with torch ops on the tensors' device (the CPU, or a GPU without Triton), and with `stats` the
    chunk's Sums as 7 float64 values on that device, not waited for. Each block (STATS_BLOCK elements with
    statistics, BLOCK without) is widened once into reused scratch, used for the output and all the sums, and
    dropped; tensors of one dtype without statistics take torch.lerp directly."""
    import torch

    if not stats and sft.dtype == aligned.dtype == out.dtype:
        lerp(out, aligned, sft, alpha)  # bf16/fp16: torch computes in float32 and rounds once
        return None
    wide = torch.float64 if torch.float64 in (sft.dtype, aligned.dtype, out.dtype) else torch.float32
    n, dev = out.numel(), out.device
    step = STATS_BLOCK if stats else BLOCK
    m = min(n, step)
    x, y, z = torch.empty(3, m, dtype=wide, device=dev)
    parts = torch.empty(-(-n // step), len(Sums._fields), dtype=wide, device=dev)
    for i, start in enumerate(range(0, n, step)):
        stop = min(start + step, n)
        s, a, o, r = x[: stop - start], y[: stop - start], z[: stop - start], parts[i]
        s.copy_(sft[start:stop])
        a.copy_(aligned[start:stop])
        lerp(o, a, s, alpha)
        out[start:stop].copy_(o)  # the one rounding (round to nearest even)
        if not stats:
            continue
        if out.dtype != wide:
            o.copy_(out[start:stop])  # the update as applied: rounded values
        torch.dot(s, s, out=r[0])
        torch.dot(a, a, out=r[1])
        torch.dot(o, o, out=r[2])
        s.sub_(a)  # sft - aligned = -D
        torch.dot(s, s, out=r[3])
        o.sub_(a)  # the applied update
        torch.dot(o, o, out=r[4])
        for v, j in ((s, 5), (o, 6)):  # max |v| in one pass (NaN propagates)
            low, high = torch.aminmax(v)
            torch.maximum(-low, high, out=r[j])
    return reduce_parts(parts) if stats else None


def reduce_parts(parts: torch.Tensor) -> torch.Tensor:
    """Per-block partial Sums (rows; columns in Sums' order, any padding after them) -> 7 float64 values on their
    device: the five sums added in float64, then the two maxima."""
    import torch

    if parts.shape[0] == 0:
        return torch.zeros(7, dtype=torch.float64, device=parts.device)
    return torch.cat([parts[:, :5].double().sum(0), parts[:, 5:7].amax(0).double()])


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
    if (_NATIVE is not None and all(n in NATIVE_DTYPES for n in names) and out.numel() == sft.numel() == aligned.numel()
            and all(t.device.type == "cpu" and t.is_contiguous() for t in (out, sft, aligned))):
        return _NATIVE.module.error_steps(_bytes(out), names[0], _bytes(sft), names[1], _bytes(aligned), names[2],
                                          alpha)
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

