"""The Ray executor on a real two-node Ray cluster on this machine (loopback only): exact output, identical to the
in-process executor, worker deaths retried, interrupted and killed runs resumed from the journal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import load_output, worst_steps

from expo_engine import extrapolate
from expo_engine.cli import main
from expo_engine.distributed import FAULT_DELAY, FAULT_KILL, FAULT_STOP, Interrupted
from expo_engine.plan import make_plan, make_units
from expo_engine.sources import open_checkpoint
from expo_engine.writer import JOURNAL_NAME, staging_path

ray = pytest.importorskip("ray")
SMALL = dict(max_shard_size="30KB", chunk_bytes=1024, unit_bytes=2048)  # ~30 units on the tiny model


def _shards(folder: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                out[name] = f.read()
    return out


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each, started here, on 127.0.0.1 only."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def reference(pairs, tmp_path_factory):
    """The in-process executor's output for the pair all these tests use."""
    p = pairs["untied-mixed"]
    out = str(tmp_path_factory.mktemp("ref") / "out")
    extrapolate(p.sft, p.aligned, 0.3, out, executor="local", **{k: v for k, v in SMALL.items() if k != "unit_bytes"})
    return out


def test_units_cover_every_output_byte_once(pair):
    plan = make_plan(open_checkpoint(pair.sft), open_checkpoint(pair.aligned), 0.3, max_shard_size="30KB",
                     chunk_bytes=1000)
    units = make_units(plan, 5000)
    assert [u.index for u in units] == list(range(len(units)))
    assert units[0].first == 0 and units[-1].last == len(plan.chunks)
    for u, nxt in zip(units, units[1:], strict=False):
        assert u.last == nxt.first
        if u.shard == nxt.shard:
            assert u.stop == nxt.start  # contiguous within a shard
    for u in units:
        assert u.stop - u.start <= 5000 or u.last - u.first == 1
    by_shard = {}
    for u in units:
        by_shard[u.shard] = by_shard.get(u.shard, 0) + u.stop - u.start
    for s in plan.shards:
        assert by_shard[s.filename] == s.size - len(s.header)  # all data bytes, and only those


def test_two_nodes_both_work_and_match_in_process_byte_for_byte(cluster, pairs, reference, tmp_path, monkeypatch):
    p = pairs["untied-mixed"]
    monkeypatch.setenv(FAULT_DELAY, "0.1")  # long enough that both nodes take units
    out = str(tmp_path / "out")
    s = extrapolate(p.sft, p.aligned, 0.3, out, executor="ray", **SMALL)
    assert s.executor == "ray" and s.units > 10 and s.resumed_units == 0
    assert len(s.nodes) == 2 and all(n["units"] > 0 for n in s.nodes.values())
    assert sum(n["bytes"] for n in s.nodes.values()) == sum(len(b) for b in _shards(out).values()) - sum(
        int.from_bytes(b[:8], "little") + 8 for b in _shards(out).values())
    assert _shards(out) == _shards(reference)
    assert worst_steps(load_output(out), p.sft_state, p.aligned_state, 0.3) <= 1
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
    with open(os.path.join(out, "expo.json")) as f, open(os.path.join(reference, "expo.json")) as g:
        got, want = json.load(f), json.load(g)
    assert {k: v["sha256"] for k, v in got["files"].items() if k.endswith(".safetensors")} == {
        k: v["sha256"] for k, v in want["files"].items() if k.endswith(".safetensors")}
    for which in ("delta", "update"):
        for key, value in want["stats"][which]["total"].items():
            assert got["stats"][which]["total"][key] == pytest.approx(value, rel=1e-12)
    assert not os.path.exists(os.path.join(out, JOURNAL_NAME)) and not os.path.exists(staging_path(out))


