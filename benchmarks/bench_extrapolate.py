"""Benchmark `expo extrapolate` against `cp -r` of the same bytes (the I/O floor) and the in-memory approach.

    python benchmarks/bench_extrapolate.py --size-gb 4 --workdir /work/bench-work [--repeat 3] [--cache cold|warm|both]
        [--markdown FILE]

Builds (once, cached in --workdir) a Llama-shaped bf16 SFT/aligned pair of about --size-gb GB in all, written
block by block as HF-style shards. Each measurement runs in a fresh wrapper process (this file with `_measure`)
that starts the command, sums the RSS of its whole process tree every 50 ms, and reports that peak, the wall time
and getrusage(RUSAGE_CHILDREN) (peak RSS, user + system CPU). `--cache cold` (default) drops the page cache before
each run (when permitted); `warm` reads both inputs into it first (as after a download or an earlier run);
`both` interleaves the two regimes and reports each against `cp -r` measured in the same regime.
Keep --workdir outside the repository: it holds several GB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zlib

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 128256  # TinyLlama widths with the Llama 3 vocabulary
BLOCK = 16 << 20  # elements generated at a time while building
ALPHA = 0.3
INDEX = "model.safetensors.index.json"


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    h, kv = HIDDEN, HIDDEN // HEADS * KV_HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (INTER, h), p + "mlp.up_proj.weight": (INTER, h),
            p + "mlp.down_proj.weight": (h, INTER), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}


def model_bytes(layers: int) -> int:
    return sum(2 * math.prod(s) for s in llama_shapes(layers).values())


def block(name: str, start: int, stop: int, aligned: bool):
    """Elements [start, stop) of a tensor, the same whenever asked: SFT weights, or SFT plus a small DPO-like drift."""
    import torch

    seed = 2 * (zlib.crc32(name.encode()) * 100_003 + start // BLOCK)
    x = torch.randn(stop - start, generator=torch.Generator().manual_seed(seed)) * 0.02
    if aligned:
        x += torch.randn(stop - start, generator=torch.Generator().manual_seed(seed + 1)) * 0.002
    return x.to(torch.bfloat16).view(torch.uint8).numpy()


def write_checkpoint(folder: str, shapes: dict, n_shards: int, aligned: bool, layers: int) -> None:
    """Like save_pretrained: split in state-dict order by size, each file sorted by name, plus index and config."""
    os.makedirs(folder)
    nbytes = {n: 2 * math.prod(s) for n, s in shapes.items()}
    total, groups, size = sum(nbytes.values()), [[]], 0
    for n in shapes:  # a new file when the next tensor would overflow total / n_shards
        if size and size + nbytes[n] > total / n_shards and len(groups) < n_shards:
            groups, size = [*groups, []], 0
        groups[-1].append(n)
        size += nbytes[n]
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for n in sorted(group):
            header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [offset, offset + nbytes[n]]}
            offset += nbytes[n]
            weight_map[n] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(folder, file), "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for n in sorted(group):
                for start in range(0, nbytes[n] // 2, BLOCK):
                    f.write(block(n, start, min(start + BLOCK, nbytes[n] // 2), aligned))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=HIDDEN, intermediate_size=INTER,
                  num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                  torch_dtype="bfloat16", rms_norm_eps=1e-5, tie_word_embeddings=False)
    for name, data in [(INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}), ("config.json", config)]:
        with open(os.path.join(folder, name), "w") as f:
            json.dump(data, f, indent=2)


def ensure_pair(workdir: str, size_gb: float) -> tuple[str, str, dict]:
    fixed, per_layer = model_bytes(0), model_bytes(1) - model_bytes(0)
    layers = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))  # each model about size_gb / 2
    info = {"layers": layers, "params": model_bytes(layers) // 2, "largest_mib": 2 * VOCAB * HIDDEN / 2**20,
            "shape": [HIDDEN, INTER, HEADS, KV_HEADS, VOCAB], "layout": 2}
    root = os.path.join(workdir, f"pair-{size_gb:g}gb")
    stamp = os.path.join(root, "pair.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == info:
        print(f"reusing the cached pair in {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.monotonic()
        write_checkpoint(os.path.join(root, "sft"), llama_shapes(layers), 2, False, layers)
        write_checkpoint(os.path.join(root, "aligned"), llama_shapes(layers), 5, True, layers)
        with open(stamp, "w") as f:
            json.dump(info, f)
        print(f"built the pair in {root} in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return os.path.join(root, "sft"), os.path.join(root, "aligned"), info


def in_memory(sft: str, aligned: str, alpha: float, out: str) -> None:
    """The authors' way: both models whole in RAM, fp32 math per tensor in place, save_file sharded, then sync."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file, save_file

    def load(folder):
        return {k: v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
                for k, v in load_file(os.path.join(folder, f)).items()}

    s, a = load(sft), load(aligned)
    for k in a:
        a[k] = (a[k].float() + alpha * (a[k].float() - s[k].float())).to(a[k].dtype)
    split = split_torch_state_dict_into_shards(a, max_shard_size="5GB")
    os.makedirs(out)
    for file, names in split.filename_to_tensors.items():
        save_file({n: a[n] for n in names}, os.path.join(out, file), metadata={"format": "pt"})
    if split.is_sharded:
        with open(os.path.join(out, INDEX), "w") as f:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2)
    shutil.copy(os.path.join(aligned, "config.json"), out)
    os.sync()  # as `cp -r` is followed by `sync` and expo fsyncs: the bytes are on disk when the clock stops


