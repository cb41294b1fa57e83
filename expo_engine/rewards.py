"""Rewards for `expo search`: score (prompt, response) pairs with a reward model, a Python function or a command.

- `RewardModel`: a Hugging Face sequence-classification reward model (a folder or a cached Hub repo id), scoring
  the conversation (the prompt's turns plus the response as the assistant's) with its own tokenizer and chat
  template, in batches; the score is the first logit.
- `RewardFunction`: `MODULE:FUNCTION`, a callable `f(prompt: str, response: str) -> float`, the module imported
  from the current folder or the installed packages.
- `RewardCommand`: a shell command reading JSONL `{"prompt", "response"}` lines (plus `"messages"` for a chat
  prompt) on stdin and printing one number per line.

Every scorer raises RewardError (one line, nothing else) when the signal fails, and refuses non-finite scores.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

from .errors import OptionError, RewardError


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


class RewardFunction:
    def __init__(self, spec: str):
        module, _, name = spec.partition(":")
        if not module or not name:
            raise OptionError(f"--reward-fn must be MODULE:FUNCTION (e.g. myrewards:score), not {spec!r}")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise OptionError(f"--reward-fn {spec}: cannot import it ({type(e).__name__}: {e}); the module must be "
                              "importable from the current folder or installed") from None
        if not callable(fn):
            raise OptionError(f"--reward-fn {spec}: {name} is not callable")
        self.fn, self.describe = fn, f"function {spec}"

    def score(self, items: list[Item]) -> list[float]:
        out = []
        for item in items:
            try:
                out.append(self.fn(item.prompt, item.response))
            except Exception as e:
                raise RewardError(f"{self.describe} raised {type(e).__name__}: {e}") from None
        return _finite(out, self.describe)


class RewardCommand:
    def __init__(self, cmd: str):
        if not cmd.strip():
            raise OptionError("--reward-cmd is empty")
        self.cmd, self.describe = cmd, f"command {cmd!r}"

    def score(self, items: list[Item]) -> list[float]:
        lines = "".join(json.dumps({"prompt": i.prompt, "response": i.response}
                                   | ({"messages": i.messages} if i.messages is not None else {})) + "\n"
                        for i in items)
        try:
            done = subprocess.run(self.cmd, shell=True, input=lines, capture_output=True, text=True)
        except OSError as e:
            raise RewardError(f"{self.describe} could not run: {e}") from None
        if done.returncode:
            tail = done.stderr.strip().splitlines()[-1:] or ["no message"]
            raise RewardError(f"{self.describe} exited with status {done.returncode} ({tail[0]})")
        values = [x for x in done.stdout.splitlines() if x.strip()]
        if len(values) != len(items):
            raise RewardError(f"{self.describe} printed {len(values)} number(s) for {len(items)} response(s); it must "
                              "print one number per input line")
        return _finite(values, self.describe)


class RewardModel:
    def __init__(self, source: str, device, batch_size: int = 8):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .sources import open_checkpoint

        path = open_checkpoint(source).path  # a folder or a cached Hub repo, resolved as the checkpoints are
        self.device = torch.device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype="auto")
        except Exception as e:  # transformers' own errors for a folder that is not a reward model
            raise OptionError(f"--reward-model {source}: not a sequence-classification model transformers can load "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.describe = batch_size, f"reward model {source}"

    def text(self, item: Item) -> str:
        turns = (item.messages or [{"role": "user", "content": item.prompt}]) + [
            {"role": "assistant", "content": item.response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(turns, tokenize=False)
        return "\n".join(str(t["content"]) for t in turns)

    def score(self, items: list[Item]) -> list[float]:
        import torch

        out = []
        for start in range(0, len(items), self.batch_size):
            texts = [self.text(i) for i in items[start:start + self.batch_size]]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 add_special_tokens=False).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits
            out.extend(logits[:, 0].float().tolist())
        return _finite(out, self.describe)


def open_reward(model: str | None = None, fn: str | None = None, cmd: str | None = None, device="cpu"):
    """The one reward signal given: exactly one of `model`, `fn` and `cmd`."""
    given = [x for x in (model, fn, cmd) if x]
    if len(given) != 1:
        raise OptionError("give exactly one reward signal: --reward-model RM, --reward-fn MODULE:FUNCTION or "
                          "--reward-cmd 'CMD'")
    if model:
        return RewardModel(model, device)
    return RewardFunction(fn) if fn else RewardCommand(cmd)
