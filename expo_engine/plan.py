"""Plan: the whole job as data, computed from the two checkpoints' headers alone.

:func:`make_plan` checks that the checkpoints match, decides every output tensor's dtype, shard and byte offset,
builds every shard's header, and cuts every tensor into chunks of at most `chunk_bytes`. It touches no tensor
data, so a 70B plan is tested from fake headers. Executors only consume plans.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from huggingface_hub import split_state_dict_into_shards_factory

from . import dtypes
from .errors import MismatchError, OptionError
from .naming import dropped_names, listing, shared_names
from .rules import as_rules, resolve
from .sources import Checkpoint, TensorSlot
from .vocab import RowMap, match_rows
from .vocab import resized as vocab_resized

SHARD_PATTERN = "model{suffix}.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_CHUNK_BYTES = 64 * 2**20
DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_UNIT_BYTES = 256 * 2**20  # output bytes per journal entry (and per Ray task)


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where its inputs lie, what is done to them, where its bytes go."""

    name: str
    shape: tuple[int, ...]
    action: str  # "extrapolate" (floats) or "copy" (non-float, identical on both sides)
    dtype: str  # output dtype (safetensors name)
    sft: TensorSlot
    aligned: TensorSlot
    shard: str  # output file name
    offset: int  # absolute byte offset of the tensor's first element in that file
    alpha: float  # the alpha of this tensor: the plan's, or what an alpha rule gave it
    rows: tuple = ()  # vocabulary segments (start_row, stop_row, sft_row or None) when rows are matched by token

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    header: bytes  # the complete file prefix: 8-byte length, JSON, space padding
    size: int  # the complete file size
    tensors: tuple[str, ...]  # in file order


@dataclass(frozen=True)
class Chunk:
    """Elements [start, stop) of plan.tensors[tensor]: the unit of reading, computing and writing."""

    tensor: int
    start: int
    stop: int
    sft_shift: int | None = 0  # the SFT elements are [start + shift, stop + shift); None: aligned-only rows

    @property
    def sft_span(self) -> tuple[int, int] | None:
        """The SFT tensor's elements this chunk combines with, or None for rows only the aligned model has (they
        are copied from it: alpha 0)."""
        return None if self.sft_shift is None else (self.start + self.sft_shift, self.stop + self.sft_shift)


@dataclass(frozen=True)
class Plan:
    alpha: float  # the base alpha: every tensor's, unless an alpha rule gave it another (TensorPlan.alpha)
    chunk_bytes: int
    tensors: tuple[TensorPlan, ...]  # in write order: by shard, then offset
    shards: tuple[ShardPlan, ...]
    chunks: tuple[Chunk, ...]  # in write order
    total_size: int  # sum of output tensor bytes (the index's metadata.total_size)
    alpha_rules: tuple[str, ...] = ()  # the rules, as written, that set TensorPlan.alpha
    drop: tuple[str, ...] = ()  # the --drop patterns, as written
    dropped: tuple[str, ...] = ()  # the tensor names (of either side) they left out of the output
    vocab: RowMap | None = None  # how the rows of the vocabulary tensors were matched (resized or reordered)
    vocab_tensors: tuple[str, ...] = ()  # those tensors
    drop_shared: bool = False  # the drop patterns were allowed to leave out tensors both checkpoints hold

    @property
    def alpha_overrides(self) -> dict[str, float]:
        """{tensor name: alpha} of the extrapolated tensors whose alpha is not the base alpha."""
        return {t.name: t.alpha for t in sorted(self.tensors, key=lambda t: t.name)
                if t.action == "extrapolate" and t.alpha != self.alpha}

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.name: t.shard for t in sorted(self.tensors, key=lambda t: t.name)}

    @property
    def bytes_read(self) -> int:
        return sum(t.sft.nbytes * (t.action == "extrapolate") + t.aligned.nbytes for t in self.tensors)

    @property
    def out_dtypes(self) -> list[str]:
        return sorted({t.dtype for t in self.tensors if t.action == "extrapolate"})


@dataclass(frozen=True)
class Unit:
    """A run of consecutive chunks of one output shard: the unit of distributed work and of the resume journal.

    It reads only its chunks' input ranges and writes only bytes [start, stop) of `shard`, so units are
    independent and idempotent, and can run on any node that sees the files.
    """

    index: int
    shard: str
    first: int  # plan.chunks[first:last] are this unit's chunks
    last: int
    start: int  # byte range of `shard` it writes
    stop: int


