"""Rewards for `expo search`: score (prompt, response) pairs with a reward model, a Python function or a command.

- `RewardModel`: a Hugging Face sequence-classification reward model (a folder or a cached Hub repo id), scoring
  the conversation (the prompt's turns plus the response as the assistant's) with its own tokenizer and chat
  template, in batches; the score is the first logit. A model whose head was not in its checkpoint (a causal LM,
  whose score head transformers would start at random) is refused.
- `RewardFunction`: `MODULE:FUNCTION`, a callable `f(prompt: str, response: str) -> float`, the module imported
  from the current folder or the installed packages. It must return a real number (int, float, a numpy number or
  a 0-dim numeric tensor); a bool or a string is refused.
- `RewardCommand`: a shell command reading JSONL `{"prompt", "response"}` lines (plus `"messages"` for a chat
  prompt) on stdin and printing one number per line, run in a process group of its own that is killed whole when
  it times out or the search is interrupted.

Every scorer has `score(items, on_progress=None)` (a progress line at most every PROGRESS_SECONDS) and
`identity()` (what its scores depend on, for the search's resume key), and raises RewardError (one line, nothing
else) when the signal fails; non-finite scores are refused.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
import os
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import OptionError, RewardError
from .reading import file_sha256

DEFAULT_REWARD_TIMEOUT = 600.0  # seconds a reward command may go without printing a score (see RewardCommand)
PROGRESS_SECONDS = 10.0  # at most one progress line per this many seconds while scoring
KILL_GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL of a reward command's process group
WHOLE_FILE_HASH_LIMIT = 64 << 20  # a reward model's side files larger than this are identified by size and mtime

Progress = Callable[[str], None] | None


@dataclass(frozen=True)
class Item:
    """One response to score, with its prompt as text (the prompt itself, or a chat prompt's last user turn) and
    as turns (None for a plain prompt)."""

    prompt: str
    messages: list | None
    response: str


def _finite(values: list, what: str) -> list[float]:
    out = []
    for k, v in enumerate(values):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"{what} gave {v!r} for response {k + 1}, not a number") from None
        if not math.isfinite(x):
            raise RewardError(f"{what} gave {x} for response {k + 1}; rewards must be finite numbers")
        out.append(x)
    return out


def real_number(v) -> float | None:
    """`v` as a float when it is a real number: int, float, a numpy integer or floating scalar (or 0-dim array), or
    a 0-dim integer or floating tensor. None for anything else: bool (an int to Python, but a yes/no is not a
    reward), str (even "0.5"), complex, None, a sequence."""
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Real):  # int, float, numpy integer and floating scalars (numpy registers them; its
        # bool_ it does not)
        return float(v)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(v, np.ndarray):
        return float(v) if v.ndim == 0 and v.dtype.kind in "iuf" else None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(v, torch.Tensor):
        ok = v.dim() == 0 and v.dtype != torch.bool and not v.dtype.is_complex
        return float(v) if ok else None
    return None


class _Throttle:
    """Calls on_progress with a line at most once per PROGRESS_SECONDS (the first call waits that long too)."""

    def __init__(self, on_progress: Progress):
        self.on_progress, self.last = on_progress, time.monotonic()

    def __call__(self, line: Callable[[], str], force: bool = False) -> None:
        now = time.monotonic()
        if self.on_progress and (force or now - self.last >= PROGRESS_SECONDS):
            self.last = now
            self.on_progress(line())


class RewardFunction:
    def __init__(self, spec: str):
        module, _, name = spec.partition(":")
        if not module or not name:
            raise OptionError(f"--reward-fn must be MODULE:FUNCTION (e.g. myrewards:score), not {spec!r}")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            self.module = importlib.import_module(module)
            fn = getattr(self.module, name)
        except (ImportError, AttributeError) as e:
            raise OptionError(f"--reward-fn {spec}: cannot import it ({type(e).__name__}: {e}); the module must be "
                              "importable from the current folder or installed") from None
        if not callable(fn):
            raise OptionError(f"--reward-fn {spec}: {name} is not callable")
        self.spec, self.fn, self.describe = spec, fn, f"function {spec}"

    def identity(self) -> dict:
        """The spec and the sha256 of the module's source file (and of the function's own file, when it was
        defined in another module): an edited reward function gives another identity."""
        files = []
        for path in (getattr(self.module, "__file__", None), _source_file(self.fn)):
            if path and os.path.isfile(path) and path not in [p for p, _ in files]:
                files.append((path, file_sha256(path)))
        return {"kind": "function", "spec": self.spec, "files": [[p, h] for p, h in files]}

    def score(self, items: list[Item], on_progress: Progress = None) -> list[float]:
        out = []
        progress = _Throttle(on_progress)
        for k, item in enumerate(items):
            try:
                v = self.fn(item.prompt, item.response)
            except Exception as e:
                raise RewardError(f"{self.describe} raised {type(e).__name__}: {e}") from None
            x = real_number(v)
            if x is None:
                raise RewardError(f"{self.describe} returned {v!r} ({type(v).__name__}) for response {k + 1}; it "
                                  "must return a real number (int or float), not a string, bool or other type")
            out.append(x)
            progress(lambda k=k: f"scored {k + 1}/{len(items)} response(s)")
        return _finite(out, self.describe)


def _source_file(fn) -> str | None:
    try:
        return inspect.getsourcefile(fn)
    except TypeError:  # a builtin or a callable object without a source file
        return None


class RewardCommand:
    """A shell command run once per scoring call, in a process group of its own (`start_new_session`).

    `timeout` (seconds, None for none) is the longest the command may go without printing a line on stdout: from
    its start to its first score, and between one score and the next, and from its last line to its exit. A
    command that prints each score as it goes may take as long as it needs in all, as long as no one response
    takes longer; one that prints all its scores at the end must finish within `timeout`. On a timeout, and when
    the search is interrupted (KeyboardInterrupt, which the CLI makes of SIGTERM, or any other exception), the
    whole group gets SIGTERM and, KILL_GRACE_SECONDS later, SIGKILL, so no child of the command is left running.
    When the command has answered, what it left running in its group is stopped the same way: every scoring call
    starts it afresh, and a server it started and forgot would otherwise pile up, one per alpha."""

    def __init__(self, cmd: str, timeout: float | None = DEFAULT_REWARD_TIMEOUT):
        if not cmd.strip():
            raise OptionError("--reward-cmd is empty")
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise OptionError(f"--reward-timeout must be a positive number of seconds, not {timeout:g}")
        self.cmd, self.timeout, self.describe = cmd, timeout, f"command {cmd!r}"

    def identity(self) -> dict:
        """The command string and the sha256 of every file it names (its script, a model file it reads): an edited
        script gives another identity. Words are split as the shell splits them (`score.py|cat` is two words, a
        `bash -c '...'` string is split again), with $VARIABLES and ~ expanded, and looked for as they are and in
        the folders the command names (`cd dir && python score.py`). `files` empty: no file could be named."""
        files = {}
        words = _shell_words(self.cmd)
        folders = [w for w in words if os.path.isdir(w)]
        for w in words:
            for path in (w, *(os.path.join(d, w) for d in folders)):
                if path not in files and os.path.isfile(path):
                    files[path] = file_sha256(path)
        return {"kind": "command", "cmd": self.cmd, "files": [[w, h] for w, h in files.items()]}

    def score(self, items: list[Item], on_progress: Progress = None) -> list[float]:
        data = "".join(json.dumps({"prompt": i.prompt, "response": i.response}
                                  | ({"messages": i.messages} if i.messages is not None else {})) + "\n"
                       for i in items).encode()
        try:
            proc = subprocess.Popen(self.cmd, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise RewardError(f"{self.describe} could not run: {e}") from None
        try:
            out, err = self._talk(proc, data, len(items), on_progress)
        except RewardError:  # a timeout: the group is already killed
            raise
        except BaseException:  # KeyboardInterrupt (SIGTERM in the CLI) or any failure here: leave nothing running
            kill_group(proc)
            raise
        else:
            kill_group(proc)  # what the command left running in its group (a judge server it started) ends too
        finally:
            for f in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    f.close()
                except OSError:  # stdin's pipe broken by a command that never read it
                    pass
        if proc.returncode:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise RewardError(f"{self.describe} exited with status {proc.returncode} ({tail[0]})")
        values = [x for x in out.decode(errors="replace").splitlines() if x.strip()]
        if len(values) != len(items):
            raise RewardError(f"{self.describe} printed {len(values)} number(s) for {len(items)} response(s); it must "
                              "print one number per input line")
        return _finite(values, self.describe)

    def _talk(self, proc: subprocess.Popen, data: bytes, n: int, on_progress: Progress) -> tuple[bytes, bytes]:
        """Feed stdin and read stdout and stderr in one loop (no threads, non-blocking pipes: a command that does
        not read its stdin, or a child of it that keeps a pipe open, cannot block us); returns (stdout, stderr)
        once stdout is closed and the shell has exited. Raises RewardError after `timeout` seconds without a new
        line, the group killed."""
        out, err, todo = bytearray(), bytearray(), memoryview(data)
        started = last = time.monotonic()
        progress = _Throttle(on_progress)
        with selectors.DefaultSelector() as sel:
            for f, event in ((proc.stdin, selectors.EVENT_WRITE), (proc.stdout, selectors.EVENT_READ),
                             (proc.stderr, selectors.EVENT_READ)):
                os.set_blocking(f.fileno(), False)
                sel.register(f, event)
            if not todo:
                sel.unregister(proc.stdin)
                proc.stdin.close()
            # until the command has exited and closed its stdout; or has exited with every score printed while a
            # child of it (a server started in the background) holds its stdout open
            while ((_open(sel, proc.stdout) or proc.poll() is None)
                   and not (proc.poll() is not None and out.count(b"\n") >= n)):
                for key, _ in sel.select(timeout=0.5):
                    f = key.fileobj
                    try:
                        if f is proc.stdin:
                            todo = todo[os.write(f.fileno(), todo[:1 << 16]):]
                            if todo:
                                continue
                        elif block := os.read(f.fileno(), 1 << 16):
                            if f is proc.stdout and b"\n" in block:
                                last = time.monotonic()
                            (out if f is proc.stdout else err).extend(block)
                            continue
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the command closed its stdin: its answer will say whether it minded
                        pass
                    sel.unregister(f)  # stdin all written (or refused), or an output at its end
                    if f is proc.stdin:
                        f.close()
                if not _open(sel, proc.stdout):
                    time.sleep(0.05)  # the shell is still running with its stdout closed
                now = time.monotonic()
                got = out.count(b"\n")
                if self.timeout is not None and now - last > self.timeout:
                    kill_group(proc)
                    what = "its first score" if not got else f"a score after {got} of {n}"
                    raise RewardError(f"{self.describe} waited {self.timeout:g} s for {what} and was stopped (its "
                                      "whole process group killed); raise --reward-timeout if it needs longer")
                progress(lambda got=got, now=now: f"reward command: {got}/{n} score(s) after {now - started:.0f} s")
            if _open(sel, proc.stderr):  # what the shell wrote before it exited is there to read; a child of it
                try:  # may hold stderr open for longer, and is not waited for
                    while block := os.read(proc.stderr.fileno(), 1 << 16):
                        err.extend(block)
                except BlockingIOError:
                    pass
        return bytes(out), bytes(err)


def _shell_words(cmd: str, depth: int = 0) -> list[str]:
    """The words of a shell command line, split at the shell's operators too, expanded ($VAR, ~); a word with
    spaces in it (a `sh -c` script) is split again."""
    lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # unbalanced quotes: the shell will complain when it runs
        words = cmd.split()
    out = []
    for w in words:
        w = os.path.expanduser(os.path.expandvars(w))
        out.append(w)
        if depth < 2 and any(c.isspace() for c in w):
            out.extend(_shell_words(w, depth + 1))
    return out


def _open(sel: selectors.BaseSelector, f) -> bool:
    try:
        sel.get_key(f)
        return True
    except KeyError:
        return False


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's whole process group, SIGKILL once the group has had KILL_GRACE_SECONDS to go
    (sooner when it has gone), and the shell reaped."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):  # nothing of the group is left
        proc.wait()
        return
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    while time.monotonic() < deadline:
        proc.poll()  # reap the shell, so that only its children keep the group alive
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.02)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group ignored SIGTERM or outlived the shell
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class RewardModel:
    def __init__(self, source: str, device, batch_size: int = 8):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .sources import open_checkpoint

        self.checkpoint = open_checkpoint(source)  # a folder or a cached Hub repo, resolved as the checkpoints are
        path = self.checkpoint.path
        self.device = torch.device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model, info = AutoModelForSequenceClassification.from_pretrained(path, dtype="auto",
                                                                                 output_loading_info=True)
        except Exception as e:  # transformers' own errors for a folder that is not a reward model
            raise OptionError(f"--reward-model {source}: not a sequence-classification model transformers can load "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            prefix = getattr(self.model, "base_model_prefix", "") + "."
            head = [k for k in missing if not k.startswith(prefix)]  # the head lives outside the base model
            listed = ", ".join((head or missing)[:3]) + (" ..." if len(head or missing) > 3 else "")
            if head:
                raise OptionError(f"--reward-model {source}: its checkpoint has no score head ({listed} missing, so "
                                  "transformers would start it at random): pass a trained sequence-classification "
                                  "reward model (e.g. saved with AutoModelForSequenceClassification), or score with "
                                  "--reward-fn or --reward-cmd")
            raise OptionError(f"--reward-model {source}: {len(missing)} weight(s) of the model are not in its "
                              f"checkpoint ({listed}; transformers would start them at random); pass a complete "
                              "reward model")
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.describe = batch_size, f"reward model {source}"

    def identity(self) -> dict:
        """The resolved folder, the sha256 of its config, tokenizer and chat-template files, and (name, size,
        mtime_ns) of its weight files (hashing them would read the whole model)."""
        ck = self.checkpoint
        side = []
        for name in ck.side_files:
            full = os.path.join(ck.path, name)
            st = os.stat(full)
            side.append([name, file_sha256(full)] if st.st_size <= WHOLE_FILE_HASH_LIMIT else
                        [name, st.st_size, st.st_mtime_ns])
        weights = []
        for name in ck.files:
            st = os.stat(os.path.join(ck.path, name))
            weights.append([name, st.st_size, st.st_mtime_ns])
        return {"kind": "model", "path": ck.path, "revision": ck.revision, "side_files": side, "weights": weights}

    def text(self, item: Item) -> str:
        turns = (item.messages or [{"role": "user", "content": item.prompt}]) + [
            {"role": "assistant", "content": item.response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(turns, tokenize=False)
        return "\n".join(str(t["content"]) for t in turns)

    def score(self, items: list[Item], on_progress: Progress = None) -> list[float]:
        import torch

        out = []
        progress = _Throttle(on_progress)
        for start in range(0, len(items), self.batch_size):
            texts = [self.text(i) for i in items[start:start + self.batch_size]]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 add_special_tokens=False).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits
            out.extend(logits[:, 0].float().tolist())
            progress(lambda: f"reward model: scored {len(out)}/{len(items)} response(s)")
        return _finite(out, self.describe)


def open_reward(model: str | None = None, fn: str | None = None, cmd: str | None = None, device="cpu",
                timeout: float | None = DEFAULT_REWARD_TIMEOUT):
    """The one reward signal given: exactly one of `model`, `fn` and `cmd`. `timeout` applies to a command (see
    RewardCommand: the longest it may go without printing a score; None for no limit)."""
    given = [x for x in (model, fn, cmd) if x]
    if len(given) != 1:
        raise OptionError("give exactly one reward signal: --reward-model RM, --reward-fn MODULE:FUNCTION or "
                          "--reward-cmd 'CMD'")
    if model:
        return RewardModel(model, device)
    return RewardFunction(fn) if fn else RewardCommand(cmd, timeout=timeout)
