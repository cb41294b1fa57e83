"""Kernels: the ExPO formula on one chunk, and its float64 reference.

    out = aligned + alpha * (aligned - sft)

computed in float32 (float64 when an input or the output is float64) and rounded once to `out`'s dtype. The
kernels know nothing of files; they take 1-D tensors of equal length and write into `out`.

Bytes moved per element: itemsize(sft) + itemsize(aligned) read, itemsize(out) written. On this project's 2-core
machine the math costs ~20-40 ms per 128 MB, against ~300 ms to write 128 MB, so the engine is I/O-bound.
"""

from __future__ import annotations

import torch

# Mixed-dtype chunks are widened through reused scratch of this many elements, so no chunk-sized float32 copy is
# ever allocated (page faults on fresh buffers cost more than the math).
BLOCK = 1 << 20


def extrapolate_chunk(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float) -> None:
    """Write `aligned + alpha * (aligned - sft)` into `out`, with one rounding to out's dtype.

    `out` may alias `aligned` (the engine computes in place when the dtypes agree). All three are 1-D, same length.
    """
    if sft.dtype == aligned.dtype == out.dtype:
        # lerp(a, s, w) = a + w * (s - a); with w = -alpha that is the formula itself. For bf16/fp16 torch computes
        # it in float32 and rounds once; alpha = 0 returns aligned bit for bit.
        torch.lerp(aligned, sft, -alpha, out=out)
        return
    wide = torch.float64 if torch.float64 in (sft.dtype, aligned.dtype, out.dtype) else torch.float32
    n = out.numel()
    a_buf = torch.empty(min(n, BLOCK), dtype=wide)
    s_buf = torch.empty(min(n, BLOCK), dtype=wide)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        a = a_buf[: stop - start].copy_(aligned[start:stop])
        s = s_buf[: stop - start].copy_(sft[start:stop])
        torch.lerp(a, s, -alpha, out=a)
        out[start:stop].copy_(a)  # the one rounding (round to nearest even)


def reference(sft: torch.Tensor, aligned: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """The float64 formula, rounded once to `dtype`: what every output element must equal within one step."""
    a, s = aligned.double(), sft.double()
    return (a + alpha * (a - s)).to(dtype)


def _ulp(r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One step of `dtype` at each value of `r` (float64 values representable in `dtype`)."""
    finfo = torch.finfo(dtype)
    _, exp = torch.frexp(r)
    return torch.ldexp(torch.full_like(r, finfo.eps), exp - 1).clamp_min(finfo.tiny * finfo.eps)


def steps_off(out: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|out - expected| in steps of out's dtype at `expected` (0 where equal, inf where only one is NaN)."""
    x, r = out.double(), expected.to(out.dtype).double()
    same = (x == r) | (torch.isnan(x) & torch.isnan(r))
    diff = torch.where(same, torch.zeros_like(r), (x - r).abs())
    return torch.nan_to_num(diff / _ulp(r, out.dtype), nan=float("inf"))


def error_steps(out: torch.Tensor, sft: torch.Tensor, aligned: torch.Tensor, alpha: float) -> torch.Tensor:
    """How far `out` is from the float64 formula rounded once, in output steps, beyond float32's own error.

    The kernel computes in float32 (float64 if anything is float64): the difference, the product and the sum are
    each rounded there, which costs up to u * (|result| + 3 |alpha (aligned - sft)|) with u = eps/2. Where the
    result cancels to near zero that is more than a step of the result, so it is forgiven; what is left must be
    at most 1 (one rounding to the output dtype).
    """
    a, s = aligned.double(), sft.double()
    exact = a + alpha * (a - s)
    wide = torch.float64 if torch.float64 in (out.dtype, sft.dtype, aligned.dtype) else torch.float32
    slack = torch.finfo(wide).eps * (exact.abs() + 3 * abs(alpha) * (a - s).abs())
    r = exact.to(out.dtype).double()
    x = out.double()
    same = (x == r) | (torch.isnan(x) & torch.isnan(r))
    excess = torch.where(same, torch.zeros_like(r), ((x - r).abs() - slack).clamp_min(0))
    return torch.nan_to_num(excess / _ulp(r, out.dtype), nan=float("inf"))
