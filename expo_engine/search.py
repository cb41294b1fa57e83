"""`expo search`: find the alpha that a reward signal likes best, without writing a checkpoint per alpha.

The inference model is loaded once from the aligned checkpoint. For each alpha the engine streams both checkpoints
into its weights in place (`weights`), generates on the prompts with fixed seeds (`generation`) and scores the
responses (`rewards`). alpha = 0 (the aligned model) is always evaluated first, as the baseline every other alpha
is compared with, pair by pair (same prompt, same sample, same random numbers).

Choosing the alphas (`next_alpha`, a pure function of the evaluations so far, so a resumed search makes the same
choices): a grid is evaluated as given; "auto" walks the coarse ladder COARSE (and outward while its top is the
best) to its end or its first degenerate alpha, whatever dips on the way, then narrows the bracket around the best
alpha by golden-section steps in log(alpha), within `budget` evaluations in all (the baseline included).

Degeneration (the paper: past the best alpha "sharp performance drops and abnormal response length increases"):
an alpha whose share of responses cut by max_new_tokens exceeds the baseline's by more than TRUNCATION_JUMP, whose
mean length exceeds LENGTH_JUMP times the baseline's, whose weights hold NaN/Inf, or whose logits were not finite,
is marked degenerate (with the reason) and is never chosen.

DIR holds `search.json` (rewritten after every evaluation: an interrupted search continues where it stopped when
the same command runs again), `responses.jsonl`, and at the end `search.csv`, `search.md` and `search.png`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from .adapters import is_adapter, open_adapter
from .backends import BACKENDS, open_backend
from .errors import NonFiniteError, OptionError, OutputError
from .generation import Response, Sampling
from .plan import check_alpha, make_plan, parse_alphas
from .prompts import Prompt, load_prompts
from .reading import file_sha256
from .rewards import DEFAULT_REWARD_TIMEOUT, Item, open_reward
from .sources import Checkpoint, open_checkpoint

COARSE = (0.3, 1.0, 3.0, 10.0)  # the auto search's first sweep, after the baseline alpha = 0
GOLDEN = (3 - math.sqrt(5)) / 2  # 0.382: the golden-section step into the larger side of the bracket
TRUNCATION_JUMP = 0.2  # degenerate: truncated share above the baseline's by more than this
LENGTH_JUMP = 2.0  # degenerate: mean length above this times the baseline's (and 8 tokens more)
MIN_ALPHA = 0.01  # the auto search does not refine below this: such an alpha is the aligned model to the eye
DEFAULT_BUDGET = 8
DEFAULT_HOLDOUT = 0.25  # the share of the prompts held out of the choice, to estimate its gain unbiased
SEARCH_NAME, RESPONSES_NAME = "search.json", "responses.jsonl"
# The weights update's chunk size: its buffers (up to 9 chunks in flight) sit beside the whole model, so smaller than
# extrapolate's 64 MiB; 8 MiB chunks still read at disk speed (the update is I/O-bound either way).
SEARCH_CHUNK_BYTES = 8 << 20


@dataclass
class Evaluation:
    alpha: float
    reward_mean: float
    reward_stderr: float
    win_rate_vs_aligned: float
    mean_length: float
    truncated_share: float
    degenerate: bool
    seconds: float
    degenerate_why: str = ""  # why it is degenerate ("" when it is not); older records lack it
    weights_seconds: float = 0.0  # where `seconds` went: streaming theta(alpha) into the weights,
    generate_seconds: float = 0.0  # generating (at tokens_per_second generated tokens a second),
    tokens_per_second: float = 0.0
    score_seconds: float = 0.0  # and scoring

    def record(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class HeldOut:
    """One alpha on the held-out prompts: its rewards and response lengths (prompt-major, samples within)."""

    rewards: list[float]
    lengths: list[int]


def split_prompts(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(indices that choose alpha, indices held out): a seeded draw of round(n * fraction) prompts, at least one,
    held out; none with fraction 0."""
    if not math.isfinite(fraction) or not 0 <= fraction < 1:
        raise OptionError(f"--holdout must be a fraction at least 0 and below 1, not {fraction:g}")
    if fraction == 0:
        return list(range(n)), []
    k = max(1, round(n * fraction))
    if n - k < 1:
        raise OptionError(f"--holdout {fraction:g} of {n} prompt(s) leaves none to choose alpha with; give more "
                          "prompts or --holdout 0")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[k:]), sorted(order[:k])


