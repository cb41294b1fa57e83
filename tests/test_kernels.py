"""Kernels against the float64 reference: dtypes, mixed inputs, odd lengths, in place, the error measure itself."""

from __future__ import annotations

import pytest
import torch

from expo_engine.kernels import BLOCK, error_steps, extrapolate_chunk, reference, steps_off

pytestmark = pytest.mark.usefixtures("kernel")  # every test on each implementation (conftest.kernel)

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _pair(n: int, dtype_s, dtype_a, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=g, dtype=torch.float64)
    a = s + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    return s.to(dtype_s), a.to(dtype_a)


@pytest.mark.parametrize("alpha", [0.3, 2.5, 8.0, 25.0, -0.5, -1.7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_dtype_within_one_step(dtype, alpha):
    s, a = _pair(100_003, dtype, dtype)
    out = torch.empty_like(a)
    extrapolate_chunk(out, s, a, alpha)
    assert error_steps(out, s, a, alpha).max().item() <= 1


@pytest.mark.parametrize("dtype_s,dtype_a,dtype_out", [
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float16, torch.float32),
    (torch.float16, torch.bfloat16, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.float16),
    (torch.float64, torch.bfloat16, torch.bfloat16),
])
def test_mixed_dtypes_within_one_step(dtype_s, dtype_a, dtype_out):
    n = BLOCK + 12_345  # crosses the scratch block boundary
    s, a = _pair(n, dtype_s, dtype_a, seed=1)
    out = torch.empty(n, dtype=dtype_out)
    extrapolate_chunk(out, s, a, 0.4)
    assert error_steps(out, s, a, 0.4).max().item() <= 1


def test_in_place_on_aligned():
    s, a = _pair(5001, torch.float32, torch.bfloat16)
    expected = reference(s, a, 1.5, torch.bfloat16)
    extrapolate_chunk(a, s, a, 1.5)  # the executor computes into the aligned buffer when dtypes agree
    assert steps_off(a, expected).max().item() <= 1


def test_alpha_zero_bit_exact():
    for dtype in DTYPES:
        s, a = _pair(4097, dtype, dtype)
        out = torch.empty_like(a)
        extrapolate_chunk(out, s, a, 0.0)
        assert torch.equal(out, a)


def test_error_measure_catches_a_two_step_error():
    s, a = _pair(1000, torch.bfloat16, torch.bfloat16)
    out = reference(s, a, 0.3, torch.bfloat16)
    assert error_steps(out, s, a, 0.3).max().item() == 0
    bad = out.clone()
    x = bad[17].double()
    _, exp = torch.frexp(x)
    bad[17] = (x + 2 * torch.ldexp(torch.tensor(2.0**-7, dtype=torch.float64), exp - 1)).bfloat16()  # two steps up
    bad[18] = -bad[18]
    steps = error_steps(bad, s, a, 0.3)
    assert steps[17] > 1 and steps[18] > 1 and (steps > 1).sum() == 2
