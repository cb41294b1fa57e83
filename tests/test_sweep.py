"""Alpha sweeps: one read of the inputs, one complete output per alpha, each byte for byte a single run's."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import OVERFLOWING as UP
from helpers import cli_args, load_output, make_pair, overflowing, refused, run_cli, unchanged, worst_steps

import expo_engine.reading as reading
from expo_engine import OptionError, extrapolate, extrapolate_sweep
from expo_engine.cli import main
from expo_engine.errors import NonFiniteError
from expo_engine.plan import parse_alphas, sweep_folder


def _files(folder: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def _count_reads(monkeypatch) -> list:
    calls = []
    real = reading.Inputs.read_into
    monkeypatch.setattr(reading.Inputs, "read_into", lambda self, buf, slot, start, stop:
                        calls.append((slot.file, slot.name, start, stop)) or real(self, buf, slot, start, stop))
    return calls


@pytest.mark.parametrize("layout, dtype", [("untied-mixed", None), ("tied-single", "fp32")])
def test_a_sweep_equals_the_single_runs_byte_for_byte(pairs, tmp_path, monkeypatch, layout, dtype):
    """Shards, index, card and config identical to separate runs; expo.json differs only in `created` and the
    `sweep` record; the inputs are read once for all alphas (as often as by one single run)."""
    p = pairs[layout]
    alphas = [0.1, 8.0, -0.5, 0.3]
    kw = dict(dtype=dtype, max_shard_size="30KB", chunk_bytes=1000)
    reads = _count_reads(monkeypatch)
    sweep = extrapolate_sweep(p.sft, p.aligned, alphas, str(tmp_path / "sweep"), **kw)
    sweep_reads = list(reads)
    assert sorted(os.listdir(tmp_path / "sweep")) == sorted(sweep_folder(a) for a in alphas)
    assert [r.alpha for r in sweep.runs] == alphas and sweep.alphas == alphas
    assert sweep.bytes_written == sum(r.bytes_written for r in sweep.runs)
    for a, run in zip(alphas, sweep.runs, strict=True):
        reads.clear()
        single = extrapolate(p.sft, p.aligned, a, str(tmp_path / f"single-{a}"), **kw)
        if a == alphas[0]:
            assert sorted(reads) == sorted(sweep_reads)  # one read of each input chunk, whatever the alphas
        got, want = _files(run.out), _files(single.out)
        assert run.out == str(tmp_path / "sweep" / sweep_folder(a))
        assert set(got) == set(want) and len(got) > 3
        for name in want:
            if name != "expo.json":
                assert got[name] == want[name], (a, name)
        prov_got, prov_want = json.loads(got["expo.json"]), json.loads(want["expo.json"])
        assert prov_got.pop("sweep") == {"alphas": alphas, "note": prov_got_note(prov_got)}
        prov_got.pop("created"), prov_want.pop("created")
        assert prov_got == prov_want
        assert run.files == single.files
        assert worst_steps(load_output(run.out), p.sft_state, p.aligned_state, a) <= 1
    assert not [n for n in os.listdir(tmp_path / "sweep") if n.startswith(".")]  # no staging left


def prov_got_note(prov: dict) -> str:
    return "one of the outputs of an alpha sweep, all written from one read of the inputs"


def test_cli_range_gives_the_alphas_as_written(pair, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["extrapolate", "--sft", pair.sft, "--aligned", pair.aligned, "--alpha", "0.1:0.3:0.1", "--out",
               str(out), "--chunk-mb", "0.01"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(os.listdir(out)) == ["alpha-0.1", "alpha-0.2", "alpha-0.3"]
    for name, alpha in [("alpha-0.1", 0.1), ("alpha-0.2", 0.2), ("alpha-0.3", 0.3)]:
        with open(out / name / "expo.json") as f:
            assert json.load(f)["alpha"] == alpha  # exactly float("0.3"), not 0.1 + 2 * 0.1
        assert worst_steps(load_output(str(out / name)), pair.sft_state, pair.aligned_state, alpha) <= 1
        assert f"alpha {alpha:g}: {out / name}" in captured.out
    assert "one read" in captured.out and "planned 3 outputs" in captured.err


@pytest.mark.parametrize("text, alphas", [
    ("0.3", (0.3,)),
    ("0.1,0.2,0.3", (0.1, 0.2, 0.3)),
    ("-0.5,0,2", (-0.5, 0.0, 2.0)),
    ("0.1:0.5:0.1", (0.1, 0.2, 0.3, 0.4, 0.5)),
    ("0.1:0.45:0.1", (0.1, 0.2, 0.3, 0.4)),
    ("1:25:8", (1.0, 9.0, 17.0, 25.0)),
    ("0.3:0.3:0.1", (0.3,)),
])
def test_parse_alphas(text, alphas):
    assert parse_alphas(text) == alphas


@pytest.mark.parametrize("alpha, name", [(0.1, "alpha-0.1"), (8.0, "alpha-8"), (-0.5, "alpha--0.5"),
                                         (1e-7, "alpha-1e-07"), (0.1 + 0.2, "alpha-0.30000000000000004"),
                                         (0.1234567, "alpha-0.1234567")])
def test_sweep_folder_names_are_exact(alpha, name):
    assert sweep_folder(alpha) == name
    assert float(name[len("alpha-"):]) == alpha


@pytest.mark.parametrize("alpha, needles", [
    ("0.5:0.1:0.1", ["'0.5:0.1:0.1'", "STOP is below START"]),
    ("0.1:0.5:0", ["'0.1:0.5:0'", "step must be positive"]),
    ("0.1:0.5:-0.1", ["step must be positive"]),
    ("0.1:0.5", ["START:STOP:STEP"]),
    ("0.1:x:0.1", ["START:STOP:STEP"]),
    ("0.1,0.2,0.1", ["alpha 0.1 appears twice"]),
    ("0,-0", ["appears twice"]),
    ("0.1,abc", ["'abc' is not a number"]),
    ("0.1,nan", ["finite number, got nan"]),
    ("0.1,", ["'' is not a number"]),
    ("0:100:0.01", ["10001 alphas", "more than 64"]),
])
def test_bad_sweeps_are_refused_before_anything_is_written(tmp_path, capsys, alpha, needles):
    sft, aligned = make_pair(tmp_path)
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out, alpha=alpha), "--alpha", *needles, out=out)


@pytest.mark.parametrize("alphas", [[], [0.1, 0.1], "0.1,0.2", 0.3, [0.1, float("inf")]])
def test_api_rejects_bad_sweeps(tmp_path, alphas):
    sft, aligned = make_pair(tmp_path)
    with unchanged(tmp_path, tmp_path / "out"), pytest.raises(OptionError):
        extrapolate_sweep(sft, aligned, alphas, str(tmp_path / "out"))


def test_an_existing_target_refuses_the_whole_sweep_unless_overwrite(tmp_path, capsys):
    sft, aligned = make_pair(tmp_path)
    out = tmp_path / "sweep"
    os.makedirs(out / "alpha-0.2")
    (out / "alpha-0.2" / "keep.txt").write_text("mine")
    (out / "notes.txt").write_text("the parent folder may hold other things")
    refused(capsys, tmp_path, cli_args(sft, aligned, out, alpha="0.1,0.2,0.3"), f"{out / 'alpha-0.2'}",
            "--overwrite")
    assert sorted(os.listdir(out)) == ["alpha-0.2", "notes.txt"]  # alpha-0.1 was not made either
    rc, _, err = run_cli(capsys, *cli_args(sft, aligned, out, "--overwrite", alpha="0.1,0.2,0.3"))
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["alpha-0.1", "alpha-0.2", "alpha-0.3", "notes.txt"]
    assert "keep.txt" not in os.listdir(out / "alpha-0.2")


@pytest.mark.parametrize("args", [["--executor", "ray"], ["--workers", "2"], ["--ray-address", "127.0.0.1:1"]])
def test_sweeps_on_ray_are_refused_clearly(tmp_path, capsys, args):
    sft, aligned = make_pair(tmp_path)
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out, *args, alpha="0.1,0.2"), "sweeps run in this process",
            out=out)
    with unchanged(tmp_path, out), pytest.raises(OptionError, match="sweeps run in this process"):
        extrapolate_sweep(sft, aligned, [0.1, 0.2], str(out), executor="ray")


def test_overflow_at_one_alpha_publishes_no_output(tmp_path):
    """Non-finite checks run per alpha: alpha 1 overflows fp16 in one element, alpha 0.01 does not; the error
    names the alpha, and neither output is published."""
    sft, aligned = overflowing(tmp_path)
    out = tmp_path / "sweep"
    with unchanged(tmp_path), pytest.raises(NonFiniteError) as e:
        extrapolate_sweep(sft, aligned, [0.01, 1.0], str(out))
    assert UP in str(e.value) and "alpha 1 ->" in str(e.value)
    assert not os.path.exists(out)  # the parent folder the run created is removed again
    s = extrapolate_sweep(sft, aligned, [0.0, 0.01], str(tmp_path / "ok"))  # without the overflowing alpha
    assert s.warnings == []


def test_nan_in_an_input_warns_once_per_alpha(tmp_path):
    def sft_edit(s):
        s[UP][0, 0] = float("nan")

    sft, aligned = make_pair(tmp_path, sft_edit=sft_edit)
    s = extrapolate_sweep(sft, aligned, [0.1, 0.2], str(tmp_path / "sweep"))
    assert len(s.warnings) == 2 and all(UP in w for w in s.warnings)
    for r in s.runs:
        assert len(r.warnings) == 1 and torch.isnan(load_output(r.out)[UP][0, 0])


def test_help_states_the_memory_bound(capsys):
    with pytest.raises(SystemExit):
        main(["extrapolate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "3 x (2 + number of alphas) chunks" in text and "DIR/alpha-0.1" in text


def test_a_sweep_that_fails_while_finishing_publishes_none(pairs, tmp_path, monkeypatch):
    """Every output of a sweep is finished (checksums, side files, index, card, expo.json) before the first is
    renamed into place: a failure while finishing the second output publishes neither."""
    from expo_engine.errors import OutputError
    from expo_engine.writer import Staging

    p = pairs["untied-mixed"]
    real = Staging.finish

    def failing(self, side, provenance):
        if self.out.endswith("alpha-0.5"):
            raise OutputError(f"{self.dir}/README.md: the disk is full (injected); nothing was published")
        return real(self, side, provenance)

    monkeypatch.setattr(Staging, "finish", failing)
    out = str(tmp_path / "sweep")
    with pytest.raises(OutputError, match="injected"):
        extrapolate_sweep(p.sft, p.aligned, [0.3, 0.5], out)
    assert not os.path.exists(out) or os.listdir(out) == []