def holdout_summary(held: list[int], fraction: float, held_kept: dict[float, HeldOut], best: float,
                    rows: list | None = None) -> dict:
    """The held-out record: which prompts and alphas, and once alpha 0 and the chosen alpha are both evaluated on
    them, the paired improvement (mean of chosen - aligned per response) with its standard error, the win rate
    (ties count half) and the mean lengths."""
    out = {"fraction": fraction, "n_prompts": len(held), "prompt_indices": held,
           "evaluated_alphas": sorted(held_kept)} | ({"rows": rows} if rows is not None else {})
    if 0.0 not in held_kept or best not in held_kept:
        return out
    base, chosen = held_kept[0.0], held_kept[best]
    diffs = [c - b for c, b in zip(chosen.rewards, base.rewards, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    stderr = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else 0.0
    return out | {
        "alpha": best, "reward_mean": sum(chosen.rewards) / n, "baseline_reward_mean": sum(base.rewards) / n,
        "improvement": mean, "improvement_stderr": stderr,
        "win_rate_vs_aligned": sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs) / n,
        "mean_length": sum(chosen.lengths) / n, "baseline_mean_length": sum(base.lengths) / n}


def describe_holdout(h: dict) -> str:
    if h["alpha"] == 0:
        return (f"{h['n_prompts']} prompt(s) never used to choose alpha: the chosen alpha is 0 (the aligned model), "
                f"which scores {h['reward_mean']:.4g} on them; no extrapolation to estimate")
    return (f"{h['n_prompts']} prompt(s) never used to choose alpha: alpha {h['alpha']:g} scores "
            f"{h['reward_mean']:.4g} against {h['baseline_reward_mean']:.4g} at alpha 0, an improvement of "
            f"{h['improvement']:+.4g} +- {h['improvement_stderr']:.2g}; win rate {h['win_rate_vs_aligned']:.2f}, "
            f"mean length {h['mean_length']:.1f} against {h['baseline_mean_length']:.1f}")


def describe_evaluation(ev: Evaluation) -> str:
    return (f"reward {ev.reward_mean:.4g} +- {ev.reward_stderr:.2g}, win rate vs aligned {ev.win_rate_vs_aligned:.2f}, "
            f"mean length {ev.mean_length:.1f}, truncated {ev.truncated_share:.0%}"
            + (f", DEGENERATE ({ev.degenerate_why})" if ev.degenerate else "")
            + f"; weights {ev.weights_seconds:.1f} s, generated {ev.tokens_per_second:.0f} tokens/s in "
              f"{ev.generate_seconds:.1f} s, scored in {ev.score_seconds:.1f} s ({ev.seconds:.1f} s in all)")


def evaluate(alpha: float, rewards: list[float], responses: list[Response], baseline: list[float] | None,
             base: Evaluation | None, seconds: float, nonfinite_weights: str = "", weights_seconds: float = 0.0,
             generate_seconds: float = 0.0, tokens_per_second: float = 0.0, score_seconds: float = 0.0
             ) -> Evaluation:
    """The numbers of one alpha from its rewards and responses (flat, prompt-major, samples within), compared pair
    by pair with the baseline's rewards (ties count half) and, for degeneration, with the baseline's lengths.
    Non-finite weights (`nonfinite_weights` says which) or logits make any alpha degenerate, the baseline too:
    its responses were cut short by overflow, so its rewards say nothing of the model."""
    n = len(rewards)
    mean = sum(rewards) / n
    stderr = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1) / n) if n > 1 else 0.0
    base_rewards = baseline if baseline is not None else rewards
    wins = sum(1.0 if r > b else 0.5 if r == b else 0.0 for r, b in zip(rewards, base_rewards, strict=True)) / n
    length = sum(r.tokens for r in responses) / n
    truncated = sum(r.truncated for r in responses) / n
    why = []
    if nonfinite_weights:
        why.append(f"non-finite weights ({nonfinite_weights})")
    broken = sum(bool(getattr(r, "nonfinite", False)) for r in responses)
    if broken:
        why.append(f"non-finite logits in {broken} of {n} response(s)")
    if base is not None and truncated > base.truncated_share + TRUNCATION_JUMP:
        why.append(f"{truncated:.0%} of responses truncated, {base.truncated_share:.0%} at alpha 0")
    if base is not None and length > max(LENGTH_JUMP * base.mean_length, base.mean_length + 8):
        why.append(f"mean length {length:.1f} tokens, {base.mean_length:.1f} at alpha 0")
    return Evaluation(alpha, mean, stderr, wins, length, truncated, bool(why), seconds, "; ".join(why),
                      weights_seconds, generate_seconds, tokens_per_second, score_seconds)


def best_of(evals: dict[float, Evaluation]) -> Evaluation:
    """The best non-degenerate evaluation; the smaller alpha on a tie. (search() refuses a degenerate baseline, so
    there always is one.)"""
    ok = [e for e in evals.values() if not e.degenerate]
    return max(ok, key=lambda e: (e.reward_mean, -e.alpha))


def _score(e: Evaluation) -> float:
    return -math.inf if e.degenerate else e.reward_mean


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * max(abs(a), abs(b))


