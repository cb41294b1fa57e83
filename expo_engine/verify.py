"""Verify an output folder: structure, checksums and, given the sources, every element against the formula.

Three checks, each independent of how the output was written:

1. structure: shard file names follow the Hugging Face convention, every safetensors header is valid (contiguous
   offsets, file size exact), every tensor is in exactly one shard, and the index agrees with the headers;
2. checksums: every file listed in `expo.json` has its recorded size and sha256, and nothing else is in the folder;
3. elements (with both sources): every float element is the float64 formula rounded once, within one output step
   (float32's own error forgiven where the result cancels, as `kernels.error_steps` measures it); every other
   tensor equals the aligned bytes. Read chunk by chunk with `pread` (O_DIRECT where allowed) into two reused sets
   of three buffers, one set read by a thread while the other is checked. The vocabulary rows are matched from the
   sources' own tokenizers (`vocab.match_rows`, as the plan matches them), not taken from `expo.json`: an output
   made row by row by id from a reordered vocabulary fails, and a row map that expo.json records differently is a
   problem;
4. completeness: the model the output's own config.json describes (built by transformers on the meta device, no
   memory) must find every tensor it needs in the folder (tied aliases and the loader's own renamings allowed). A
   tensor it needs that no shard holds (left out with `--drop --drop-shared`) is a problem; without transformers,
   or with a config it cannot build, the check is skipped with a note.

A damaged output is not an exception: it is a report with `ok` False, each problem naming its file or tensor.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass, field

from . import dtypes, kernels
from .adapters import is_adapter
from .errors import FormatError, MismatchError, OptionError, SourceError
from .naming import shared_names
from .plan import check_alpha
from .reading import Buffers, Inputs, direct_io, file_sha256, read_ahead
from .sources import (
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    Checkpoint,
    TensorSlot,
    open_checkpoint,
    read_safetensors_layout,
    read_safetensors_metadata,
)
from .vocab import match_rows
from .writer import PROVENANCE_NAME

MAX_LISTED = 20  # problems and failing tensors shown by format_report


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found. `ok` is True when there is no problem and no failing tensor."""

    out: str
    problems: list[str]  # structure and checksum problems, each naming the file or tensor
    shards: int
    tensors: int  # tensors found in the readable shards
    files_checked: int  # files whose size and sha256 were compared with expo.json
    alpha: float | None  # None when no sources were given (structure and checksums only)
    elements_checked: int
    elements_total: int  # elements in the readable shards
    worst_steps: float  # largest distance from the formula, in output-dtype steps (inf: a copied tensor differs)
    failing_tensors: list[tuple[str, float, int]]  # (name, worst steps, elements more than one step off)
    sample: float | None  # the fraction of chunks asked for; None: all
    seed: int
    notes: list[str] = field(default_factory=list)  # checks that were skipped, and why

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failing_tensors

    @property
    def sampled_fraction(self) -> float:
        return self.elements_checked / self.elements_total if self.elements_total else 1.0


