"""One run owns its output: real `expo` processes racing for the same `--out` (single runs, sweeps, Ray,
--overwrite, a run that is publishing). The loser stops at once with exit 2 and one line naming the output and
the owner; the output that exists afterwards verifies exactly with the alpha its expo.json records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import assert_user_error, expo_process, leftovers, make_pair

from expo_engine import verify
from expo_engine.ownership import OutputLock, lock_path, old_path, staging_path

# The real CLI in a real process, slowed down (a sleep after every chunk written, in the progress hook) so that a
# second process can meet it mid-run; with "pause-publish" it also waits before renaming the finished output.
_SLOW = """
import sys, time
import expo_engine.api as api, expo_engine.writer as writer
mode, argv = sys.argv[1], sys.argv[2:]
for name in ("extrapolate", "extrapolate_sweep"):
    real = getattr(api, name)
    def slow(*a, _real=real, **k):
        inner = k.get("on_progress")
        def hook(n):
            if inner: inner(n)
            time.sleep(0.3)
        k["on_progress"] = hook
        return _real(*a, **k)
    import expo_engine.cli as cli
    setattr(cli, name, slow)
if mode == "pause-publish":
    real_fault = writer.fault_point
    def pause(where):
        if where == "publish":
            print("publishing", flush=True)
            time.sleep(3)
        real_fault(where)
    writer.fault_point = pause
