"""NaN and Inf: produced by the formula from finite inputs is an error naming the tensor (nothing published);
already in an input, it is carried through with a warning (silenced by --allow-nonfinite)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    HIDDEN,
    OVERFLOWING,
    aligned_from,
    cli_args,
    load_output,
    make_pair,
    overflowing,
    tiny_state,
    unchanged,
    write_checkpoint,
)

from expo_engine import extrapolate
from expo_engine.cli import main
from expo_engine.errors import NonFiniteError


@pytest.mark.parametrize("stats", [True, False])
def test_overflow_from_finite_inputs_is_an_error(tmp_path, stats):
    sft, aligned = overflowing(tmp_path)
    out = tmp_path / "out"
    with unchanged(tmp_path, out), pytest.raises(NonFiniteError) as e:
        extrapolate(sft, aligned, 1.0, str(out), stats=stats)
    msg = str(e.value)
    assert OVERFLOWING in msg and "1 element(s)" in msg and f"index {3 * HIDDEN + 5}" in msg
    assert "F16" in msg and "--dtype fp32" in msg


def test_overflow_error_through_the_cli(tmp_path, capsys):
    sft, aligned = overflowing(tmp_path)
    out = tmp_path / "out"
    with unchanged(tmp_path, out):
        assert main(["extrapolate", *cli_args(sft, aligned, str(out), "--no-stats", alpha="1")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress lines: found only once the chunks are computed
    assert last.startswith("expo: error: ") and OVERFLOWING in last and "NaN or Inf" in last, err


def test_the_same_pair_in_fp32_is_fine(tmp_path):
    sft, aligned = overflowing(tmp_path)
    s = extrapolate(sft, aligned, 1.0, str(tmp_path / "out"), dtype="fp32")
    assert s.warnings == []
    assert load_output(str(tmp_path / "out"))[OVERFLOWING][3, 5].item() == 180000.0


@pytest.mark.parametrize("stats", [True, False])
def test_nan_in_an_input_is_carried_with_a_warning(tmp_path, stats, capsys):
    def sft_edit(s):
        s[OVERFLOWING][0, 0] = float("nan")
        s[OVERFLOWING][1, 1] = float("inf")

    sft, aligned = make_pair(tmp_path, sft_edit=sft_edit)
    out = str(tmp_path / "out")
    args = cli_args(sft, aligned, out, *([] if stats else ["--no-stats"]))
    assert main(["extrapolate", *args]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("expo: warning:")]
    assert len(warnings) == 1 and OVERFLOWING in warnings[0] and "sft: 2, aligned: 0" in warnings[0], err
    got = load_output(out)[OVERFLOWING]
    assert math.isnan(got[0, 0].item()) and not math.isfinite(got[1, 1].item())
    finite = torch.isfinite(got)
    assert int((~finite).sum()) == 2  # only the elements that were already NaN/Inf

    # the same with --allow-nonfinite: no warning, same output
    out2 = str(tmp_path / "out2")
    assert main(["extrapolate", *cli_args(sft, aligned, out2, "--allow-nonfinite")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert torch.equal(load_output(out2)[OVERFLOWING].view(torch.int16), got.view(torch.int16))


def test_huge_finite_values_are_not_reported(tmp_path):
    """fp32 values whose squares overflow float32's block sums flag the tensor; the element scan clears it."""
    sft_state = {k: v.float() for k, v in tiny_state().items()}
    aligned_state = aligned_from(sft_state)
    sft_state[OVERFLOWING] = sft_state[OVERFLOWING] * 1e25
    aligned_state[OVERFLOWING] = aligned_state[OVERFLOWING] * 1e25

    sft = write_checkpoint(str(tmp_path / "sft"), sft_state)
    aligned = write_checkpoint(str(tmp_path / "aligned"), aligned_state)
    s = extrapolate(sft, aligned, 0.5, str(tmp_path / "out"))
    assert s.warnings == []
    assert torch.isfinite(load_output(str(tmp_path / "out"))[OVERFLOWING]).all()


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_failed_run_removes_the_folders_it_created(tmp_path, executor):
    """--out a/b/out, where a does not exist: the run makes a/b for its staging folder, and a failure found only
    while computing removes them again (the parent that was there before stays)."""
    sft, aligned = overflowing(tmp_path)
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(NonFiniteError):
        extrapolate(sft, aligned, 1.0, str(out), executor=executor, workers=1)
    assert not (tmp_path / "new").exists()


def test_a_relative_output_path_is_fine(tmp_path, monkeypatch):
    """--out new/out relative to the working folder: its parent is made, and removed again on failure."""
    sft, aligned = overflowing(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NonFiniteError):
        extrapolate(sft, aligned, 1.0, "new/out")
    assert not (tmp_path / "new").exists()