def verify(
    out: str,
    sft: str | None = None,
    aligned: str | None = None,
    alpha: float | None = None,
    sample: float | None = None,
    chunk_bytes: int = 64 * 2**20,
    seed: int = 0,
) -> VerifyReport:
    """Check the ExPO model in folder `out`; with `sft` and `aligned`, check every element against the formula.

    `alpha` defaults to the one recorded in `out/expo.json`; tensors that alpha rules gave another alpha are
    checked with the one recorded for them there (`alpha_by_tensor`). `sample` (in (0, 1]) checks that fraction of the
    chunks, chosen at random with `seed` (checksums and structure are always checked in full). Memory: two sets of
    three buffers of `chunk_bytes` (one read while the other is checked; the compiled checker needs no more; torch
    ops, its fallback, add ~100 MB of float64 scratch), whatever the model's size. Every file is read once to hash
    it, and the shards again, with the sources, to check elements.

    Raises an ExpoError subclass for user errors (no such folder, no weights in it, unreadable sources, sources
    whose tensors are not the output's); a damaged output gives a report with `ok` False.
    """
    if (sft is None) != (aligned is None):
        raise OptionError("give both the SFT and the aligned checkpoint, or neither (structure and checksums only)")
    if sample is not None and (isinstance(sample, bool) or not (isinstance(sample, int | float) and 0 < sample <= 1)):
        raise OptionError(f"sample must be a fraction in (0, 1], got {sample!r}")
    if chunk_bytes < 1:
        raise OptionError("the chunk size must be positive")
    for option, src in (("--sft", sft), ("--aligned", aligned)):
        if src is not None and is_adapter(src):
            raise OptionError(
                f"{option} {src} is a LoRA adapter (it has adapter_config.json), not a checkpoint: expo verify checks "
                "elements against the two full checkpoints an output was made from, and does not recompute an "
                "adapter merge (sft + (1 + alpha) * s * B @ A in float32); run `expo verify OUT` alone for its "
                "structure, checksums and completeness, or compare the merged model's logits with PEFT's "
                "(PeftModel.from_pretrained on the SFT model)")
    out = os.path.abspath(os.path.expanduser(out))
    if not os.path.isdir(out):
        raise SourceError(f"{out}: no such folder; give the folder `expo extrapolate` wrote")
    if not os.path.isfile(os.path.join(out, SAFETENSORS_INDEX)) and not any(
        f.endswith(".safetensors") for f in os.listdir(out)
    ):
        raise SourceError(f"{out}: not a model folder (it has neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX})")
    provenance, prov_problem = _read_provenance(out)
    sources = None
    if sft is not None:
        alpha = _alpha(alpha, provenance)
        sources = open_checkpoint(sft), open_checkpoint(aligned)

    problems = [prov_problem] if prov_problem else []
    notes: list[str] = []
    slots, shards = _check_structure(out, problems)
    files_checked = _check_checksums(out, provenance, problems)
    dropped = set(((provenance or {}).get("dropped") or {}).get("tensors") or ())
    _check_complete(out, slots, dropped, problems, notes)
    report = dict(out=out, shards=shards, tensors=len(slots), files_checked=files_checked,
                  elements_total=sum(s.numel for s in slots), sample=sample, seed=seed, notes=notes)
    if sources is None:
        return VerifyReport(problems=problems, alpha=None, elements_checked=0, worst_steps=0.0, failing_tensors=[],
                            **report)
    # alpha rules: the tensors that got another alpha are recorded with it in expo.json
    overrides = {name: float(a) for name, a in ((provenance or {}).get("alpha_by_tensor") or {}).items()}
    drop = ((provenance or {}).get("dropped") or {}).get("patterns") or ()  # left out on purpose (--drop)
    checked, worst, failing = _check_elements(slots, *sources, alpha, sample, seed, chunk_bytes, problems,
                                              overrides, drop, (provenance or {}).get("vocab"), notes)
    return VerifyReport(problems=problems, alpha=alpha, elements_checked=checked, worst_steps=worst,
                        failing_tensors=failing, **report)


def format_report(report: VerifyReport) -> str:
    """A few lines for the terminal."""
    r = report
    verdict = "OK" if r.ok else f"FAILED ({len(r.problems)} problem(s), {len(r.failing_tensors)} failing tensor(s))"
    lines = [f"verify {r.out}: {verdict}",
             f"  structure: {r.tensors} tensor(s) in {r.shards} shard(s); "
             f"checksums: {r.files_checked} file(s) compared with {PROVENANCE_NAME}"]
    if r.alpha is None:
        lines.append("  elements: not checked (no sources given; pass --sft and --aligned to check them)")
    else:
        how = "all" if r.sample is None else f"a {r.sampled_fraction:.1%} sample, seed {r.seed}"
        lines.append(f"  elements: {r.elements_checked:,} of {r.elements_total:,} checked ({how}) against the float64 "
                     f"formula with alpha {r.alpha:g}; worst {r.worst_steps:.2f} step(s), at most 1 allowed")
    lines += [f"  note: {n}" for n in r.notes]
    lines += [f"  problem: {p}" for p in r.problems[:MAX_LISTED]]
    lines += [f"  tensor '{name}': {bad:,} element(s) more than one step off (worst {steps:.2f})"
              for name, steps, bad in r.failing_tensors[:MAX_LISTED]]
    hidden = max(0, len(r.problems) - MAX_LISTED) + max(0, len(r.failing_tensors) - MAX_LISTED)
    if hidden:
        lines.append(f"  ... and {hidden} more")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Options and provenance


