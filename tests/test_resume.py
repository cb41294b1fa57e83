"""In-process runs resume: a real `expo` process killed with SIGKILL mid-shard, between shards or while
publishing (EXPO_FAULT_KILL_AT makes it kill itself there), then the same command again. The result is
byte-identical to an uninterrupted run, the summary says how much was resumed, and the resumed run reads only
the input bytes of what was missing (counted by the kernel: rchar of the process)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import leftovers
from safetensors.torch import save_file

from expo_engine import verify
from expo_engine.plan import make_plan, make_units
from expo_engine.sources import open_checkpoint
from expo_engine.writer import FAULT_KILL_AT, JOURNAL_NAME, staging_path

CHUNK_MB, UNIT_MB, SHARD = 1, 2, "12MB"  # 8 tensors of 4 MiB: 4 shards, 32 chunks, 16 units


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """A 32 MiB-per-side bf16 pair: big enough that reading it dwarfs what a process reads to start."""
    root = tmp_path_factory.mktemp("resume")
    g = torch.Generator().manual_seed(7)
    sft = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(1024, 2048, generator=g).to(torch.bfloat16)
           for i in range(8)}
    aligned = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in sft.items()}
    paths = []
    for name, state in (("sft", sft), ("aligned", aligned)):
        os.makedirs(root / name)
        save_file(state, str(root / name / "model.safetensors"))
        with open(root / name / "config.json", "w") as f:
            json.dump({"model_type": "llama"}, f)
        paths.append(str(root / name))
    return (*paths, str(root))


def _args(sft, aligned, out, alpha="0.3"):
    return ["extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", alpha, "--out", out, "--chunk-mb",
            str(CHUNK_MB), "--unit-mb", str(UNIT_MB), "--max-shard-size", SHARD]


def _run(args, env=None) -> tuple[subprocess.CompletedProcess, int]:
    """Run the CLI in a real process; also return the bytes it read through read/pread/preadv (rchar of the
    shell that waited for it, which includes its children's)."""
    cmd = " ".join(f"'{a}'" for a in [sys.executable, "-m", "expo_engine.cli", *args])
    r = subprocess.run(["bash", "-c", f"{cmd}; rc=$?; grep '^rchar' /proc/$$/io >&2; exit $rc"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    rchar = [int(x.split()[1]) for x in r.stderr.splitlines() if x.startswith("rchar:")]
    return r, rchar[-1]


def _digests(folder: str) -> dict[str, str]:
    """sha256 of every file but expo.json (which records when it was made), and expo.json's file table."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        out[name] = json.loads(data)["files"] if name == "expo.json" else hashlib.sha256(data).hexdigest()
    return out


def _stats(folder: str) -> dict:
    """Every number of expo.json's statistics, per tensor and in total, flattened."""
    with open(os.path.join(folder, "expo.json")) as f:
        stats = json.load(f)["stats"]
    flat = {}
    for which in ("delta", "update"):
        flat |= {(which, "total", k): v for k, v in stats[which]["total"].items()}
        for name, st in stats[which]["tensors"].items():
            flat |= {(which, name, k): float(v) for k, v in st.items()}
    return flat


@pytest.fixture(scope="module")
def reference(big_pair):
    sft, aligned, root = big_pair
    out = os.path.join(root, "reference")
    r, rchar = _run(_args(sft, aligned, out))
    assert r.returncode == 0, r.stderr
    dry, baseline = _run([*_args(sft, aligned, os.path.join(root, "dry")), "--dry-run"])
    assert dry.returncode == 0, dry.stderr
    return out, rchar, baseline


def _plan(sft, aligned):
    plan = make_plan(open_checkpoint(sft), open_checkpoint(aligned), 0.3, max_shard_size=SHARD,
                     chunk_bytes=CHUNK_MB * 2**20)
    return plan, make_units(plan, UNIT_MB * 2**20)


def _kill_point(plan, units, where: str) -> tuple[str, int | None]:
    """(FAULT_KILL_AT value, units an immediate resume must keep: None where only bounds are known)."""
    shards = [s.filename for s in plan.shards]
    first = [u for u in units if u.shard == shards[0]]
    if where == "between-shards":  # right after the last chunk of the first shard (its units all journaled)
        return f"chunk:{first[-1].last - 1}", len(first)
    if where == "mid-shard":  # one chunk into a unit in the middle of the second shard
        second = [u for u in units if u.shard == shards[1]]
        return f"chunk:{second[len(second) // 2].first}", None
    return "publish", len(units)


@pytest.mark.parametrize("where", ["mid-shard", "between-shards", "publish"])
def test_sigkill_then_the_same_command_resumes_exactly(big_pair, reference, tmp_path, where):
    sft, aligned, _ = big_pair
    ref, full_rchar, baseline = reference
    plan, units = _plan(sft, aligned)
    assert len(plan.shards) == 4 and len(units) == 16
    point, expect_kept = _kill_point(plan, units, where)
    out = str(tmp_path / "out")
    killed, _ = _run(_args(sft, aligned, out), env={FAULT_KILL_AT: point})
    assert killed.returncode == 128 + signal.SIGKILL, killed.stderr  # bash reports its child's SIGKILL so
    assert not os.path.exists(out) and os.path.isdir(staging_path(out))
    assert os.path.exists(os.path.join(staging_path(out), JOURNAL_NAME))

    again, rchar = _run(_args(sft, aligned, out))
    assert again.returncode == 0, again.stderr
    assert f"resuming from {staging_path(out)}, left by a run that stopped" in again.stderr
    kept = int(again.stdout.split("resumed: ")[1].split(" of ")[0])
    assert f"resumed: {kept} of {len(units)} units" in again.stdout
    if expect_kept is None:
        assert 0 < kept < len(units)
    else:
        assert kept == expect_kept
    assert _digests(out) == _digests(ref)
    report = verify(out, sft, aligned)
    assert report.ok and report.elements_checked == report.elements_total
    # The statistics of the kept units come from the journal: the same sums, up to the order of float64 additions.
    mine, theirs = (_stats(folder) for folder in (out, ref))
    assert mine.keys() == theirs.keys() and mine
    for key, value in theirs.items():
        assert math.isclose(mine[key], value, rel_tol=1e-12, abs_tol=1e-300), key
    with open(os.path.join(out, "expo.json")) as f:
        assert json.load(f)["resumed"]["units"] == kept

    # Reads: the inputs of the missing units, plus the kept part of each shard read back to continue its checksum.
    kept_units = units[:kept]
    out_kept = sum(u.stop - u.start for u in kept_units)
    in_missing = plan.bytes_read * (1 - out_kept / plan.total_size)
    assert rchar - baseline <= in_missing + out_kept + 2 * 2**20, (rchar - baseline, in_missing, out_kept)
    assert full_rchar - baseline >= plan.bytes_read  # the uninterrupted run read every input byte
    if where == "publish":
        assert rchar - baseline < plan.total_size + 2 * 2**20  # no input read again at all
    assert not leftovers(out)


def test_a_sweep_killed_mid_run_resumes_every_output_exactly(big_pair, tmp_path):
    sft, aligned, _ = big_pair
    plan, units = _plan(sft, aligned)
    ref = str(tmp_path / "ref")
    r, _ = _run(_args(sft, aligned, ref, "0.3,0.5"))
    assert r.returncode == 0, r.stderr
    out = str(tmp_path / "out")
    point, _ = _kill_point(plan, units, "mid-shard")
    killed, _ = _run(_args(sft, aligned, out, "0.3,0.5"), env={FAULT_KILL_AT: point})
    assert killed.returncode == 128 + signal.SIGKILL, killed.stderr
    again, _ = _run(_args(sft, aligned, out, "0.3,0.5"))
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("resuming from") == 2, again.stderr
    assert "resumed: " in again.stdout
    for name in ("alpha-0.3", "alpha-0.5"):
        assert _digests(os.path.join(out, name)) == _digests(os.path.join(ref, name))


def test_a_stopped_run_for_another_alpha_is_not_resumed(big_pair, reference, tmp_path):
    """The journal names the job it was written for: another alpha (or layout, inputs, executor) starts afresh,
    and says it removed what it found."""
    sft, aligned, _ = big_pair
    plan, units = _plan(sft, aligned)
    out = str(tmp_path / "out")
    point, _ = _kill_point(plan, units, "between-shards")
    killed, _ = _run(_args(sft, aligned, out, "0.5"), env={FAULT_KILL_AT: point})
    assert killed.returncode == 128 + signal.SIGKILL
    again, _ = _run(_args(sft, aligned, out, "0.3"))
    assert again.returncode == 0, again.stderr
    assert (f"removed {staging_path(out)}, left by a run that stopped (it was made for another alpha"
            in again.stderr), again.stderr
    assert "resumed:" not in again.stdout
    assert _digests(out) == _digests(reference[0])
