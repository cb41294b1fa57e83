"""Vocabulary rows: which rows of the embedding-like tensors of two checkpoints mean the same token.

DPO and RLHF recipes often add tokens (a pad token, chat-template tokens) or pad the embedding to a multiple of 64,
so the aligned model's input embeddings and output head have more rows than the SFT model's. A row that means the
same token on both sides is extrapolated; a row that exists only in the aligned model is copied from it (alpha = 0
for it: there is no SFT value to extrapolate from).

"Same token" is decided from the two tokenizers (`tokenizer.json`, else `vocab.json` + `added_tokens.json`, with the
added tokens of `tokenizer_config.json`'s `added_tokens_decoder`, as slow tokenizers save them): the same token
string at the same id is the same row; when shared tokens sit at different ids, rows are matched by token string.
Rows beyond a tokenizer's tokens (padding rows) are matched by id where both sides have them. Without tokenizers,
`vocab="aligned-extends-sft"` says that the first rows of the aligned model are the SFT model's.

The tokenizers are consulted whenever both sides have one, also when the row counts are equal: a vocabulary of the
same size whose tokens were reordered is matched by token string too (`match_rows`), not extrapolated row k against
row k. Equal row counts with tokenizers that agree id for id need no row map (the plain by-id case).

Which tensors hold one row per token is one rule for both paths (`token_tensors`): embeddings and heads by name,
and, by shape, a tensor outside the numbered layers whose name says no other kind, with the vocabulary's rows and an
embedding's row (ChatGLM's `output_layer`, OLMo's `ff_out`) or one number per token (a bias). A tensor that may hold
the vocabulary in a way that cannot be told (on another axis, as BART's `final_logits_bias` [1, vocab]; or a row
count that another dimension of the model shares) is refused when the tokens moved, never matched by id silently.

The result is a tuple of segments `(start_row, stop_row, sft_row)`: aligned rows [start, stop) come from SFT rows
[sft_row, sft_row + stop - start), or, with sft_row None, from the aligned model alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .errors import MismatchError, OptionError
from .naming import classify, listing
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
    new_tokens: int = 0  # by token string: aligned rows whose token the SFT tokenizer lacks (among the copied rows)

    @property
    def extrapolated(self) -> int:
        return sum(b - a for a, b, s in self.segments if s is not None)

    @property
    def copied(self) -> int:
        return sum(b - a for a, b, s in self.segments if s is None)

    @property
    def headline(self) -> str:
        """`vocabulary resized (128 -> 136 rows, matched by id` or `vocabulary reordered (128 rows, matched by
        token string, 2 row(s) at another id`: the start of the line the CLI prints."""
        rows = (f"resized ({self.sft_rows} -> {self.aligned_rows} rows" if self.sft_rows != self.aligned_rows
                else f"reordered ({self.aligned_rows} rows")
        return (f"vocabulary {rows}, matched {self.how}" + (f", {self.moved} row(s) at another id" if self.moved
                                                             else "")
                + (f", {self.new_tokens} aligned token(s) the SFT tokenizer lacks, copied"
                   if self.new_tokens and self.sft_rows == self.aligned_rows else ""))

    def record(self, tensors: list[str]) -> dict:
        return {"sft_rows": self.sft_rows, "aligned_rows": self.aligned_rows, "matched": self.how,
                "rows_extrapolated": self.extrapolated, "rows_copied": self.copied, "rows_moved": self.moved,
                "rows_new_tokens": self.new_tokens,
                "tensors": tensors, "segments": [list(s) for s in self.segments],
                "note": "rows of these tensors that exist only in the aligned model are copied from it (alpha 0)"}


def resized(sft: Checkpoint, aligned: Checkpoint, names) -> dict[str, tuple[int, int]]:
    """{name: (SFT rows, aligned rows)} of the tensors among `names` whose first dimension differs and nothing
    else, and that are vocabulary-like: an embedding or a head by name, or a tensor whose rows are tokens on both
    sides by `token_tensors`' rule (each side's config vocab_size). A resized vocabulary when all of them agree on
    the two row counts."""
    names = list(names)
    by_rule = set(token_tensors(sft, names, vocab_size(sft.path))[0]) & set(
        token_tensors(aligned, names, vocab_size(aligned.path))[0])
    out = {}
    for name in names:
        s, a = sft.tensors[name].shape, aligned.tensors[name].shape
        if (s != a and len(s) == len(a) >= 1 and s[1:] == a[1:]
                and (_by_name(name) or name in by_rule)):
            out[name] = (s[0], a[0])
    return out


def vocab_size(folder: str) -> int | None:
    """The embedding's row count from config.json (also under text_config): its vocab_size, or its embedding_size
    where that is larger (OLMo pads the embedding and its head `ff_out` to embedding_size rows; ALBERT and ELECTRA
    use the key for a smaller embedding width). None without one."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        if isinstance(c, dict) and isinstance(c.get("vocab_size"), int):
            padded = c.get("embedding_size")
            return max(c["vocab_size"], padded) if isinstance(padded, int) else c["vocab_size"]
    return None


