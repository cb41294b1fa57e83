"""Statistics fused into extrapolation: same bytes as without, the same numbers as a float64 computation, stored
in expo.json and printed by `expo norms --from`."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import load_output

from expo_engine import extrapolate
from expo_engine.cli import main
from expo_engine.kernels import STATS_BLOCK, Stats, extrapolate_chunk, extrapolate_chunk_stats
from expo_engine.norms import compare, from_output, reference_stats
from expo_engine.sources import open_checkpoint

RTOL = 1e-4  # float32 partial sums per block, float64 across blocks


def _close(got: dict, want: dict, rtol=RTOL) -> None:
    for k, v in want.items():
        if k == "cosine":  # what matters is 1 - cosine, the angle between the two
            assert abs(got[k] - v) <= rtol * (1 - v) + 1e-12, (k, got[k], v)
        else:
            assert got[k] == pytest.approx(v, rel=rtol, abs=1e-30), (k, got[k], v)


@pytest.mark.parametrize("dtypes", [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16),
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float64, torch.bfloat16, torch.bfloat16),
])
@pytest.mark.parametrize("alpha", [0.3, -0.5, 12.0])
def test_fused_kernel_same_bytes_and_float64_stats(dtypes, alpha, kernel):
    ds, da, do = dtypes
    n = 2 * STATS_BLOCK + 4_321  # several blocks and a ragged tail
    g = torch.Generator().manual_seed(7)
    s64 = torch.randn(n, generator=g, dtype=torch.float64)
    a64 = s64 + 1e-3 * torch.randn(n, generator=g, dtype=torch.float64)
    s, a = s64.to(ds), a64.to(da)
    plain, fused = torch.empty(n, dtype=do), torch.empty(n, dtype=do)
    extrapolate_chunk(plain, s, a, alpha)
    delta, update = extrapolate_chunk_stats(fused, s, a, alpha)
    assert torch.equal(plain.view(-1).double(), fused.view(-1).double())
    rtol = RTOL if kernel == "torch" else 1e-6  # the compiled kernel's partial sums span 1024 elements only
    _close(delta.summary(), reference_stats(s, a), rtol)
    _close(update.summary(), reference_stats(a, fused), rtol)


@pytest.mark.usefixtures("kernel")
def test_fused_kernel_in_place_on_aligned():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5000, generator=g).bfloat16()
    a = (s.float() + 0.01 * torch.randn(5000, generator=g)).bfloat16()
    want = torch.empty_like(a)
    extrapolate_chunk(want, s, a, 0.4)
    a_before = a.clone()
    delta, update = extrapolate_chunk_stats(a, s, a, 0.4)  # out aliases aligned, as the engine does
    assert torch.equal(a, want)
    _close(delta.summary(), reference_stats(s, a_before))
    _close(update.summary(), reference_stats(a_before, want))


@pytest.mark.usefixtures("kernel")
def test_cosine_keeps_its_digits_when_the_change_is_tiny():
    """Alignment moves weights by ~1e-5 of their norm: 1 - cosine must still be right to a few percent."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(1 << 20, generator=g, dtype=torch.float64)
    b = a + 1e-5 * torch.randn(1 << 20, generator=g, dtype=torch.float64)
    out = torch.empty(1 << 20, dtype=torch.float32)
    delta, _ = extrapolate_chunk_stats(out, a.float(), b.float(), 0.1)
    want = reference_stats(a.float(), b.float())
    assert 1 - delta.summary()["cosine"] == pytest.approx(1 - want["cosine"], rel=0.05)


@pytest.mark.usefixtures("kernel")
def test_stats_merge_across_chunks():
    g = torch.Generator().manual_seed(9)
    s = torch.randn(10_000, generator=g).bfloat16()
    a = (s.float() + 0.02 * torch.randn(10_000, generator=g)).bfloat16()
    total_d, total_u = Stats(), Stats()
    out = torch.empty_like(a)
    for start in range(0, 10_000, 999):
        d, u = extrapolate_chunk_stats(out[start:start + 999], s[start:start + 999], a[start:start + 999], 2.0)
        total_d.add(d)
        total_u.add(u)
    _close(total_d.summary(), reference_stats(s, a))
    _close(total_u.summary(), reference_stats(a, out))


@pytest.mark.parametrize("layout", ["untied-mixed", "tied-single"])
def test_expo_json_holds_the_stats_of_both_changes(pairs, tmp_path, layout):
    p = pairs[layout]
    out = str(tmp_path / "out")
    extrapolate(p.sft, p.aligned, 0.5, out, max_shard_size="30KB", chunk_bytes=1000)
    with open(os.path.join(out, "expo.json")) as f:
        record = json.load(f)["stats"]
    got = load_output(out)
    aligned = p.aligned_state
    # delta: the same numbers `expo norms sft aligned` computes by reading both checkpoints again
    direct = compare(open_checkpoint(p.sft), open_checkpoint(p.aligned))
    assert set(record["delta"]["tensors"]) == set(got) == set(direct.tensors)
    for name, st in direct.tensors.items():
        _close(Stats(**record["delta"]["tensors"][name]).summary(), st.summary())
        _close(Stats(**record["update"]["tensors"][name]).summary(), reference_stats(aligned[name], got[name]))
    total = Stats()
    for st in direct.tensors.values():
        total.add(st)
    _close(record["delta"]["total"], total.summary())


def test_no_stats_gives_the_same_bytes(pair, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extrapolate(pair.sft, pair.aligned, 0.3, a, chunk_bytes=1000)
    extrapolate(pair.sft, pair.aligned, 0.3, b, chunk_bytes=1000, stats=False)
    shards = sorted(f for f in os.listdir(a) if f.endswith(".safetensors"))
    for shard in shards:
        with open(os.path.join(a, shard), "rb") as fa, open(os.path.join(b, shard), "rb") as fb:
            assert fa.read() == fb.read()
    with open(os.path.join(b, "expo.json")) as f:
        assert "stats" not in json.load(f)


def test_norms_from_output_cli(pair, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["extrapolate", "--sft", pair.sft, "--aligned", pair.aligned, "--alpha", "0.3", "--out", out]) == 0
    capsys.readouterr()
    js = str(tmp_path / "n.json")
    assert main(["norms", "--from", out, "--json", js]) == 0
    text = capsys.readouterr().out
    assert f"{pair.sft}  ->  {pair.aligned}" in text and "expo (alpha=0.3)" in text and "layer 1" in text
    with open(js) as f:
        pairs = json.load(f)["pairs"]
    reports = from_output(out)
    n = sum(t.numel() for t in pair.aligned_state.values())  # every element of the model, counted apart
    assert [p["total"]["n"] for p in pairs] == [n, n] == [r.aggregates()["total"]["n"] for r in reports]
    # the applied update is alpha times the change, up to the output's rounding
    ratio = pairs[1]["total"]["fro"] / pairs[0]["total"]["fro"]
    assert math.isclose(ratio, 0.3, rel_tol=0.05)


def test_norms_from_output_errors(pair, tmp_path, capsys):
    out = str(tmp_path / "out")
    extrapolate(pair.sft, pair.aligned, 0.3, out, stats=False)
    assert main(["norms", "--from", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no statistics" in err and "expo norms SFT ALIGNED" in err
    assert main(["norms", "--from", str(tmp_path)]) == 2
    assert "expo.json: not found" in capsys.readouterr().err
    assert main(["norms", pair.sft, pair.aligned, "--from", out]) == 2
    assert "not both" in capsys.readouterr().err
