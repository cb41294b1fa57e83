"""Benchmark an alpha sweep (one read of the inputs, one output per alpha) against one single run per alpha.

    python benchmarks/bench_sweep.py --size-gb 4 --workdir /work/bench-work [--alphas 0.1,0.2,0.3,0.4,0.5]
                                     [--repeat 1] [--markdown FILE]

Uses bench_extrapolate.py's pair (built once, cached in --workdir) and its measuring wrapper: every expo process
is timed from outside, with the summed RSS of its process tree, the page cache dropped before it when permitted.
Bytes read are the expo process's own /proc/self/io at its end: `read_bytes` (what storage delivered, O_DIRECT
included) and `rchar` (what its read calls returned, page cache or not). Both methods run `--executor local`, so
the comparison is the same engine doing one pass or five. Each sweep output's shards are compared, by the sha256
in expo.json, with the single run of the same alpha. Keep --workdir outside the repository: it holds several GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_extrapolate import engine_revision, ensure_pair, run_one  # noqa: E402


def expo_with_io(io_file: str, args: list[str]) -> None:
    """Child: run `expo ARGS` in this process, then record this process's I/O counters (all its threads)."""
    from expo_engine.cli import main as expo_main

    rc = expo_main(args)
    with open("/proc/self/io") as f:
        counters = dict(line.split(": ") for line in f.read().splitlines())
    with open(io_file, "w") as f:
        json.dump({k: int(v) for k, v in counters.items()}, f)
    sys.exit(rc)


def run_expo(workdir: str, sft: str, aligned: str, alpha: str, out: str) -> dict:
    io_file = os.path.join(workdir, "io.json")
    cmd = [sys.executable, os.path.abspath(__file__), "_expo_io", io_file, "--", "extrapolate", "--sft", sft,
           "--aligned", aligned, "--alpha", alpha, "--out", out, "--executor", "local"]
    r = run_one(cmd, out, workdir)
    with open(io_file) as f:
        io = json.load(f)
    return r | {"read_bytes": io["read_bytes"], "rchar": io["rchar"]}


def shard_hashes(folder: str) -> dict[str, str]:
    with open(os.path.join(folder, "expo.json")) as f:
        files = json.load(f)["files"]
    return {n: v["sha256"] for n, v in files.items() if n.endswith(".safetensors")}


def main() -> None:
    if sys.argv[1:2] == ["_expo_io"]:
        return expo_with_io(sys.argv[2], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=4.0, help="SFT + aligned size in GB (default %(default)g)")
    p.add_argument("--workdir", required=True, help="scratch folder outside the repo; the pair is cached here")
    p.add_argument("--alphas", default="0.1,0.2,0.3,0.4,0.5", help="the sweep (default %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each method, interleaved (default %(default)s)")
    p.add_argument("--markdown", metavar="FILE", help="append the table, command, date and machine to FILE")
    p.add_argument("--delete-pair", action="store_true", help="remove the cached pair at the end")
    args = p.parse_args()
    alphas = args.alphas.split(",")
    os.makedirs(workdir := os.path.abspath(args.workdir), exist_ok=True)
    sft, aligned, info = ensure_pair(workdir, args.size_gb)
    sweep_out = os.path.join(workdir, "sweep-out")
    results: dict[str, list[dict]] = {"sweep (one pass)": [], f"{len(alphas)} single runs": []}
    mismatches = []
    for _ in range(args.repeat):
        shutil.rmtree(sweep_out, ignore_errors=True)
        r = run_expo(workdir, sft, aligned, args.alphas, sweep_out)
        results["sweep (one pass)"].append(r)
        print(f"sweep of {len(alphas)}: {r['wall']:.1f} s, read {r['read_bytes'] / 1e9:.2f} GB from storage, "
              f"{'cold' if r['cold'] else 'WARM'} cache", file=sys.stderr, flush=True)
        swept = {a: shard_hashes(os.path.join(sweep_out, f"alpha-{float(a):g}")) for a in alphas}
        shutil.rmtree(sweep_out)
        total = {"wall": 0.0, "read_bytes": 0, "rchar": 0, "written": 0, "tree_peak": 0, "cold": True, "load": None}
        for a in alphas:
            out = os.path.join(workdir, f"single-{a}")
            shutil.rmtree(out, ignore_errors=True)
            r = run_expo(workdir, sft, aligned, a, out)
            if shard_hashes(out) != swept[a]:
                mismatches.append(a)
            shutil.rmtree(out)
            for k in ("wall", "read_bytes", "rchar", "written"):
                total[k] += r[k]
            total["tree_peak"] = max(total["tree_peak"], r["tree_peak"])
            total["cold"] = total["cold"] and r["cold"]
            total["load"] = r["load"] if total["load"] is None else total["load"]
            print(f"single alpha {a}: {r['wall']:.1f} s", file=sys.stderr, flush=True)
        results[f"{len(alphas)} single runs"].append(total)

    rows = ["| method | runs | wall s, median (all) | GB read from storage | GB read (syscalls) | GB written "
            "| peak tree RSS MiB | load avg before |", "|---|---|---|---|---|---|---|---|"]
    walls = {}
    for name, rs in results.items():
        walls[name] = statistics.median(r["wall"] for r in rs)
        each = ", ".join(f"{r['wall']:.1f}" for r in rs)
        rows.append(f"| {name} | {len(rs)} | {walls[name]:.1f} ({each}) | "
                    f"{rs[0]['read_bytes'] / 1e9:.2f} | {rs[0]['rchar'] / 1e9:.2f} | {rs[0]['written'] / 1e9:.2f} | "
                    f"{max(r['tree_peak'] for r in rs) / 2**20:.0f} | {rs[0]['load']:.1f} |")
    (sweep_name, sweep), (singles_name, singles) = results.items()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cold = all(r["cold"] for rs in results.values() for r in rs)
    report = "\n".join([
        f"### Sweep of {len(alphas)} alphas ({args.alphas}) on the {args.size_gb:g} GB pair "
        f"({info['params'] / 1e9:.2f} B params per model, {info['layers']} layers)", "",
        f"- command: `python benchmarks/bench_sweep.py {' '.join(sys.argv[1:])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {os.cpu_count()} cores, {mem:.1f} GiB RAM, "
        f"{platform.platform()}; engine: {engine_revision()}",
        "- page cache: " + ("dropped before every expo process (cold)" if cold
                            else "COULD NOT be dropped (no permission): WARM-cache numbers; storage reads are low"),
        "- sweep outputs vs the single runs: " + ("every shard's sha256 equal" if not mismatches
                                                  else f"DIFFERENT for alpha {', '.join(mismatches)}"),
        f"- speed-up of the sweep (median wall of the single runs, summed, / sweep): "
        f"{walls[singles_name] / walls[sweep_name]:.2f}x; input read (syscalls) "
        f"{singles[0]['rchar'] / max(1, sweep[0]['rchar']):.2f}x less", "",
        *rows, "",
    ])
    print(report)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(report + "\n")
    if args.delete_pair:
        shutil.rmtree(os.path.dirname(sft))
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
