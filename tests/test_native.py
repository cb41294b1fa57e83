"""The compiled kernel (_fused.c) against torch's: the same output bytes for every dtype triple, both of lerp's
branches, special values, ragged lengths and in place; the same NaN/Inf flags; float64-accurate sums."""

from __future__ import annotations

import itertools
import platform

import pytest
import torch
from helpers import require_native

from expo_engine import kernels
from expo_engine.norms import reference_stats

FLOATS = [torch.bfloat16, torch.float16, torch.float32]
ALPHAS = [0.3, 0.49999, 0.5, 2.5, 25.0, -0.5, -1.7, 0.0]


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


@pytest.mark.skipif(platform.machine() != "x86_64" or not _cpu_has_avx2(), reason="the tuned kernel is for AVX2 CPUs")
def test_compiled_kernel_is_built_and_used(pair, tmp_path):
    """On an AVX2 machine (CI's) the install must have built the kernel: otherwise the engine silently runs ~3x
    slower statistics on torch ops. Elsewhere (no compiler, another CPU) it skips unless EXPO_REQUIRE_NATIVE=1.
    Built is not enough: a real run must say in its expo.json that the compiled kernel did the arithmetic."""
    import json

    from expo_engine import extrapolate

    if kernels.native_kernel() != "avx2":
        require_native(f"the compiled AVX2 kernel is not in use here (kernel: {kernels.native_kernel()})")
    out = str(tmp_path / "out")
    extrapolate(pair.sft, pair.aligned, 0.3, out)
    with open(f"{out}/expo.json") as f:
        assert json.load(f)["cpu_kernel"] == "compiled (avx2)"


def _special(dtype: torch.dtype) -> torch.Tensor:
    """Values where rounding and overflow go wrong first: zeros, denormals, the largest finite, NaN, Inf."""
    fi = torch.finfo(dtype)
    vals = [0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny * fi.eps, fi.max, -fi.max, fi.max / 2, 1.0, -1.0, fi.eps,
            float("nan"), float("inf"), float("-inf")]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


