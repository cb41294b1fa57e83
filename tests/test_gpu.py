"""The CUDA path (expo_engine.gpu): the Triton kernel under Triton's interpreter, the torch fallback, the pipeline
run with device="cpu", device selection, and, on a machine with a GPU, the same on the GPU (skipped without one).

Triton picks its interpreter for a whole process, when triton is imported (TRITON_INTERPRET=1 must be set before,
because triton wraps its own library functions, tl.sum included, at import). This pytest process may import triton
compiled (the GPU tests) or through another module, so the interpreter cases run in one child process started with
TRITON_INTERPRET=1 (the `interpreted` fixture); it saves its outputs and the tests here check them.

Every output is compared with the float64 formula in output steps (`kernels.error_steps`: at most one), and every
statistic with a float64 computation from the same tensors (relative RTOL). The interpreter rounds float32 to
bfloat16 by truncation (a GPU rounds to nearest even), so bf16 outputs there are compared in steps only, never
byte for byte; fp16 and fp32 outputs are byte-identical to the CPU path's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from expo_engine import dtypes, gpu
from expo_engine.errors import OptionError
from expo_engine.executor import run_chunks
from expo_engine.kernels import (
    Stats,
    error_steps,
    extrapolate_chunk,
    extrapolate_chunk_stats,
    extrapolate_chunk_stats_torch,
)
from expo_engine.plan import make_plan
from expo_engine.reading import Inputs, direct_io, input_paths
from expo_engine.sources import open_checkpoint

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

RTOL = 1e-6  # statistics against float64: float32 per block of gpu.BLOCK (Triton) elements, then float64
# Against the CPU path: its float32 dot products over STATS_BLOCK elements are themselves off by up to a few 1e-6
# (measured: 3.5e-6 on 65537 elements), so the two are compared with this.
RTOL_CPU = 1e-5
BF, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
DTYPES = {  # (sft, aligned, out)
    "bf16": (BF, BF, BF),
    "fp16": (F16, F16, F16),
    "fp32": (F32, F32, F32),
    "fp32,bf16->bf16": (F32, BF, BF),
    "bf16,fp16->fp32": (BF, F16, F32),
}
SIZES = [1, 7, 4097, 65537]  # the interpreter runs ~0.2 s per 64 K elements
ALPHAS = [0.0, 0.3, 8.0, -0.5]  # 8.0 and -0.5 take torch.lerp's second form (|alpha| >= 0.5)
CASES = [(d, n, alpha) for d in DTYPES for n in SIZES for alpha in ALPHAS]


def chunk_pair(n: int, ds: torch.dtype, da: torch.dtype, seed: int = 0):
    """An SFT chunk and an aligned one that differs from it by ~1 % (as DPO makes), in the given dtypes."""
    g = torch.Generator().manual_seed(seed + n)
    s = torch.randn(n, generator=g, dtype=F64) * 0.05
    a = s + 5e-4 * torch.randn(n, generator=g, dtype=F64)
    return s.to(ds), a.to(da)


def stats64(a: torch.Tensor, b: torch.Tensor) -> Stats:
    """The statistics of the change b - a, in float64 from the tensors' values."""
    a, b = a.double(), b.double()
    d = b - a
    return Stats(a.numel(), float(d @ d), float(a @ a), float(b @ b), float(d.abs().max()) if a.numel() else 0.0)


def close(got: Stats, want: Stats, rtol: float = RTOL) -> None:
    assert got.n == want.n
    for field in ("d2", "a2", "b2", "max_abs"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=rtol, abs=1e-30), (field, got, want)
    assert got.finite and want.finite


