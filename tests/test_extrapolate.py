"""End to end: tiny transformers models in, every element checked against the float64 formula, loads back."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import load_output, worst_steps
from safetensors import safe_open

from expo_engine import extrapolate
from expo_engine.api import no_gpu_here
from expo_engine.cli import main
from expo_engine.kernels import reference
from expo_engine.verify import verify
from expo_engine.writer import model_card

ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8}


def _check_index_consistent(out: str) -> None:
    """Every tensor in exactly one shard, the index's weight_map equal to the shard headers, total_size right."""
    index_path = os.path.join(out, "model.safetensors.index.json")
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    if len(shards) == 1:
        assert shards == ["model.safetensors"] and not os.path.exists(index_path)
        return
    with open(index_path) as f:
        index = json.load(f)
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    seen, total = {}, 0
    for shard in shards:
        with safe_open(os.path.join(out, shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert name not in seen
                seen[name] = shard
                sl = f.get_slice(name)
                total += math.prod(sl.get_shape()) * ITEMSIZE[sl.get_dtype()]
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("layout", ["untied-mixed", "tied-mixed", "untied-single", "tied-single"])
@pytest.mark.parametrize("alpha", [0.3, 8.0, -0.5])
def test_every_element_is_the_formula_rounded_once(pairs, tmp_path, layout, alpha):
    p = pairs[layout]
    out = str(tmp_path / "out")
    summary = extrapolate(p.sft, p.aligned, alpha, out, max_shard_size="30KB", chunk_bytes=1000)
    got = load_output(out)
    # Output names: the aligned model's parameters (save_pretrained drops the tied lm_head.weight).
    expected_names = set(p.aligned_state) - ({"lm_head.weight"} if layout.startswith("tied") else set())
    assert set(got) == expected_names and len(got) > 10
    assert worst_steps(got, p.sft_state, p.aligned_state, alpha) <= 1
    assert all(got[n].dtype == p.aligned_state[n].dtype for n in got)
    _check_index_consistent(out)
    assert summary.tensors == len(expected_names) and summary.shards >= 1


def test_alpha_zero_is_aligned_bit_for_bit(pair, tmp_path):
    out = str(tmp_path / "out")
    extrapolate(pair.sft, pair.aligned, 0.0, out, chunk_bytes=999)
    got = load_output(out)
    for name, t in got.items():
        assert torch.equal(t.view(torch.int16), pair.aligned_state[name].view(torch.int16)), name


def test_fp32_math_beats_bf16_arithmetic(pair, tmp_path):
    """The authors compute in bf16; the engine must not: its output differs from the bf16 result somewhere."""
    alpha = 0.3
    extrapolate(pair.sft, pair.aligned, alpha, str(tmp_path / "out"))
    got = load_output(str(tmp_path / "out"))
    differs = 0
    for name, t in got.items():
        a, s = pair.aligned_state[name], pair.sft_state[name]
        naive = a + alpha * (a - s)  # bf16 arithmetic, rounded at every step
        differs += (naive != t).sum().item()
        exact = reference(s, a, alpha, torch.bfloat16)
        assert (t != exact).float().mean().item() < 0.01
    assert differs > 0


@pytest.mark.parametrize("dtype,torch_dtype,config_value", [("fp32", torch.float32, "float32"),
                                                           ("fp16", torch.float16, "float16")])
def test_dtype_override_and_config(pair, tmp_path, dtype, torch_dtype, config_value):
    out = str(tmp_path / "out")
    extrapolate(pair.sft, pair.aligned, 2.5, out, dtype=dtype, chunk_bytes=4096)
    got = load_output(out)
    assert all(t.dtype == torch_dtype for t in got.values())
    assert worst_steps(got, pair.sft_state, pair.aligned_state, 2.5) <= 1
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config.get("torch_dtype", config.get("dtype")) == config_value


def test_mixed_input_dtypes(tmp_path, pair):
    """SFT in fp32 and aligned in bf16: computed in fp32 from the stored values, output bf16 (aligned's)."""
    from helpers import save_model

    sft32 = pair.sft_model.to(torch.float32)
    try:
        sft_dir = save_model(sft32, str(tmp_path / "sft32"))
    finally:
        pair.sft_model.to(torch.bfloat16)
    sft_state = {k: v.float() for k, v in pair.sft_state.items()}
    out = str(tmp_path / "out")
    extrapolate(sft_dir, pair.aligned, 0.7, out, chunk_bytes=3000)
    got = load_output(out)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert worst_steps(got, sft_state, pair.aligned_state, 0.7) <= 1


def test_output_loads_in_transformers_with_in_memory_logits(pair, tmp_path):
    from helpers import llama_config
    from transformers import AutoModelForCausalLM

    alpha = 0.4
    out = str(tmp_path / "out")
    extrapolate(pair.sft, pair.aligned, alpha, out, max_shard_size="20KB")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)

    # The same model built in memory: float64 formula, rounded once.
    from transformers import LlamaForCausalLM

    expected = LlamaForCausalLM(llama_config()).to(torch.bfloat16)
    expected.load_state_dict({n: reference(pair.sft_state[n], a, alpha, a.dtype)
                              for n, a in pair.aligned_state.items()})
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got_logits = loaded(ids).logits.float()
        want_logits = expected(ids).logits.float()
    # Weights differ from the in-memory ones by at most one bf16 step in a few elements.
    torch.testing.assert_close(got_logits, want_logits, atol=2e-2, rtol=2e-2)
    assert got_logits.abs().max() > 0


def test_side_files_card_and_provenance(pair, tmp_path):
    out = str(tmp_path / "out")
    summary = extrapolate(pair.sft, pair.aligned, 0.3, out, max_shard_size="20KB")
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "README.md", "expo.json"} <= names
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert card.startswith(f"---\nbase_model: {json.dumps(pair.aligned)}\n") and "- expo" in card
    assert "alpha = 0.3" in card
    with open(os.path.join(out, "expo.json")) as f:
        prov = json.load(f)
    assert prov["alpha"] == 0.3 and prov["sft"]["format"] == "bin" and prov["aligned"]["format"] == "safetensors"
    assert set(prov["files"]) == names - {"expo.json"}
    for name, info in prov["files"].items():
        with open(os.path.join(out, name), "rb") as f:
            data = f.read()
        assert info["size"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest(), name
    assert summary.files == prov["files"]
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))  # no staging left behind


