"""Parameter-change norms between checkpoints: per tensor, per layer, per module kind, per (layer, kind).

For a pair (A, B) and each tensor, with D = B - A and n elements, sums are accumulated in float64:

    ||D||_F,  ||D||_F / sqrt(n) (RMS change),  ||D||_F / n,  ||D||_F / ||A||_F (relative),  cos(A, B),  max |D|

These are the quantities of the ExPO paper's Table 1 (Frobenius norm and its size-normalised variant). Reading is
streamed like extrapolation: chunks of at most `chunk_bytes`, read with pread into reused buffers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import dtypes, kernels
from .errors import MismatchError, OptionError
from .kernels import Stats
from .naming import KINDS, classify, untied_extras
from .reading import Buffers, Inputs, direct_io, read_ahead
from .sources import Checkpoint, open_checkpoint
from .vocab import match_rows

if TYPE_CHECKING:
    import torch

BLOCK = 1 << 20  # float64 scratch, in elements


def chunk_stats(a: torch.Tensor, b: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor] | None = None) -> Stats:
    """Stats of b - a over two 1-D chunks of any float dtypes, widened to float64 block by block."""
    import torch

    n = a.numel()
    sa, sb = scratch or tuple(torch.empty(min(n, BLOCK), dtype=torch.float64) for _ in range(2))
    st = Stats(n=n)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        x = sa[: stop - start].copy_(a[start:stop])
        y = sb[: stop - start].copy_(b[start:stop])
        st.a2 += torch.dot(x, x).item()
        st.b2 += torch.dot(y, y).item()
        y.sub_(x)
        st.d2 += torch.dot(y, y).item()
        st.max_abs = max(st.max_abs, y.abs().max().item())
    return st


def reference_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """The same numbers computed directly in float64, for tests."""
    a, b = a.double().flatten(), b.double().flatten()
    d = b - a
    st = Stats(a.numel(), (d * d).sum().item(), (a * a).sum().item(), (b * b).sum().item(),
               d.abs().max().item() if d.numel() else 0.0).summary()
    na, nb = a.norm().item(), b.norm().item()
    st["cosine"] = (a * b).sum().item() / (na * nb) if na and nb else st["cosine"]  # the direct definition
    return st


# ---------------------------------------------------------------------------------------------------------------
# Reports


@dataclass
class PairReport:
    a: str
    b: str
    tensors: dict[str, Stats] = field(default_factory=dict)
    vocab: dict | None = None  # a resized or reordered vocabulary: which rows were compared (vocab.RowMap.record)

    def aggregates(self) -> dict[str, dict]:
        total, by_layer, by_kind, by_layer_kind = Stats(), {}, {}, {}
        for name, st in self.tensors.items():
            layer, kind = classify(name)
            total.add(st)
            by_kind.setdefault(kind, Stats()).add(st)
            if layer is not None:
                by_layer.setdefault(layer, Stats()).add(st)
                by_layer_kind.setdefault(f"{layer}/{kind}", Stats()).add(st)
        return {
            "total": total.summary(),
            "by_kind": {k: by_kind[k].summary() for k in KINDS if k in by_kind},
            "by_layer": {str(k): by_layer[k].summary() for k in sorted(by_layer)},
            "by_layer_kind": {k: v.summary() for k, v in sorted(by_layer_kind.items(),
                                                                  key=lambda kv: (int(kv[0].split("/")[0]), kv[0]))},
        }

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, **({"vocab": self.vocab} if self.vocab else {}), **self.aggregates(),
                "tensors": {n: {**dict(zip(("layer", "kind"), classify(n), strict=True)), **st.summary()}
                            for n, st in self.tensors.items()}}


def compare(a: Checkpoint, b: Checkpoint, chunk_bytes: int = 64 * 2**20, skip=frozenset(),
            vocab: str = "auto") -> PairReport:
    """Stream both checkpoints once and return per-tensor stats of b - a (float tensors; others are skipped).

    The vocabulary rows are matched as `make_plan` matches them (`vocab.match_rows`, `vocab` its mode): in a resized
    vocabulary, or one of equal size whose tokenizers put tokens at other ids, each row of b is compared with the row
    of a that means the same token; rows of b without one (added tokens, padding) are left out, and
    `PairReport.vocab` says which. One thread reads the next chunk (O_DIRECT where allowed) while this one computes;
    the compiled kernel sums in float64 in one pass, torch ops (float64 scratch blocks) where it does not apply."""
    only_a, only_b = untied_extras(a, b), untied_extras(b, a)  # a tied alias on one side only is not a change
    if only_a or only_b:
        raise MismatchError(f"{a.source} and {b.source} hold different tensors (only in the first: "
                            f"{', '.join(only_a[:5]) or '-'}; only in the second: {', '.join(only_b[:5]) or '-'})")
    work = []  # (name, slot in a, slot in b, start, stop, shift of a's elements)
    # the same row map as the plan's: resized, or reordered at equal size (None: every row by id, or resized tensors
    # that disagree on their row counts, which the shape check below reports)
    row_map_, rows = match_rows(a, b, [n for n in a.tensors if n in b.tensors], vocab)
    for name, ta in a.tensors.items():
        if name not in b.tensors or name in skip:
            continue  # a tie (checked above), or a tensor the caller computes itself
        tb = b.tensors[name]
        if row_map_ and name in rows and ta.dtype in dtypes.FLOATS and tb.dtype in dtypes.FLOATS:
            # a resized or reordered vocabulary: the rows that mean the same token on both sides, the others left out
            row = math.prod(tb.shape[1:])
            step = max(1, chunk_bytes // max(dtypes.itemsize(ta.dtype), dtypes.itemsize(tb.dtype)))
            work += [(name, ta, tb, start, min(start + step, r1 * row), (s0 - r0) * row)
                     for r0, r1, s0 in row_map_.segments if s0 is not None
                     for start in range(r0 * row, r1 * row, step)]
            continue
        if ta.shape != tb.shape:
            raise MismatchError(f"tensor '{name}' has shape {list(ta.shape)} in {a.source} but "
                                f"{list(tb.shape)} in {b.source}")
        if ta.dtype not in dtypes.FLOATS or tb.dtype not in dtypes.FLOATS:
            continue
        step = max(1, chunk_bytes // max(dtypes.itemsize(ta.dtype), dtypes.itemsize(tb.dtype)))
        work += [(name, ta, tb, start, min(start + step, ta.numel), 0) for start in range(0, ta.numel, step)]
        if ta.numel == 0:
            work.append((name, ta, tb, 0, 0, 0))
    report = PairReport(a.source, b.source, vocab=row_map_.record(list(rows)) if row_map_ else None)
    inputs = Inputs([t.file for t in a.tensors.values()] + [t.file for t in b.tensors.values()], direct=direct_io())
    sets = [Buffers(chunk_bytes) for _ in range(2)]
    scratch = None

    def read(k: int):
        _, ta, tb, start, stop, shift = work[k]
        bufs = sets[k % 2]
        return (inputs.read_bytes(bufs.sft, ta, start + shift, stop + shift),
                inputs.read_bytes(bufs.aligned, tb, start, stop))

    try:
        with read_ahead(len(work), read) as chunks:
            for (name, ta, tb, *_), (x, y) in zip(work, chunks, strict=True):
                st = kernels.diff_stats_bytes(x, ta.dtype, y, tb.dtype)
                if st is None:
                    import torch

                    scratch = scratch or tuple(torch.empty(BLOCK, dtype=torch.float64) for _ in range(2))
                    st = chunk_stats(*(torch.from_numpy(v).view(dtypes.TORCH[t.dtype])
                                       for v, t in ((x, ta), (y, tb))), scratch)
                report.tensors.setdefault(name, Stats()).add(st)
        inputs.check_unchanged()
    finally:
        inputs.close()
    return report


def from_output(path: str) -> list[PairReport]:
    """The statistics `expo extrapolate` stored in OUT/expo.json: the change sft -> aligned and the applied update."""
    import json
    import os

    from .errors import SourceError
    from .writer import PROVENANCE_NAME

    file = os.path.join(path, PROVENANCE_NAME)
    try:
        with open(file) as f:
            prov = json.load(f)
        record = prov["stats"]
        return [PairReport(record[k]["a"], record[k]["b"],
                           {n: Stats(**v) for n, v in record[k]["tensors"].items()}) for k in ("delta", "update")]
    except FileNotFoundError:
        raise SourceError(f"{file}: not found; is {path} a folder written by expo extrapolate?") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, KeyError) and e.args == ("stats",):
            raise SourceError(f"{file} holds no statistics (the run used --no-stats); run "
                              "`expo norms SFT ALIGNED` instead") from None
        raise SourceError(f"{file}: unreadable statistics ({type(e).__name__}: {e})") from None


def parameter_norms(sources: list[str], chunk_bytes: int = 64 * 2**20, vocab: str = "auto") -> list[PairReport]:
    """Every pair (i < j) of the given checkpoints, as in the paper's Table 1. A LoRA adapter may be one of two
    sources, the other its base: the change is then s B A (modules it saved whole: their change). `vocab`: how
    vocabulary rows are matched (`compare`; the modes of `expo extrapolate --vocab`)."""
    from .adapters import change_stats, is_adapter, open_adapter

    adapters = [k for k, s in enumerate(sources) if is_adapter(s)]
    if adapters:
        if len(sources) != 2 or len(adapters) != 1:
            raise OptionError("a LoRA adapter is compared with its base model alone: expo norms BASE ADAPTER")
        base = open_checkpoint(sources[1 - adapters[0]])
        adapter = open_adapter(sources[adapters[0]], base)
        base = adapter.sft  # the base as the adapter sees it: a tied head written out where the adapter unties it
        report = compare(base, adapter.aligned, chunk_bytes, skip=set(adapter.loras), vocab=vocab)
        report.tensors.update(change_stats(adapter, chunk_bytes))
        report.tensors = {n: report.tensors[n] for n in base.tensors if n in report.tensors}  # the model's order
        return [report]
    cks = [open_checkpoint(s) for s in sources]
    return [compare(cks[i], cks[j], chunk_bytes, vocab=vocab) for i in range(len(cks)) for j in range(i + 1, len(cks))]


# ---------------------------------------------------------------------------------------------------------------
# Renderings

COLUMNS = ["fro", "rms", "fro_per_n", "relative", "cosine", "max_abs"]


def table(report: PairReport) -> str:
    agg = report.aggregates()
    rows = [("total", agg["total"])] + [(f"kind {k}", v) for k, v in agg["by_kind"].items()]
    rows += [(f"layer {k}", v) for k, v in agg["by_layer"].items()]
    head = f"{'':<14}" + "".join(f"{c:>13}" for c in ["n", *COLUMNS])
    lines = [f"{report.a}  ->  {report.b}", head]
    if report.vocab:
        v = report.vocab
        lines.insert(1, vocab_line(v))
    for label, s in rows:
        lines.append(f"{label:<14}{s['n']:>13,}" + "".join(f"{s[c]:>13.4e}" for c in COLUMNS))
    return "\n".join(lines)


def vocab_line(v: dict) -> str:
    """What `table` says of the vocabulary rows (a `PairReport.vocab` record): which were compared, which left out."""
    how = f"matched {v['matched']}" + (f", {v['rows_moved']} row(s) at another id" if v.get("rows_moved") else "")
    if v["sft_rows"] != v["aligned_rows"]:
        return (f"vocabulary resized ({v['sft_rows']} -> {v['aligned_rows']} rows, {how}): {', '.join(v['tensors'])} "
                f"compared on the {v['rows_extrapolated']} shared row(s); {v['rows_copied']} row(s) only in the second "
                "are left out")
    left = v["rows_copied"]
    return (f"vocabulary reordered ({v['aligned_rows']} rows, {how}): {', '.join(v['tensors'])} compared row by row "
            f"where the two tokenizers hold the same token, on {v['rows_extrapolated']} row(s)"
            + (f"; {left} row(s) of the second without a token of the first are left out" if left else ""))


def markdown(reports: list[PairReport]) -> str:
    out = []
    for r in reports:
        agg = r.aggregates()
        out.append(f"## `{r.a}` → `{r.b}`\n")
        out.append("| group | n | " + " | ".join(COLUMNS) + " |")
        out.append("|---|---:|" + "---:|" * len(COLUMNS))
        rows = [("total", agg["total"])] + [(f"kind {k}", v) for k, v in agg["by_kind"].items()]
        rows += [(f"layer {k}", v) for k, v in agg["by_layer"].items()]
        for label, s in rows:
            out.append(f"| {label} | {s['n']} | " + " | ".join(f"{s[c]:.4e}" for c in COLUMNS) + " |")
        out.append("")
    return "\n".join(out)


def csv_rows(reports: list[PairReport]) -> list[list]:
    rows = [["a", "b", "tensor", "layer", "kind", "n", *COLUMNS]]
    for r in reports:
        for name, st in r.tensors.items():
            layer, kind = classify(name)
            s = st.summary()
            rows.append([r.a, r.b, name, "" if layer is None else layer, kind, s["n"], *(s[c] for c in COLUMNS)])
    return rows


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'expo-engine[plot]'") from None
    return plt


def check_plotting(path: str) -> None:
    """Fail before any reading when --plot cannot be honoured: no matplotlib, or a format it cannot write."""
    plt = _pyplot()
    import io

    fig = plt.figure(figsize=(1, 1))
    try:
        formats = fig.canvas.get_supported_filetypes()
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        if ext not in formats:
            what = f".{ext} files" if ext else "a file without an extension"
            raise OptionError(f"--plot {path}: matplotlib cannot write {what}; end the name with one of "
                              + ", ".join("." + f for f in sorted(formats)))
        try:  # some formats need more than matplotlib (.pgf: a LaTeX install): try one before reading anything
            fig.text(0.5, 0.5, "x")  # text is what needs LaTeX
            fig.savefig(io.BytesIO(), format=ext)
        except Exception as e:  # noqa: BLE001 - whatever the backend raises, it is one message for the user
            raise OptionError(f"--plot {path}: matplotlib cannot write .{ext} here ({type(e).__name__}: "
                              f"{' '.join(str(e).split())}); use .png, .pdf or .svg") from None
    finally:
        plt.close(fig)


def plot(reports: list[PairReport], path: str) -> None:
    """Relative change per layer, one line per module kind, one panel per pair. Needs the `plot` extra."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(reports), 1, figsize=(8, 3.2 * len(reports)), squeeze=False)
    for ax, r in zip(axes[:, 0], reports, strict=True):
        per = r.aggregates()["by_layer_kind"]
        for kind in KINDS:
            pts = sorted((int(k.split("/")[0]), v["relative"]) for k, v in per.items() if k.endswith("/" + kind))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=kind)
        ax.set_title(f"{r.a} → {r.b}", fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("||B−A||F / ||A||F")
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