def _data(n: int, ds, da, seed: int):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=g, dtype=torch.float64)
    a = s + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    s, a = s.to(ds), a.to(da)
    # special values on either side, and against ordinary ones, at random places
    k = min(n, 64)
    where = torch.randperm(n, generator=g)[:k]
    s[where[: k // 2]] = _special(ds).repeat(k)[: k // 2]
    a[where[k // 4: k // 4 + k // 2]] = _special(da).flip(0).repeat(k)[: k // 2]
    return s, a


def _same(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Element-wise: identical bytes, or NaN in both (torch's vectorised bfloat16 NaN is 0xffff, ours 0x7fc0)."""
    bits = {2: torch.int16, 4: torch.int32}[x.element_size()]
    return (x.view(bits) == y.view(bits)) | (torch.isnan(x) & torch.isnan(y))


def _run(impl, out, s, a, alpha, stats):
    fn = kernels.extrapolate_chunk_stats if stats else kernels.extrapolate_chunk_checked
    with kernels.using(impl):
        return fn(out, s, a, alpha)


IMPLS = ["compiled", "generic"]


@pytest.fixture(scope="module")
def impls():
    """The implementations to compare (their names for kernels.using); the compiled ones must be built."""
    if kernels.load_native("compiled") is None or kernels.load_native("generic") is None:
        require_native("expo_engine/_fused.c is not built (pip install -e . with a C compiler)")
    return {kind: kind for kind in [*IMPLS, "torch"]}


@pytest.mark.parametrize("ds,da,do", list(itertools.product(FLOATS, FLOATS, FLOATS)))
@pytest.mark.parametrize("impl", IMPLS)
def test_same_bytes_as_torch_for_every_dtype_triple(impls, impl, ds, da, do):
    for seed, (n, alpha) in enumerate([(5003, 0.3), (1031, 2.5), (777, -0.5), (64, 25.0), (9, 0.49999)]):
        s, a = _data(n, ds, da, seed)
        want, got = torch.empty(n, dtype=do), torch.empty(n, dtype=do)
        kernels.extrapolate_chunk_torch(want, s, a, alpha)
        for stats in (False, True):
            got.fill_(0)
            _run(impls[impl], got, s, a, alpha, stats)
            bad = (~_same(got, want)).nonzero()
            assert len(bad) == 0, (f"{impl} stats={stats} {ds}/{da}->{do} alpha={alpha}: element {int(bad[0])}: "
                                   f"sft {s[bad[0]].item()} aligned {a[bad[0]].item()} -> {got[bad[0]].item()}, "
                                   f"torch {want[bad[0]].item()}")


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1023, 1024, 1025, 8 * 1024 + 5])
def test_ragged_lengths_and_in_place(impls, n, alpha):
    g = torch.Generator().manual_seed(n)
    s = torch.randn(n, generator=g).bfloat16()
    a = (s.float() + 0.01 * torch.randn(n, generator=g)).bfloat16()
    want = torch.empty_like(a)
    kernels.extrapolate_chunk_torch(want, s, a, alpha)
    for impl in IMPLS:
        for stats in (False, True):
            inplace = a.clone()
            guard = torch.cat([inplace, torch.full((8,), 7.0, dtype=torch.bfloat16)])  # bytes past the end
            _run(impls[impl], guard[:n], s, guard[:n], alpha, stats)
            assert torch.equal(guard[:n], want), (impl, stats)
            assert torch.equal(guard[n:], torch.full((8,), 7.0, dtype=torch.bfloat16)), "wrote past the end"


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_inf_flags(impls, impl):
    n = 3000
    s = torch.randn(n).bfloat16()
    a = (s.float() + 0.01).bfloat16()
    out = torch.empty_like(a)
    fn = impls[impl]
    assert _run(fn, out, s, a, 0.3, False) is False
    d, u = _run(fn, out, s, a, 0.3, True)
    assert d.finite and u.finite
    s2 = s.clone()
    s2[2999] = float("nan")  # in the ragged tail's block
    d, u = _run(fn, out, s2, a, 0.3, True)
    assert not d.finite and not u.finite  # the NaN reaches the output
    assert _run(fn, out, s2, a, 0.3, False) is True
    a2 = a.clone()
    a2[5] = float("inf")
    d, u = _run(fn, out, s, a2, 0.3, True)
    assert not d.finite and not u.finite
    big = torch.full((n,), 3e38, dtype=torch.bfloat16)  # finite inputs whose extrapolation overflows
    d, u = _run(fn, out, -big, big, 0.5, True)
    assert d.finite is False or d.d2 == float("inf")  # |d| overflows float32 itself
    assert not u.finite and torch.isinf(out).all()
    assert _run(fn, out, -big, big, 0.5, False) is True


@pytest.mark.parametrize("impl", IMPLS)
def test_sums_match_float64(impls, impl):
    """Float32 sums over 1024 elements, float64 above: ~1e-7 relative here (the torch path: ~1e-5)."""
    n = 1 << 20
    g = torch.Generator().manual_seed(11)
    s = torch.randn(n, generator=g).bfloat16()
    a = (s.float() + 1e-3 * torch.randn(n, generator=g)).bfloat16()
    out = torch.empty_like(a)
    d, u = _run(impls[impl], out, s, a, 0.3, True)
    want_d, want_u = reference_stats(s, a), reference_stats(a, out)
    for got, want in ((d.summary(), want_d), (u.summary(), want_u)):
        for key in ("fro", "relative", "max_abs"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), key
        assert 1 - got["cosine"] == pytest.approx(1 - want["cosine"], rel=1e-4)


@pytest.mark.parametrize("ds,da,do", [t for t in itertools.product(FLOATS, FLOATS, FLOATS) if torch.float16 in t])
def test_float16_subnormals_ties_and_overflow(impls, ds, da, do):
    """float16's own edges, where the compiled kernel converts by hand: subnormal results (|x| < 6.1e-5, down to
    6e-8 and below), values that round across a power of two, and the overflow threshold (65504 is the largest
    float16; from 65520 up a value rounds to Inf)."""
    g = torch.Generator().manual_seed(3)
    n = 20_000
    scale = torch.logspace(-9, -3, n, dtype=torch.float64)  # through float16's subnormal range
    s = (torch.randn(n, generator=g, dtype=torch.float64) * scale)
    a = s + torch.randn(n, generator=g, dtype=torch.float64) * scale * 0.3
    edges = torch.tensor([65504.0, 65519.0, 65520.0, 65536.0, 7e4, 2048.0, 2049.0, 2050.0, 6.1e-5, 6.0e-5, 5.96e-8,
                          2.98e-8, 2.99e-8, 1e-9], dtype=torch.float64)
    s[: len(edges)], a[: len(edges)] = edges, edges * 1.0001
    s[len(edges): 2 * len(edges)], a[len(edges): 2 * len(edges)] = -edges * 0.9999, -edges
    s, a = s.to(ds), a.to(da)
    for alpha in (0.3, 2.5, -0.5):
        want = torch.empty(n, dtype=do)
        kernels.extrapolate_chunk_torch(want, s, a, alpha)
        for impl in IMPLS:
            got = torch.empty(n, dtype=do)
            _run(impls[impl], got, s, a, alpha, True)
            bad = (~_same(got, want)).nonzero()
            assert len(bad) == 0, (impl, alpha, int(bad[0]), s[bad[0]].item(), a[bad[0]].item(), got[bad[0]].item(),
                                   want[bad[0]].item())


@pytest.mark.parametrize("da,db", list(itertools.product(FLOATS, FLOATS)))
def test_norms_kernel_sums_in_float64(da, db):
    """`expo norms`' compiled statistics of b - a: float64 sums, so they agree with a direct float64 computation
    to rounding (1e-12), whatever the dtypes, with a ragged tail; NaN/Inf make `finite` False."""
    n = 100_003
    g = torch.Generator().manual_seed(5)
    a64 = torch.randn(n, generator=g, dtype=torch.float64)
    a, b = a64.to(da), (a64 + 1e-3 * torch.randn(n, generator=g, dtype=torch.float64)).to(db)
    st = kernels.diff_stats_bytes(a.view(torch.uint8).numpy(), kernels.dtypes.NAME[da],
                                  b.view(torch.uint8).numpy(), kernels.dtypes.NAME[db])
    assert st is not None and st.finite and st.n == n
    want = reference_stats(a, b)
    got = st.summary()
    for key in ("fro", "relative", "max_abs"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    assert 1 - got["cosine"] == pytest.approx(1 - want["cosine"], rel=1e-6)
    b[n - 1] = float("nan")  # in the ragged tail
    st = kernels.diff_stats_bytes(a.view(torch.uint8).numpy(), kernels.dtypes.NAME[da],
                                  b.view(torch.uint8).numpy(), kernels.dtypes.NAME[db])
    assert not st.finite


@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize("dtype", FLOATS)
def test_alpha_zero_is_aligned_bit_for_bit_even_for_negative_zero(impls, dtype, stats):
    """alpha = 0 must give the aligned tensor bit for bit; lerp's a + 0 * d would turn an aligned -0.0 into +0.0
    wherever sft < aligned (on every implementation: compiled, untuned, torch ops)."""
    n = 1001
    g = torch.Generator().manual_seed(8)
    s = torch.randn(n, generator=g).to(dtype)
    a = torch.randn(n, generator=g).to(dtype)
    a[::3] = -0.0
    s[::6] = 1.0  # sft > aligned = -0.0: lerp's fma gives +0.0 there
    s[3::6] = -1.0
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    for impl in [*IMPLS, "torch"]:
        out = torch.empty_like(a)
        _run(impls[impl], out, s, a, 0.0, stats)
        assert torch.equal(out.view(bits), a.view(bits)), impl


@pytest.fixture
def stale_build(monkeypatch):
    """`_fused` as an editable install not rebuilt after a pull leaves it: the ctypes-era module, a CPython
    extension with no functions and no ABI. The real build must be there first: it is the one being replaced."""
    import sys
    import types

    if kernels.native_kernel() is None:
        require_native("no compiled kernel here, so there is no stale one to fall back from")
    real = sys.modules["expo_engine._fused"]
    old = types.ModuleType("expo_engine._fused", "The fused CPU kernel (called through ctypes).")
    old.__file__ = real.__file__
    monkeypatch.setitem(sys.modules, "expo_engine._fused", old)
    monkeypatch.setattr(sys.modules["expo_engine"], "_fused", old)
    return old


def test_a_stale_compiled_kernel_falls_back_to_torch(stale_build):
    """A stale `_fused` must not break `import expo_engine` or run: the loader refuses it and torch ops do the
    work, with the same bytes."""
    assert kernels.load_native("compiled") is None and kernels.load_native("generic") is None
    with kernels.using("compiled") as available:
        assert not available
    stale_build.ABI, stale_build.SUMS, stale_build.FLAGS = kernels.ABI, ("sft2",), ("sft", "aligned", "out")
    assert kernels.load_native() is None, "a build whose statistics are laid out differently is stale too"


def test_the_extension_checks_its_buffers():
    """The compiled functions check what they are given: a wrong length, dtype or a read-only output raise instead
    of writing past a buffer; an output overlapping an input other than exactly is refused."""
    import numpy as np

    native = kernels.load_native("generic")
    if native is None:
        require_native("expo_engine/_fused.c is not built (pip install -e . with a C compiler)")
    mod = native.module
    out, s, a = np.zeros(16, np.uint8), np.zeros(16, np.uint8), np.zeros(16, np.uint8)
    args = (0.3, False, False, True, False)
    mod.extrapolate(out, "BF16", s, "BF16", a, "BF16", *args)  # 8 elements each: fine
    mod.extrapolate(a, "BF16", s, "BF16", a, "BF16", *args)  # in place: fine
    for bad, what in [((out, "BF16", s[:14], "BF16", a, "BF16"), "sft holds 14 bytes"),
                      ((out, "BF16", s, "BF16", a, "F32"), "aligned holds 16 bytes"),
                      ((out[:15], "BF16", s, "BF16", a, "BF16"), "not a whole number"),
                      ((out, "F64", s, "BF16", a, "BF16"), "not F64"),
                      ((out[2:], "BF16", out[:14], "BF16", a[2:], "BF16"), "overlaps sft"),
                      ((a[:8], "BF16", s[:8], "BF16", a[:16:2].copy(), "BF16"), None)]:
        if what is None:
            mod.extrapolate(*bad, *args)  # a copy: no overlap
            continue
        with pytest.raises(ValueError, match=what):
            mod.extrapolate(*bad, *args)
    frozen = np.zeros(16, np.uint8)
    frozen.flags.writeable = False
    with pytest.raises((TypeError, BufferError)):
        mod.extrapolate(frozen, "BF16", s, "BF16", a, "BF16", *args)
    with pytest.raises(ValueError, match="b holds 14 bytes"):
        mod.diff_stats(s, "BF16", a[:14], "BF16")
    with pytest.raises(ValueError, match="sft holds 14 bytes"):
        mod.error_steps(out, "BF16", s[:14], "BF16", a, "BF16", 0.3)


def test_the_extension_releases_the_gil():
    """While one thread is inside the compiled kernel, another runs Python: the executor's compute threads and the
    reader and writer threads depend on it."""
    import threading
    import time

    import numpy as np

    native = kernels.load_native("generic")
    if native is None:
        require_native("expo_engine/_fused.c is not built (pip install -e . with a C compiler)")
    n = 1 << 25
    s, a, out = np.zeros(2 * n, np.uint8), np.zeros(2 * n, np.uint8), np.zeros(2 * n, np.uint8)
    span, ticks = [], []

    def work():
        t0 = time.perf_counter()
        native.extrapolate(out, "BF16", s, "BF16", a, "BF16", 0.3, True)
        span.extend((t0, time.perf_counter()))

    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    t0, t1 = span
    quarter = (t1 - t0) / 4
    assert t1 - t0 > 0.03, span  # long enough to tell the two apart
    # held, the GIL would stop this thread for the whole call: no tick in its middle half
    assert any(t0 + quarter < t < t1 - quarter for t in ticks), "no Python ran while the kernel did"


def _outputs_to_check(s, a, alpha, do, seed):
    """Outputs `expo verify` may meet: the kernel's own, each element nudged by 0-3 steps or random bits, and
    values near the ends of the output's range."""
    out = torch.empty(s.numel(), dtype=do)
    kernels.extrapolate_chunk_torch(out, s, a, alpha)
    g = torch.Generator().manual_seed(seed)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[do]
    raw = out.view(bits).clone()
    nudge = torch.randint(-3, 4, raw.shape, generator=g, dtype=torch.int64).to(bits)
    nudged = (raw + nudge).view(do)
    scrambled = raw.clone()
    where = torch.randperm(raw.numel(), generator=g)[: raw.numel() // 10]
    scrambled[where] = torch.randint(-2**15, 2**15, (len(where),), generator=g, dtype=torch.int64).to(bits)
    return [out, nudged, scrambled.view(do)]


@pytest.mark.parametrize("ds,da,do", list(itertools.product(FLOATS, FLOATS, FLOATS)))
def test_compiled_checker_agrees_with_torch_error_steps(impls, ds, da, do):
    """`expo verify`'s compiled checker gives torch's error_steps' worst step and count element for element, on
    correct, nudged and scrambled outputs, special values included (NaN, Inf, subnormals, overflow)."""
    for seed, (n, alpha) in enumerate([(5003, 0.3), (1031, 2.5), (777, -0.5), (512, 25.0), (300, 1e4), (64, 0.0)]):
        s, a = _data(n, ds, da, seed)
        for k, out in enumerate(_outputs_to_check(s, a, alpha, do, seed)):
            steps = kernels.error_steps(out, s, a, alpha)
            want = (steps.max().item(), int((steps > 1).sum()))
            got = kernels.error_counts(out, s, a, alpha)
            assert got == want, (k, alpha, got, want)
            if k:  # a nudged or scrambled output is caught
                assert want[1] > 0
            for i in range(0, n, 97):  # element by element too: the same verdict for each
                one = kernels.error_counts(out[i:i + 1], s[i:i + 1], a[i:i + 1], alpha)
                assert one == (steps[i].item(), int(steps[i] > 1)), (i, out[i], s[i], a[i], alpha)


def test_checker_falls_back_to_torch_without_the_kernel():
    """Without the kernel, torch ops count the same errors as the compiled checker did (which must be there to
    give the answer to compare with)."""
    if kernels.native_kernel() is None:
        require_native("the compiled checker is not built here: nothing to compare the fallback with")
    s, a = _data(1000, torch.bfloat16, torch.bfloat16, 3)
    out = _outputs_to_check(s, a, 0.3, torch.bfloat16, 3)[1]
    want = kernels.error_counts(out, s, a, 0.3)  # the compiled checker
    with kernels.using("torch"):
        assert kernels.error_counts(out, s, a, 0.3) == want and want[1] > 0


@pytest.mark.parametrize("do", [torch.bfloat16, torch.float16])
def test_checker_on_float32_midpoints_and_float16_subnormals(do):
    """Where rounding float64 -> float32 -> the output dtype (torch's way) differs from rounding once: values just
    past a midpoint of the output dtype; and results among float16's subnormals, whose step is fixed."""
    bits = 8 if do == torch.bfloat16 else 11  # half a step of the output at 1.0 is 2^-bits
    e = torch.arange(-6, 7, dtype=torch.float64).repeat_interleave(4)
    m = torch.tensor([1 + 2.0**-bits, 1 + 3 * 2.0**-bits, -(1 + 2.0**-bits), 1.5 + 2.0**-bits]).repeat(13)
    a = (m * 2**e).float()  # on a midpoint of the output dtype, exactly
    s = (a.double() - 2**e * 2.0**-20).float()  # alpha (a - s) = 2^(e - 30): past the midpoint by less than float32
    tiny = torch.linspace(-3e-6, 3e-6, 211, dtype=torch.float64)  # float16 subnormals: below 6.1e-5
    s = torch.cat([s, (tiny * 0.9).float()])
    a = torch.cat([a, tiny.float()])
    out = torch.empty(a.numel(), dtype=do)
    kernels.extrapolate_chunk_torch(out, s, a, 2.0**-10)
    for got in (out, (out.view(torch.int16) + 1).view(do)):
        steps = kernels.error_steps(got, s, a, 2.0**-10)
        assert kernels.error_counts(got, s, a, 2.0**-10) == (steps.max().item(), int((steps > 1).sum()))
        for i in range(a.numel()):
            one = kernels.error_counts(got[i:i + 1], s[i:i + 1], a[i:i + 1], 2.0**-10)
            assert one == (steps[i].item(), int(steps[i] > 1)), (i, got[i], s[i], a[i])


def test_checker_takes_torch_ops_for_strided_views():
    """A view with strides is not what the compiled checker's raw pointers assume: torch ops check it."""
    s, a = _data(2000, torch.bfloat16, torch.bfloat16, 5)
    out = _outputs_to_check(s, a, 0.3, torch.bfloat16, 5)[1]
    steps = kernels.error_steps(out[::2], s[::2], a[::2], 0.3)
    assert kernels.error_counts(out[::2], s[::2], a[::2], 0.3) == (steps.max().item(), int((steps > 1).sum()))


def test_expo_doctor_reports_a_stale_build(capsys, stale_build):
    """A stale build: `expo doctor` says so and how to fix it, exit 1 (the engine itself falls back to torch ops,
    see above)."""
    from expo_engine.cli import main

    with kernels.using("torch"):  # as the engine loaded it at import, with the stale build: no compiled kernel
        assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "is stale" in out and "pip install -e ." in out and "interface is version 1" in out, out


def test_expo_doctor_reports_the_kernel_in_use(capsys):
    from expo_engine.cli import main

    if kernels.native_kernel() is None:
        require_native("no compiled kernel here to report")
    assert main(["doctor"]) == 0
    assert "kernel: compiled kernel in use: avx2" in capsys.readouterr().out