def check_chunk(out: torch.Tensor, s: torch.Tensor, a: torch.Tensor, alpha: float, delta: Stats,
                update: Stats, rtol: float = RTOL) -> None:
    """Output within one step of the float64 formula; both statistics within `rtol` of float64 ones."""
    assert error_steps(out, s, a, alpha).max().item() <= 1
    if alpha != 0 and out.numel() > 100:  # the check can fail: the wrong sign of alpha is many steps off
        assert error_steps(out, s, a, -alpha).max().item() > 1
    close(delta, stats64(s, a), rtol)
    close(update, stats64(a, out), rtol)


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))


# --- pairs on disk and a pipeline run that collects what it writes ---------------------------------------------

def write_pair(root) -> tuple[str, str]:
    """A small SFT/aligned pair: bf16, fp16, fp32 and mixed tensors of odd sizes, an int tensor to copy, the
    aligned side in two files."""
    g = torch.Generator().manual_seed(11)
    shapes = {"a.weight": ((37, 129), BF, BF), "b.weight": ((1000,), F32, BF), "c.bias": ((5,), F16, F16),
              "d.weight": ((70_001,), BF, BF), "e.weight": ((3, 333), F32, F32)}
    sft, aligned = {}, {}
    for name, (shape, ds, da) in shapes.items():
        s = torch.randn(shape, generator=g, dtype=F64) * 0.05
        sft[name] = s.to(ds)
        aligned[name] = (s + 5e-4 * torch.randn(shape, generator=g, dtype=F64)).to(da)
    sft["f.position_ids"] = aligned["f.position_ids"] = torch.arange(17).reshape(1, 17)
    folders = os.path.join(root, "sft"), os.path.join(root, "aligned")
    for f in folders:
        os.makedirs(f, exist_ok=True)
    save_file(sft, os.path.join(folders[0], "model.safetensors"), metadata={"format": "pt"})
    names = sorted(aligned)
    index = {}
    for k, part in enumerate((names[:3], names[3:])):
        file = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: aligned[n] for n in part}, os.path.join(folders[1], file), metadata={"format": "pt"})
        index |= dict.fromkeys(part, file)
    with open(os.path.join(folders[1], "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    return folders


def run_collect(sft: str, aligned: str, alpha: float, chunk_bytes: int, runner, stats: bool = True,
                dtype: str | None = None, rules=(), **kw):
    """Run `runner` (executor.run_chunks or gpu.run_chunks_cuda) over a plan of the pair; return
    ({tensor name: output tensor}, the statistics it returned, the chunk indices in the order they were written)."""
    plan = make_plan(open_checkpoint(sft), open_checkpoint(aligned), alpha, chunk_bytes=chunk_bytes, dtype=dtype,
                     rules=rules)
    shards = {s.filename: bytearray(s.size) for s in plan.shards}
    order = []
    index = {(c.tensor, c.start): k for k, c in enumerate(plan.chunks)}

    def write(t, c, data, chunk_stats=None):
        offset = t.offset + c.start * dtypes.itemsize(t.dtype)
        shards[t.shard][offset:offset + len(data)] = bytes(data)
        order.append(index[(plan.tensors.index(t), c.start)])

    inputs = Inputs(input_paths(plan), direct=direct_io())
    try:
        found = runner(plan, plan.chunks, inputs, write, stats, **kw)
    finally:
        inputs.close()
    outs = {t.name: torch.frombuffer(shards[t.shard], dtype=torch.uint8)[t.offset:t.offset + t.nbytes].clone()
            .view(dtypes.TORCH[t.dtype]) for t in plan.tensors}
    return outs, found, order


def load_pair(sft: str, aligned: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    def load(folder):
        return {k: v.reshape(-1) for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
                for k, v in load_file(os.path.join(folder, f)).items()}

    return load(sft), load(aligned)


def check_run(outs: dict, found: dict, sft: dict, aligned: dict, alpha: float, stats: bool = True,
              rtol: float = RTOL) -> None:
    for name, out in outs.items():
        if not out.is_floating_point():
            assert torch.equal(out, aligned[name])  # copied
            assert name not in found
            continue
        assert error_steps(out, sft[name], aligned[name], alpha).max().item() <= 1, name
        delta, update = found[name]
        if stats:
            close(delta, stats64(sft[name], aligned[name]), rtol)
            close(update, stats64(aligned[name], out), rtol)
        else:
            assert delta == Stats(out.numel()) and update == Stats(out.numel())


# --- the Triton kernel under the interpreter, in a child process -----------------------------------------------

CHILD = r"""
import sys
from dataclasses import asdict
import torch
sys.path.insert(0, sys.argv[3])
from expo_engine import dtypes, gpu
from test_gpu import run_collect
job = torch.load(sys.argv[1])
res = {"chunks": {}, "runs": {}}
for key, (s, a, out_dtype, alpha) in job["chunks"].items():
    out, plain = torch.empty(s.numel(), dtype=out_dtype), torch.empty(s.numel(), dtype=out_dtype)
    delta, update = gpu.extrapolate_chunk_stats(out, s, a, alpha, kernel="triton")
    gpu.extrapolate_chunk(plain, s, a, alpha, kernel="triton")
    res["chunks"][key] = (out, plain, asdict(delta), asdict(update))
for key, (sft, aligned, alpha, chunk_bytes, stats) in job["runs"].items():
    outs, found, order = run_collect(sft, aligned, alpha, chunk_bytes, gpu.run_chunks_cuda, stats, device="cpu",
                                     kernel="triton")
    res["runs"][key] = (outs, {k: (asdict(d), asdict(u)) for k, (d, u) in found.items()}, order)
torch.save(res, sys.argv[2])
"""

NONFINITE = {  # sft, aligned, out dtype, alpha: NaN/Inf in an input, and an fp16 overflow from finite inputs
    "nan-in-sft": (torch.tensor([1.0, float("nan"), 2.0], dtype=BF), torch.tensor([1.0, 1.0, 2.0], dtype=BF), BF, 0.3),
    "inf-in-aligned": (torch.tensor([1.0, 2.0], dtype=F32), torch.tensor([float("inf"), 2.0], dtype=F32), F32, 0.3),
    "overflow": (torch.tensor([-60000.0, 1.0], dtype=F16), torch.tensor([60000.0, 1.0], dtype=F16), F16, 1.0),
}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every interpreter case, run once in a child process with TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install triton)")
    root = tmp_path_factory.mktemp("interpret")
    chunks = {}
    for d, n, alpha in CASES:
        ds, da, do = DTYPES[d]
        chunks[(d, n, alpha)] = (*chunk_pair(n, ds, da), do, alpha)
    chunks |= {k: v for k, v in NONFINITE.items()}
    sft, aligned = write_pair(str(root))
    runs = {"stats": (sft, aligned, 0.3, 4096, True), "no-stats": (sft, aligned, 8.0, 1000, False)}
    torch.save({"chunks": chunks, "runs": runs}, root / "job.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    tests = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", CHILD, str(root / "job.pt"), str(root / "res.pt"), tests], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return {"job": {"chunks": chunks, "runs": runs}, **torch.load(root / "res.pt")}


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[f"{d}-n{n}-a{alpha}" for d, n, alpha in CASES])
def test_triton_kernel_under_the_interpreter(interpreted, case):
    s, a, out_dtype, alpha = interpreted["job"]["chunks"][case]
    out, plain, delta, update = interpreted["chunks"][case]
    assert out.dtype == out_dtype and out.numel() == s.numel()
    assert same(out, plain)  # with and without the statistics: the same bytes
    check_chunk(out, s, a, alpha, Stats(**delta), Stats(**update))
    ref = torch.empty_like(out)
    want_delta, want_update = extrapolate_chunk_stats(ref, s, a, alpha)
    close(Stats(**delta), want_delta, RTOL_CPU)  # what the CPU path reports for the change
    if out_dtype != BF:  # the interpreter's bf16 cast truncates; fp16 and fp32 match the CPU path byte for byte
        assert same(out, ref)
        close(Stats(**update), want_update, RTOL_CPU)


@needs_triton
@pytest.mark.parametrize("case", list(NONFINITE))
def test_nonfinite_is_flagged_under_the_interpreter(interpreted, case):
    s, a, out_dtype, alpha = NONFINITE[case]
    out, _, delta, update = interpreted["chunks"][case]
    ref = torch.empty_like(out)
    want_delta, want_update = extrapolate_chunk_stats(ref, s, a, alpha)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)  # NaN where NaN (its bits may differ)
    assert Stats(**update).finite is False and want_update.finite is False
    assert Stats(**delta).finite == want_delta.finite == (case == "overflow")  # the change itself is finite there