def read_tokens(folder: str) -> list[str | None] | None:
    """Token string per id from a tokenizer in `folder` (None at ids no token has), or None without a tokenizer.

    The base vocabulary comes from `tokenizer.json` (else `vocab.json`); added tokens from its `added_tokens` (else
    `added_tokens.json`) and from `tokenizer_config.json`'s `added_tokens_decoder` (id -> content, where slow
    tokenizers keep them), which win at their ids. A string may end up at two ids (an added token that repeats a
    base token elsewhere): `match_rows` refuses to guess between them."""
    pairs: list[tuple[str, int]] = []  # (token, id) in the order they apply: later ones win at their id
    path = os.path.join(folder, "tokenizer.json")
    try:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            model = data.get("model") or {}
            v = model.get("vocab")
            if isinstance(v, dict):
                pairs += v.items()
            elif isinstance(v, list):  # Unigram: [[token, score], ...] by id
                pairs += [(item[0], i) for i, item in enumerate(v)]
            pairs += [(t["content"], t["id"]) for t in data.get("added_tokens") or []]
        elif os.path.isfile(os.path.join(folder, "vocab.json")):
            with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
                pairs += json.load(f).items()
            added = os.path.join(folder, "added_tokens.json")
            if os.path.isfile(added):
                with open(added, encoding="utf-8") as f:
                    pairs += json.load(f).items()
        else:
            return None
        config = os.path.join(folder, "tokenizer_config.json")
        if pairs and os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                decoder = json.load(f).get("added_tokens_decoder") or {}
            pairs += [(t["content"], int(i)) for i, t in decoder.items()]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise MismatchError(f"{folder}: its tokenizer files cannot be read to match vocabulary rows ({e})") from None
    pairs = [(t, i) for t, i in pairs if isinstance(t, str) and isinstance(i, int) and i >= 0]
    if not pairs:
        return None
    tokens: list[str | None] = [None] * (max(i for _, i in pairs) + 1)
    for token, i in pairs:
        tokens[i] = token
    return tokens


def row_map(sft: Checkpoint, aligned: Checkpoint, sft_rows: int, aligned_rows: int, mode: str = "auto",
            tensors: list[str] = ()) -> RowMap:
    """How the `aligned_rows` rows of the embedding-like tensors map onto the SFT model's `sft_rows` (a resized
    vocabulary: the row counts differ). Raises MismatchError when it cannot be decided, saying what is missing and
    which option accepts it anyway."""
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
    if _same_ids(sft_tokens, aligned_tokens, sft_rows):
        return RowMap(sft_rows, aligned_rows, _extends(sft_rows, aligned_rows), "by id")
    return _by_string(sft_tokens, aligned_tokens, sft_rows, aligned_rows, f"the vocabulary was resized ({what})")