def make_units(plan: Plan, unit_bytes: int) -> tuple[Unit, ...]:
    """Cut the plan's chunks, in write order, into units of at most `unit_bytes` output bytes (at least one chunk
    each; a unit never spans two shards). Chunks are contiguous in their shard, so each unit is one byte range."""
    units: list[Unit] = []
    first, size = 0, 0

    def close(last: int) -> None:
        if last > first:
            ts = [plan.tensors[plan.chunks[k].tensor] for k in (first, last - 1)]
            start = ts[0].offset + plan.chunks[first].start * dtypes.itemsize(ts[0].dtype)
            stop = ts[1].offset + plan.chunks[last - 1].stop * dtypes.itemsize(ts[1].dtype)
            units.append(Unit(len(units), ts[0].shard, first, last, start, stop))

    for k, c in enumerate(plan.chunks):
        t = plan.tensors[c.tensor]
        nbytes = (c.stop - c.start) * dtypes.itemsize(t.dtype)
        if k > first and (size + nbytes > unit_bytes or plan.tensors[plan.chunks[k - 1].tensor].shard != t.shard):
            close(k)
            first, size = k, 0
        size += nbytes
    close(len(plan.chunks))
    return tuple(units)


def check_alpha(alpha) -> float:
    """alpha as a finite float, or OptionError."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise OptionError(f"alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(value):
        raise OptionError(f"alpha must be a finite number, got {value}")
    return value


MAX_SWEEP = 64  # alphas in one sweep: each adds one chunk buffer per buffer set, and one output folder


def check_alphas(alphas) -> tuple[float, ...]:
    """A sweep's alphas as finite floats, in the given order; OptionError if empty, too many or repeated."""
    if isinstance(alphas, (str, bytes)) or not hasattr(alphas, "__iter__"):
        raise OptionError(f"a sweep needs a list of alphas, got {alphas!r}")
    values = tuple(check_alpha(a) for a in alphas)
    if not values:
        raise OptionError("a sweep needs at least one alpha")
    if len(values) > MAX_SWEEP:
        raise OptionError(f"a sweep of {len(values)} alphas is more than {MAX_SWEEP}; split it into several runs")
    seen = set()
    for a in values:
        if a in seen:
            raise OptionError(f"alpha {a:g} appears twice in the sweep")
        seen.add(a)
    return values


def parse_alphas(text: str) -> tuple[float, ...]:
    """`0.3` (one alpha), `0.1,0.2,0.3` (a list) or `START:STOP:STEP` (STOP included when a whole number of
    steps reaches it). The range is stepped in decimal, so `0.1:0.5:0.1` gives exactly the floats of `0.1`, `0.2`,
    ..., `0.5` as written, the same alphas single runs would get."""
    from decimal import Decimal, InvalidOperation

    text = text.strip()
    if ":" not in text:
        return check_alphas([_number(part, text) for part in text.split(",")])
    parts = text.split(":")
    if len(parts) != 3:
        raise OptionError(f"alpha range {text!r} must be START:STOP:STEP, like 0.1:0.5:0.1")
    try:
        start, stop, step = (Decimal(p.strip()) for p in parts)
    except InvalidOperation:
        raise OptionError(f"alpha range {text!r} must be START:STOP:STEP with three numbers, like 0.1:0.5:0.1"
                          ) from None
    if not all(d.is_finite() for d in (start, stop, step)):
        raise OptionError(f"alpha range {text!r} must have finite numbers")
    if step <= 0:
        raise OptionError(f"alpha range {text!r}: the step must be positive")
    if stop < start:
        raise OptionError(f"alpha range {text!r}: STOP is below START (the form is START:STOP:STEP)")
    count = int((stop - start) / step) + 1
    if count > MAX_SWEEP:
        raise OptionError(f"alpha range {text!r} has {count} alphas, more than {MAX_SWEEP}; use a larger step")
    return check_alphas([float(start + k * step) for k in range(count)])


def _number(part: str, text: str) -> float:
    try:
        return float(part)
    except ValueError:
        raise OptionError(f"alpha {text!r}: {part.strip()!r} is not a number (give one alpha, a list like "
                          "0.1,0.2,0.3 or a range like 0.1:0.5:0.1)") from None


