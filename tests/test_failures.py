"""Failures while running: a full disk (a real size-limited tmpfs), a read-only output filesystem, inputs that
change or disappear mid-run, SIGTERM/SIGINT of an in-process run. Each ends with one clear message, a non-zero
exit, inputs untouched and nothing new at the output path."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import assert_user_error, cli_args, expo_process, leftovers, make_pair, unchanged

from expo_engine import extrapolate
from expo_engine.errors import InputChangedError, OutputError
from expo_engine.plan import make_plan
from expo_engine.sources import open_checkpoint


@contextlib.contextmanager
def tmpfs(path, size: int, options: str = ""):
    """A real tmpfs of `size` bytes at `path` (needs root; the test is skipped otherwise)."""
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _shard_bytes(sft, aligned) -> int:
    plan = make_plan(open_checkpoint(sft), open_checkpoint(aligned), 0.5)
    return sum(s.size for s in plan.shards)


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_full_disk_before_any_work(tmp_path, capsys):
    """The shards do not fit: preallocation fails at once with a clear message; nothing is left on the disk."""
    sft, aligned = make_pair(tmp_path / "in")
    with tmpfs(tmp_path / "small", 4096) as small:
        out = os.path.join(small, "out")
        with unchanged(tmp_path / "in", out):
            from expo_engine.cli import main

            assert main(["extrapolate", *cli_args(sft, aligned, out)]) == 2
        err = capsys.readouterr().err
        line = [x for x in err.splitlines() if x.startswith("expo: error:")]
        assert len(line) == 1 and "not enough disk space" in line[0] and "Traceback" not in err, err
        assert os.listdir(small) == []


def test_full_disk_after_the_shards(tmp_path):
    """The shards fit but the side files, index, card and expo.json do not: OutputError naming the file; the
    staging folder is removed and the disk is as before."""
    sft, aligned = make_pair(tmp_path / "in")
    need = _shard_bytes(sft, aligned)
    with tmpfs(tmp_path / "small", 1 << 20) as small:
        # leave room for the shards and the output's lock file (tmpfs counts whole pages) and less than one more
        # page
        filler = os.path.join(small, "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        os.posix_fallocate(fd, 0, _free(small) - -(-need // 4096) * 4096 - 4096 - 100)
        os.close(fd)
        out = os.path.join(small, "out")
        with unchanged(tmp_path / "in", out), pytest.raises(OutputError, match="disk is full"):
            extrapolate(sft, aligned, 0.5, out)
        assert os.listdir(small) == ["filler"]


def test_read_only_output_filesystem(tmp_path, capsys):
    sft, aligned = make_pair(tmp_path / "in")
    with tmpfs(tmp_path / "ro", 1 << 20, "ro") as ro:
        out = os.path.join(ro, "out")
        with unchanged(tmp_path / "in"):
            from expo_engine.cli import main

            assert main(["extrapolate", *cli_args(sft, aligned, out)]) == 2
        assert_user_error(2, capsys.readouterr().err, ro, "not a writable folder")


@pytest.mark.parametrize("how", ["grows", "touched", "deleted"])
def test_input_changing_mid_run_is_not_published(tmp_path, how):
    sft, aligned = make_pair(tmp_path / "in")
    victim = os.path.join(aligned, "model.safetensors")
    out = str(tmp_path / "out")
    done = []

    def meddle(nbytes: int) -> None:
        if done:
            return
        done.append(nbytes)
        if how == "grows":
            with open(victim, "ab") as f:
                f.write(b"\0")
        elif how == "touched":
            st = os.stat(victim)
            os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        else:
            os.remove(victim)

    with pytest.raises(InputChangedError, match="model.safetensors") as e:
        extrapolate(sft, aligned, 0.5, out, chunk_bytes=1024, on_progress=meddle, stats=False)
    assert done and "not published" in str(e.value)
    assert ("disappeared" in str(e.value)) == (how == "deleted")
    assert not os.path.exists(out) and not leftovers(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_in_process_run_stopped_by_a_signal(tmp_path, sig):
    """SIGTERM or SIGINT of an in-process run: exit 130, one message, no traceback, nothing at the output path,
    the staging folder and its journal kept; the same command then resumes and finishes the job."""
    from expo_engine.writer import staging_path

    sft, aligned = make_pair(tmp_path / "in")
    out = str(tmp_path / "out")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with unchanged(tmp_path / "in"):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SLOW_RUN, sft, aligned, out], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "started"
        time.sleep(0.5)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr
        last = [x for x in stderr.splitlines() if x.startswith("expo: ")][-1]
        assert last.startswith("expo: interrupted;") and "run the same command again to resume" in last, stderr
        assert not os.path.lexists(out) and os.path.isdir(staging_path(out))
        again = expo_process("extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5", "--out", out,
                             "--chunk-mb", "0.001", "--no-stats", "--unit-mb", "0.001")
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr and "resumed:" in again.stdout, (again.stdout, again.stderr)
    assert not leftovers(out)


# The CLI, with a progress hook that sleeps, so that the run is still going when the signal comes.
_SLOW_RUN = """
import sys, time
import expo_engine.api as api
real = api.extrapolate
def slow(*a, **k):
    inner = k.get("on_progress")
    def hook(n):
        if inner: inner(n)
        time.sleep(0.05)
    k["on_progress"] = hook
    print("started", flush=True)
    return real(*a, **k)
import expo_engine.cli as cli
cli.extrapolate = slow
sft, aligned, out = sys.argv[1:4]
sys.exit(cli.main(["extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5", "--out", out,
                   "--chunk-mb", "0.001", "--no-stats", "--unit-mb", "0.001"]))
"""