def ladder(evals: dict[float, Evaluation]) -> list[float]:
    """The coarse ladder as far as `evals` (alpha >= 0) have walked it, plus its next point (last in the list) when
    it goes on: COARSE, then x3 outward while its top is the best so far. It ends at its first degenerate point
    (degeneration grows with alpha: above it there is nothing to choose), never at a mere decline, which noise or
    a real dip (shorter responses at small alpha, longer and better ones after) can give."""
    points: list[float] = []
    for a in COARSE:
        points.append(a)
        if a not in evals:
            return points
        if evals[a].degenerate:
            return points
    while True:  # outward while the top is the best so far (or was, when the next point is already evaluated)
        further = round(points[-1] * 3, 6)
        if further not in evals and best_of(evals).alpha != points[-1]:
            return points
        points.append(further)
        if further not in evals or evals[further].degenerate:
            return points


def next_alpha(evals: dict[float, Evaluation], grid: tuple[float, ...] | None, budget: int) -> float | None:
    """The next alpha to evaluate, or None when the search is done. Deterministic in `evals`.

    auto: the baseline, the whole coarse ladder (`ladder`), then golden-section steps in log(alpha) around the best
    non-degenerate alpha, each 0.382 of the way into the wider side of its bracket (the evaluated neighbours; a
    degenerate neighbour bounds it too). Below the ladder's first point only when that point or alpha = 0 is the
    best: the optimum can then lie in (0, 0.3), and alpha = 0 counts as a decade below its neighbour."""
    if 0.0 not in evals:
        return 0.0
    if grid is not None:
        return next((a for a in grid if a not in evals), None)
    # a report may hold a grid's negative alphas (interpolation): the auto strategy walks alpha >= 0 only, and
    # only those count toward its budget
    evals = {a: e for a, e in evals.items() if a >= 0}
    if len(evals) >= budget:
        return None
    points = ladder(evals)
    if points[-1] not in evals:
        return points[-1]
    b = best_of(evals).alpha
    above = [a for a in evals if a > b]
    below = [a for a in evals if a < b]
    if b == 0.0:
        candidates = [GOLDEN * min(above)] if above else []
    else:
        sides = [min(above)] if above else []
        if below and (max(below) > 0 or b <= COARSE[0]):
            sides.append(max(below) or b / 10)  # alpha = 0 counts as a decade below
        # toward a degenerate neighbour above first: the reward rises to b and the best alpha is typically just
        # short of degeneration (the paper's "sharp drops" past it); else the wider side, and on a tie (the
        # ladder's geometric steps) the side of the better neighbour
        sides.sort(key=lambda far: (not (far > b and evals[far].degenerate), -round(abs(math.log(far / b)), 9),
                                    -_score(evals.get(far, evals[0.0]))))
        candidates = [b * (far / b) ** GOLDEN for far in sides]
    for c in (float(f"{c:.3g}") for c in candidates):
        if c >= MIN_ALPHA and not any(_same(c, a) for a in evals):
            return c
    return None  # the bracket is as narrow as alpha is worth telling apart


@dataclass(frozen=True)
class Settings:
    """What the evaluations depend on besides the inputs: a change of any of these starts the search afresh."""

    sampling: Sampling
    chat_template: bool
    backend: str
    device: str
    drop: tuple[str, ...] = ()
    holdout: float = 0.0
    drop_shared: bool = False

    def record(self) -> dict:
        return ({"sampling": dataclasses.asdict(self.sampling), "chat_template": self.chat_template,
                 "backend": self.backend, "device": self.device, "holdout": self.holdout}
                | ({"drop": list(self.drop)} if self.drop else {})
                | ({"drop_shared": True} if self.drop_shared else {}))


def _identity(ck: Checkpoint) -> dict:
    """What a search's results depend on in a checkpoint: its weight files (size and mtime: hashing them would
    read the whole model again) and the sha256 of every side file (config, generation_config, tokenizer, chat
    template), which are small and change without changing a size."""
    files = []
    for name in ck.files:
        st = os.stat(os.path.join(ck.path, name))
        files.append([name, st.st_size, st.st_mtime_ns])
    side = [[name, file_sha256(os.path.join(ck.path, name))] for name in ck.side_files]
    return {"path": ck.path, "files": files, "side_files": side}


def _folder_identity(folder: str) -> dict:
    """A LoRA adapter's folder: the sha256 of every file in it (an adapter is megabytes, not gigabytes)."""
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    return {"path": folder, "adapter_files": [[n, file_sha256(os.path.join(folder, n))] for n in names]}


def check_sampling(temperature: float, samples: int, max_new_tokens: int, batch_size: int) -> None:
    """One line for sampling options that cannot be honoured, before anything is loaded."""
    if max_new_tokens < 1 or samples < 1 or batch_size < 1:
        raise OptionError("--max-new-tokens, --samples and the batch size must be positive")
    if not math.isfinite(temperature) or temperature < 0:
        raise OptionError(f"--temperature must be 0 (greedy decoding) or a positive number, not {temperature:g}")
    if temperature == 0 and samples > 1:
        raise OptionError(f"--temperature 0 is greedy decoding: every sample of a prompt would be the same response, "
                          f"so --samples {samples} cannot be drawn; use --samples 1, or a temperature above 0")


