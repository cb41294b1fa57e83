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


def steps_off(out: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|out - expected| in units of `expected`'s last place in out's dtype (0 where equal, inf for NaN mismatch)."""
    finfo = torch.finfo(out.dtype)
    x, r = out.double(), expected.to(out.dtype).double()
    _, exp = torch.frexp(r)
    ulp = torch.ldexp(torch.full_like(r, finfo.eps), exp - 1).clamp_min(finfo.tiny * finfo.eps)
    diff = (x - r).abs()
    same = (x == r) | (torch.isnan(x) & torch.isnan(r))
    return torch.where(same, torch.zeros_like(diff), torch.nan_to_num(diff / ulp, nan=float("inf")))