def test_a_worker_killed_mid_unit_is_retried_and_the_output_is_exact(cluster, pairs, reference, tmp_path,
                                                                      monkeypatch):
    p = pairs["untied-mixed"]
    monkeypatch.setenv(FAULT_KILL, "3")  # the worker running unit 3 exits on its first attempt
    out = str(tmp_path / "out")
    extrapolate(p.sft, p.aligned, 0.3, out, executor="ray", **SMALL)
    assert _shards(out) == _shards(reference)


def test_an_interrupted_run_resumes_from_its_journal(cluster, pairs, reference, tmp_path, monkeypatch):
    p = pairs["untied-mixed"]
    out = str(tmp_path / "out")
    monkeypatch.setenv(FAULT_STOP, "5")
    with pytest.raises(Interrupted, match="run the same command again to resume"):
        extrapolate(p.sft, p.aligned, 0.3, out, executor="ray", **SMALL)
    assert not os.path.exists(out)
    with open(os.path.join(staging_path(out), JOURNAL_NAME)) as f:
        done = len(f.readlines()) - 1
    assert done >= 5
    monkeypatch.delenv(FAULT_STOP)
    s = extrapolate(p.sft, p.aligned, 0.3, out, executor="ray", **SMALL)
    assert s.resumed_units == done
    assert _shards(out) == _shards(reference)
    assert not os.path.exists(staging_path(out))


def test_resume_redoes_units_whose_bytes_changed_and_ignores_other_jobs_journals(cluster, pairs, reference,
                                                                                tmp_path, monkeypatch):
    p = pairs["untied-mixed"]
    out = str(tmp_path / "out")
    monkeypatch.setenv(FAULT_STOP, "6")
    with pytest.raises(Interrupted):
        extrapolate(p.sft, p.aligned, 0.3, out, executor="ray", **SMALL)
    staging = staging_path(out)
    with open(os.path.join(staging, JOURNAL_NAME)) as f:
        records = [json.loads(line) for line in f][1:]
    # Damage the bytes of one journaled unit: the rerun must notice and compute it again.
    plan = make_plan(open_checkpoint(p.sft), open_checkpoint(p.aligned), 0.3, max_shard_size="30KB",
                     chunk_bytes=SMALL["chunk_bytes"])
    unit = make_units(plan, SMALL["unit_bytes"])[records[0]["index"]]
    with open(os.path.join(staging, unit.shard), "r+b") as f:
        f.seek(unit.start)
        byte = f.read(1)
        f.seek(unit.start)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.delenv(FAULT_STOP)
    s = extrapolate(p.sft, p.aligned, 0.3, out, executor="ray", **SMALL)
    assert s.resumed_units == len(records) - 1
    assert _shards(out) == _shards(reference)
    # A staging folder journaled for another alpha is not resumed into this job.
    out2 = str(tmp_path / "out2")
    monkeypatch.setenv(FAULT_STOP, "4")
    with pytest.raises(Interrupted):
        extrapolate(p.sft, p.aligned, 0.5, out2, executor="ray", **SMALL)
    monkeypatch.delenv(FAULT_STOP)
    s = extrapolate(p.sft, p.aligned, 0.3, out2, executor="ray", **SMALL)
    assert s.resumed_units == 0
    assert _shards(out2) == _shards(reference)


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "expo_engine.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            start_new_session=True, **kw)