def _check_apart(report: str, prompts: str, write_best: str | None) -> None:
    """The report folder holds neither the prompts nor --write-best's output, nor lies inside that output: each
    would be removed or replaced by the other."""
    def real(path: str) -> str:
        return os.path.realpath(os.path.abspath(os.path.expanduser(path)))

    rep = real(report)
    within = lambda path, folder: os.path.commonpath([path, folder]) == folder  # noqa: E731
    if os.path.exists(os.path.expanduser(prompts)) and within(real(prompts), rep):  # not a Hub dataset's org/name
        raise OptionError(f"--prompts {prompts} lies inside the --report folder {report}, which the search writes "
                          "and replaces files in; keep the prompts elsewhere")
    if write_best and (within(real(write_best), rep) or within(rep, real(write_best))):
        raise OptionError(f"--write-best {write_best} and --report {report} overlap: the model's folder would "
                          "replace the report or the report would land in the model; give two separate folders")


def check_report(report: str) -> str:
    """The report folder's absolute path; refuses a path that is a file, lies inside one, or cannot be made."""
    out = os.path.abspath(os.path.expanduser(report))
    probe = out
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == out else f"lies inside the file {probe}"
        raise OutputError(f"--report {report} {where}; give a folder for the search's report")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--report {report}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"--report {report}: cannot write there; choose another folder")
    return out