@needs_triton
@pytest.mark.parametrize("run", ["stats", "no-stats"])
def test_pipeline_with_the_triton_kernel_under_the_interpreter(interpreted, run):
    sft_dir, aligned_dir, alpha, _, stats = interpreted["job"]["runs"][run]
    outs, found, order = interpreted["runs"][run]
    assert order == sorted(order) and len(order) == len(set(order))
    found = {k: (Stats(**d), Stats(**u)) for k, (d, u) in found.items()}
    check_run(outs, found, *load_pair(sft_dir, aligned_dir), alpha, stats)


# --- the torch fallback ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [*DTYPES, "fp64,bf16->bf16"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_torch_fallback_is_the_cpu_path(d, alpha):
    ds, da, do = DTYPES.get(d, (F64, BF, BF))
    s, a = chunk_pair(300_007, ds, da)  # two STATS_BLOCKs and a ragged tail
    out, plain, ref = (torch.empty(s.numel(), dtype=do) for _ in range(3))
    delta, update = gpu.extrapolate_chunk_stats(out, s, a, alpha, kernel="torch")
    gpu.extrapolate_chunk(plain, s, a, alpha, kernel="torch")
    want = extrapolate_chunk_stats_torch(ref, s, a, alpha)  # the same ops as the fallback
    assert same(out, ref) and same(plain, ref)  # the same torch ops on the same device: the same bytes
    assert (delta, update) == want  # and the same float32 partial sums, added in the same order
    check_chunk(out, s, a, alpha, delta, update, RTOL_CPU)


