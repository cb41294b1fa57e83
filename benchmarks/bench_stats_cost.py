"""What the fused statistics cost: `expo extrapolate` with and without `--no-stats`, alternated, on the same pair.

    python benchmarks/bench_stats_cost.py --workdir /work/bench-work [--size-gb 4] [--repeat 7] [--tmpfs /dev/shm]
        [--kernel compiled|torch] [--markdown FILE]

On disk, the run waits for the disk and the statistics hide in that wait (and the disk's own drift, up to 40 %
within an hour here, swamps them). With --tmpfs the pair is copied into memory and the output written there too:
no I/O wait, so the run is CPU-bound and the statistics' share of it is as large as it can be. Reports the median
wall time and the median CPU time (user + sys of the process) of each, and their ratios. `--kernel torch` sets
EXPO_KERNEL=torch (the torch-ops fallback) for comparison. Reuses bench_extrapolate's cached pair.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_extrapolate import ALPHA, engine_revision, ensure_pair  # noqa: E402


def run(sft: str, aligned: str, out: str, stats: bool, env: dict) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    cmd = ["expo", "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", str(ALPHA), "--out", out,
           "--executor", "local"] + ([] if stats else ["--no-stats"])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shutil.rmtree(out, ignore_errors=True)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--size-gb", type=float, default=4)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--tmpfs", metavar="DIR", help="copy the pair here and write the output here (e.g. /dev/shm)")
    ap.add_argument("--kernel", choices=["compiled", "torch"], default="compiled")
    ap.add_argument("--markdown", metavar="FILE")
    args = ap.parse_args()

    sft, aligned, _ = ensure_pair(args.workdir, args.size_gb)
    where = args.workdir
    if args.tmpfs:
        where = os.path.join(args.tmpfs, "expo-bench-stats")
        shutil.rmtree(where, ignore_errors=True)
        shutil.copytree(os.path.dirname(sft), os.path.join(where, "pair"))
        sft, aligned = os.path.join(where, "pair", "sft"), os.path.join(where, "pair", "aligned")
    env = dict(os.environ, EXPO_KERNEL=args.kernel)
    out = os.path.join(where, "out-stats")
    got: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    try:
        run(sft, aligned, out, True, env)  # warm-up: imports and the page cache of the program itself
        for _ in range(args.repeat):
            for stats in (True, False):
                got[stats].append(run(sft, aligned, out, stats, env))
                print(f"{'stats' if stats else 'no-stats'}: wall {got[stats][-1][0]:.2f} s, "
                      f"cpu {got[stats][-1][1]:.2f} s", flush=True)
    finally:
        if args.tmpfs:
            shutil.rmtree(where, ignore_errors=True)

    def med(stats: bool, k: int) -> float:
        return statistics.median(r[k] for r in got[stats])

    where_text = (f"in {args.tmpfs} (no I/O wait: CPU-bound)" if args.tmpfs
                  else "on disk (page cache not dropped; inputs are read with O_DIRECT)")
    rows = [f"| {'with statistics' if s else '--no-stats'} | {args.repeat} | {med(s, 0):.2f} "
            f"({', '.join(f'{r[0]:.2f}' for r in got[s])}) | {med(s, 1):.2f} |" for s in (True, False)]
    text = "\n".join([
        f"- command: `python benchmarks/bench_stats_cost.py {' '.join(sys.argv[1:])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {os.cpu_count()} cores, "
        f"{platform.platform()}; engine: {engine_revision()}; kernel: {args.kernel}",
        f"- pair and output: {where_text}",
        f"- cost of the statistics, median wall: {100 * (med(True, 0) / med(False, 0) - 1):+.1f} %; "
        f"median CPU time: {100 * (med(True, 1) / med(False, 1) - 1):+.1f} %",
        "",
        "| run | runs | wall s, median (all) | CPU s (user + sys), median |",
        "|---|---|---|---|",
        *rows,
    ])
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