def search(sft: str, aligned: str, prompts: str, report: str, *, reward_model: str | None = None,
           reward_fn: str | None = None, reward_cmd: str | None = None, alpha="auto", budget: int = DEFAULT_BUDGET,
           max_new_tokens: int = 512, samples: int = 1, seed: int = 42, backend: str = "transformers",
           device: str = "auto", write_best: str | None = None, chat_template: bool = True,
           batch_size: int = 8, temperature: float = 0.7, chunk_bytes: int = SEARCH_CHUNK_BYTES,
           overwrite: bool = False, drop=(), reward_timeout: float | None = DEFAULT_REWARD_TIMEOUT,
           holdout: float = DEFAULT_HOLDOUT, drop_shared: bool = False, prompt_field: str | None = None,
           split: str | None = None, limit: int | None = None,
           on_progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate alphas with a reward signal and return the search record (what `DIR/search.json` holds):
    `{"evaluations": [...], "best": {...}, "inputs": {...}, "settings": {...}}`.

    `alpha`: "auto" (see the module docstring) or a grid (`0.1:0.5:0.1`, `0.1,0.3,1`, or a list of numbers); 0 is
    added as the baseline. `budget` caps the auto search's evaluations (the baseline included). Exactly one of
    `reward_model`, `reward_fn`, `reward_cmd` (a command may go `reward_timeout` seconds without printing its next
    score before it and its process group are killed).
    `write_best`: also write the best alpha's model there with `extrapolate` (its expo.json records the search's
    digest); checked before the first evaluation. `drop`: tensors left out, as `expo extrapolate --drop` does.
    `prompts`: a file, a `datasets` folder or a cached Hub dataset (`prompts.load_prompts`, with `prompt_field`,
    `split` and a seeded sample of `limit` rows). `holdout`: the share of the prompts (a seeded draw) never used
    to choose alpha; the chosen alpha and alpha = 0 are evaluated on them at the end (`record["holdout"]`: the
    paired improvement, its standard error, the win rate, the mean lengths). 0 turns it off. `on_progress`
    receives one line per step.

    Evaluations already in `report` for the same inputs and settings are reused. A report of a search with other
    inputs or settings is kept unless `overwrite`; with it, the new search runs beside the old report (in
    `report/.expo-search-new`) and replaces it only once complete.
    """
    say = on_progress or (lambda line: None)
    grid = _grid(alpha)
    if grid is None and budget < 2:
        raise OptionError("--budget must be at least 2 (the baseline alpha = 0 and one more)")
    check_sampling(temperature, samples, max_new_tokens, batch_size)
    if backend not in BACKENDS:
        raise OptionError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    drop = tuple(drop or ())
    _check_apart(report, prompts, write_best)
    report = check_report(report)
    prompt_list = load_prompts(prompts, field=prompt_field, split=split, limit=limit, seed=seed)
    select, held = split_prompts(len(prompt_list), holdout, seed)
    sft_ck = open_checkpoint(sft)
    adapter = open_adapter(aligned, sft_ck) if is_adapter(aligned) else None  # every check expo extrapolate makes
    if adapter and drop:
        raise OptionError(f"--drop with a LoRA adapter as --aligned ({aligned}): an adapter holds no extra tensors "
                          "to leave out (its saved modules are the SFT model's); drop --drop")
    aligned_ck = adapter.aligned if adapter else open_checkpoint(aligned)
    base_ck = adapter.sft if adapter else sft_ck  # the SFT side as planned: with a head written out when untied
    make_plan(base_ck, aligned_ck, 0.0, drop=drop, drop_shared=drop_shared)  # the pair's checks, before any loading
    if write_best:  # every check of the final write (output path, the plan), before hours of evaluations
        from .api import prepare

        prepare(sft, aligned, 0.0, write_best, overwrite=overwrite, drop=drop, drop_shared=drop_shared)
    from .gpu import resolve_device

    dev = resolve_device(device)
    sampling = Sampling(max_new_tokens=max_new_tokens, samples=samples, seed=seed, temperature=temperature,
                        batch_size=batch_size)
    settings = Settings(sampling, chat_template, backend, dev.type, drop, holdout, drop_shared)
    reward = open_reward(reward_model, reward_fn, reward_cmd, dev, timeout=reward_timeout)
    reward_id = reward.identity()
    if reward_cmd and not reward_id["files"]:
        say("note: the reward command names no file that exists here, so the resume key cannot see an edit to the "
            "script it runs; after editing one, pass another --report (or --overwrite)")
    inputs = {"sft": _identity(sft_ck), "aligned": _folder_identity(adapter.path) if adapter else _identity(aligned_ck),
              "prompts": os.path.abspath(prompts) if os.path.exists(prompts) else prompts,
              "prompt_field": prompt_field, "split": split, "limit": limit,
              # the prompts as read (texts and turns): what the evaluations depend on, whatever they were read from
              "prompts_sha256": hashlib.sha256(json.dumps([[p.text, p.messages] for p in prompt_list],
                                                          sort_keys=True).encode()).hexdigest(),
              "n_prompts": len(prompt_list), "reward": reward_id}
    # where the prompts came from is recorded, but the key holds them as read: the same prompts from another file
    # (or another --limit that picks the same rows) are the same search
    keyed = {k: v for k, v in inputs.items() if k not in ("prompts", "prompt_field", "split", "limit")}
    key = hashlib.sha256(json.dumps([keyed, settings.record()], sort_keys=True).encode()).hexdigest()

    with _locked(report):
        work = _work_folder(report, key, overwrite, say, {"inputs": keyed, "settings": settings.record()})
        evals, kept, held_kept = _resume(work, key)
        if work != report:
            say(f"the search in {report} was for other inputs or settings (--overwrite): this one runs in {work} "
                "and replaces it once complete")
        if evals:
            say(f"resuming: {len(evals)} evaluation(s) already in {work} for these inputs and settings")
        before = _recorded_grid(work)  # an earlier search's grid (the key leaves alpha and budget out)
        earlier = sorted(a for a in evals if a and (a not in grid if grid is not None else before is not None))
        if earlier:
            say(f"also using the evaluation(s) of alpha {', '.join(f'{a:g}' for a in earlier)} from an earlier "
                "search into this report" + (", outside this grid" if grid is not None else
                                             "'s grid, which count toward --budget")
                + ": the best is chosen among all")
        model = open_backend(backend, base_ck, aligned_ck, dev, chunk_bytes, drop=drop, adapter=adapter,
                             drop_shared=drop_shared)
        say(f"loaded {aligned_ck.source} with {backend} on {dev} in {model.load_seconds:.1f} s; "
            f"{len(select)} prompt(s) x {samples} sample(s) to choose alpha"
            + (f", {len(held)} held out" if held else "") + f"; reward: {reward.describe}")
        texts = [model.render(None if p.messages else p.text, p.messages, chat_template) for p in prompt_list]
        model.check_lengths(texts, max_new_tokens)
        applied = model.generation_record(sampling)

        def run(a: float, indices: list[int], label: str) -> tuple[list[list[Response]], list[float], dict]:
            """Generate on the prompts `indices` with theta(a) and score: responses, rewards, timings."""
            started = time.monotonic()
            bad = model.load_weights(a) or {}
            t_gen = time.monotonic()
            say(f"{label}: weights in place ({t_gen - started:.1f} s); generating {len(indices)} prompt(s) x "
                f"{samples}")
            responses = model.generate([texts[i] for i in indices], sampling,
                                       on_batch=_throttled(say, label, len(indices), t_gen))
            t_score = time.monotonic()
            items = [Item(prompt_list[i].text, prompt_list[i].messages, r.text)
                     for i, rs in zip(indices, responses, strict=True) for r in rs]
            rewards = reward.score(items, on_progress=lambda line: say(f"{label}: {line}"))
            done = time.monotonic()
            tokens = sum(r.tokens for rs in responses for r in rs)
            timing = {"seconds": done - started, "weights_seconds": t_gen - started,
                      "generate_seconds": t_score - t_gen, "tokens_per_second": tokens / max(t_score - t_gen, 1e-9),
                      "score_seconds": done - t_score, "nonfinite_weights": _listing_counts(bad)}
            return responses, rewards, timing

        def current() -> dict:
            return _record(evals, inputs, settings, key, grid, budget, applied, held, held_kept, earlier,
                           [prompt_list[i].row for i in held])

        while (a := next_alpha(evals, grid, budget)) is not None:
            label = f"[{len(evals) + 1}] alpha {a:g}"
            responses, rewards, timing = run(a, select, label)
            ev = evaluate(a, rewards, [r for rs in responses for r in rs], kept.get(0.0, rewards) if a else None,
                          evals.get(0.0), **timing)
            if a == 0.0 and ev.degenerate:
                raise NonFiniteError(f"the aligned model itself (alpha 0) is unusable as the baseline: "
                                     f"{ev.degenerate_why}; search needs an aligned model that generates")
            evals[a], kept[a] = ev, rewards
            _append_responses(work, a, prompt_list, select, responses, rewards, "select")
            record = current()
            _write_json(os.path.join(work, SEARCH_NAME), record)
            say(f"{label}: {describe_evaluation(ev)}")
        best = best_of(evals).alpha
        for a in sorted({0.0, best}) if held else ():
            if a in held_kept:
                continue
            responses, rewards, timing = run(a, held, f"[held out] alpha {a:g}")
            held_kept[a] = HeldOut(rewards, [r.tokens for rs in responses for r in rs])
            _append_responses(work, a, prompt_list, held, responses, rewards, "holdout")
            record = current()
            _write_json(os.path.join(work, SEARCH_NAME), record)
        record = current() | {"complete": True}
        _write_json(os.path.join(work, SEARCH_NAME), record)
        model = reward = None  # the model's memory goes back before the plot (matplotlib) and --write-best need theirs
        write_reports(work, record)
        if work != report:
            _publish(work, report)
    if write_best:
        from .api import extrapolate

        digest = file_sha256(os.path.join(report, SEARCH_NAME))
        summary = extrapolate(sft, aligned, record["best"]["alpha"], write_best, overwrite=overwrite, drop=drop,
                              drop_shared=drop_shared,
                              provenance={"search": {"report": os.path.join(report, SEARCH_NAME), "sha256": digest,
                                                     "best": record["best"]}})
        record["written"] = {"out": summary.out, "alpha": summary.alpha}
    return record


def _listing_counts(counts: dict[str, int]) -> str:
    """{tensor: NaN/Inf count} as 'N element(s) in T tensor(s): a (n), b (m), ...' ('' when empty)."""
    if not counts:
        return ""
    shown = ", ".join(f"{name} ({n})" for name, n in list(counts.items())[:3])
    more = f" and {len(counts) - 3} more" if len(counts) > 3 else ""
    return f"{sum(counts.values())} NaN/Inf element(s) in {len(counts)} tensor(s): {shown}{more}"


def _throttled(say: Callable[[str], None], label: str, total: int, started: float,
               every: float = 10.0) -> Callable[[int], None]:
    """Generation progress for `say`: at most one line per `every` seconds, with the rate and an ETA."""
    last = [started]

    def on_batch(done: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] >= every:
            last[0] = now
            rate = done / (now - started)
            say(f"{label}: generated {done}/{total} prompt(s), {rate:.2g} prompt(s)/s, ETA "
                f"{(total - done) / rate:.0f} s")

    return on_batch


def _grid(alpha) -> tuple[float, ...] | None:
    if isinstance(alpha, str):
        if alpha.strip().lower() == "auto":
            return None
        values = parse_alphas(alpha)
    elif isinstance(alpha, (int, float)):
        values = (check_alpha(alpha),)
    else:
        values = tuple(check_alpha(a) for a in alpha)
    return (0.0, *sorted({a for a in values if a != 0}))


def _record(evals: dict[float, Evaluation], inputs: dict, settings: Settings, key: str, grid, budget: int,
            applied: dict, held: list[int], held_kept: dict[float, HeldOut], earlier: list[float],
            rows: list | None = None) -> dict:
    best = best_of(evals)
    return ({"holdout": holdout_summary(held, settings.holdout, held_kept, best.alpha, rows)} if held else {}) | (
        {"alphas_from_earlier_searches": earlier} if earlier else {}) | {
        "evaluations": [evals[a].record() for a in sorted(evals)],
        "best": best.record(),
        "inputs": inputs,
        "settings": settings.record() | {"alpha": "auto" if grid is None else list(grid), "budget": budget,
                                         "generation": applied,
                                         "degenerate_if": {"truncated_share_above_baseline_by": TRUNCATION_JUMP,
                                                           "mean_length_above_baseline_times": LENGTH_JUMP}},
        "key": key,
    }


@contextlib.contextmanager
def _locked(report: str):
    fd = os.open(os.path.join(report, ".expo-search.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{report} is being written by another expo search; wait for it or choose another "
                              "--report folder") from None
        yield
    finally:
        os.close(fd)


NEW_FOLDER = ".expo-search-new"  # where a search replacing another's report runs until it is complete


def _key_of(folder: str) -> str | None:
    """The key of the search recorded in `folder`/search.json; None without a readable record."""
    try:
        with open(os.path.join(folder, SEARCH_NAME)) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    return old.get("key") if isinstance(old, dict) else None


def _work_folder(report: str, key: str, overwrite: bool, say: Callable[[str], None], now: dict) -> str:
    """Where this search writes: `report` itself when it holds no other search (or this one's, to resume); else,
    with `overwrite`, the folder beside the old report that replaces it at the end. Refuses without `overwrite`.
    A complete replacement that stopped while moving its files is finished first, whatever this search is."""
    work = os.path.join(report, NEW_FOLDER)
    if _key_of(work) is not None and _complete(work) and not os.path.exists(os.path.join(work, RESPONSES_NAME)):
        _publish(work, report)
    old = _key_of(report)
    if old is None or old == key:
        if old is None:
            _remove_stray_responses(report)
        if _key_of(work) not in (None, key):
            say(f"an unfinished search with other settings in {work} is kept: the command that started it resumes "
                "it (with --overwrite)")
        return report
    if not overwrite:
        raise OutputError(f"--report {report} holds a search with other inputs or settings ({_differences(report, now)}"
                          "); pass --overwrite to replace it (it is kept until the new search is complete), or "
                          "choose another --report folder")
    if _key_of(work) not in (None, key):
        _remove_tree(work)
    os.makedirs(work, exist_ok=True)
    return work


def _differences(report: str, now: dict) -> str:
    """What differs between the search recorded in `report` and this one, by name (its inputs and settings)."""
    try:
        with open(os.path.join(report, SEARCH_NAME)) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return "search.json's key differs"
    names = []
    for part in ("inputs", "settings"):
        was, new = old.get(part) or {}, now[part]
        names += [f"{part}.{k}" for k in sorted(set(was) | set(new))
                  if k not in ("prompts", "prompt_field", "split", "limit", "generation", "alpha", "budget",
                               "degenerate_if") and was.get(k) != new.get(k)]
    return "differing: " + ", ".join(names) if names else "search.json's key differs"


RESPONSE_KEYS = {"alpha", "prompt_index", "sample", "score", "tokens", "truncated"}


def _remove_stray_responses(report: str) -> None:
    """A responses.jsonl without a search.json: the first responses of a search killed before it recorded them
    (removed), or a file that is not this tool's (refused, kept)."""
    path = os.path.join(report, RESPONSES_NAME)
    try:
        with open(path) as f:
            first = f.readline()
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError):
        first = ""
    try:
        ours = not first.strip() or RESPONSE_KEYS <= set(json.loads(first))
    except (ValueError, TypeError):
        ours = False
    if not ours:
        raise OutputError(f"--report {report} holds a {RESPONSES_NAME} that expo search did not write (and no "
                          f"{SEARCH_NAME}); move it away or choose another --report folder")
    os.unlink(path)