def test_fallback_in_place_on_aligned_and_empty():
    s, a = chunk_pair(5000, BF, BF)
    want = torch.empty_like(a)
    extrapolate_chunk(want, s, a, 0.4)
    a2 = a.clone()
    delta, update = gpu.extrapolate_chunk_stats(a2, s, a2, 0.4, kernel="torch")  # out aliases aligned
    assert same(a2, want)
    close(delta, stats64(s, a))
    close(update, stats64(a, want))
    e = torch.empty(0, dtype=BF)
    assert gpu.extrapolate_chunk_stats(e, e, e, 0.3) == (Stats(0), Stats(0))


def test_kernel_argument_checks():
    s, a = chunk_pair(10, BF, BF)
    with pytest.raises(ValueError, match="kernel must be"):
        gpu.extrapolate_chunk(torch.empty_like(a), s, a, 0.3, kernel="cuda")
    with pytest.raises(ValueError, match="same length"):
        gpu.extrapolate_chunk(torch.empty(9, dtype=BF), s, a, 0.3)
    with pytest.raises(ValueError, match="float64"):
        gpu.extrapolate_chunk(torch.empty_like(a), s.double(), a, 0.3, kernel="triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="interpreter"):
            gpu.extrapolate_chunk(torch.empty_like(a), s, a, 0.3, kernel="triton")
    assert gpu.kernel_for("cpu") == "torch"


# --- the pipeline on the CPU (device="cpu": the same steps, in order) ------------------------------------------

@pytest.fixture(scope="module")
def disk_pair(tmp_path_factory):
    return write_pair(str(tmp_path_factory.mktemp("pair")))


@pytest.mark.parametrize("chunk_bytes", [1000, 4096, 1 << 20])
@pytest.mark.parametrize("stats", [True, False])
def test_pipeline_on_cpu_is_the_cpu_path(disk_pair, chunk_bytes, stats):
    sft, aligned = disk_pair
    outs, found, order = run_collect(sft, aligned, 0.3, chunk_bytes, gpu.run_chunks_cuda, stats, device="cpu")
    want_outs, want_found, want_order = run_collect(sft, aligned, 0.3, chunk_bytes, run_chunks, stats)
    assert order == want_order == sorted(order)
    assert outs.keys() == want_outs.keys() and all(same(outs[k], want_outs[k]) for k in outs)
    assert found.keys() == want_found.keys()
    if stats:  # the same kind of partial sums, but the CPU path cuts a chunk in two halves (two compute threads)
        for name, (d, u) in found.items():
            close(d, want_found[name][0], RTOL_CPU)
            close(u, want_found[name][1], RTOL_CPU)
    else:
        assert found == want_found
    check_run(outs, found, *load_pair(sft, aligned), 0.3, stats, RTOL_CPU)


def test_pipeline_on_cpu_to_a_wider_dtype(disk_pair):
    sft, aligned = disk_pair
    outs, found, _ = run_collect(sft, aligned, -0.5, 3000, gpu.run_chunks_cuda, device="cpu", dtype="fp32")
    assert all(o.dtype in (F32, torch.int64) for o in outs.values())
    check_run(outs, found, *load_pair(sft, aligned), -0.5, rtol=RTOL_CPU)


def test_pipeline_uses_each_tensors_alpha(disk_pair):
    """Alpha rules give tensors their own alpha (TensorPlan.alpha): the pipeline must use it, not the plan's."""
    sft, aligned = disk_pair
    rules = [r"d\.weight=2.5"]
    outs, found, _ = run_collect(sft, aligned, 0.3, 4096, gpu.run_chunks_cuda, rules=rules, device="cpu")
    want_outs, _, _ = run_collect(sft, aligned, 0.3, 4096, run_chunks, rules=rules)
    assert all(same(outs[k], want_outs[k]) for k in outs)
    s, a = load_pair(sft, aligned)
    assert error_steps(outs["d.weight"], s["d.weight"], a["d.weight"], 2.5).max().item() <= 1
    assert error_steps(outs["a.weight"], s["a.weight"], a["a.weight"], 0.3).max().item() <= 1
    assert error_steps(outs["d.weight"], s["d.weight"], a["d.weight"], 0.3).max().item() > 1


def test_pipeline_surfaces_a_failed_write(disk_pair):
    sft, aligned = disk_pair
    plan = make_plan(open_checkpoint(sft), open_checkpoint(aligned), 0.3, chunk_bytes=1000)
    calls = []

    def write(t, c, data, chunk_stats=None):
        calls.append(c)
        if len(calls) == 5:
            raise OSError("disk full")

    inputs = Inputs(input_paths(plan))
    try:
        with pytest.raises(OSError, match="disk full"):
            gpu.run_chunks_cuda(plan, plan.chunks, inputs, write, device="cpu")
    finally:
        inputs.close()
    assert len(calls) < len(plan.chunks)


# --- device selection -----------------------------------------------------------------------------------------

def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.resolve_device("cpu") == torch.device("cpu")
    assert gpu.resolve_device("auto") == torch.device("cpu")
    assert gpu.cuda_available() is False
    for name in ("cuda", "cuda:0", "CUDA"):
        with pytest.raises(OptionError, match=r"no CUDA GPU is available.*--device cpu or auto"):
            gpu.resolve_device(name)
    for bad in ("tpu", "cuda:x", ""):
        with pytest.raises(OptionError, match="device must be cpu, cuda"):
            gpu.resolve_device(bad)


@needs_cuda
def test_resolve_device_with_a_gpu():
    assert gpu.resolve_device("auto").type == "cuda"
    assert gpu.resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    with pytest.raises(OptionError, match="GPU"):
        gpu.resolve_device(f"cuda:{torch.cuda.device_count()}")


# --- on a GPU -------------------------------------------------------------------------------------------------

GPU_KERNELS = ["triton", "torch"]


def _gpu_kernel_or_skip(kernel: str) -> None:
    if kernel == "triton" and gpu.kernel_for("cuda") != "triton":
        pytest.skip("Triton is not installed or does not support this GPU")


@needs_cuda
@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("d", list(DTYPES))
@pytest.mark.parametrize("alpha", ALPHAS)
def test_gpu_kernel(kernel, d, alpha):
    _gpu_kernel_or_skip(kernel)
    ds, da, do = DTYPES[d]
    for n in (1, 7, 4097, 3_000_017):
        s, a = chunk_pair(n, ds, da)
        out, plain = torch.empty(n, dtype=do, device="cuda"), torch.empty(n, dtype=do, device="cuda")
        delta, update = gpu.extrapolate_chunk_stats(out, s.cuda(), a.cuda(), alpha, kernel=kernel)
        gpu.extrapolate_chunk(plain, s.cuda(), a.cuda(), alpha, kernel=kernel)
        out, plain = out.cpu(), plain.cpu()
        assert same(out, plain)
        check_chunk(out, s, a, alpha, delta, update, RTOL if kernel == "triton" else RTOL_CPU)
        ref = torch.empty_like(out)
        want_delta, want_update = extrapolate_chunk_stats(ref, s, a, alpha)
        close(delta, want_delta, RTOL_CPU)
        close(update, want_update, RTOL_CPU)
        # A GPU rounds to nearest even and fuses the multiply-add as torch's vectorised CPU lerp does, so nearly
        # every element equals the CPU path's (a vector's ragged tail on the CPU may be computed unfused; none is
        # off by more than the step allowed above); a truncating cast would make ~45 % of bf16 elements differ.
        if n > 1_000_000:
            assert (out.view(torch.uint8) != ref.view(torch.uint8)).float().mean().item() <= 1e-3


@needs_cuda
@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_gpu_kernel_in_place_and_nonfinite(kernel):
    _gpu_kernel_or_skip(kernel)
    s, a = chunk_pair(10_001, BF, BF)
    want = torch.empty_like(a)
    extrapolate_chunk(want, s, a, 0.4)
    a_d = a.cuda()
    gpu.extrapolate_chunk_stats(a_d, s.cuda(), a_d, 0.4, kernel=kernel)  # out aliases aligned
    assert error_steps(a_d.cpu(), s, a, 0.4).max().item() <= 1
    for case, (s, a, do, alpha) in NONFINITE.items():
        out = torch.empty(s.numel(), dtype=do, device="cuda")
        delta, update = gpu.extrapolate_chunk_stats(out, s.cuda(), a.cuda(), alpha, kernel=kernel)
        assert update.finite is False and delta.finite == (case == "overflow"), case


@needs_cuda
@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("chunk_bytes,stats,dtype", [(1000, True, None), (4096, False, None), (1 << 20, True, None),
                                                      (3000, True, "fp32")])
def test_gpu_pipeline_end_to_end(disk_pair, kernel, chunk_bytes, stats, dtype):
    sft, aligned = disk_pair
    outs, found, order = run_collect(sft, aligned, 0.3, chunk_bytes, gpu.run_chunks_cuda, stats, dtype=dtype,
                                     device="cuda", kernel=kernel)
    want_outs, want_found, want_order = run_collect(sft, aligned, 0.3, chunk_bytes, run_chunks, stats, dtype=dtype)
    assert order == want_order
    assert outs.keys() == want_outs.keys()
    triton = kernel == "auto" and gpu.kernel_for("cuda") == "triton"
    check_run(outs, found, *load_pair(sft, aligned), 0.3, stats, RTOL if triton else RTOL_CPU)
    if stats:
        for name, (d, u) in found.items():
            close(d, want_found[name][0], RTOL_CPU)
            close(u, want_found[name][1], RTOL_CPU)


@needs_cuda
def test_gpu_pipeline_on_a_transformers_pair(pair):
    """The tiny Llama pair of the other tests (bf16, .bin shards against safetensors shards)."""
    outs, found, _ = run_collect(pair.sft, pair.aligned, 0.5, 5000, gpu.run_chunks_cuda, device="cuda")
    sft = {k: v.reshape(-1) for k, v in pair.sft_state.items()}
    aligned = {k: v.reshape(-1) for k, v in pair.aligned_state.items()}
    outs = {k: v for k, v in outs.items() if k in aligned}
    check_run(outs, found, sft, aligned, 0.5, rtol=RTOL_CPU)


# --- --device through the CLI and the API ----------------------------------------------------------------------

def _cli(*args) -> tuple[int, str]:
    import contextlib
    import io

    from expo_engine.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["extrapolate", *map(str, args)])
    return rc, err.getvalue()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
