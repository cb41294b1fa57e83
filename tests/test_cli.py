"""The `expo` command line: report files of `expo norms`, the progress log, and `expo verify`'s exit statuses."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
from helpers import assert_user_error, copy_tree, nudge_element

from expo_engine import cli, extrapolate, norms
from expo_engine.cli import main

REPORTS = {"--json": "n.json", "--csv": "n.csv", "--markdown": "n.md", "--plot": "n.png"}


@pytest.fixture
def no_reading(monkeypatch):
    """Fail the test if `expo norms` starts reading checkpoints."""
    def read(*args, **kwargs):
        raise AssertionError("checkpoints were read before the report files were checked")

    monkeypatch.setattr(norms, "parameter_norms", read)


@pytest.mark.parametrize("option", REPORTS)
def test_norms_refuses_a_report_file_in_a_missing_folder_before_reading(pair, tmp_path, capsys, no_reading, option):
    path = str(tmp_path / "nowhere" / REPORTS[option])
    rc = main(["norms", pair.sft, pair.aligned, option, path])
    assert_user_error(rc, capsys.readouterr().err, option, path, "does not exist")
    assert not os.path.lexists(tmp_path / "nowhere")


@pytest.mark.parametrize("option", REPORTS)
def test_norms_refuses_a_folder_as_report_file(pair, tmp_path, capsys, no_reading, option):
    rc = main(["norms", pair.sft, pair.aligned, option, str(tmp_path)])
    assert_user_error(rc, capsys.readouterr().err, option, str(tmp_path), "is a folder")


@pytest.mark.parametrize("option", REPORTS)
def test_norms_write_failure_is_a_user_error_naming_the_file(pair, tmp_path, capsys, monkeypatch, option):
    """The folder checked at the start disappears during the read: the write's OSError names the file."""
    folder = tmp_path / "reports"
    folder.mkdir()
    path = str(folder / REPORTS[option])
    read = norms.parameter_norms

    def read_then_remove_folder(*args, **kwargs):
        reports = read(*args, **kwargs)
        shutil.rmtree(folder)
        return reports

    monkeypatch.setattr(norms, "parameter_norms", read_then_remove_folder)
    rc = main(["norms", pair.sft, pair.aligned, option, path])
    assert_user_error(rc, capsys.readouterr().err, f"cannot write {option} {path}")
    assert not os.path.lexists(folder)


def test_norms_replaces_report_files_whole(pair, tmp_path, capsys):
    paths = {option: str(tmp_path / name) for option, name in REPORTS.items()}
    with open(paths["--json"], "w") as f:
        f.write("old")
    assert main(["norms", pair.sft, pair.aligned, *(x for item in paths.items() for x in item)]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(REPORTS.values())  # no temporary file left beside them
    with open(paths["--json"]) as f:
        assert len(json.load(f)["pairs"]) == 1


class _Clock:
    def __init__(self):
        self.now = 100.0

    def monotonic(self):
        return self.now


def test_plain_progress_log_waits_one_interval_then_shows_done_rate_and_eta(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(cli, "time", clock)
    stream = io.StringIO()
    progress = cli.Progress(stream)
    plan = SimpleNamespace(total_size=4_000_000, tensors=[1, 2], shards=["a"], chunks=[1, 2, 3, 4], vocab=None, drop=())
    progress.start(plan)
    assert stream.getvalue() == "planned 2 tensors, 1 shard(s), 4.00 MB to write in 4 chunks\n"
    clock.now = 101.0
    progress.advance(1_000_000)
    assert stream.getvalue().count("\n") == 1  # nothing before the first interval
    clock.now = 110.0
    progress.advance(1_000_000)
    clock.now = 112.0
    progress.advance(1_000_000)  # 2 s after the last line: none
    clock.now = 115.0
    progress.advance(1_000_000)  # done: always a line
    assert stream.getvalue().splitlines()[1:] == [
        "  2.00 MB of 4.00 MB, 200.00 kB/s, ETA 10 s",
        "  4.00 MB of 4.00 MB, 266.67 kB/s, ETA 0 s",
    ]


def test_extrapolate_plain_log(pair, tmp_path, capsys):
    """Not a terminal: the plan, the executor, then progress lines, the last one at the end (one only, unless a
    busy machine makes this tiny run last over the 10 s interval)."""
    assert main(["extrapolate", "--sft", pair.sft, "--aligned", pair.aligned, "--alpha", "0.3",
                 "--out", str(tmp_path / "out"), "--chunk-mb", "0.001"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3, lines
    assert lines[0].startswith("planned ") and lines[1].startswith("executor: local (")
    assert all(re.fullmatch(r"  \S+ \S?B of \S+ \S?B, \S+ \S?B/s, ETA \d+ s", line) for line in lines[2:]), lines
    assert re.fullmatch(r"  (\S+ \S?B) of \1, \S+ \S?B/s, ETA 0 s", lines[-1]), lines[-1]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_extrapolate_on_a_terminal_prints_the_executor_line_before_the_bar(pair, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["extrapolate", "--sft", pair.sft, "--aligned", pair.aligned, "--alpha", "0.3",
                 "--out", str(tmp_path / "out")]) == 0
    err = terminal.getvalue()
    head, bar = err.split("extrapolating", 1)
    assert re.fullmatch(r"planned [^\n]*\nexecutor: local \([^\n]*\)\n\r?", head), err
    assert "100%" in bar and "executor" not in bar


# `expo verify` through main(); the checks themselves are tested on verify() in test_verify.py.

@pytest.fixture(scope="module")
def made(pairs, tmp_path_factory):
    p = pairs["untied-mixed"]
    out = str(tmp_path_factory.mktemp("cli-verify") / "expo")
    extrapolate(p.sft, p.aligned, 0.3, out, max_shard_size="20KB", chunk_bytes=1000)
    return out


@pytest.fixture
def out(made, tmp_path):
    return copy_tree(made, str(tmp_path / "expo"))


def test_verify_passes_a_correct_output(pair, out, capsys):
    assert main(["verify", out, "--sft", pair.sft, "--aligned", pair.aligned]) == 0
    printed = capsys.readouterr().out
    n = sum(t.numel() for t in pair.aligned_state.values())
    assert printed.startswith(f"verify {out}: OK\n")
    assert f"elements: {n:,} of {n:,} checked (all) against the float64 formula with alpha 0.3" in printed
    assert main(["verify", out]) == 0
    assert "elements: not checked" in capsys.readouterr().out


def test_verify_fails_naming_the_tensor_of_a_flipped_element(pair, out, capsys):
    shard, name = nudge_element(out, steps=64)
    assert main(["verify", out, "--sft", pair.sft, "--aligned", pair.aligned]) == 1
    printed = capsys.readouterr().out
    assert printed.startswith(f"verify {out}: FAILED")
    assert f"tensor '{name}': 1 element(s) more than one step off" in printed
    assert f"problem: {shard}: its sha256 differs" in printed


def test_verify_structure_only_fails_on_a_changed_byte(out, capsys):
    shard, _ = nudge_element(out, steps=64)
    assert main(["verify", out]) == 1
    printed = capsys.readouterr().out
    assert printed.startswith(f"verify {out}: FAILED (1 problem(s), 0 failing tensor(s))")
    assert f"problem: {shard}: its sha256 differs from the one expo.json records" in printed


def test_verify_user_errors(pair, out, tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert_user_error(main(["verify", missing]), capsys.readouterr().err, missing)
    assert_user_error(main(["verify", out, "--sft", pair.sft]), capsys.readouterr().err, "--sft and --aligned")