def _recorded_grid(folder: str) -> list | None:
    """The grid of the search recorded in `folder` (None for an auto search, or no record)."""
    try:
        with open(os.path.join(folder, SEARCH_NAME)) as f:
            grid = json.load(f).get("settings", {}).get("alpha")
    except (OSError, ValueError, AttributeError):
        return None
    return grid if isinstance(grid, list) else None


def _complete(folder: str) -> bool:
    with open(os.path.join(folder, SEARCH_NAME)) as f:
        return json.load(f).get("complete") is True


def _remove_tree(folder: str) -> None:
    import shutil

    shutil.rmtree(folder)


def _publish(work: str, report: str) -> None:
    """Move a complete replacement's files over the old report's, responses.jsonl first and search.json last. A
    search stopped in between leaves the rest in `work`, and the next search into `report` moves it
    (`_work_folder`): once responses.jsonl has gone, every file missing from `work` has been moved."""
    if os.path.exists(os.path.join(work, RESPONSES_NAME)):  # not begun: an old plot this search has none of goes
        for name in ("search.png",):
            if not os.path.exists(os.path.join(work, name)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(report, name))
    for name in (RESPONSES_NAME, "search.csv", "search.md", "search.png", SEARCH_NAME):
        src = os.path.join(work, name)
        if os.path.exists(src):
            os.replace(src, os.path.join(report, name))
    _remove_tree(work)