def _read_provenance(out: str) -> tuple[dict | None, str | None]:
    try:
        with open(os.path.join(out, PROVENANCE_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None, f"{PROVENANCE_NAME}: missing, so no checksum can be checked"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{PROVENANCE_NAME}: not readable JSON ({e})"
    if not isinstance(data, dict):
        return None, f"{PROVENANCE_NAME}: not a JSON object"
    return data, None


def _alpha(alpha, provenance: dict | None) -> float:
    if alpha is None:
        recorded = provenance.get("alpha") if provenance else None
        if isinstance(recorded, bool) or not isinstance(recorded, int | float):
            raise OptionError(f"{PROVENANCE_NAME} records no alpha; give the alpha the output was made with")
        alpha = recorded
    return check_alpha(alpha)


# ---------------------------------------------------------------------------------------------------------------
# 1. Structure


def _check_structure(out: str, problems: list[str]) -> tuple[list[TensorSlot], int]:
    """Check names, headers and index; return the tensors of the readable shards and the number of shards."""
    present = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    has_index = os.path.isfile(os.path.join(out, SAFETENSORS_INDEX))
    weight_map, total_size = _read_index(os.path.join(out, SAFETENSORS_INDEX), problems) if has_index else (None, None)
    if not has_index:
        shards = present
        problems += [f"{f}: a shard without {SAFETENSORS_INDEX}" for f in present if f != SAFETENSORS_SINGLE]
    else:
        shards = sorted(set(present) | set((weight_map or {}).values()))
        if SAFETENSORS_SINGLE in shards:
            problems.append(f"{SAFETENSORS_SINGLE}: beside {SAFETENSORS_INDEX}; loaders would take it and ignore "
                            "the shards")
        named = [f for f in shards if f != SAFETENSORS_SINGLE]
        expected = [f"model-{i:05d}-of-{len(named):05d}.safetensors" for i in range(1, len(named) + 1)]
        if named != expected:
            problems.append(f"shard files {', '.join(named[:4])}{', ...' if len(named) > 4 else ''} are not named "
                            f"model-0000i-of-0000N.safetensors for i = 1..N")

    holder: dict[str, str] = {}  # tensor -> shard holding it
    slots, unreadable = [], set()
    for shard in shards:
        path = os.path.join(out, shard)
        if not os.path.isfile(path):
            unreadable.add(shard)
            problems.append(f"{shard}: missing, but the index names it")
            continue
        try:
            layout = read_safetensors_layout(path)
        except FormatError as e:
            unreadable.add(shard)
            problems.append(str(e).replace(out + os.sep, ""))
            continue
        meta = read_safetensors_metadata(path)
        if meta.get("format") != "pt":
            problems.append(f"{shard}: header __metadata__ is {meta}, not {{'format': 'pt'}} as "
                            "save_pretrained writes it (transformers checks this tag when it loads the shard)")
        for slot in layout:
            if slot.name in holder:
                problems.append(f"tensor '{slot.name}': in both {holder[slot.name]} and {shard}")
            holder.setdefault(slot.name, shard)
        slots += layout

    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in holder and shard not in unreadable:
                problems.append(f"{SAFETENSORS_INDEX}: names tensor '{name}' (in {shard}), which no shard holds")
            elif name in holder and holder[name] != shard:
                problems.append(f"{SAFETENSORS_INDEX}: says tensor '{name}' is in {shard}, but {holder[name]} holds it")
        problems += [f"{SAFETENSORS_INDEX}: lacks tensor '{n}' (in {s})"
                     for n, s in holder.items() if n not in weight_map]
    nbytes = sum(s.nbytes for s in slots)
    if total_size is not None and not unreadable and total_size != nbytes:
        problems.append(f"{SAFETENSORS_INDEX}: metadata.total_size is {total_size}, but the shards' tensors hold "
                        f"{nbytes} bytes")
    return slots, len(shards)


def _read_index(path: str, problems: list[str]) -> tuple[dict[str, str] | None, int | None]:
    """The index's weight_map and total_size, each None (with a problem) when it is unusable."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{name}: not readable JSON ({e})")
        return None, None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) and f.endswith(".safetensors") and f == os.path.basename(f) for f in weight_map.values()
    ):
        problems.append(f"{name}: has no weight_map mapping tensor names to shard file names")
        weight_map = None
    meta = index.get("metadata") if isinstance(index, dict) else None
    total = meta.get("total_size") if isinstance(meta, dict) else None
    if isinstance(total, bool) or not isinstance(total, int):
        problems.append(f"{name}: has no metadata.total_size")
        total = None
    return weight_map, total


# ---------------------------------------------------------------------------------------------------------------
# 2. Checksums


def _check_checksums(out: str, provenance: dict | None, problems: list[str]) -> int:
    """Compare every file listed in expo.json with its size and sha256; return how many were compared."""
    if provenance is None:
        return 0
    files = provenance.get("files")
    if not isinstance(files, dict):
        problems.append(f"{PROVENANCE_NAME}: has no 'files' object with each file's size and sha256")
        return 0
    compared = 0
    for name, entry in sorted(files.items()):
        path = os.path.join(out, name)
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
                and name == os.path.basename(name) and name not in ("", ".", "..")):
            problems.append(f"{PROVENANCE_NAME}: the entry for {name!r} is not a plain file name with size and sha256")
        elif not os.path.isfile(path):
            problems.append(f"{name}: listed in {PROVENANCE_NAME} but missing")
        else:
            compared += 1
            size = os.path.getsize(path)
            if size != entry["size"]:
                problems.append(f"{name}: has {size} bytes, but {PROVENANCE_NAME} records {entry['size']}")
            elif file_sha256(path) != entry["sha256"]:
                problems.append(f"{name}: its sha256 differs from the one {PROVENANCE_NAME} records")
    problems += [f"{name}: in the folder but not listed in {PROVENANCE_NAME}"
                 for name in sorted(os.listdir(out)) if name != PROVENANCE_NAME and name not in files]
    return compared


# ---------------------------------------------------------------------------------------------------------------
# 3. Elements


def _compare_row_maps(recorded, rows_map, tensors, problems: list[str]) -> None:
    """A problem when expo.json's vocabulary record is not the row map the sources' tokenizers give."""
    if not rows_map and not recorded:
        return
    if rows_map and not isinstance(recorded, dict):
        problems.append(
            f"{PROVENANCE_NAME}: records no vocabulary row map, but the sources' tokenizers match the rows of "
            f"{', '.join(tensors)} {rows_map.how} ({rows_map.moved} row(s) at another id, {rows_map.copied} only in "
            "the aligned model): the output was made row by row by id; its elements are checked against the "
            "tokenizers' rows")
    elif not rows_map:
        problems.append(f"{PROVENANCE_NAME}: records a vocabulary row map ({recorded.get('matched')}), but the "
                        "sources' tokenizers match every row by id; are these its sources?")
    elif (recorded.get("segments") != [list(x) for x in rows_map.segments]
          or sorted(recorded.get("tensors") or ()) != sorted(tensors)):
        problems.append(f"{PROVENANCE_NAME}: its vocabulary row map is not the one the sources' tokenizers give "
                        f"({rows_map.how}, {rows_map.moved} row(s) at another id); elements are checked against the "
                        "tokenizers' rows")


def _check_elements(slots, sft, aligned, alpha, sample, seed, chunk_bytes, problems, overrides=None, drop=(),
                    vocab=None, notes=None):
    """Return (elements checked, worst steps, failing tensors) for the output tensors in `slots`."""
    import torch

    shared = shared_names(sft, aligned, drop)  # the names an output of these sources holds; raises MismatchError
    names = {s.name for s in slots}
    extra = sorted(names - set(shared))
    if extra:
        raise MismatchError(f"the output holds {len(extra)} tensor(s) that the sources do not (first: "
                            f"{', '.join(extra[:5])}); give the SFT and aligned checkpoints it was made from")
    missing = [n for n in shared if n not in names]
    if missing:
        problems.append(f"the output lacks {len(missing)} tensor(s) that the sources hold (first: "
                        f"{', '.join(missing[:5])})")

    # the vocabulary rows, from the sources' tokenizers as the plan matches them (segments (start_row, stop_row,
    # sft_row or None)); rows only the aligned model has must equal it (alpha 0). expo.json's record only says
    # which --vocab mode made the output; a record that differs from the sources' own row map is a problem.
    mode = "aligned-extends-sft" if isinstance(vocab, dict) and vocab.get("matched") == "as told" else "auto"
    try:
        rows_map, vocab_names = match_rows(sft, aligned, shared, mode)
    except MismatchError as e:
        if not isinstance(vocab, dict):
            raise
        # e.g. sources copied without their tokenizers: the recorded rows are all there is to check against
        (notes if notes is not None else []).append(f"the vocabulary row map could not be taken from the sources "
                                                    f"({e}); rows checked as {PROVENANCE_NAME} records them")
        segments = {name: [tuple(x) for x in vocab["segments"]] for name in vocab["tensors"]}
    else:
        segments = {name: list(rows_map.segments) for name in vocab_names} if rows_map else {}
        _compare_row_maps(vocab, rows_map, vocab_names, problems)
    work, chunks = [], []  # work[i] = (out slot, sft slot, aligned slot, copied?); chunks: (i, start, stop, shift)
    for o in slots:
        s, a = sft.tensors[o.name], aligned.tensors[o.name]
        if o.name in segments and o.shape == a.shape and s.shape[1:] == a.shape[1:]:
            row = math.prod(a.shape[1:])
            spans = [(r0 * row, r1 * row, None if s0 is None else (s0 - r0) * row) for r0, r1, s0 in segments[o.name]]
        elif o.shape == s.shape == a.shape:
            spans = [(0, o.numel, 0)]
        else:
            raise MismatchError(f"tensor '{o.name}' has shape {list(o.shape)} in the output but {list(s.shape)} "
                                f"(SFT) and {list(a.shape)} (aligned) in the sources; are these its sources?")
        copied = o.dtype == a.dtype and a.dtype not in dtypes.FLOATS
        if not copied and not {o.dtype, s.dtype, a.dtype} <= dtypes.FLOATS:
            raise MismatchError(f"tensor '{o.name}' is {o.dtype} in the output but {s.dtype} (SFT) and {a.dtype} "
                                "(aligned) in the sources; are these its sources?")
        step = max(1, chunk_bytes // max(dtypes.itemsize(t.dtype) for t in (o, s, a)))
        chunks += [(len(work), start, min(start + step, hi), shift) for lo, hi, shift in spans
                   for start in range(lo, hi, step)]
        work.append((o, s, a, copied))
    if sample is not None and chunks:
        picked = random.Random(seed).sample(range(len(chunks)), max(1, math.ceil(sample * len(chunks))))
        chunks = [chunks[k] for k in sorted(picked)]

    stats = [[0.0, 0] for _ in work]  # per tensor: worst steps, elements off by more than one step
    inputs = Inputs([t.file for o, s, a, copied in work for t in (o, a) + (() if copied else (s,))],
                    direct=direct_io())
    sets = [Buffers(chunk_bytes) for _ in range(2)]  # one set is read (O_DIRECT where allowed) while one is checked

    def read(k: int):
        i, start, stop, shift = chunks[k]
        o, s, a, copied = work[i]
        bufs = sets[k % 2]
        want = inputs.read_into(bufs.aligned, a, start, stop)
        s_vals = (None if copied else want if shift is None
                  else inputs.read_into(bufs.sft, s, start + shift, stop + shift))
        return inputs.read_into(bufs.out, o, start, stop), want, s_vals

    try:
        with read_ahead(len(chunks), read) as results:
            for (i, _, _, shift), (got, want, s_vals) in zip(chunks, results, strict=True):
                o, s, a, copied = work[i]
                if copied:
                    n = dtypes.itemsize(o.dtype)
                    bad = got.view(torch.uint8).view(-1, n).ne(want.view(torch.uint8).view(-1, n)).any(1).sum().item()
                    worst = math.inf if bad else 0.0
                else:
                    a_k = 0.0 if shift is None else (overrides or {}).get(o.name, alpha)
                    worst, bad = kernels.error_counts(got, s_vals, want, a_k)
                stats[i][0], stats[i][1] = max(stats[i][0], worst), stats[i][1] + bad
    finally:
        inputs.close()
    failing = [(o.name, st[0], st[1]) for (o, *_), st in zip(work, stats, strict=True) if st[1]]
    worst = max((st[0] for st in stats), default=0.0)
    return sum(stop - start for _, start, stop, _ in chunks), worst, failing


# ---------------------------------------------------------------------------------------------------------------
# 4. Completeness


def _check_complete(out: str, slots: list[TensorSlot], dropped: set[str], problems: list[str],
                    notes: list[str]) -> None:
    """Problems for the tensors that the model of the output's own config.json needs and no shard holds; a note
    where that cannot be told. The model is built by transformers on the meta device (no memory, no weights
    read); tied aliases count as one, the names its loader renames or fuses (`generation.transformers_placement`)
    as the names they become, and its own `_keys_to_ignore_on_load_missing` as not needed."""
    what = "whether the folder holds every tensor its config.json requires"
    if not os.path.isfile(os.path.join(out, "config.json")):
        notes.append(f"{what}: not checked (no config.json)")
        return
    try:
        import torch
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        notes.append(f"{what}: not checked (transformers is not installed)")
        return
    from .generation import transformers_placement

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings about the config are the loader's business, not verify's
    try:
        config = transformers.AutoConfig.from_pretrained(out)
        arch = next(iter(getattr(config, "architectures", None) or ()), None)
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        with torch.device("meta"):
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                model = cls(config)
            else:
                model = transformers.AutoModelForCausalLM.from_config(config)
        state = model.state_dict(keep_vars=True)
        held = {s.name: s for s in slots}
        placed = transformers_placement(model, Checkpoint(out, out, None, "safetensors", (), held), state)
    except Exception as e:  # any config transformers cannot build a model from (of any kind): not checkable
        notes.append(f"{what}: not checked (transformers cannot build a model from its config.json: "
                     f"{type(e).__name__})")
        return
    finally:
        hf_logging.set_verbosity(level)
    name = type(model).__name__
    unknown = [n for n in held if n not in state and n not in placed]
    if unknown:
        notes.append(f"{what}: not checked ({len(unknown)} tensor name(s) of the folder, first "
                     f"{', '.join(unknown[:3])}, are not {name}'s own)")
        return
    wrong = [n for n, t in held.items() if n in state and tuple(state[n].shape) != tuple(t.shape)]
    if wrong:
        notes.append(f"{what}: not checked (config.json does not describe these tensors: '{wrong[0]}' is "
                     f"{list(held[wrong[0]].shape)} in the folder, {list(state[wrong[0]].shape)} in {name})")
        return
    covered = set(held) | {target for target, _ in placed.values()}
    aliases: dict[int, list[str]] = {}  # tied parameters are one tensor under several names
    for key, value in state.items():
        aliases.setdefault(id(value), []).append(key)
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    for group in aliases.values():
        if any(n in covered for n in group) or any(rx.search(n) for rx in ignore for n in group):
            continue
        left = " (left out with --drop)" if any(n in dropped for n in group) else ""
        problems.append(f"tensor '{group[0]}': {name} (the model of its config.json) needs it, but no shard holds "
                        f"it{left}; a loader would fill it with random values")
