"""The `expo` command. User errors print one line on stderr and exit with status 2; nothing is half-written."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from . import __version__
from .api import FORMULA, Summary, extrapolate
from .distributed import Interrupted
from .errors import ExpoError, OptionError
from .plan import DEFAULT_MAX_SHARD_SIZE, Plan


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the same one-line form as every other user error."""

    def error(self, message):
        print(f"expo: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(_glue_negative_numbers(sys.argv[1:] if argv is None else argv))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # a scheduler's SIGTERM stops the run like Ctrl-C does
    try:
        return args.run(args)
    except Interrupted as e:
        print(f"expo: {e}", file=sys.stderr)
        return e.exit_code
    except ExpoError as e:
        print(f"expo: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("expo: interrupted; nothing was written at the output path", file=sys.stderr)
        return 130


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="expo", description=f"ExPO model extrapolation: {FORMULA}")
    p.add_argument("--version", action="version", version=f"expo_engine {__version__}")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    x = sub.add_parser(
        "extrapolate",
        help="build an ExPO model from an SFT and an aligned checkpoint",
        description=f"{FORMULA}, computed in float32 and rounded once, streamed chunk by chunk.",
    )
    x.add_argument("--sft", required=True, metavar="SRC", help="SFT checkpoint: a folder or org/name[@revision]")
    x.add_argument("--aligned", required=True, metavar="SRC", help="aligned (DPO/RLHF) checkpoint trained from it")
    x.add_argument("--alpha", required=True, type=_finite, help="extrapolation strength (0 = aligned; <0 interpolates)")
    x.add_argument("--out", required=True, metavar="DIR", help="output folder (appears only when complete)")
    x.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default: the aligned dtype)")
    x.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                   help="shard cap, decimal units like 5GB or 500MB (default %(default)s)")
    x.add_argument("--chunk-mb", type=_positive, default=64.0, metavar="N",
                   help="largest piece of a tensor in flight, in MiB (default %(default)g); peak memory is a fixed "
                        "base plus about 9 chunks")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    x.add_argument("--executor", choices=["auto", "local", "ray"], default="auto",
                   help="where chunks are computed: local (this process), ray (Ray tasks, resumable), or auto "
                        "(default: Ray for a cluster address, --workers above 1 or a large model; local otherwise)")
    x.add_argument("--workers", type=_count, metavar="N", help="local Ray workers (default: one per CPU)")
    x.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: $RAY_ADDRESS); input and "
                                                         "output folders must be on a filesystem every node sees")
    x.add_argument("--max-memory", metavar="SIZE", help="Ray: memory for tasks in flight per node, like 4GB "
                                                        "(default: half the available memory, at most 4 GiB)")
    x.add_argument("--unit-mb", type=_positive, default=256.0, metavar="N",
                   help="Ray: output bytes per task and per journal entry, in MiB (default %(default)g)")
    x.add_argument("--no-stats", dest="stats", action="store_false",
                   help="skip the norms of the change and of the applied update (stored in expo.json by default, "
                        "computed in the same pass; see expo norms --from)")
    x.add_argument("--allow-nonfinite", action="store_true",
                   help="carry NaN/Inf that is already in an input into the output without a warning (NaN/Inf "
                        "that the formula produces from finite inputs is always an error)")
    x.set_defaults(run=_run_extrapolate)

    n = sub.add_parser("norms", help="parameter-change norms between checkpoints (every pair), per tensor/layer/kind",
                       description="For each pair (A, B) and tensor: ||B-A||_F, RMS change ||B-A||_F/sqrt(n), "
                                   "||B-A||_F/n, relative change ||B-A||_F/||A||_F, cosine(A, B), max |B-A|; "
                                   "float64 sums, aggregated per layer, module kind and (layer, kind).")
    n.add_argument("sources", nargs="*", metavar="SRC", help="two or more checkpoints (folders or org/name[@rev])")
    n.add_argument("--from", dest="from_out", metavar="OUT",
                   help="instead of reading checkpoints, print the statistics an `expo extrapolate` run stored in "
                        "OUT/expo.json: the change sft -> aligned and the applied update")
    n.add_argument("--json", metavar="FILE", help="write everything, machine-readable")
    n.add_argument("--csv", metavar="FILE", help="write one row per tensor and pair")
    n.add_argument("--markdown", metavar="FILE", help="write the aggregate tables as Markdown")
    n.add_argument("--plot", metavar="FILE.png", help="plot relative change per layer and kind (needs matplotlib)")
    n.add_argument("--chunk-mb", type=_positive, default=64.0, metavar="N", help="read chunk size in MiB")
    n.set_defaults(run=_run_norms)

    v = sub.add_parser("verify", help="check an output folder: index, headers, checksums, and every element",
                       description="Structure and checksums always; with --sft and --aligned, every output element "
                                   "against the float64 formula rounded once (within one output-dtype step).")
    v.add_argument("out", metavar="OUT", help="an output folder written by expo extrapolate")
    v.add_argument("--sft", metavar="SRC", help="the SFT checkpoint it was made from")
    v.add_argument("--aligned", metavar="SRC", help="the aligned checkpoint it was made from")
    v.add_argument("--alpha", type=_finite, help="alpha (default: the one recorded in expo.json)")
    v.add_argument("--sample", type=_positive, metavar="F", help="check a random fraction F of the chunks")
    v.set_defaults(run=_run_verify)

    d = sub.add_parser("demo", help="build a tiny SFT/aligned pair in a temp folder, extrapolate it, check it")
    d.add_argument("--alpha", type=_finite, default=0.3, help="extrapolation strength (default %(default)s)")
    d.add_argument("--keep", metavar="DIR", help="build in DIR and keep everything (default: a temp folder)")
    d.set_defaults(run=_run_demo)
    return p