def test_inputs_are_not_modified(pair, tmp_path):
    def digest(folder):
        return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in os.listdir(folder)}

    before = digest(pair.sft), digest(pair.aligned)
    extrapolate(pair.sft, pair.aligned, 0.3, str(tmp_path / "out"))
    assert (digest(pair.sft), digest(pair.aligned)) == before


def test_cli_extrapolate_prints_summary(pair, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc = main(["extrapolate", "--sft", pair.sft, "--aligned", pair.aligned, "--alpha", "0.5", "--out", out,
               "--chunk-mb", "0.01", "--max-shard-size", "40KB"])
    captured = capsys.readouterr()
    assert rc == 0
    assert f"wrote {out}" in captured.out and "alpha 0.5" in captured.out
    assert "planned" in captured.err  # plain progress lines when stderr is not a terminal
    assert worst_steps(load_output(out), pair.sft_state, pair.aligned_state, 0.5) <= 1


def test_overwrite_replaces_previous_output(pair, tmp_path):
    out = str(tmp_path / "out")
    extrapolate(pair.sft, pair.aligned, 0.3, out, max_shard_size="20KB")
    extrapolate(pair.sft, pair.aligned, 0.1, out, overwrite=True)
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors"]
    assert worst_steps(load_output(out), pair.sft_state, pair.aligned_state, 0.1) <= 1
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("chunk", [1 << 16, 10_000, 12_346])
@pytest.mark.parametrize("buffered", [False, True])
def test_direct_and_buffered_reads_give_the_same_exact_output(pairs, tmp_path, monkeypatch, buffered, chunk):
    """Chunks of 64 KiB (and of sizes that are no multiple of 4 KiB: a direct read then needs up to 3 blocks more
    than the chunk): reads of whole 4 KiB blocks around unaligned tensor offsets and writes of whole blocks
    with the tail carried to the next write (O_DIRECT), or page-cache I/O with EXPO_BUFFERED_IO=1; both give
    the same bytes, on safetensors and `.bin` inputs, in several shards whose headers end mid-block."""
    import json

    import expo_engine.reading as reading
    from expo_engine.writer import Staging

    writes = []
    monkeypatch.setattr(reading, "resident_fraction", lambda *a: 0.0)  # as if nothing were cached: O_DIRECT reads
    real_write = Staging._write_direct
    monkeypatch.setattr(Staging, "_write_direct", lambda self, *a: writes.append(a[0]) or real_write(self, *a))
    if buffered:
        monkeypatch.setenv("EXPO_BUFFERED_IO", "1")
    p = pairs["untied-mixed"]
    out = str(tmp_path / "out")
    extrapolate(p.sft, p.aligned, 0.7, out, chunk_bytes=chunk, max_shard_size="30KB")
    assert worst_steps(load_output(out), p.sft_state, p.aligned_state, 0.7) <= 1
    with open(os.path.join(out, "expo.json")) as f:
        reads = json.load(f)["reads"]
    assert (reads["direct_bytes"] > 0) != buffered and reads["page_cache_bytes"] + reads["direct_bytes"] > 0
    assert bool(writes) != buffered and (buffered or len(set(writes)) > 1)
    assert verify(out).ok  # every shard's bytes against the sha256 computed while writing, headers, index
    monkeypatch.delenv("EXPO_BUFFERED_IO", raising=False)
    monkeypatch.setenv("EXPO_BUFFERED_IO", "0" if buffered else "1")  # the other way round: the same bytes
    other = str(tmp_path / "other")
    extrapolate(p.sft, p.aligned, 0.7, other, chunk_bytes=chunk, max_shard_size="30KB")
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 1 and shards == sorted(f for f in os.listdir(other) if f.endswith(".safetensors"))
    for f in shards:
        with open(os.path.join(out, f), "rb") as a, open(os.path.join(other, f), "rb") as b:
            assert a.read() == b.read(), f
    if not buffered:  # 8 KiB tensors: read around their unaligned offsets
        from expo_engine.sources import open_checkpoint

        for side in (p.sft, p.aligned):
            file = open_checkpoint(side).tensors["model.embed_tokens.weight"].file
            assert reads["files"][file]["direct_bytes"] >= 8192, reads["files"][file]


@pytest.mark.skipif(not no_gpu_here(), reason="this machine has GPU device nodes: `--device auto` asks torch")
@pytest.mark.parametrize("layout", ["untied-mixed", "tied-single"])
def test_extrapolate_runs_without_importing_torch(pairs, tmp_path, layout):
    """With the compiled kernel, `expo extrapolate` (safetensors and .bin inputs) never imports torch: ~3 s of CPU
    at every start on this machine. The output is still exact (checked here, in this process, with torch)."""
    p = pairs[layout]
    out = str(tmp_path / "out")
    code = ("import sys; from expo_engine.cli import main; "
            f"rc = main(['extrapolate', '--sft', {p.sft!r}, '--aligned', {p.aligned!r}, '--alpha', '0.3', "
            f"'--out', {out!r}, '--max-shard-size', '30KB']); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k != "EXPO_KERNEL"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "no torch"
    assert worst_steps(load_output(out), p.sft_state, p.aligned_state, 0.3) <= 1


def test_direct_reads_fit_the_buffer_at_every_address_and_offset(tmp_path):
    """A direct read of a chunk that is no multiple of 4 KiB needs up to 3 blocks more than the chunk (aligning
    the address, then whole blocks around an unaligned range): at every buffer address and file offset, the
    bytes come back right, whether the read goes direct or (where it would not fit) through the page cache."""
    import numpy as np

    from expo_engine.reading import ALIGN, Buffers, Inputs
    from expo_engine.sources import TensorSlot

    data = os.urandom(64 << 10)
    path = str(tmp_path / "weights.bin")
    with open(path, "wb") as f:
        f.write(data)
    inputs = Inputs([path], direct=True)
    try:
        if path not in inputs.direct:
            pytest.skip("this filesystem refuses O_DIRECT")
        chunk = 10_002
        size = len(Buffers(chunk).sft)
        raw = np.empty(size + ALIGN, dtype=np.uint8)
        shifts = [(s - raw.ctypes.data) % ALIGN for s in range(0, ALIGN, 2)]  # every even address mod 4 KiB
        for shift in shifts[::64] + [(-raw.ctypes.data + 2) % ALIGN, (-raw.ctypes.data - 2) % ALIGN]:
            buf = raw[shift: shift + size]
            for offset in (0, 2, 3000, 4094, 4096, 5000):
                slot = TensorSlot("t", "BF16", (chunk // 2,), path, offset, chunk)
                got = inputs.read_bytes(buf, slot, 0, chunk // 2)
                assert got.tobytes() == data[offset: offset + chunk], (shift, offset)
    finally:
        inputs.close()


def test_model_card_base_model_is_the_hub_repo_id():
    """A Hub source's @revision is not part of the repo id: base_model names the repo; the revision is listed."""
    side = {"source": "org/zephyr-dpo@v1.0", "revision": "0123abcd"}
    card = model_card({"sft": {"source": "org/zephyr-sft", "revision": "fedc"}, "aligned": side, "alpha": 0.3,
                       "engine_version": "x", "dtypes": ["BF16"]})
    assert card.startswith('---\nbase_model: "org/zephyr-dpo"\n')
    assert "- aligned model: `org/zephyr-dpo@v1.0` (revision `0123abcd`)" in card


def _evict(folder: str) -> None:
    """Drop a folder's files from the page cache (POSIX_FADV_DONTNEED frees their pages once they are clean)."""
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        os.fsync(fd)  # dirty pages (a file just written) are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _warm(folder: str) -> None:
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            while f.read(1 << 20):
                pass


@pytest.mark.parametrize("cache", ["cold", "warm", "half"])
def test_reads_follow_what_the_page_cache_holds(tmp_path, cache):
    """The real page cache decides, per chunk: inputs not in memory are read with O_DIRECT, inputs in memory
    through the page cache; expo.json says how many bytes went each way. The output is the same either way.
    (Files of 8 MiB: reading a header pulls the next 128 KiB into the cache by readahead, all of a tiny file.)"""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    sft = {f"layers.{i}.weight": torch.randn(2048, 1024, generator=g).to(torch.bfloat16) for i in range(2)}
    aligned = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in sft.items()}
    sides = {}
    for name, state in (("sft", sft), ("aligned", aligned)):
        os.makedirs(tmp_path / name)
        save_file(state, str(tmp_path / name / "model.safetensors"))
        sides[name] = str(tmp_path / name)
    for side in sides.values():
        (_evict if cache == "cold" else _warm)(side)
    if cache == "half":
        _evict(sides["sft"])
    out = str(tmp_path / "out")
    s = extrapolate(sides["sft"], sides["aligned"], 0.7, out, chunk_bytes=1 << 20)
    with open(os.path.join(out, "expo.json")) as f:
        reads = json.load(f)["reads"]
    assert reads["page_cache_bytes"] + reads["direct_bytes"] == s.bytes_read
    for name, side in sides.items():
        r = reads["files"][os.path.join(side, "model.safetensors")]
        cold = cache == "cold" or (cache == "half" and name == "sft")
        assert r["page_cache_bytes" if cold else "direct_bytes"] == 0, (name, r)
        assert r["direct_bytes" if cold else "page_cache_bytes"] == 8 * 2**20, (name, r)
    out_state = load_output(out)
    assert worst_steps(out_state, sft, aligned, 0.7) <= 1


def test_the_ring_stops_finishing_after_a_failed_step():
    """A failed write stops the pipeline: no later step is written (its bytes would sit beside a hole, and its unit
    could be journaled), and the first failure is the one raised."""
    from expo_engine.executor import ring

    finished = []

    def finish(k, _):
        if k == 2:
            raise OSError(28, "No space left on device")
        finished.append(k)

    with pytest.raises(OSError, match="No space left"):
        ring(12, read=lambda k: k, compute=lambda k, got: got, finish=finish)
    assert finished == [0, 1]