def match_rows(sft: Checkpoint, aligned: Checkpoint, names,
               mode: str = "auto") -> tuple[RowMap | None, tuple[str, ...]]:
    """(row map, its tensors) for the vocabulary tensors among `names` (names both sides hold, in output order).

    Resized (the row counts differ, all by the same pair): `row_map`. Equal row counts with a tokenizer on both
    sides: the tensors whose rows are tokens (`token_tensors`, with config.json's vocab_size rows) are matched by
    token string when the tokenizers put tokens at other ids (MismatchError when `token_tensors` is unsure of a
    tensor, unless `mode="aligned-extends-sft"`); rows whose aligned token the SFT tokenizer lacks are copied
    from the aligned model and counted (`RowMap.new_tokens`); `mode="aligned-extends-sft"` keeps them by id,
    recorded as told. (None, ()) when rows go by id without a record: equal row counts whose tokenizers agree id
    for id, or with a tokenizer on one side only; and resized tensors that disagree on their row counts (plain
    shape mismatches, the caller's to report). Reads no tensor data."""
    if mode not in MODES:
        raise OptionError(f"--vocab must be one of {', '.join(MODES)}, not {mode!r}")
    names = list(names)
    grown = resized(sft, aligned, names)
    if grown:
        if len(set(grown.values())) > 1:
            return None, ()
        (n_sft, n_aligned), = set(grown.values())
        tensors = [n for n in names if n in grown]
        return row_map(sft, aligned, n_sft, n_aligned, mode, tensors), tuple(tensors)
    if same_tokenizer_files(sft.path, aligned.path):
        return None, ()  # the same tokens at the same ids, without parsing them (once per plan: per alpha)
    sft_tokens, aligned_tokens = read_tokens(sft.path), read_tokens(aligned.path)
    if sft_tokens is None or aligned_tokens is None:
        return None, ()
    names = [n for n in names if sft.tensors[n].shape == aligned.tensors[n].shape]
    rows = _rows(sft, aligned, names, max(len(sft_tokens), len(aligned_tokens)))
    tensors, unsure = token_tensors(aligned, names, rows)
    if not tensors and not unsure:
        return None, ()
    if _same_ids(sft_tokens, aligned_tokens, rows):
        return None, ()
    if mode == "aligned-extends-sft":  # every row by id, as told: the unsure tensors' too
        return RowMap(rows, rows, ((0, rows, 0),), "as told"), tuple(tensors)
    if unsure:
        raise MismatchError(
            f"the tokenizers put tokens at other ids, and {listing(unsure, 3)} "
            f"({', '.join(str(list(aligned.tensors[n].shape)) for n in unsure[:3])}) "
            f"{'has' if len(unsure) == 1 else 'have'} the vocabulary's {rows} rows in a shape that does not say "
            "whether they are tokens (the vocabulary axis is not the first, its rows are not the embedding's, or "
            "another dimension of the model has the same size): its rows are not matched by token string, and "
            "by id they would pair different tokens; pass --vocab aligned-extends-sft if all rows do go by id")
    what = (f"the tokenizers put tokens at other ids in {', '.join(tensors[:3])} ({rows} rows on both sides)")
    return _by_string(sft_tokens, aligned_tokens, rows, rows, what), tuple(tensors)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "added_tokens.json", "tokenizer_config.json")


def same_tokenizer_files(a: str, b: str) -> bool:
    """True when the files `read_tokens` reads are byte for byte the same in folders `a` and `b` (both present or
    both absent, and at least one present)."""
    found = False
    for name in TOKENIZER_FILES:
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        if os.path.isfile(pa) != os.path.isfile(pb):
            return False
        if os.path.isfile(pa):
            found = True
            if os.path.getsize(pa) != os.path.getsize(pb):
                return False
            try:
                with open(pa, "rb") as fa, open(pb, "rb") as fb:
                    if fa.read() != fb.read():
                        return False
            except OSError:
                return False  # let read_tokens say what is wrong
    return found


# embeddings by position, not by token, and rotary tables: never matched by token string
_POSITIONS = ("wpe", "position", "rotary", "inv_freq")


def _by_name(name: str) -> bool:
    return classify(name)[1] in ("embed", "head") and not any(p in name for p in _POSITIONS)


