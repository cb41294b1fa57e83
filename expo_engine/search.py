"""`expo search`: find the alpha that a reward signal likes best, without writing a checkpoint per alpha.

The inference model is loaded once from the aligned checkpoint. For each alpha the engine streams both checkpoints
into its weights in place (`weights`), generates on the prompts with fixed seeds (`generation`) and scores the
responses (`rewards`). alpha = 0 (the aligned model) is always evaluated first, as the baseline every other alpha
is compared with, pair by pair (same prompt, same sample, same random numbers).

Choosing the alphas (`next_alpha`, a pure function of the evaluations so far, so a resumed search makes the same
choices): a grid is evaluated as given; "auto" walks the coarse geometric sweep COARSE upward until the reward
falls (or a response degenerates), then narrows the bracket around the best alpha by golden-section steps in
log(alpha), within `budget` evaluations in all (the baseline included).

Degeneration (the paper: past the best alpha "sharp performance drops and abnormal response length increases"):
an alpha whose share of responses cut by max_new_tokens exceeds the baseline's by more than TRUNCATION_JUMP, or
whose mean length exceeds LENGTH_JUMP times the baseline's, is marked degenerate and is never chosen.

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
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import OptionError, OutputError
from .generation import BACKENDS, Response, Sampling, open_backend
from .plan import check_alpha, parse_alphas
from .rewards import Item, open_reward
from .sources import Checkpoint, open_checkpoint

COARSE = (0.3, 1.0, 3.0, 10.0)  # the auto search's first sweep, after the baseline alpha = 0
GOLDEN = (3 - math.sqrt(5)) / 2  # 0.382: the golden-section step into the larger side of the bracket
TRUNCATION_JUMP = 0.2  # degenerate: truncated share above the baseline's by more than this
LENGTH_JUMP = 2.0  # degenerate: mean length above this times the baseline's (and 8 tokens more)
MIN_ALPHA = 0.01  # the auto search does not refine below this: such an alpha is the aligned model to the eye
DEFAULT_BUDGET = 8
SEARCH_NAME, RESPONSES_NAME = "search.json", "responses.jsonl"
# The weights update's chunk size: its buffers (up to 9 chunks in flight) sit beside the whole model, so smaller than
# extrapolate's 64 MiB; 8 MiB chunks still read at disk speed (the update is I/O-bound either way).
SEARCH_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class Prompt:
    text: str  # the prompt, or a chat prompt's last user turn (what --reward-fn and --reward-cmd get)
    messages: list | None  # the turns of a chat prompt


def load_prompts(path: str) -> list[Prompt]:
    """JSONL with `prompt` (a string) or `messages` (a chat list) per line, or a text file of one prompt a line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"--prompts {path}: cannot read it ({e})") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise OptionError(f"--prompts {path}: holds no prompt")
    if not (path.endswith(".jsonl") or lines[0].lstrip().startswith("{")):
        return [Prompt(line, None) for line in lines]
    prompts, bad = [], []
    for k, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad.append(k)
            continue
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            prompts.append(Prompt(rec["prompt"], None))
        elif (isinstance(rec, dict) and isinstance(rec.get("messages"), list) and rec["messages"]
              and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in rec["messages"])):
            users = [m["content"] for m in rec["messages"] if m.get("role") == "user"]
            prompts.append(Prompt(users[-1] if users else rec["messages"][-1]["content"], rec["messages"]))
        else:
            bad.append(k)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise OptionError(f"--prompts {path}: line(s) {shown} are not JSON objects with a string `prompt` or a "
                          "`messages` list of {\"role\", \"content\"} turns")
    return prompts


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

    def record(self) -> dict:
        return dataclasses.asdict(self)