def _glue_negative_numbers(argv: list[str]) -> list[str]:
    """`--alpha -1e-3` -> `--alpha=-1e-3`: argparse takes some negative numbers (exponent forms) for options."""
    out = []
    for arg in argv:
        if out and out[-1] == "--alpha" and arg.startswith("-"):
            out[-1] = f"--alpha={arg}"
        else:
            out.append(arg)
    return out


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _run_extrapolate(args) -> int:
    progress = Progress()
    summary = extrapolate(
        args.sft, args.aligned, args.alpha, args.out,
        dtype=args.dtype, max_shard_size=args.max_shard_size, chunk_bytes=max(1, int(args.chunk_mb * 2**20)),
        overwrite=args.overwrite, stats=args.stats, executor=args.executor, workers=args.workers,
        ray_address=args.ray_address, max_memory=args.max_memory, unit_bytes=max(1, int(args.unit_mb * 2**20)),
        allow_nonfinite=args.allow_nonfinite,
        on_plan=progress.start, on_executor=_say_executor, on_progress=progress.advance,
    )
    progress.close()
    for w in summary.warnings:
        print(f"expo: warning: {w}", file=sys.stderr)
    print(describe(summary))
    return 0


def _run_norms(args) -> int:
    import csv
    import json

    from . import norms

    if args.from_out and args.sources:
        raise OptionError("give checkpoints or --from OUT, not both")
    if not args.from_out and len(args.sources) < 2:
        raise OptionError("expo norms needs at least two checkpoints (or --from OUT)")
    if args.plot:
        norms.check_plotting()
    if args.from_out:
        reports = norms.from_output(args.from_out)
    else:
        reports = norms.parameter_norms(args.sources, chunk_bytes=max(1, int(args.chunk_mb * 2**20)))
    print("\n\n".join(norms.table(r) for r in reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine_version": __version__, "inputs": args.sources or [args.from_out],
                       "pairs": [r.as_dict() for r in reports]}, f, indent=1)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows(norms.csv_rows(reports))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(norms.markdown(reports))
    if args.plot:
        norms.plot(reports, args.plot)
    return 0


def _run_verify(args) -> int:
    from .verify import format_report, verify

    if (args.sft is None) != (args.aligned is None):
        raise OptionError("give both --sft and --aligned to check elements, or neither to check structure only")
    report = verify(args.out, sft=args.sft, aligned=args.aligned, alpha=args.alpha, sample=args.sample)
    print(format_report(report))
    return 0 if report.ok else 1


def _run_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.alpha, args.keep)


def human(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(nbytes) < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return ""


def describe(s: Summary) -> str:
    rate = s.bytes_written / s.seconds if s.seconds > 0 else 0.0
    return (
        f"wrote {s.out}\n"
        f"  alpha {s.alpha:g}; {s.tensors} tensors ({s.extrapolated} extrapolated, {s.copied} copied) in "
        f"{s.shards} shard(s), dtype {', '.join(s.dtypes) or '-'}\n"
        f"  read {human(s.bytes_read)}, wrote {human(s.bytes_written)} in {s.seconds:.1f} s "
        f"({human(rate)}/s); peak RSS {s.peak_rss_bytes / 2**20:.0f} MiB"
        + (f"; whole process tree {s.tree_peak_bytes / 2**20:.0f} MiB" if s.tree_peak_bytes else "")
        + _describe_ray(s)
    )


def _say_executor(kind: str, why: str) -> None:
    print(f"executor: {kind} ({why})", file=sys.stderr)


def _describe_ray(s: Summary) -> str:
    if not s.nodes:
        return ""
    lines = [f"\n  ray: {s.units} units" + (f" ({s.resumed_units} already done, resumed)" if s.resumed_units else "")
             + "; phases " + ", ".join(f"{k} {v:.1f} s" for k, v in s.phases.items())]
    for node, n in sorted(s.nodes.items()):
        lines.append(f"  node {node[:12]} ({n['host']}): {n['units']} units, {human(n['bytes'])}")
    return "\n".join(lines)


class Progress:
    """A tqdm bar on a terminal; otherwise a plain log line every 10 s. Kept out of the engine on purpose."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.bar = None
        self.total = self.done = 0
        self.last = 0.0

    def start(self, plan: Plan) -> None:
        self.total, self.began = plan.total_size, time.monotonic()
        print(f"planned {len(plan.tensors)} tensors, {len(plan.shards)} shard(s), {human(plan.total_size)} to write "
              f"in {len(plan.chunks)} chunks", file=self.stream)
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc="extrapolating", file=self.stream)

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            return
        now = time.monotonic()
        if now - self.last >= 10 or self.done == self.total:
            self.last = now
            elapsed = now - self.began
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"  {human(self.done)} of {human(self.total)}, {human(rate)}/s, ETA {eta:.0f} s",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
