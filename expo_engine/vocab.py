"""Vocabulary rows: which rows of the embedding-like tensors of two checkpoints mean the same token.

DPO and RLHF recipes often add tokens (a pad token, chat-template tokens) or pad the embedding to a multiple of 64,
so the aligned model's input embeddings and output head have more rows than the SFT model's. A row that means the
same token on both sides is extrapolated; a row that exists only in the aligned model is copied from it (alpha = 0
for it: there is no SFT value to extrapolate from).

"Same token" is decided from the two tokenizers (`tokenizer.json`, else `vocab.json` + `added_tokens.json`): the
same token string at the same id is the same row; when shared tokens sit at different ids, rows are matched by
token string. Rows beyond a tokenizer's tokens (padding rows) are matched by id where both sides have them. Without
tokenizers, `vocab="aligned-extends-sft"` says that the first rows of the aligned model are the SFT model's.

The result is a tuple of segments `(start_row, stop_row, sft_row)`: aligned rows [start, stop) come from SFT rows
[sft_row, sft_row + stop - start), or, with sft_row None, from the aligned model alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .errors import MismatchError, OptionError
from .naming import classify
from .sources import Checkpoint

MODES = ("auto", "aligned-extends-sft")

Segment = tuple[int, int, "int | None"]


@dataclass(frozen=True)
class RowMap:
    sft_rows: int
    aligned_rows: int
    segments: tuple[Segment, ...]
    how: str  # "by id" (the aligned tokens extend the SFT ones), "by token string", or "as told" (--vocab)
    moved: int = 0  # rows matched at another id (by token string)

    @property
    def extrapolated(self) -> int:
        return sum(b - a for a, b, s in self.segments if s is not None)

    @property
    def copied(self) -> int:
        return sum(b - a for a, b, s in self.segments if s is None)

    def record(self, tensors: list[str]) -> dict:
        return {"sft_rows": self.sft_rows, "aligned_rows": self.aligned_rows, "matched": self.how,
                "rows_extrapolated": self.extrapolated, "rows_copied": self.copied, "rows_moved": self.moved,
                "tensors": tensors, "segments": [list(s) for s in self.segments],
                "note": "rows of these tensors that exist only in the aligned model are copied from it (alpha 0)"}


def resized(sft: Checkpoint, aligned: Checkpoint, names) -> dict[str, tuple[int, int]]:
    """{name: (SFT rows, aligned rows)} of the tensors among `names` whose first dimension differs and nothing
    else, and that are vocabulary-like: an embedding or a head by name, or with the two configs' vocab_size as
    rows. A resized vocabulary when all of them agree on the two row counts."""
    vocabs = (vocab_size(sft.path), vocab_size(aligned.path))
    out = {}
    for name in names:
        s, a = sft.tensors[name].shape, aligned.tensors[name].shape
        if (s != a and len(s) == len(a) >= 1 and s[1:] == a[1:]
                and (classify(name)[1] in ("embed", "head") or (s[0], a[0]) == vocabs)):
            out[name] = (s[0], a[0])
    return out


def vocab_size(folder: str) -> int | None:
    """config.json's vocab_size (also under text_config), or None."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        if isinstance(c, dict) and isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def read_tokens(folder: str) -> list[str | None] | None:
    """Token string per id from a tokenizer in `folder` (None at ids no token has), or None without a tokenizer."""
    vocab: dict[str, int] = {}
    path = os.path.join(folder, "tokenizer.json")
    try:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            model = data.get("model") or {}
            v = model.get("vocab")
            if isinstance(v, dict):
                vocab.update(v)
            elif isinstance(v, list):  # Unigram: [[token, score], ...] by id
                vocab.update({item[0]: i for i, item in enumerate(v)})
            for t in data.get("added_tokens") or []:
                vocab[t["content"]] = t["id"]
        elif os.path.isfile(os.path.join(folder, "vocab.json")):
            with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
                vocab.update(json.load(f))
            added = os.path.join(folder, "added_tokens.json")
            if os.path.isfile(added):
                with open(added, encoding="utf-8") as f:
                    vocab.update(json.load(f))
        else:
            return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise MismatchError(f"{folder}: its tokenizer files cannot be read to match vocabulary rows ({e})") from None
    if not vocab:
        return None
    tokens: list[str | None] = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        if isinstance(i, int) and i >= 0:
            tokens[i] = token
    return tokens