def _wait_for_units(staging: str, n: int, proc: subprocess.Popen, timeout=120) -> None:
    deadline = time.monotonic() + timeout
    journal = os.path.join(staging, JOURNAL_NAME)
    while time.monotonic() < deadline:
        if os.path.exists(journal):
            with open(journal) as f:
                if len(f.readlines()) > n:
                    return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run did not journal units in time")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_cli_killed_or_terminated_then_rerun_resumes_exactly(pairs, reference, tmp_path, how):
    """A real `expo` process with its own local Ray, stopped mid-run: kill -9 (nothing runs at all after it) or
    SIGTERM (a clean stop, exit 130, the staging folder kept). The same command then finishes the job."""
    p = pairs["untied-mixed"]
    out = str(tmp_path / "out")
    args = ["extrapolate", "--sft", p.sft, "--aligned", p.aligned, "--alpha", "0.3", "--out", out,
            "--executor", "ray", "--workers", "1", "--max-shard-size", "30KB", "--chunk-mb", str(1024 / 2**20),
            "--unit-mb", str(2048 / 2**20)]
    proc = _cli(*args, env={FAULT_DELAY: "0.3"})
    _wait_for_units(staging_path(out), 3, proc)
    if how == "SIGKILL":
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its whole local Ray die at once
    else:
        os.kill(proc.pid, signal.SIGTERM)  # `kill PID`, as a scheduler's pre-emption notice
    _, err = proc.communicate(timeout=60)
    if how == "SIGTERM":
        assert proc.returncode == 130, err
        assert "interrupted;" in err and "run the same command again to resume" in err and "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(out) and os.path.exists(staging_path(out))
    proc = _cli(*args)
    stdout, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "already done, resumed" in stdout
    assert _shards(out) == _shards(reference)


def test_auto_runs_small_jobs_in_process_and_says_so(pair, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["extrapolate", "--sft", pair.sft, "--aligned", pair.aligned, "--alpha", "0.3", "--out", out]) == 0
    assert "executor: local (small job" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--executor", "local", "--workers", "2"], "need the Ray executor"),
    (["--workers", "0"], "must be at least 1"),
    (["--max-memory", "lots", "--executor", "ray"], "is not understood"),
])
def test_bad_distribution_options(pair, tmp_path, capsys, args, message):
    out = str(tmp_path / "out")
    try:
        code = main(["extrapolate", "--sft", pair.sft, "--aligned", pair.aligned, "--alpha", "0.3", "--out", out,
                     *args])
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not os.path.exists(out)


@pytest.mark.parametrize("stats", [True, False])
def test_nonfinite_checks_cover_ray_units(cluster, tmp_path, stats):
    """Overflow from finite inputs is an error on Ray too (units' flags reach the driver); nothing is published."""
    from helpers import OVERFLOWING as UP
    from helpers import overflowing

    from expo_engine.errors import NonFiniteError

    sft, aligned = overflowing(tmp_path)
    out = str(tmp_path / "out")
    with pytest.raises(NonFiniteError, match=UP):
        extrapolate(sft, aligned, 1.0, out, executor="ray", stats=stats, **SMALL)
    assert not os.path.exists(out) and not os.path.exists(staging_path(out))


def test_device_cuda_on_a_cluster_without_gpus_is_refused(cluster, pairs, tmp_path):
    from expo_engine.errors import OptionError

    p = pairs["untied-mixed"]
    out = str(tmp_path / "out")
    with pytest.raises(OptionError, match="no node of the cluster has a GPU"):
        extrapolate(p.sft, p.aligned, 0.3, out, executor="ray", device="cuda", **SMALL)
    assert not os.path.exists(out) and not os.path.exists(staging_path(out))


def test_probe_names_the_node_that_cannot_use_the_folders(cluster, pairs, tmp_path):
    """The probe task runs on every node; a node that cannot write in the staging folder (here: a folder no node
    has, as on a node where the output filesystem is not mounted) fails the run with a message naming it."""
    from expo_engine.distributed import probe_nodes
    from expo_engine.errors import SourceError

    p = pairs["untied-mixed"]
    plan = make_plan(open_checkpoint(p.sft), open_checkpoint(p.aligned), 0.3)
    assert len(probe_nodes(ray, plan, str(tmp_path))) == 2  # both nodes see everything
    missing = str(tmp_path / "not-mounted")
    with pytest.raises(SourceError) as e:
        probe_nodes(ray, plan, missing)
    msg = str(e.value)
    assert msg.startswith("Ray node 127.0.0.1 (") and f"cannot write in {missing}" in msg
    assert "every node of the cluster sees" in msg