def _resume(work: str, key: str) -> tuple[dict[float, Evaluation], dict[float, list[float]], dict[float, HeldOut]]:
    """The evaluations of an earlier search into `work` with the same key, their rewards and the held-out
    evaluations (both from responses.jsonl); responses of an alpha that search.json does not list (cut off by a
    kill) are dropped."""
    if _key_of(work) != key:
        return {}, {}, {}
    with open(os.path.join(work, SEARCH_NAME)) as f:
        old = json.load(f)
    evals = {float(e["alpha"]): Evaluation(**e) for e in old.get("evaluations", [])}
    listed = {"select": set(evals), "holdout": {float(a) for a in (old.get("holdout") or {}).get("evaluated_alphas",
                                                                                                   [])}}
    found: dict[tuple[str, float], list[dict]] = {}
    with contextlib.suppress(FileNotFoundError), open(os.path.join(work, RESPONSES_NAME)) as f:
        for line in f:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                rec = json.loads(line)
                split, a = rec.get("split", "select"), float(rec["alpha"])
                if a in listed.get(split, ()):
                    found.setdefault((split, a), []).append(rec)
    evals = {a: e for a, e in evals.items() if ("select", a) in found}  # rewards lost: evaluate again
    kept = {a: [r["score"] for r in found[("select", a)]] for a in evals}
    held = {a: HeldOut([r["score"] for r in found[("holdout", a)]], [r["tokens"] for r in found[("holdout", a)]])
            for a in listed["holdout"] if ("holdout", a) in found}
    tmp = os.path.join(work, RESPONSES_NAME + ".tmp")
    with open(tmp, "w") as f:
        for (split, a), recs in found.items():
            if (split == "select" and a in evals) or (split == "holdout" and a in held):
                f.writelines(json.dumps(r) + "\n" for r in recs)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(work, RESPONSES_NAME))
    return evals, kept, held