def measure(cmd: list[str], log: str) -> None:
    """Wrapper process: run cmd, poll the summed RSS of its process tree, print one JSON line."""
    import psutil

    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        rss = 0
        with contextlib.suppress(psutil.Error):
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
        peak = max(peak, rss)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"rc": proc.returncode, "wall": wall, "tree_peak": peak, "ru_maxrss": ru.ru_maxrss * 1024,
                      "cpu": ru.ru_utime + ru.ru_stime}))


def warm_up(folders: list[str]) -> None:
    """Read every file of `folders` into the page cache."""
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass


def run_one(cmd: list[str], out: str, workdir: str, cache: str = "cold", inputs: tuple[str, ...] = ()) -> dict:
    os.sync()
    cold = False
    if cache == "warm":
        warm_up(list(inputs))
    else:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                cold = bool(f.write("3\n"))
        except OSError:
            pass
    load, log = os.getloadavg()[0], os.path.join(workdir, "last.log")
    res = subprocess.run([sys.executable, __file__, "_measure", log, "--", *cmd], capture_output=True, text=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        sys.exit(f"{cmd[0]} failed (rc {r['rc']}):\n{open(log).read()[-3000:]}")
    r["written"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    own = re.search(r"GB in ([0-9.]+) s", open(log).read())  # expo's own timer, which starts after its imports
    return r | {"cold": cold, "cache": cache if cold or cache == "warm" else "WARM (could not drop)", "load": load,
                "own": float(own[1]) if own else None}


def spot_check(sft: str, aligned: str, out: str) -> float:
    """Worst distance, in bf16 steps, of some expo output rows from the float64 formula rounded once."""
    from safetensors import safe_open

    from expo_engine.kernels import reference, steps_off

    def rows(folder, name, start, stop):
        index = os.path.join(folder, INDEX)
        file = json.load(open(index))["weight_map"][name] if os.path.exists(index) else "model.safetensors"
        with safe_open(os.path.join(folder, file), "pt") as f:
            return f.get_slice(name)[start:stop]

    edge = (64 << 20) // (2 * HIDDEN)  # the first row of a tensor's second 64 MiB chunk
    checks = [("model.norm.weight", 0, HIDDEN), ("model.layers.0.self_attn.q_proj.weight", 0, HIDDEN),
              ("lm_head.weight", edge - 64, edge + 64), ("model.embed_tokens.weight", VOCAB - 4096, VOCAB)]
    worst = 0.0
    for name, start, stop in checks:
        o = rows(out, name, start, stop)
        ref = reference(rows(sft, name, start, stop), rows(aligned, name, start, stop), ALPHA, o.dtype)
        worst = max(worst, steps_off(o, ref).max().item())
    return worst


def table(results: dict[str, list[dict]]) -> str:
    cp, fmt = statistics.median(r["wall"] for r in results["cp -r + sync"]), ", ".join
    rows = ["| method | runs | wall s, median (all) | own timer s, median | GB written | GB/s | wall / cp "
            "| CPU s (user + sys), median | peak tree RSS MiB, max (all) | ru_maxrss MiB, max | load avg before |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in results.items():
        wall, gb = statistics.median(r["wall"] for r in rs), rs[0]["written"] / 1e9
        peaks = [r["tree_peak"] / 2**20 for r in rs]
        walls, loads = fmt(f"{r['wall']:.1f}" for r in rs), fmt(f"{r['load']:.1f}" for r in rs)
        own = [r["own"] for r in rs if r.get("own")]
        own = f"{statistics.median(own):.1f}" if own else "-"
        rows.append(f"| {name} | {len(rs)} | {wall:.1f} ({walls}) | {own} | {gb:.2f} | {gb / wall:.2f} | "
                    f"{wall / cp:.2f} | {statistics.median(r.get('cpu', 0.0) for r in rs):.1f} | "
                    f"{max(peaks):.0f} ({fmt(f'{p:.0f}' for p in peaks)}) | "
                    f"{max(r['ru_maxrss'] for r in rs) / 2**20:.0f} | {loads} |")
    return "\n".join(rows)


def engine_revision(tree: str | None = None) -> str:
    git = ["git", "-C", tree or os.path.dirname(os.path.abspath(__file__))]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "-uno", "--", "expo_engine" if tree else "../expo_engine"],
                           capture_output=True,
                           text=True)
    return f"git {head or '?'}" + (" with uncommitted changes in expo_engine/" if dirty.stdout.strip() else "")


def main() -> None:
    if sys.argv[1:2] == ["_measure"]:
        return measure(sys.argv[4:], sys.argv[2])
    if sys.argv[1:2] == ["_inmemory"]:
        return in_memory(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=4.0, help="SFT + aligned size in GB (default %(default)g)")
    p.add_argument("--workdir", required=True, help="scratch folder outside the repo; the pair is cached here")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of expo and of cp, interleaved, shuffled each round (default %(default)s)")
    p.add_argument("--skip-in-memory", action="store_true", help="skip the in-memory baseline (needs ~3x RAM)")
    p.add_argument("--markdown", metavar="FILE", help="append the table, command, date and machine to FILE")
    p.add_argument("--delete-pair", action="store_true", help="remove the cached pair at the end")
    p.add_argument("--compare", metavar="TREE", default="",
                   help="also run `python -m expo_engine.cli extrapolate` from another checkout TREE (with its "
                        "compiled kernel built in place), interleaved with the rest: before/after in one series")
    p.add_argument("--cache", choices=("cold", "warm", "both"), default="cold",
                   help="page cache before each run: dropped, holding both inputs, or both regimes interleaved")
    p.add_argument("--ray-workers", metavar="N[,N...]", default="",
                   help="also run `expo extrapolate --executor ray --workers N` for each N (Ray started per run)")
    args = p.parse_args()
    os.makedirs(workdir := os.path.abspath(args.workdir), exist_ok=True)
    sft, aligned, info = ensure_pair(workdir, args.size_gb)
    out, expo = os.path.join(workdir, "out"), os.path.join(os.path.dirname(sys.executable), "expo")
    cmds = {
        "expo extrapolate": [expo if os.path.exists(expo) else "expo", "extrapolate", "--sft", sft, "--aligned",
                             aligned, "--alpha", str(ALPHA), "--out", out],
        "expo extrapolate --no-stats": [expo if os.path.exists(expo) else "expo", "extrapolate", "--sft", sft,
                                        "--aligned", aligned, "--alpha", str(ALPHA), "--out", out, "--no-stats"],
        "cp -r + sync": ["sh", "-c", 'cp -r "$0" "$1" && sync', aligned, out],
        "in-memory (load_file, fp32, save_file)": [sys.executable, __file__, "_inmemory", sft, aligned,
                                                    str(ALPHA), out],
    }
    # What expo must do at least: read both models (cat the SFT files while cp reads the aligned ones) and write one.
    cmds["read both + cp -r + sync"] = ["sh", "-c", 'cat "$0"/* > /dev/null & cp -r "$1" "$2"; wait; sync', sft,
                                        aligned, out]
    if args.compare:
        tree = os.path.abspath(args.compare)
        cmds[f"expo extrapolate ({engine_revision(tree)})"] = [
            "sh", "-c", 'cd "$0" && p="$1" && shift && exec "$p" -m expo_engine.cli "$@"', tree, sys.executable, *cmds[
                "expo extrapolate"][1:]]
    for n in [int(w) for w in args.ray_workers.split(",") if w]:
        cmds[f"expo extrapolate --executor ray --workers {n}"] = [*cmds["expo extrapolate"], "--executor", "ray",
                                                                  "--workers", str(n)]
    names = list(cmds)
    timed = names[:3] + names[4:]  # interleaved; the in-memory baseline (names[3]) runs once at the end
    # What ran just before (a 2-4 GB write, sync and delete) slows the disk for a while, and a fixed order gave
    # one method that handicap in every round: each round runs in its own shuffled order (seeded: repeatable).
    modes = ["cold", "warm"] if args.cache == "both" else [args.cache]
    jobs = [(n, m) for n in timed for m in modes]
    rounds = [random.Random(r).sample(jobs, len(jobs)) for r in range(args.repeat)]
    tail = [] if args.skip_in_memory else [(names[3], m) for m in modes]
    by_mode = {m: {name: [] for name in names} for m in modes}
    worst = None
    for name, mode in [j for order in rounds for j in order] + tail:
        shutil.rmtree(out, ignore_errors=True)
        r = run_one(cmds[name], out, workdir, mode, (sft, aligned))
        if name == names[0] and worst is None:
            worst = spot_check(sft, aligned, out)
        by_mode[mode][name].append(r)
        print(f"{name} [{mode}]: {r['wall']:.1f} s, cpu {r['cpu']:.1f} s, tree peak {r['tree_peak'] / 2**20:.0f} "
              f"MiB, {r['cache']} cache", file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
    for mode in modes:
        report_mode(args, info, names, {k: v for k, v in by_mode[mode].items() if v}, worst, mode)
    if args.delete_pair:
        shutil.rmtree(os.path.dirname(sft))


def report_mode(args, info: dict, names: list[str], results: dict, worst, mode: str) -> None:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    own = [f"{r['own']:.1f}" for r in results.get(names[0], []) if r["own"]]
    own_ns = [f"{r['own']:.1f}" for r in results.get(names[1], []) if r["own"]]
    with_s, without = (statistics.median(r["wall"] for r in results[n]) for n in names[:2])
    floor = statistics.median(r["wall"] for r in results["read both + cp -r + sync"])
    report = "\n".join([
        f"### {args.size_gb:g} GB pair, {mode} cache ({info['params'] / 1e9:.2f} B params per model, "
        f"{info['layers']} layers, largest tensor {info['largest_mib']:.0f} MiB; SFT in 2 shards, aligned in 5)", "",
        f"- command: `python benchmarks/bench_extrapolate.py {' '.join(sys.argv[1:])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {os.cpu_count()} cores, {mem:.1f} GiB RAM, "
        f"{platform.platform()}; engine: {engine_revision()}",
        "- page cache: " + ("both inputs read into it before every run (warm)" if mode == "warm" else
                            "dropped before every run (cold)" if all(r["cold"] for v in results.values() for r in v)
                            else "COULD NOT be dropped (no permission): these are WARM-cache numbers"),
        f"- expo output vs the float64 formula rounded once (rows of 4 tensors, across a chunk edge): worst "
        f"{worst:g} bf16 step(s)" if worst is not None else "- expo output not checked",
        f"- expo's own timer (after its imports, to the published folder): {', '.join(own)} s; "
        f"with --no-stats: {', '.join(own_ns)} s",
        f"- cost of the fused statistics (median wall with / without): {with_s / without - 1:+.1%}",
        f"- expo / the read-both floor (median wall): {with_s / floor:.2f} with statistics, {without / floor:.2f} "
        "without", "",
        table(results), "",
    ])
    print(report)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