import expo_engine.cli as cli
sys.exit(cli.main(argv))
"""


def _start(args, mode: str = "slow") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SLOW, mode, "extrapolate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _args(sft, aligned, out, alpha, *extra):
    return ["--sft", sft, "--aligned", aligned, "--alpha", alpha, "--out", out, "--chunk-mb", "0.001",
            "--no-stats", *extra]


def _wait_owned(out: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until `proc` holds the output's lock and has begun staging."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(lock_path(out)) as f:
                if json.loads(f.read() or "{}").get("pid") == proc.pid and os.path.isdir(staging_path(out)):
                    return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the first run did not take the output in time")


def _exact(out: str, sft: str, aligned: str, alpha: float) -> None:
    """The published output holds exactly the model its expo.json describes."""
    with open(os.path.join(out, "expo.json")) as f:
        assert json.load(f)["alpha"] == alpha
    report = verify(out, sft, aligned)
    assert report.ok and report.alpha == alpha and report.elements_checked == report.elements_total, report


def _refused(proc_or_result, out: str, owner_pid: int) -> None:
    err = proc_or_result.stderr if isinstance(proc_or_result.stderr, str) else proc_or_result.stderr.read()
    line = assert_user_error(proc_or_result.returncode, err, out, "being written by another expo run",
                             f"pid {owner_pid} on host")
    assert "started 20" in line, line


@pytest.mark.parametrize("first,second", [("0.3", "0.5"), ("0.5", "0.3")])
def test_a_second_run_on_a_live_output_stops_at_once(tmp_path, first, second):
    sft, aligned = make_pair(tmp_path / "in")
    out = str(tmp_path / "out")
    a = _start(_args(sft, aligned, out, first))
    _wait_owned(out, a)
    staged = sorted(os.listdir(staging_path(out)))
    t = time.monotonic()
    b = expo_process("extrapolate", *_args(sft, aligned, out, second))
    assert time.monotonic() - t < 30
    _refused(b, out, a.pid)
    assert a.poll() is None, "the second run was refused only after the first had finished"
    assert sorted(os.listdir(staging_path(out))) == staged  # nothing of the first run's was touched
    _, err = a.communicate(timeout=120)
    assert a.returncode == 0, err
    _exact(out, sft, aligned, float(first))
    assert not leftovers(out)


def test_two_runs_started_together_one_wins_and_its_output_is_exact(tmp_path):
    """No waiting between the two starts: which one wins is up to the machine; exactly one publishes, the other is
    refused (while the winner runs: busy; after it has published: the output exists)."""
    sft, aligned = make_pair(tmp_path / "in")
    out = str(tmp_path / "out")
    procs = {alpha: _start(_args(sft, aligned, out, alpha)) for alpha in ("0.3", "0.5")}
    results = {alpha: (p, *p.communicate(timeout=120)) for alpha, p in procs.items()}
    won = [alpha for alpha, (p, _, _) in results.items() if p.returncode == 0]
    assert len(won) == 1, {a: (p.returncode, err) for a, (p, _, err) in results.items()}
    lost = "0.5" if won[0] == "0.3" else "0.3"
    p, _, err = results[lost]
    assert p.returncode == 2 and "Traceback" not in err, err
    assert f"pid {procs[won[0]].pid}" in err or "exists and is not empty" in err, err
    _exact(out, sft, aligned, float(won[0]))
    assert not leftovers(out)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_started_while_another_publishes_is_refused(tmp_path, overwrite):
    sft, aligned = make_pair(tmp_path / "in")
    out = str(tmp_path / "out")
    a = _start(_args(sft, aligned, out, "0.3"), "pause-publish")
    assert a.stdout.readline().strip() == "publishing"
    b = expo_process("extrapolate", *_args(sft, aligned, out, "0.5", *(["--overwrite"] if overwrite else [])))
    _refused(b, out, a.pid)
    _, err = a.communicate(timeout=60)
    assert a.returncode == 0, err
    _exact(out, sft, aligned, 0.3)
    if overwrite:  # once the first has finished, the same --overwrite run may replace its output
        b = expo_process("extrapolate", *_args(sft, aligned, out, "0.5", "--overwrite"))
        assert b.returncode == 0, b.stderr
        _exact(out, sft, aligned, 0.5)
    assert not leftovers(out)


def test_sweeps_ray_and_overwrite_runs_meet_the_same_lock(tmp_path):
    """A sweep owns each of its outputs: a single run (with --overwrite), a Ray run and another sweep on any of
    them stop at once; a run on an output the sweep does not write is free to go."""
    sft, aligned = make_pair(tmp_path / "in")
    parent = str(tmp_path / "sweep")
    a = _start(_args(sft, aligned, parent, "0.3,0.5"))
    _wait_owned(os.path.join(parent, "alpha-0.5"), a)
    target = os.path.join(parent, "alpha-0.5")
    for extra, out in ((["--overwrite"], target), (["--executor", "ray", "--workers", "2"], target)):
        _refused(expo_process("extrapolate", *_args(sft, aligned, out, "0.5", *extra)), out, a.pid)
    b = expo_process("extrapolate", *_args(sft, aligned, parent, "0.1,0.3"))
    _refused(b, os.path.join(parent, "alpha-0.3"), a.pid)
    free = expo_process("extrapolate", *_args(sft, aligned, os.path.join(parent, "alpha-0.7"), "0.7"))
    assert free.returncode == 0, free.stderr
    _, err = a.communicate(timeout=120)
    assert a.returncode == 0, err
    assert sorted(os.listdir(parent)) == ["alpha-0.3", "alpha-0.5", "alpha-0.7"]
    for alpha in (0.3, 0.5, 0.7):
        _exact(os.path.join(parent, f"alpha-{alpha:g}"), sft, aligned, alpha)


def test_a_lock_left_by_a_dead_run_is_free(tmp_path):
    """kill -9 leaves the lock file; the kernel has dropped the lock with the process, so the next run owns the
    output at once (and says what it did with the staging folder the dead run left)."""
    sft, aligned = make_pair(tmp_path / "in")
    out = str(tmp_path / "out")
    a = _start(_args(sft, aligned, out, "0.3"))
    _wait_owned(out, a)
    a.kill()
    a.wait()
    assert os.path.exists(lock_path(out)) and os.path.isdir(staging_path(out))
    b = expo_process("extrapolate", *_args(sft, aligned, out, "0.5"))
    assert b.returncode == 0, b.stderr
    assert f"removed {staging_path(out)}, left by a run that stopped" in b.stderr, b.stderr
    _exact(out, sft, aligned, 0.5)
    assert not leftovers(out)


def test_a_publish_killed_between_its_renames_is_settled_by_the_next_owner(tmp_path):
    """An --overwrite publish first moves the old output to .<name>.expo-old. Killed right after that, the old
    output is put back by the next run that owns the path; killed after the new one is in place, the old one is
    removed. Both say so."""
    sft, aligned = make_pair(tmp_path / "in")
    out = str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, "mine.txt"), "w") as f:
        f.write("the previous output")
    os.rename(out, old_path(out))  # as a run killed between the two renames leaves it
    with OutputLock(out) as lock:
        assert lock.notes == [f"restored {out} from {old_path(out)}, where a run that stopped while publishing "
                              "had moved it"]
    assert os.listdir(out) == ["mine.txt"] and not leftovers(out)
    os.makedirs(old_path(out))  # as a run killed after the second rename leaves it
    with OutputLock(out) as lock:
        assert lock.notes and lock.notes[0].startswith(f"removed {old_path(out)}")
    assert os.listdir(out) == ["mine.txt"] and not leftovers(out)


def test_outputs_nested_in_a_live_output_are_refused_both_ways(tmp_path):
    """A run on OUT/b while another writes OUT (or on OUT, with --overwrite, while another writes OUT/b) would
    delete the other's files when it publishes: it stops at once instead, naming the other output."""
    sft, aligned = make_pair(tmp_path / "in")
    outer, inner = str(tmp_path / "m"), str(tmp_path / "m" / "b")
    a = _start(_args(sft, aligned, outer, "0.3"))
    _wait_owned(outer, a)
    r = expo_process("extrapolate", *_args(sft, aligned, inner, "0.5"))
    assert_user_error(r.returncode, r.stderr, inner, f"is inside {outer}, which another expo run is writing")
    _, err = a.communicate(timeout=120)
    assert a.returncode == 0, err
    _exact(outer, sft, aligned, 0.3)

    b = _start(_args(sft, aligned, inner, "0.5", "--overwrite"))  # inside the finished output: allowed
    _wait_owned(inner, b)
    r = expo_process("extrapolate", *_args(sft, aligned, outer, "0.7", "--overwrite"))
    assert_user_error(r.returncode, r.stderr, outer, f"holds {inner}, which another expo run is writing")
    _, err = b.communicate(timeout=120)
    assert b.returncode == 0, err
    _exact(inner, sft, aligned, 0.5)
    with open(os.path.join(outer, "expo.json")) as f:  # the outer output is still the first run's
        assert json.load(f)["alpha"] == 0.3


def test_an_output_filled_while_the_run_computes_is_not_replaced(tmp_path):
    """Something else writes into the empty output folder while the run computes: without --overwrite the run
    does not replace it; it keeps the finished model in its staging folder, and the same command publishes it,
    reading nothing again, once the folder is empty."""
    sft, aligned = make_pair(tmp_path / "in")
    out = str(tmp_path / "out")
    a = _start(_args(sft, aligned, out, "0.3"))
    _wait_owned(out, a)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    _, err = a.communicate(timeout=120)
    line = assert_user_error(a.returncode, err.splitlines()[-1] + "\n", out, "exists and is not empty",
                             "the finished model is kept in", "run the same command again")
    assert staging_path(out) in line
    with open(os.path.join(out, "notes.txt")) as f:
        assert f.read() == "mine"
    os.remove(os.path.join(out, "notes.txt"))
    again = expo_process("extrapolate", *_args(sft, aligned, out, "0.3"))
    assert again.returncode == 0, again.stderr
    units = int(again.stdout.split("resumed: ")[1].split(" of ")[0])
    assert f"resumed: {units} of {units} units" in again.stdout
    _exact(out, sft, aligned, 0.3)
    assert not leftovers(out)