def _append_responses(report: str, alpha: float, prompts: list[Prompt], indices: list[int],
                      responses: list[list[Response]], rewards: list[float], split: str) -> None:
    scores = iter(rewards)
    with open(os.path.join(report, RESPONSES_NAME), "a") as f:
        for k, rs in zip(indices, responses, strict=True):
            for j, r in enumerate(rs):
                f.write(json.dumps({"alpha": alpha, "split": split, "prompt_index": k, "row": prompts[k].row,
                                    "sample": j,
                                    "prompt": prompts[k].text, "response": r.text, "score": next(scores),
                                    "tokens": r.tokens, "truncated": r.truncated,
                                    "nonfinite": r.nonfinite}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


COLUMNS = ("alpha", "reward_mean", "reward_stderr", "win_rate_vs_aligned", "mean_length", "truncated_share",
           "degenerate", "degenerate_why", "seconds", "weights_seconds", "generate_seconds", "tokens_per_second",
           "score_seconds")


def format_table(record: dict) -> str:
    """The evaluations as a text table, the best alpha marked, as `expo search` prints it."""
    best = record["best"]["alpha"]
    rows = [("alpha", "reward", "+-", "win vs aligned", "mean length", "truncated", "", "seconds")]
    for e in record["evaluations"]:
        rows.append((f"{e['alpha']:g}", f"{e['reward_mean']:.4g}", f"{e['reward_stderr']:.2g}",
                     f"{e['win_rate_vs_aligned']:.2f}", f"{e['mean_length']:.1f}", f"{e['truncated_share']:.0%}",
                     "degenerate" if e["degenerate"] else ("<- best" if e["alpha"] == best else ""),
                     f"{e['seconds']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    cells = lambda r: (c.ljust(w) if i == 6 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    return "\n".join("  ".join(cells(r)).rstrip() for r in rows)


def write_reports(report: str, record: dict) -> list[str]:
    """search.csv, search.md and (when matplotlib is installed) search.png beside search.json."""
    written = []
    with open(os.path.join(report, "search.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for e in record["evaluations"]:
            w.writerow([e[c] for c in COLUMNS])
    written.append("search.csv")
    best = record["best"]
    md = ["# expo search", "", f"Best alpha: **{best['alpha']:g}** (reward {best['reward_mean']:.4g} ± "
          f"{best['reward_stderr']:.2g}, win rate vs the aligned model {best['win_rate_vs_aligned']:.2f}) on the "
          "prompts that chose it", ""]
    if "improvement" in record.get("holdout", {}):
        md += [f"Held out: {describe_holdout(record['holdout'])}.", ""]
    md += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for e in record["evaluations"]:
        md.append("| " + " | ".join(f"{e[c]:.4g}" if isinstance(e[c], float) else str(e[c]) for c in COLUMNS) + " |")
    with open(os.path.join(report, "search.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    written.append("search.md")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    evs = record["evaluations"]
    xs = [e["alpha"] for e in evs]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(xs, [e["reward_mean"] for e in evs], yerr=[e["reward_stderr"] for e in evs], marker="o",
                capsize=3, label="reward")
    bad = [e for e in evs if e["degenerate"]]
    if bad:
        ax.scatter([e["alpha"] for e in bad], [e["reward_mean"] for e in bad], color="red", zorder=3,
                   label="degenerate")
    ax.axvline(best["alpha"], color="green", linestyle="--", label=f"best alpha {best['alpha']:g}")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("alpha")
    ax.set_ylabel("reward (mean ± stderr)")
    twin = ax.twinx()
    twin.plot(xs, [e["mean_length"] for e in evs], color="gray", marker="x", linestyle=":", label="mean length")
    twin.set_ylabel("mean response length (tokens)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(report, "search.png"), dpi=100)
    plt.close(fig)
    written.append("search.png")
    return written