@pytest.mark.parametrize("extra, needles", [
    (["--device", "cuda"], ["--device cuda", "no CUDA GPU is available", "--device cpu"]),
    (["--device", "tpu"], ["device must be cpu, cuda, cuda:N or auto", "'tpu'"]),
    (["--device", "cuda:1", "--executor", "ray"], ["on Ray each task gets a GPU from Ray"]),
])
def test_device_errors_before_anything_is_written(disk_pair, tmp_path, extra, needles):
    sft, aligned = disk_pair
    out = tmp_path / "out"
    rc, err = _cli("--sft", sft, "--aligned", aligned, "--alpha", "0.3", "--out", out, *extra)
    assert rc == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("expo: error:")]
    assert len(line) == 1 and all(n in line[0] for n in needles), err
    assert not os.path.lexists(out) and os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_a_sweep_on_cuda_is_refused(disk_pair, tmp_path):
    sft, aligned = disk_pair
    rc, err = _cli("--sft", sft, "--aligned", aligned, "--alpha", "0.3,0.4", "--out", tmp_path / "sw",
                   "--device", "cuda")
    assert rc == 2 and "no CUDA GPU" in err and not os.path.lexists(tmp_path / "sw")


def test_device_is_recorded(disk_pair, tmp_path):
    from expo_engine import extrapolate

    sft, aligned = disk_pair
    s = extrapolate(sft, aligned, 0.3, str(tmp_path / "out"), device="cpu")
    assert s.device == "cpu"
    with open(tmp_path / "out" / "expo.json") as f:
        assert json.load(f)["device"] == "cpu"


@needs_cuda
@pytest.mark.parametrize("stats", [True, False])
def test_cli_device_cuda_end_to_end(pair, tmp_path, stats):
    """`expo extrapolate --device cuda` on a real GPU: exact output, the device recorded, verify passes."""
    from helpers import load_output, worst_steps

    from expo_engine.verify import verify

    out = tmp_path / "out"
    rc, err = _cli("--sft", pair.sft, "--aligned", pair.aligned, "--alpha", "0.5", "--out", out, "--device",
                   "cuda", "--chunk-mb", "0.01", *([] if stats else ["--no-stats"]))
    assert rc == 0, err
    assert "arithmetic on cuda" in err
    assert worst_steps(load_output(str(out)), pair.sft_state, pair.aligned_state, 0.5) <= 1
    with open(out / "expo.json") as f:
        prov = json.load(f)
    assert prov["device"].startswith("cuda") and ("stats" in prov) == stats
    assert verify(str(out), sft=pair.sft, aligned=pair.aligned).ok