def row_map(sft: Checkpoint, aligned: Checkpoint, sft_rows: int, aligned_rows: int, mode: str = "auto",
            tensors: list[str] = ()) -> RowMap:
    """How the `aligned_rows` rows of the embedding-like tensors map onto the SFT model's `sft_rows`. Raises
    MismatchError when it cannot be decided, saying what is missing and which option accepts it anyway."""
    if mode not in MODES:
        raise OptionError(f"--vocab must be one of {', '.join(MODES)}, not {mode!r}")
    what = f"{', '.join(tensors[:3])} ({sft_rows} rows in the SFT checkpoint, {aligned_rows} in the aligned one)"
    if sft_rows > aligned_rows:
        raise MismatchError(f"the vocabulary shrank: {what}; ExPO extrapolates an aligned model whose vocabulary "
                            "is the SFT model's or extends it, not one with fewer rows")
    if mode == "aligned-extends-sft":
        return RowMap(sft_rows, aligned_rows, _extends(sft_rows, aligned_rows), "as told")
    sft_tokens, aligned_tokens = read_tokens(sft.path), read_tokens(aligned.path)
    if sft_tokens is None or aligned_tokens is None:
        missing = " and ".join(f"{side} ({ck.path})" for side, ck, t in (("SFT", sft, sft_tokens),
                                                                          ("aligned", aligned, aligned_tokens))
                               if t is None)
        raise MismatchError(f"the vocabulary was resized: {what}, and there is no tokenizer (tokenizer.json or "
                            f"vocab.json) in the {missing} folder to tell which rows mean the same token; if the "
                            f"first {sft_rows} rows of the aligned model are the SFT model's tokens, pass --vocab "
                            "aligned-extends-sft")

    def at(tokens, i):
        return tokens[i] if i < len(tokens) else None

    if all(at(sft_tokens, i) == at(aligned_tokens, i) for i in range(sft_rows)):
        return RowMap(sft_rows, aligned_rows, _extends(sft_rows, aligned_rows), "by id")
    index = {t: i for i, t in enumerate(sft_tokens[:sft_rows]) if t is not None}
    if len(index) != len([t for t in sft_tokens[:sft_rows] if t is not None]):
        raise MismatchError(f"the vocabulary was resized ({what}) and the SFT tokenizer holds a token twice, so its "
                            "rows cannot be matched by token string")
    source: list[int | None] = []
    for j in range(aligned_rows):
        t = at(aligned_tokens, j)
        if t is not None:
            source.append(index.get(t))
        else:  # a padding row: the same row where the SFT side has an untokened row there too
            source.append(j if j < sft_rows and at(sft_tokens, j) is None else None)
    moved = sum(1 for j, s in enumerate(source) if s is not None and s != j)
    return RowMap(sft_rows, aligned_rows, _segments(source), "by token string", moved)


def _extends(sft_rows: int, aligned_rows: int) -> tuple[Segment, ...]:
    return ((0, sft_rows, 0),) + (((sft_rows, aligned_rows, None),) if aligned_rows > sft_rows else ())


def _segments(source: list[int | None]) -> tuple[Segment, ...]:
    """Runs of consecutive aligned rows whose SFT rows are consecutive too (or absent)."""
    out: list[list] = []
    for j, s in enumerate(source):
        if out:
            start, stop, first = out[-1]
            if stop == j and ((s is None and first is None) or
                              (s is not None and first is not None and s == first + (j - start))):
                out[-1][1] = j + 1
                continue
        out.append([j, j + 1, s])
    return tuple(tuple(x) for x in out)