def token_tensors(ck: Checkpoint, names, rows: int | None) -> tuple[list[str], list[str]]:
    """(tensors, unsure) among `names` of `ck`: those whose first dimension is a vocabulary of `rows` rows, and
    those that may hold one in a way whose rows cannot be matched safely. The one rule of the resized and the
    equal-size path, so that plan, verify and norms give every such tensor the same row map.

    A tensor's rows are tokens when it has `rows` rows and
    - it is an embedding or a head by name (naming.classify; position embeddings and rotary tables aside), or
    - by shape: it sits outside the numbered layers, its name says no other kind (attention, MLP, norm), and its
      row is an embedding's row (the trailing dims of an embedding or head by name: a head named otherwise,
      ChatGLM's `transformer.output_layer`, OLMo's top-level `ff_out`) or one number (a bias per token, BERT's
      `cls.predictions.bias`); only where `rows` is distinctive: no other dimension of the checkpoint (the hidden
      size, an MLP's width, any dimension inside the layers) has that size, so that a tensor of that shape cannot
      be something else. An MLP whose width is the vocabulary's row count (tiny models) is never taken: it sits in
      a numbered layer and its name says MLP.
    `unsure`: the other tensors outside the layers and of no other kind by name with a dimension of `rows`: the
    vocabulary on another axis (`final_logits_bias` [1, vocab]: rows are matched along the first dimension only),
    rows unlike the embedding's, or rows that are not distinctive. None `rows`: nothing."""
    if rows is None:
        return [], []
    names = list(names)
    shape = {n: tuple(ck.tensors[n].shape) for n in names}
    named = [n for n in names if _by_name(n) and shape[n][:1] == (rows,)]
    loose = [n for n in names if n not in named and rows in shape[n] and classify(n) == (None, "other")
             and not any(p in n for p in _POSITIONS)]
    row_shapes = {shape[n][1:] for n in named} | {()}
    elsewhere = set()  # every dimension but the candidates' vocabulary axes
    for n in names:
        elsewhere.update(shape[n][1:] if n in named else [d for d in shape[n] if d != rows] if n in loose
                         else shape[n])
    taken = [n for n in loose if rows not in elsewhere and shape[n][0] == rows and shape[n][1:] in row_shapes]
    return named + taken, [n for n in loose if n not in taken]


def _rows(sft: Checkpoint, aligned: Checkpoint, names: list[str], tokens: int) -> int | None:
    """The vocabulary's row count at equal sizes: config.json's vocab_size (both configs agreeing), or else the one
    row count of the embeddings and heads by name among `names` with at least `tokens` rows."""
    sizes = {vocab_size(sft.path), vocab_size(aligned.path)}
    if len(sizes) == 1 and None not in sizes:
        return sizes.pop()
    counts = {aligned.tensors[n].shape[0] for n in names if _by_name(n) and aligned.tensors[n].shape
              and aligned.tensors[n].shape[0] >= tokens}
    return counts.pop() if len(counts) == 1 else None


def _at(tokens: list, i: int):
    return tokens[i] if i < len(tokens) else None


def _same_ids(sft_tokens: list, aligned_tokens: list, rows: int) -> bool:
    return all(_at(sft_tokens, i) == _at(aligned_tokens, i) for i in range(rows))


def _by_string(sft_tokens: list, aligned_tokens: list, sft_rows: int, aligned_rows: int, what: str) -> RowMap:
    """Aligned row j from the SFT row of its token: the same id where the SFT token there is the same, else the
    one SFT id of that string; None (copied) where the SFT tokenizer lacks it. A string at several SFT ids, none of
    them j, is ambiguous: MismatchError."""
    ids: dict[str, list[int]] = {}
    for i in range(sft_rows):
        if (t := _at(sft_tokens, i)) is not None:
            ids.setdefault(t, []).append(i)
    source: list[int | None] = []
    new = 0
    for j in range(aligned_rows):
        t = _at(aligned_tokens, j)
        if t is None:  # a padding row: the same row where the SFT side has an untokened row there too
            source.append(j if j < sft_rows and _at(sft_tokens, j) is None else None)
        elif j < sft_rows and _at(sft_tokens, j) == t:
            source.append(j)
        elif len(ids.get(t, ())) == 1:
            source.append(ids[t][0])
        elif t in ids:
            raise MismatchError(f"{what}, and the SFT tokenizer holds token {t!r} at {len(ids[t])} ids "
                                f"({', '.join(map(str, ids[t][:4]))}), so aligned row {j} cannot be matched by "
                                "token string; fix the tokenizer, or pass --vocab aligned-extends-sft if the rows "
                                "go by id")
        else:
            source.append(None)
            new += 1
    moved = sum(1 for j, s in enumerate(source) if s is not None and s != j)
    return RowMap(sft_rows, aligned_rows, _segments(source), "by token string", moved, new)


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
