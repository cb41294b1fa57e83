"""The aligned side as a PEFT LoRA adapter: much DPO is done with LoRA (TRL + peft), so the "aligned checkpoint" is
`adapter_config.json` + `adapter_model.safetensors` on top of the SFT model. Then, for every adapted weight,

    theta_aligned - theta_sft = s * B @ A        (s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA)
    theta_expo = theta_sft + (1 + alpha) * s * B @ A

and the modules the adapter saved whole (`modules_to_save`) are the aligned tensors themselves.

- `open_adapter` checks the adapter against the SFT checkpoint (type, options, every tensor's shape) before
  anything is read, and describes the aligned side as a checkpoint: the SFT's tensors, with the saved modules'
  tensors from the adapter file;
- `run_lora_chunks` is the compute step of the merged output (the executor's pipeline around it): an adapted
  weight's chunk is sft + (1 + alpha) * s * (B @ A) for the chunk's rows, B @ A a row block at a time in float32,
  rounded once to the output dtype; every other tensor goes through the engine's kernel;
- `write_scaled_adapter` (`--as-adapter`): a PEFT adapter whose effect is (1 + alpha) times the original's:
  `lora_alpha` (and every `alpha_pattern` value) times (1 + alpha) in the config, so s grows exactly by that
  factor while A and B are copied byte for byte; the saved modules are extrapolated like any tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from . import dtypes, kernels
from .errors import FormatError, MismatchError, SourceError
from .naming import listing
from .plan import Plan
from .reading import Inputs
from .sources import Checkpoint, TensorSlot, read_safetensors_layout

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# options that change what the adapter adds beyond s * B @ A, which this engine does not compute
UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)",
               "layer_replication": "layer replication", "trainable_token_indices": "trainable token indices",
               "target_parameters": "LoRA on parameters (target_parameters)", "use_qalora": "QA-LoRA",
               "use_bdlora": "BD-LoRA"}


def is_adapter(folder: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(folder), CONFIG_NAME))


@dataclass(frozen=True)
class Lora:
    a: TensorSlot  # [r, in]
    b: TensorSlot  # [out, r]
    scale: float
    transposed: bool  # fan_in_fan_out (GPT-2's Conv1D): the weight is [in, out] and its change (B @ A)^T


@dataclass(frozen=True)
class Adapter:
    path: str
    config: dict
    loras: dict[str, Lora]  # by the weight's name in the SFT checkpoint
    saved: dict[str, TensorSlot]  # modules_to_save: their tensors, by name
    aligned: Checkpoint  # the aligned side as the engine plans it


def _fail(path: str, why: str) -> MismatchError:
    return MismatchError(f"{path}: {why}; nothing was written")


def open_adapter(folder: str, sft: Checkpoint) -> Adapter:
    """Read and check the LoRA adapter in `folder` against `sft`. Raises one clear error (nothing is read but the
    config and the headers)."""
    path = os.path.abspath(os.path.expanduser(folder))
    try:
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{os.path.join(path, CONFIG_NAME)}: not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{os.path.join(path, CONFIG_NAME)}: is not a JSON object")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise _fail(path, f"a PEFT {kind} adapter; expo takes LoRA adapters (peft_type LORA)")
    on = [why for key, why in UNSUPPORTED.items() if cfg.get(key) not in (None, False, [], {}, "")]
    if cfg.get("bias", "none") != "none":
        on.append(f"trained biases (bias={cfg['bias']!r})")
    if on:
        raise _fail(path, f"the adapter uses {', '.join(on)}, which expo does not merge; only plain LoRA and "
                          "rsLoRA adapters are supported")
    base = cfg.get("base_model_name_or_path")
    if base and os.path.isdir(os.path.expanduser(base)) and os.path.realpath(os.path.expanduser(base)) != \
            os.path.realpath(sft.path):
        raise _fail(path, f"the adapter was trained on {base}, not on --sft {sft.source}")
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise SourceError(f"{path}: has {CONFIG_NAME} but no {WEIGHTS_NAME} (a .bin adapter: save it with "
                          "safe_serialization=True)")
    slots = {s.name: s for s in read_safetensors_layout(weights)}
    pairs: dict[str, dict[str, TensorSlot]] = {}
    saved, unknown = {}, []
    for name, slot in slots.items():
        bare = name[len(PREFIX):] if name.startswith(PREFIX) else name
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", bare)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = slot
        elif ".lora_embedding_" in bare or ".lora_magnitude_vector" in bare:
            unknown.append(name)
        else:
            saved[bare] = slot  # a module saved whole (modules_to_save)
    if unknown:
        raise _fail(path, f"{listing(unknown)}: LoRA on embedding layers or DoRA magnitudes are not merged by expo")
    alpha_cfg, patterns = cfg.get("lora_alpha", 8), cfg.get("alpha_pattern") or {}
    rslora, transposed = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
    loras, wrong = {}, []
    for module, ab in pairs.items():
        weight = module + ".weight"
        if set(ab) != {"A", "B"}:
            wrong.append(f"{module} (lora_{'A' if 'A' not in ab else 'B'} missing)")
            continue
        a, b = ab["A"], ab["B"]
        target = sft.tensors.get(weight)
        r = a.shape[0] if len(a.shape) == 2 else -1
        want = (b.shape[0], a.shape[1]) if len(b.shape) == 2 and len(a.shape) == 2 else None
        if want and transposed:
            want = want[::-1]
        if target is None or want is None or b.shape[1] != r or tuple(target.shape) != want:
            wrong.append(f"{weight} (adapter {list(b.shape)} @ {list(a.shape)}, SFT "
                         f"{list(target.shape) if target else 'none'})")
            continue
        if a.dtype not in dtypes.FLOATS or b.dtype not in dtypes.FLOATS:
            wrong.append(f"{weight} (adapter dtypes {a.dtype}, {b.dtype})")
            continue
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
        lora_alpha = patterns[key] if key is not None else alpha_cfg
        loras[weight] = Lora(a, b, lora_alpha / (math.sqrt(r) if rslora else r), transposed)
    for name, slot in saved.items():
        target = sft.tensors.get(name)
        if target is None or tuple(target.shape) != tuple(slot.shape):
            wrong.append(f"{name} (saved {list(slot.shape)}, SFT {list(target.shape) if target else 'none'})")
    if wrong:
        raise _fail(path, f"{len(wrong)} adapter tensor(s) do not fit the SFT model ({listing(wrong)}): is it an "
                          f"adapter for {sft.source}?")
    if not loras and not saved:
        raise _fail(path, f"{WEIGHTS_NAME} holds no LoRA tensors")
    tensors = {n: saved.get(n, t) for n, t in sft.tensors.items()}
    aligned = Checkpoint(path, path, None, "lora adapter", (WEIGHTS_NAME, *sft.files), tensors, ())
    return Adapter(path, cfg, loras, saved, aligned)


def _read(inputs, slot: TensorSlot, r0: int = 0, r1: int | None = None):
    """Rows [r0, r1) of a tensor (all of it by default) as float32, through the reading layer."""
    import numpy as np

    rows = slot.shape[0] if slot.shape else 1
    r1 = rows if r1 is None else r1
    per_row = slot.numel // rows if rows else 0
    buf = np.empty(max(1, (r1 - r0) * per_row * dtypes.itemsize(slot.dtype)), dtype=np.uint8)
    flat = inputs.read_into(buf, slot, r0 * per_row, r1 * per_row)
    return flat.view((r1 - r0, *slot.shape[1:]) if slot.shape else ()).float()


def run_lora_chunks(plan: Plan, chunks, inputs, write: Callable, stats: bool = True, adapter: Adapter | None = None,
                    ) -> dict[str, tuple[kernels.Stats, kernels.Stats]]:
    """`executor.run_chunks` for an adapter job: an adapted weight's chunk is computed from its SFT elements and
    the LoRA factors (a row block of B @ A in float32); every other tensor with the engine's kernel. Reads of the
    next chunk overlap the compute (executor.ring); A and B of the tensor at hand are held (r x (in + out))."""
    import numpy as np
    import torch

    from .executor import chunk_alpha, ring
    from .reading import DEPTH, Buffers

    found: dict[str, tuple[kernels.Stats, kernels.Stats]] = {}
    sets = [Buffers(plan.chunk_bytes) for _ in range(DEPTH)]
    factor_inputs = Inputs([os.path.join(adapter.path, WEIGHTS_NAME)])
    factors: dict[str, tuple] = {}  # the current tensor's (A, B): one at a time

    def read(k: int):
        c = chunks[k]
        t, bufs = plan.tensors[c.tensor], sets[k % DEPTH]
        s = inputs.read_bytes(bufs.sft, t.sft, c.start, c.stop)
        if t.name in adapter.loras or t.action != "extrapolate":
            return s, None
        return s, inputs.read_bytes(bufs.aligned, t.aligned, c.start, c.stop)  # a saved module, or the SFT's own

    def compute(k: int, got):
        c = chunks[k]
        t, bufs = plan.tensors[c.tensor], sets[k % DEPTH]
        s, a = got
        if t.action == "copy":
            return s, None
        if t.name not in adapter.loras:
            out = bufs.out[: (c.stop - c.start) * dtypes.itemsize(t.dtype)]
            d, u = kernels.extrapolate_bytes(out, t.dtype, s, t.sft.dtype, a, t.aligned.dtype, chunk_alpha(t, c),
                                             stats)
            kernels.add_stats(found, t.name, d, u)
            return out, (d, u)
        lora = adapter.loras[t.name]
        if t.name not in factors:
            factors.clear()
            factors[t.name] = (_read(factor_inputs, lora.a), _read(factor_inputs, lora.b))
        fa, fb = factors[t.name]
        cols = t.shape[1]
        r0, r1 = c.start // cols, -(-c.stop // cols)
        delta = ((fa[:, r0:r1].T @ fb.T) if lora.transposed else (fb[r0:r1] @ fa)).mul_(lora.scale)
        delta = delta.reshape(-1)[c.start - r0 * cols:c.stop - r0 * cols]
        base = torch.from_numpy(s).view(dtypes.TORCH[t.sft.dtype]).float()
        aligned = base + delta  # theta_aligned, unrounded
        o = torch.empty(c.stop - c.start, dtype=dtypes.TORCH[t.dtype])
        o.copy_(aligned + t.alpha * delta)  # theta_sft + (1 + alpha) s B A, rounded once
        chunk_stats = None
        if stats:
            q = o.double()
            al = aligned.double()
            dd, uu = delta.double(), q - al
            chunk_stats = (kernels.Stats(o.numel(), float(dd @ dd), float(base.double() @ base.double()),
                                         float(al @ al), float(dd.abs().max()) if o.numel() else 0.0,
                                         bool(torch.isfinite(al).all())),
                           kernels.Stats(o.numel(), float(uu @ uu), float(al @ al), float(q @ q),
                                         float(uu.abs().max()) if o.numel() else 0.0, bool(torch.isfinite(q).all())))
        else:
            chunk_stats = (kernels.Stats(o.numel()), kernels.Stats(o.numel(), finite=bool(torch.isfinite(o).all())))
        kernels.add_stats(found, t.name, *chunk_stats)
        return o.view(torch.uint8).numpy(), chunk_stats

    def finish(k: int, done) -> None:
        out, chunk_stats = done
        c = chunks[k]
        write(plan.tensors[c.tensor], c, memoryview(np.ascontiguousarray(out)), chunk_stats)

    try:
        ring(len(chunks), read, compute, finish)
    finally:
        factor_inputs.close()
    return found


def write_scaled_adapter(adapter: Adapter, sft: Checkpoint, alpha: float, folder: str) -> list[str]:
    """Write into `folder` (a staging folder: the caller renames it into place) a PEFT adapter whose effect is
    (1 + alpha) times `adapter`'s: lora_alpha and alpha_pattern scaled in the config, A and B copied byte for
    byte, saved modules extrapolated (float32, one rounding). Returns the file names written."""
    import torch
    from safetensors.torch import save_file

    factor = 1.0 + alpha
    cfg = dict(adapter.config)
    cfg["lora_alpha"] = cfg.get("lora_alpha", 8) * factor
    if cfg.get("alpha_pattern"):
        cfg["alpha_pattern"] = {k: v * factor for k, v in cfg["alpha_pattern"].items()}
    slots = read_safetensors_layout(os.path.join(adapter.path, WEIGHTS_NAME))
    inputs = Inputs([os.path.join(adapter.path, WEIGHTS_NAME)] + [sft.tensors[n].file for n in adapter.saved])
    tensors = {}
    try:
        for slot in slots:
            value = _read(inputs, slot).to(dtypes.TORCH[slot.dtype])
            bare = slot.name[len(PREFIX):] if slot.name.startswith(PREFIX) else slot.name
            if bare in adapter.saved and slot.dtype in dtypes.FLOATS:
                s = _read(inputs, sft.tensors[bare]).to(dtypes.TORCH[sft.tensors[bare].dtype])
                out = torch.empty_like(value)
                kernels.extrapolate_chunk(out.view(-1), s.reshape(-1), value.reshape(-1), alpha)
                value = out
            tensors[slot.name] = value.contiguous()
    finally:
        inputs.close()
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2)
    return [WEIGHTS_NAME, CONFIG_NAME]


def change_stats(adapter: Adapter, sft: Checkpoint, chunk_bytes: int) -> dict[str, kernels.Stats]:
    """`expo norms SFT ADAPTER` for the adapted weights: the statistics of the change s B A against the SFT
    weights (A = sft, B = sft + s B A), float64 sums, the SFT rows read and B @ A formed a row block at a time."""
    import torch

    out: dict[str, kernels.Stats] = {}
    inputs = Inputs([os.path.join(adapter.path, WEIGHTS_NAME)] + [sft.tensors[n].file for n in adapter.loras])
    try:
        for name, lora in adapter.loras.items():
            slot = sft.tensors[name]
            fa, fb = _read(inputs, lora.a).double(), _read(inputs, lora.b).double()  # a report: float64 throughout
            rows, cols = slot.shape
            step = max(1, chunk_bytes // (cols * 8))
            st = kernels.Stats()
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                part = _read(inputs, slot, r0, r1)
                delta = ((fa[:, r0:r1].T @ fb.T) if lora.transposed else (fb[r0:r1] @ fa)) * lora.scale
                base = part.double()
                al = base + delta
                st.add(kernels.Stats(delta.numel(), float((delta * delta).sum()), float((base * base).sum()),
                                     float((al * al).sum()), float(delta.abs().max()) if delta.numel() else 0.0,
                                     bool(torch.isfinite(al).all())))
            out[name] = st
    finally:
        inputs.close()
    return out
