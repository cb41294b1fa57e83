"""Live weights: theta(alpha) streamed into a loaded model's tensors in place, for `expo search`.

For each alpha the engine plans the job as `expo extrapolate` would (same checks, same per-tensor output dtype),
reads both checkpoints chunk by chunk through the same reader and computes every chunk with the same kernel
(float32, one rounding); instead of a shard, each chunk's bytes go into the model tensor of that name, at the
chunk's element offset. Nothing is written to disk and no second copy of the model is held: memory is the model
plus the engine's chunk buffers. The tensors then hold exactly what loading `expo extrapolate`'s output for that
alpha would put there (tested).

Two ways to take the chunks:
- `LiveWeights(sft, aligned, tensors)` with the model's own tensors by checkpoint name (transformers: the state
  dict; names, shapes and dtypes must match the checkpoint's, tied aliases are written once);
- `stream_tensors(alpha, sink)`: whole tensors handed to `sink(name, tensor)` one at a time, for an inference
  engine that places (shards, fuses, renames) weights itself, like vLLM's `load_weights`. Memory then also holds
  the largest tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from . import dtypes
from .errors import MismatchError
from .executor import check_copies, run_chunks
from .naming import listing
from .plan import DEFAULT_CHUNK_BYTES, Plan, make_plan
from .reading import Inputs, direct_io, input_paths
from .sources import Checkpoint, open_checkpoint

if TYPE_CHECKING:
    import torch


def _plan(sft: Checkpoint, aligned: Checkpoint, alpha: float, chunk_bytes: int, drop=(),
          drop_shared: bool = False) -> Plan:
    plan = make_plan(sft, aligned, alpha, chunk_bytes=chunk_bytes, drop=drop, drop_shared=drop_shared)
    check_copies(plan)
    return plan


# The exponent field of each float dtype, as an unsigned integer view: all ones is Inf or NaN.
_EXPONENT = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000),
             "F64": (np.uint64, 0x7FF0000000000000)}


def count_nonfinite(data, dtype: str) -> int:
    """How many elements of the raw bytes `data` (safetensors dtype `dtype`) are NaN or Inf; 0 for other dtypes."""
    if dtype not in _EXPONENT:
        return 0
    kind, mask = _EXPONENT[dtype]
    bits = np.frombuffer(data, dtype=kind)
    return int(np.count_nonzero((bits & kind(mask)) == kind(mask)))


class LiveWeights:
    """The model tensors `tensors` (model name -> tensor, CPU or CUDA), set to theta(alpha) by `update`.

    A checkpoint tensor goes to the model tensor of its name, or where `placement` says ({checkpoint name: (model
    name, element offset)}: a part of a fused tensor, as an inference library's loader stacks MoE experts).
    Checked once, before any byte is read: every checkpoint tensor has its model tensor, of its shape (or room for
    it) and dtype (the output dtype `expo extrapolate` would write: the aligned tensor's), and every model tensor
    that is not an alias of another is wholly covered. Raises MismatchError naming all that do not fit.
    `drop`, `drop_shared`: the --drop patterns and --drop-shared (tensors left out, as `expo extrapolate` leaves
    them out of its output)."""

    def __init__(self, sft: str | Checkpoint, aligned: str | Checkpoint, tensors: dict[str, torch.Tensor],
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, placement: dict[str, tuple[str, int]] | None = None,
                 drop=(), drop_shared: bool = False):
        self.sft = sft if isinstance(sft, Checkpoint) else open_checkpoint(sft)
        self.aligned = aligned if isinstance(aligned, Checkpoint) else open_checkpoint(aligned)
        self.chunk_bytes, self.drop, self.drop_shared = chunk_bytes, tuple(drop or ()), drop_shared
        plan = _plan(self.sft, self.aligned, 0.0, chunk_bytes, self.drop, drop_shared)
        self.targets = _match(plan, tensors, placement or {})
        self.alpha: float | None = None

    def update(self, alpha: float) -> dict[str, int]:
        """Write theta(alpha) into the tensors, chunk by chunk. CUDA tensors receive each chunk with one copy.
        Returns {tensor name: NaN/Inf element count} of the tensors that hold any (an fp16 or bf16 overflow at a
        large alpha, or NaN/Inf already in an input): such a model is not one to generate with."""
        plan = _plan(self.sft, self.aligned, alpha, self.chunk_bytes, self.drop, self.drop_shared)
        views = {name: (_bytes_of(m), offset) for name, (m, offset) in self.targets.items()}
        nonfinite: dict[str, int] = {}

        def write(t, c, data: memoryview, chunk_stats) -> None:
            bad = count_nonfinite(data, t.dtype)
            if bad:
                nonfinite[t.name] = nonfinite.get(t.name, 0) + bad
            view, offset = views.get(t.name, (None, 0))
            if view is None:  # an alias of a tensor written under its other name
                return
            size = dtypes.itemsize(t.dtype)
            src = np.frombuffer(data, dtype=np.uint8)
            lo, hi = (offset + c.start) * size, (offset + c.stop) * size
            if isinstance(view, np.ndarray):
                view[lo:hi] = src
            else:
                import torch

                view[lo:hi].copy_(torch.from_numpy(src))

        inputs = Inputs(input_paths(plan), direct=direct_io())
        try:
            run_chunks(plan, plan.chunks, inputs, write, stats=False)
        finally:
            inputs.close()
        self.alpha = alpha
        return nonfinite


def stream_tensors(sft: Checkpoint, aligned: Checkpoint, alpha: float, sink: Callable[[str, torch.Tensor], None],
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, drop=(), drop_shared: bool = False) -> None:
    """theta(alpha) tensor by tensor: each tensor is assembled from its chunks in one reused host buffer and handed
    to `sink(name, tensor)` (valid only during the call) once complete, in the plan's order."""
    import torch

    plan = _plan(sft, aligned, alpha, chunk_bytes, drop, drop_shared)
    largest = max((t.nbytes for t in plan.tensors), default=0)
    buf = np.empty(max(largest, 1), dtype=np.uint8)

    def write(t, c, data: memoryview, chunk_stats) -> None:
        size = dtypes.itemsize(t.dtype)
        buf[c.start * size:c.stop * size] = np.frombuffer(data, dtype=np.uint8)
        if c.stop == t.numel:
            flat = torch.from_numpy(buf[:t.nbytes]).view(dtypes.TORCH[t.dtype])
            sink(t.name, flat.view(t.shape))

    inputs = Inputs(input_paths(plan), direct=direct_io())
    try:
        run_chunks(plan, plan.chunks, inputs, write, stats=False)
    finally:
        inputs.close()


def _bytes_of(t: torch.Tensor):
    """A writable byte view of tensor `t`: numpy for a CPU tensor, a uint8 torch view for a CUDA one."""
    import torch

    flat = t.detach().view(-1).view(torch.uint8)
    return flat.numpy() if flat.device.type == "cpu" else flat


def _match(plan: Plan, tensors: dict[str, torch.Tensor],
           placement: dict[str, tuple[str, int]]) -> dict[str, tuple[torch.Tensor, int]]:
    """The model tensor and element offset each plan tensor goes to: the tensor of its own name, or where
    `placement` puts it (a part of a fused tensor); aliases (tied weights: one storage under two names) once, under
    the first name the model lists. Raises MismatchError listing every misfit."""
    missing, wrong, misfit, targets, seen = [], [], set(), {}, {}
    for t in plan.tensors:
        key, offset = placement.get(t.name, (t.name, 0))
        m = tensors.get(key)
        if m is None:
            missing.append(t.name)
            continue
        want = dtypes.TORCH[t.dtype]
        fits = (tuple(m.shape) == tuple(t.shape) if key == t.name
                else offset + t.numel <= m.numel())  # placed: a contiguous part of the fused tensor
        if not fits or m.dtype != want or not m.is_contiguous():
            where = f" {key}" if key != t.name else ""
            wrong.append(f"{t.name} (checkpoint {list(t.shape)} {t.dtype}, model{where} {list(m.shape)} "
                         f"{dtypes.NAME.get(m.dtype, m.dtype)}{'' if m.is_contiguous() else ', not contiguous'})")
            misfit.add((m.device, m.data_ptr()))
            continue
        targets[t.name] = (m, offset)
    order = {name: k for k, name in enumerate(tensors)}
    for name in sorted((n for n in targets if n in order), key=order.__getitem__):
        m, offset = targets[name]
        key = (m.device, m.data_ptr(), offset)
        if key in seen:
            del targets[name]  # the alias: its storage is written under the first name
        else:
            seen[key] = name
    numel = {t.name: t.numel for t in plan.tensors}
    written: dict[tuple, int] = {}
    for name, (m, _) in targets.items():
        written[(m.device, m.data_ptr())] = written.get((m.device, m.data_ptr()), 0) + numel[name]
    uncovered = [n for n, m in tensors.items() if m.is_floating_point() and (m.device, m.data_ptr()) not in misfit
                 and written.get((m.device, m.data_ptr()), 0) < m.numel()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} checkpoint tensor(s) the model has no tensor for ({listing(missing)})")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of another shape or dtype in the model ({listing(wrong)})")
    if uncovered:
        problems.append(f"{len(uncovered)} model tensor(s) the checkpoints do not (wholly) hold "
                        f"({listing(uncovered)})")
    if problems:
        raise MismatchError("the loaded model does not take the checkpoints' tensors as they are: "
                            + "; ".join(problems) + ". Load the aligned checkpoint itself with its own dtype "
                            "(dtype=\"auto\"); an architecture whose loader transforms weights in ways other than "
                            "renaming, stacking experts and concatenating needs `--backend vllm`")
    return targets