def evaluate(alpha: float, rewards: list[float], responses: list[Response], baseline: list[float] | None,
             base: Evaluation | None, seconds: float) -> Evaluation:
    """The numbers of one alpha from its rewards and responses (flat, prompt-major, samples within), compared pair
    by pair with the baseline's rewards (ties count half) and, for degeneration, with the baseline's lengths."""
    n = len(rewards)
    mean = sum(rewards) / n
    stderr = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1) / n) if n > 1 else 0.0
    base_rewards = baseline if baseline is not None else rewards
    wins = sum(1.0 if r > b else 0.5 if r == b else 0.0 for r, b in zip(rewards, base_rewards, strict=True)) / n
    length = sum(r.tokens for r in responses) / n
    truncated = sum(r.truncated for r in responses) / n
    degenerate = base is not None and (truncated > base.truncated_share + TRUNCATION_JUMP
                                       or length > max(LENGTH_JUMP * base.mean_length, base.mean_length + 8))
    return Evaluation(alpha, mean, stderr, wins, length, truncated, bool(degenerate), seconds)


def best_of(evals: dict[float, Evaluation]) -> Evaluation:
    """The best non-degenerate evaluation (the baseline never is degenerate); the smaller alpha on a tie."""
    ok = [e for e in evals.values() if not e.degenerate]
    return max(ok, key=lambda e: (e.reward_mean, -e.alpha))


def _score(e: Evaluation) -> float:
    return -math.inf if e.degenerate else e.reward_mean


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * max(abs(a), abs(b))


def next_alpha(evals: dict[float, Evaluation], grid: tuple[float, ...] | None, budget: int) -> float | None:
    """The next alpha to evaluate, or None when the search is done. Deterministic in `evals`."""
    if 0.0 not in evals:
        return 0.0
    if grid is not None:
        return next((a for a in grid if a not in evals), None)
    if len(evals) >= budget:
        return None
    # the coarse sweep, upward, until a point is worse than the best before it
    best = evals[0.0]
    for a in COARSE:
        if a not in evals:
            return a
        if _score(evals[a]) < _score(best):
            break
        best = evals[a]
    else:
        top = max(evals)  # still rising at the end of the sweep: go on outward
        if best_of(evals).alpha == top:
            return round(top * 3, 6)
    # a golden-section step into the larger side of the bracket around the best, in log(alpha); alpha = 0 counts
    # as a decade below the best
    b = best_of(evals).alpha
    above = [a for a in evals if a > b]
    if not above:
        return None
    hi = min(above)
    if b == 0.0:
        candidate = GOLDEN * hi
    else:
        lo = max(a for a in evals if a < b) or b / 10
        far = hi if math.log(hi / b) >= math.log(b / lo) else lo
        candidate = b * (far / b) ** GOLDEN
    candidate = float(f"{candidate:.3g}")
    if candidate < MIN_ALPHA or any(_same(candidate, a) for a in evals):
        return None  # the bracket is as narrow as alpha is worth telling apart
    return candidate


@dataclass(frozen=True)
class Settings:
    """What the evaluations depend on besides the inputs: a change of any of these starts the search afresh."""

    sampling: Sampling
    chat_template: bool
    backend: str
    device: str

    def record(self) -> dict:
        return {"sampling": dataclasses.asdict(self.sampling), "chat_template": self.chat_template,
                "backend": self.backend, "device": self.device}