def sweep_folder(alpha: float) -> str:
    """The output folder name of one alpha of a sweep: `alpha-0.3`, `alpha-8`, `alpha--0.5`, exact (the float
    reads back from the name) and stable."""
    text = format(alpha, "g")
    return f"alpha-{text if float(text) == alpha else repr(alpha)}"


SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as huggingface_hub's max_shard_size


def parse_size(size: int | str) -> int:
    """`5GB`, `500MB`, `2KB`, `1.5GB` (decimal units, as huggingface_hub reads max_shard_size) or a plain number of
    bytes."""
    if isinstance(size, int):
        value = size
    elif size.strip().startswith("-"):
        raise OptionError(f"size {size!r} must be positive")
    else:
        text = size.strip().upper()
        try:
            value = int(text) if text.isdigit() else int(float(text[:-2].strip()) * SIZE_UNITS[text[-2:]])
        except (ValueError, KeyError, OverflowError):
            raise OptionError(f"size {size!r} is not understood; write it like 5GB, 500MB or in bytes") from None
    if value <= 0:
        raise OptionError(f"size {size!r} must be positive")
    return value


def make_plan(
    sft: Checkpoint,
    aligned: Checkpoint,
    alpha: float,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    rules=(),
    drop=(),
    vocab: str = "auto",
    drop_shared: bool = False,
) -> Plan:
    """Match the checkpoints by tensor name and lay out the output. Raises MismatchError/OptionError, listing every
    tensor that does not match (names on one side only, shapes, dtypes), not only the first.

    `rules` (alpha rules: `rules.Rule`s, `PATTERN=VALUE` strings or rules-file dicts) give tensors another alpha
    than `alpha`; the first rule that selects a tensor wins (see expo_engine.rules). `drop` (regexes searched in
    tensor names) leaves matching tensors of either side out of the output, on purpose (a value head); a pattern that
matches a tensor both sides hold is refused (OptionError: the output would lack a weight its model needs) unless
`drop_shared`, and so is a drop that leaves no tensor.

    Tensors whose first dimension (the vocabulary) has more rows in the aligned checkpoint, all by the same count,
    are matched row by row (`vocab.row_map`, from the two tokenizers; `vocab="aligned-extends-sft"` without them):
    shared rows are extrapolated, rows only the aligned model has are copied from it. At equal row counts the two
    tokenizers, where both sides have one, are consulted too (`vocab.match_rows`): tokens at other ids are matched
    by token string."""
    alpha = check_alpha(alpha)
    if chunk_bytes < 1:
        raise OptionError("the chunk size must be positive")
    out_float = _out_dtype(dtype)
    max_shard = parse_size(max_shard_size)
    # Output order follows the aligned checkpoint's files, so its reads stay sequential.
    drop = tuple(drop or ())
    dropped = tuple(dropped_names(sft, aligned, drop))
    both = [n for n in dropped if n in sft.tensors and n in aligned.tensors]
    if both and not drop_shared:
        which = [p for p in drop if any(re.search(p, n) for n in both)]
        raise OptionError(f"--drop {' '.join(repr(p) for p in which)} matches {len(both)} tensor(s) that both "
                          f"checkpoints hold ({listing(both)}): the output would lack them, and a loader fills "
                          "missing weights with random values; --drop is for tensors one side has (a value head); "
                          "pass --drop-shared (drop_shared=True) to leave them out anyway")
    drafts, shapes, kinds = {}, [], []
    names = shared_names(sft, aligned, drop)
    if drop and not names:
        raise OptionError(f"--drop {' '.join(repr(p) for p in drop)} leaves no tensor to write")
    resized = vocab_resized(sft, aligned, names)  # a resized vocabulary, if all such tensors agree
    for name in names:
        s, a = sft.tensors[name], aligned.tensors[name]
        if s.shape != a.shape and name not in resized:
            shapes.append(f"{name} {list(s.shape)} vs {list(a.shape)}")
        elif (action := _action(s, a, out_float)) is None:
            kinds.append(f"{name} {s.dtype} vs {a.dtype}")
        else:
            drafts[name] = (s, a, *action)
    rows_map, vocab_names = None, ()
    if resized and (len(set(resized.values())) > 1 or shapes):  # not one vocabulary: plain shape mismatches
        shapes = [f"{n} {list(sft.tensors[n].shape)} vs {list(aligned.tensors[n].shape)}" for n in resized] + shapes
        for n in resized:
            drafts.pop(n, None)
    elif not shapes:
        # resized, or of equal size with tokens at other ids (the two tokenizers say): rows matched by token
        rows_map, vocab_names = match_rows(sft, aligned, names, vocab)
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) differ in shape between the SFT and the aligned checkpoint "
                        f"({listing(shapes)}); ExPO needs two checkpoints of one architecture (was the vocabulary "
                        "resized by added tokens?)")
    if kinds:
        problems.append(f"{len(kinds)} tensor(s) differ in kind ({listing(kinds)}); ExPO extrapolates floating-point "
                        "tensors (F16, BF16, F32, F64) and copies other tensors only when both sides are identical")
    if problems:
        raise MismatchError("; ".join(problems))

    alphas = {}
    if rules:
        rules = as_rules(rules)
        alphas = resolve(rules, [n for n, d in drafts.items() if d[2] == "extrapolate"], alpha)
    split = split_state_dict_into_shards_factory(
        drafts,
        get_storage_size=lambda d: math.prod(d[1].shape) * dtypes.itemsize(d[3]),
        filename_pattern=SHARD_PATTERN,
        max_shard_size=max_shard,
    )
    tensors, shards = [], []
    for filename, names in split.filename_to_tensors.items():
        # safetensors' own order inside a file (dtype rank descending, then name): byte-identical to save_file.
        names = sorted(names, key=lambda n: (-dtypes.RANK[drafts[n][3]], n))
        header_json, offset = {"__metadata__": {"format": "pt"}}, 0
        for n in names:
            s, a, action, out_dtype = drafts[n]
            nbytes = math.prod(a.shape) * dtypes.itemsize(out_dtype)
            header_json[n] = {"dtype": out_dtype, "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header = _header_bytes(header_json)
        for n in names:
            s, a, action, out_dtype = drafts[n]
            start = len(header) + header_json[n]["data_offsets"][0]
            tensors.append(TensorPlan(n, a.shape, action, out_dtype, s, a, filename, start, alphas.get(n, alpha),
                                      rows_map.segments if rows_map and n in vocab_names else ()))
        shards.append(ShardPlan(filename, header, len(header) + offset, tuple(names)))

    chunks = []
    for i, t in enumerate(tensors):
        widest = max(dtypes.itemsize(t.sft.dtype), dtypes.itemsize(t.aligned.dtype), dtypes.itemsize(t.dtype))
        step = max(1, chunk_bytes // widest)
        row = math.prod(t.shape[1:])
        # a resized vocabulary: chunks within each segment of rows, each with its own SFT offset
        spans = ([(a0 * row, a1 * row, None if s0 is None else (s0 - a0) * row) for a0, a1, s0 in t.rows]
                 if t.rows else [(0, t.numel, 0)])
        for lo, hi, shift in spans:
            chunks.extend(Chunk(i, start, min(start + step, hi), shift) for start in range(lo, hi, step))
    total = sum(t.nbytes for t in tensors)
    return Plan(float(alpha), chunk_bytes, tuple(tensors), tuple(shards), tuple(chunks), total,
                tuple(r.text for r in rules) if rules else (), drop, dropped, rows_map,
                tuple(n for n in (t.name for t in tensors) if n in vocab_names) if rows_map else (), drop_shared)


def _out_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    key = dtype.lower()
    if key not in dtypes.CLI_NAMES:
        raise OptionError(f"dtype {dtype!r} is not one of bf16, fp16, fp32")
    return dtypes.CLI_NAMES[key]


def _action(s: TensorSlot, a: TensorSlot, out_float: str | None) -> tuple[str, str] | None:
    """(action, output dtype), or None when the two sides cannot be combined (a float and a non-float, or two
    different non-float dtypes)."""
    s_float, a_float = s.dtype in dtypes.FLOATS, a.dtype in dtypes.FLOATS
    if s_float and a_float:
        return "extrapolate", out_float or a.dtype
    if not s_float and not a_float and s.dtype == a.dtype:
        return "copy", a.dtype  # the executor's caller checks that both sides hold the same bytes
    return None


def _header_bytes(header: dict) -> bytes:
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body