def _identity(ck: Checkpoint) -> dict:
    files = []
    for name in ck.files:
        st = os.stat(os.path.join(ck.path, name))
        files.append([name, st.st_size, st.st_mtime_ns])
    return {"path": ck.path, "files": files}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def search(sft: str, aligned: str, prompts: str, report: str, *, reward_model: str | None = None,
           reward_fn: str | None = None, reward_cmd: str | None = None, alpha="auto", budget: int = DEFAULT_BUDGET,
           max_new_tokens: int = 512, samples: int = 1, seed: int = 42, backend: str = "transformers",
           device: str = "auto", write_best: str | None = None, chat_template: bool = True,
           batch_size: int = 8, temperature: float = 0.7, chunk_bytes: int = SEARCH_CHUNK_BYTES,
           on_progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate alphas with a reward signal and return the search record (what `DIR/search.json` holds):
    `{"evaluations": [...], "best": {...}, "inputs": {...}, "settings": {...}}`.

    `alpha`: "auto" (see the module docstring) or a grid (`0.1:0.5:0.1`, `0.1,0.3,1`, or a list of numbers); 0 is
    added as the baseline. `budget` caps the auto search's evaluations (the baseline included). Exactly one of
    `reward_model`, `reward_fn`, `reward_cmd`. `write_best`: also write the best alpha's model there with
    `extrapolate` (its expo.json records the search's digest). `on_progress` receives one line per step.
    Evaluations already in `report` for the same inputs and settings are reused.
    """
    say = on_progress or (lambda line: None)
    grid = _grid(alpha)
    if grid is None and budget < 2:
        raise OptionError("--budget must be at least 2 (the baseline alpha = 0 and one more)")
    if max_new_tokens < 1 or samples < 1 or batch_size < 1:
        raise OptionError("--max-new-tokens, --samples and the batch size must be positive")
    if backend not in BACKENDS:
        raise OptionError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    prompt_list = load_prompts(prompts)
    sft_ck, aligned_ck = open_checkpoint(sft), open_checkpoint(aligned)
    from .gpu import resolve_device

    dev = resolve_device(device)
    sampling = Sampling(max_new_tokens=max_new_tokens, samples=samples, seed=seed, temperature=temperature,
                        batch_size=batch_size)
    settings = Settings(sampling, chat_template, backend, dev.type)
    reward = open_reward(reward_model, reward_fn, reward_cmd, dev)
    reward_id = ({"model": _identity(open_checkpoint(reward_model))} if reward_model
                 else {"function": reward_fn} if reward_fn else {"command": reward_cmd})
    inputs = {"sft": _identity(sft_ck), "aligned": _identity(aligned_ck), "prompts": os.path.abspath(prompts),
              "prompts_sha256": _sha256(prompts), "n_prompts": len(prompt_list), "reward": reward_id}
    key = hashlib.sha256(json.dumps([inputs, settings.record()], sort_keys=True).encode()).hexdigest()

    os.makedirs(report, exist_ok=True)
    with _locked(report):
        evals, kept, note = _resume(report, key)
        if note:
            say(note)
        if evals:
            say(f"resuming: {len(evals)} evaluation(s) already in {report} for these inputs and settings")
        model = open_backend(backend, sft_ck, aligned_ck, dev, chunk_bytes)
        say(f"loaded {aligned_ck.source} with {backend} on {dev} in {model.load_seconds:.1f} s; "
            f"{len(prompt_list)} prompt(s) x {samples} sample(s), reward: {reward.describe}")
        texts = [model.render(None if p.messages else p.text, p.messages, chat_template) for p in prompt_list]
        items_of = lambda responses: [Item(p.text, p.messages, r.text)  # noqa: E731
                                      for p, rs in zip(prompt_list, responses, strict=True) for r in rs]
        record = {}
        while (a := next_alpha(evals, grid, budget)) is not None:
            started = time.monotonic()
            step = len(evals) + 1
            model.load_weights(a)
            t_gen = time.monotonic()
            say(f"[{step}] alpha {a:g}: weights in place ({t_gen - started:.1f} s); generating {len(texts)} "
                f"prompt(s) x {samples}")
            responses = model.generate(texts, sampling, on_batch=_throttled(say, step, a, len(texts), t_gen))
            t_score = time.monotonic()
            flat = [r for rs in responses for r in rs]
            rewards = reward.score(items_of(responses))
            base = evals.get(0.0)
            ev = evaluate(a, rewards, flat, kept.get(0.0, rewards) if a else None, base,
                          time.monotonic() - started)
            evals[a], kept[a] = ev, rewards
            _append_responses(report, a, prompt_list, responses, rewards, samples)
            record = _record(evals, inputs, settings, key, grid, budget)
            _write_json(os.path.join(report, SEARCH_NAME), record)
            say(f"[{step}] alpha {a:g}: reward {ev.reward_mean:.4g} +- {ev.reward_stderr:.2g}, win rate vs aligned "
                f"{ev.win_rate_vs_aligned:.2f}, mean length {ev.mean_length:.1f}, truncated "
                f"{ev.truncated_share:.0%}{', DEGENERATE' if ev.degenerate else ''}; generated "
                f"{sum(r.tokens for r in flat) / max(t_score - t_gen, 1e-9):.0f} tokens/s, scored in "
                f"{time.monotonic() - t_score:.1f} s ({ev.seconds:.1f} s in all)")
        record = record or _record(evals, inputs, settings, key, grid, budget)
        _write_json(os.path.join(report, SEARCH_NAME), record)
        del model, reward  # the model's memory goes back before the plot (matplotlib) and --write-best need theirs
        write_reports(report, record)
    if write_best:
        from .api import extrapolate

        digest = _sha256(os.path.join(report, SEARCH_NAME))
        summary = extrapolate(sft, aligned, record["best"]["alpha"], write_best, provenance={"search": {
            "report": os.path.abspath(os.path.join(report, SEARCH_NAME)), "sha256": digest,
            "best": record["best"]}})
        record["written"] = {"out": summary.out, "alpha": summary.alpha}
    return record


def _throttled(say: Callable[[str], None], step: int, alpha: float, total: int, started: float,
               every: float = 10.0) -> Callable[[int], None]:
    """Generation progress for `say`: at most one line per `every` seconds, with the rate and an ETA."""
    last = [started]

    def on_batch(done: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] >= every:
            last[0] = now
            rate = done / (now - started)
            say(f"[{step}] alpha {alpha:g}: generated {done}/{total} prompt(s), {rate:.2g} prompt(s)/s, ETA "
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


def _record(evals: dict[float, Evaluation], inputs: dict, settings: Settings, key: str, grid, budget: int) -> dict:
    best = best_of(evals)
    return {
        "evaluations": [evals[a].record() for a in sorted(evals)],
        "best": best.record(),
        "inputs": inputs,
        "settings": settings.record() | {"alpha": "auto" if grid is None else list(grid), "budget": budget,
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


def _resume(report: str, key: str) -> tuple[dict[float, Evaluation], dict[float, list[float]], str]:
    """The evaluations of an earlier search into `report` with the same key, and their rewards (from
    responses.jsonl); responses of an alpha that search.json does not list (cut off by a kill) are dropped."""
    path = os.path.join(report, SEARCH_NAME)
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or old.get("key") != key:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(report, RESPONSES_NAME))
        note = (f"starting afresh: the search in {report} was for other inputs or settings; its report is replaced"
                if isinstance(old, dict) else "")
        return {}, {}, note
    evals = {float(e["alpha"]): Evaluation(**e) for e in old.get("evaluations", [])}
    kept: dict[float, list[float]] = {}
    lines = []
    with contextlib.suppress(FileNotFoundError), open(os.path.join(report, RESPONSES_NAME)) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if float(rec["alpha"]) in evals:
                    kept.setdefault(float(rec["alpha"]), []).append(rec["score"])
                    lines.append(line)
    if set(kept) != set(evals):  # rewards lost: evaluate again what has none
        evals = {a: e for a, e in evals.items() if a in kept}
    with open(os.path.join(report, RESPONSES_NAME), "w") as f:
        f.writelines(line for line in lines if float(json.loads(line)["alpha"]) in evals)
    return evals, {a: kept[a] for a in evals}, ""


def _append_responses(report: str, alpha: float, prompts: list[Prompt], responses: list[list[Response]],
                      rewards: list[float], samples: int) -> None:
    scores = iter(rewards)
    with open(os.path.join(report, RESPONSES_NAME), "a") as f:
        for k, (p, rs) in enumerate(zip(prompts, responses, strict=True)):
            for j, r in enumerate(rs):
                f.write(json.dumps({"alpha": alpha, "prompt_index": k, "sample": j, "prompt": p.text,
                                    "response": r.text, "score": next(scores), "tokens": r.tokens,
                                    "truncated": r.truncated}) + "\n")
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
           "degenerate", "seconds")


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
          f"{best['reward_stderr']:.2g}, win rate vs the aligned model {best['win_rate_vs_aligned']:.2f})", "",
          "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
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
