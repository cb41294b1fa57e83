"""The aligned side as a PEFT LoRA adapter: much DPO is done with LoRA (TRL + peft), so the "aligned checkpoint" is
`adapter_config.json` + `adapter_model.safetensors` on top of the SFT model. Then, for every adapted weight,

    theta_aligned - theta_sft = s * B @ A        (s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA)
    theta_expo = theta_sft + (1 + alpha) * s * B @ A

and the modules the adapter saved whole (`modules_to_save`) are the aligned tensors themselves. LoRA on an embedding
(`lora_embedding_A/B`) is the same product, transposed.

What the aligned model is follows PEFT's own model with the adapter loaded:
- an initialisation that changes the base weights (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) makes an adapter relative to
  those changed weights, not to the SFT model: refused, with how to convert it to plain LoRA (`check_init`);
- a targeted embedding or head saves a copy of its base weight (`X.base_layer.weight`); it must equal the SFT's;
- with tied embeddings (the SFT checkpoint holds no `lm_head.weight`), an adapter that changes the head or the
  embedding changes only that one in PEFT's model, unless it ties its own changes (`ensure_weight_tying`): the
  output is then untied, its head written out (`Adapter.untied`, config.json's tie_word_embeddings false).

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

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from . import dtypes, kernels
from .errors import FormatError, MismatchError, SourceError
from .naming import classify, listing
from .plan import Plan
from .reading import Inputs
from .sources import Checkpoint, TensorSlot, read_safetensors_layout
from .vocab import vocab_size

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
    loras: dict[str, Lora]  # by the weight's name in `sft`
    saved: dict[str, TensorSlot]  # modules_to_save: their tensors, by the name in `sft` they replace
    aligned: Checkpoint  # the aligned side as the engine plans it
    sft: Checkpoint  # the SFT side as the engine plans it: the SFT's tensors, with the head written out when untied
    saved_as: dict[str, str] = field(default_factory=dict)  # adapter file name -> SFT name, of every saved module
    untied: tuple[str, str] | None = None  # (head, embedding): the output unties them (tie_word_embeddings false)
    notes: tuple[str, ...] = ()  # what the user should be told (the untying)
    record: dict = field(default_factory=dict)  # for expo.json


def _fail(path: str, why: str) -> MismatchError:
    return MismatchError(f"{path}: {why}; nothing was written")


# init_lora_weights values after which the saved adapter is relative to base weights its initialisation changed
# (PEFT subtracts the initial B @ A, or a quantisation error, from the base), by prefix, with their names
MUTATING_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA", "loftq": "LoftQ"}
# values that leave the base weights as they are (B @ A = 0 at the start, or nothing assumed)
PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica", "true", "false"}


def check_init(path: str, cfg: dict) -> None:
    """Refuse an adapter whose initialisation changed the base weights it was trained on (PiSSA, OLoRA, CorDA,
    LoRA-GA, LoftQ): merged onto the SFT model as plain LoRA it gives a wrong model (logits off by ~9 at alpha 0 on a
    tiny Llama). PEFT converts the first four into a plain LoRA adapter of twice the rank (save_pretrained with
    `path_initial_model_for_weight_conversion`), which expo takes; LoftQ's base is a quantised copy."""
    init = cfg.get("init_lora_weights", True)
    value = str(init).lower()
    kind = next((name for key, name in MUTATING_INITS.items() if value.startswith(key)), None)
    if kind is None and cfg.get("loftq_config"):
        kind, init = "LoftQ", f"{init!r} with loftq_config {cfg['loftq_config']!r}"
    elif kind is not None:
        init = repr(init)
    if kind == "LoftQ":
        raise _fail(path, f"a LoftQ adapter (init_lora_weights {init}) is relative to a quantised copy of its base, "
                          "not to --sft, and PEFT cannot convert it to plain LoRA; merge it into that base with PEFT "
                          "and pass the merged model as --aligned")
    if kind is not None:
        article = "an" if kind[0] in "AEIOU" else "a"
        raise _fail(path, f"{article} {kind} adapter (init_lora_weights {init}) is relative to base weights its "
                          "initialisation changed, not to --sft, so it cannot be merged as plain LoRA; save it with "
                          "PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved "
                          "before training>) to get the equivalent plain LoRA adapter (init_lora_weights true, twice "
                          "the rank), and pass that")
    if value not in PLAIN_INITS:
        raise _fail(path, f"init_lora_weights {init!r} is an initialisation expo does not know; it may have changed "
                          "the base weights, so the adapter is not merged (known: True, False, "
                          f"{', '.join(sorted(PLAIN_INITS - {'true', 'false'}))})")


HEAD = "lm_head.weight"  # the output head's name in transformers' causal LMs (Llama, Qwen2, GPT-2, Gemma, OPT, ...)


def tied_embedding(sft: Checkpoint) -> str | None:
    """The input embedding the SFT model's head is tied to, when its checkpoint holds no `lm_head.weight` and its
    config does not say tie_word_embeddings false: the one 2-D embedding tensor (position embeddings left out) with
    the config's vocab_size rows. None otherwise."""
    if HEAD in sft.tensors:
        return None
    try:
        with open(os.path.join(sft.path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}
    if cfg.get("tie_word_embeddings", True) is False:
        return None
    vocab = vocab_size(sft.path)  # as vocab reads it: also under text_config, OLMo's padded embedding_size
    names = [n for n, t in sft.tensors.items() if len(t.shape) == 2 and classify(n)[1] == "embed"
             and not re.search(r"wpe|position", n) and (not isinstance(vocab, int) or t.shape[0] == vocab)]
    return names[0] if len(names) == 1 else None


def untie_config(data: bytes, path: str) -> bytes:
    """config.json with tie_word_embeddings false (also in a nested text_config that has the key)."""
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{path}: not valid JSON, so its tied embeddings cannot be untied ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: is not a JSON object, so its tied embeddings cannot be untied")
    cfg["tie_word_embeddings"] = False
    if isinstance(cfg.get("text_config"), dict) and "tie_word_embeddings" in cfg["text_config"]:
        cfg["text_config"]["tie_word_embeddings"] = False
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def output_side_files(adapter: Adapter, side: dict[str, bytes]) -> dict[str, bytes]:
    """The merged output's side files: config.json untied when the adapter unties the head from the embedding."""
    if adapter.untied and "config.json" in side:
        return side | {"config.json": untie_config(side["config.json"], os.path.join(adapter.sft.path,
                                                                                     "config.json"))}
    return side


def _same_values(path: str, copy: TensorSlot, target: TensorSlot) -> bool:
    """Whether the adapter's copy of a base weight holds the SFT tensor's values (compared in float32, which holds
    bf16, fp16 and fp32 exactly), a block of rows at a time."""
    import torch

    inputs = Inputs([copy.file, target.file])
    try:
        rows = copy.shape[0] if copy.shape else 1
        step = max(1, (16 << 20) // max(1, copy.numel // max(1, rows) * 4))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            if not torch.equal(_read(inputs, copy, r0, r1), _read(inputs, target, r0, r1)):
                return False
    finally:
        inputs.close()
    return True


def open_adapter(folder: str, sft: Checkpoint) -> Adapter:
    """Read and check the LoRA adapter in `folder` against `sft`. Raises one clear error. Nothing is read but the
    configs, the headers and, where the adapter saved a copy of a base weight (a targeted embedding or head), that
    copy and the SFT tensor it must equal."""
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
    check_init(path, cfg)
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
    embedding: set[str] = set()  # modules whose LoRA is an embedding's (lora_embedding_A/B): the change transposed
    saved, copies, unknown = {}, {}, []
    for name, slot in slots.items():
        bare = name[len(PREFIX):] if name.startswith(PREFIX) else name
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", bare)
        e = re.fullmatch(r"(.+)\.lora_embedding_([AB])(?:\.[^.]+)?", bare)
        c = re.fullmatch(r"(.+)\.base_layer\.weight", bare)
        if m or e:
            module, ab = (m or e).group(1), (m or e).group(2)
            pairs.setdefault(module + ".weight", {})[ab] = slot
            if e:
                embedding.add(module + ".weight")
        elif c:
            copies[c.group(1) + ".weight"] = slot  # PEFT saves the base weight of a targeted embedding or head
        elif ".lora_magnitude_vector" in bare:
            unknown.append(name)
        else:
            saved[bare] = slot  # a module saved whole (modules_to_save)
    if unknown:
        raise _fail(path, f"{listing(unknown)}: DoRA magnitudes are not merged by expo")
    saved_as = {PREFIX + n if PREFIX + n in slots else n: n for n in saved}

    # Tied embeddings: in PEFT's model the adapter changes the head or the embedding it names, the other keeps the
    # SFT's values; unless `ensure_weight_tying` tied the adapter's own changes (then its head and embedding entries
    # are twins: one change, to the one tensor).
    sft_plan, untied, notes, record = sft, None, [], {}
    embed = tied_embedding(sft)
    touched = set(pairs) | set(saved) | set(copies)
    if embed and (HEAD in touched or embed in touched):
        if cfg.get("ensure_weight_tying"):
            for entries in (pairs, saved, copies):
                if HEAD in entries:
                    twin = entries.pop(HEAD)
                    entries.setdefault(embed, twin)  # the embedding's own entry, where it has one, is the twin
            saved_as = {k: (embed if v == HEAD else v) for k, v in saved_as.items()}
            record = {"tied": {"head": HEAD, "embedding": embed, "note": "the adapter ties its changes of the two "
                               "(ensure_weight_tying): the output keeps them tied, the change applied once, as in "
                               "PEFT's model with the adapter loaded"}}
        else:
            head_slot = dataclasses.replace(sft.tensors[embed], name=HEAD)
            sft_plan = dataclasses.replace(sft, tensors={**sft.tensors, HEAD: head_slot})
            untied = (HEAD, embed)
            changed = [n for n in (embed, HEAD) if n in pairs or n in saved]
            what = " and ".join(f"{n} ({'LoRA' if n in pairs else 'saved whole'})" for n in changed)
            notes.append(f"the adapter changes {what} of a model whose lm_head is tied to {embed}; as in PEFT's model, "
                         f"the output unties them: {HEAD} is written out (from the SFT's {embed} and the adapter's "
                         "change to it, if any) and config.json says tie_word_embeddings false"
                         + ("; PEFT's merge_and_unload differs: it writes the change into the shared tensor, so both "
                            "change" if any(n in pairs for n in changed) else ""))
            record = {"untied": {"head": HEAD, "embedding": embed, "changed": changed,
                                 "note": "tie_word_embeddings set false: in PEFT's model the adapter changes only "
                                         "the tensors listed; the other keeps the SFT's values"}}
    sft = sft_plan

    alpha_cfg, patterns = cfg.get("lora_alpha", 8), cfg.get("alpha_pattern") or {}
    rslora, transposed = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
    loras, wrong = {}, []
    for weight, ab in pairs.items():
        module = weight[: -len(".weight")]
        if set(ab) != {"A", "B"}:
            wrong.append(f"{module} (lora_{'A' if 'A' not in ab else 'B'} missing)")
            continue
        a, b = ab["A"], ab["B"]
        target = sft.tensors.get(weight)
        flip = transposed or weight in embedding  # an embedding's change is (B @ A)^T in PEFT
        r = a.shape[0] if len(a.shape) == 2 else -1
        want = (b.shape[0], a.shape[1]) if len(b.shape) == 2 and len(a.shape) == 2 else None
        if want and flip:
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
        loras[weight] = Lora(a, b, lora_alpha / (math.sqrt(r) if rslora else r), flip)
    for name, slot in saved.items():
        target = sft.tensors.get(name)
        if target is None or tuple(target.shape) != tuple(slot.shape):
            wrong.append(f"{name} (saved {list(slot.shape)}, SFT {list(target.shape) if target else 'none'})")
    for name, slot in copies.items():
        target = sft.tensors.get(name)
        if target is None or tuple(target.shape) != tuple(slot.shape) or slot.dtype not in dtypes.FLOATS:
            wrong.append(f"{name} (base copy {list(slot.shape)} {slot.dtype}, SFT "
                         f"{list(target.shape) if target else 'none'})")
    if wrong:
        hint = "" if embed or HEAD in sft.tensors or HEAD not in touched else (
            f"; the SFT checkpoint holds no {HEAD} and does not tie it to one embedding (tie_word_embeddings)")
        raise _fail(path, f"{len(wrong)} adapter tensor(s) do not fit the SFT model ({listing(wrong)}): is it an "
                          f"adapter for {sft.source}?{hint}")
    if not loras and not saved:
        raise _fail(path, f"{WEIGHTS_NAME} holds no LoRA tensors")
    for name, slot in copies.items():  # PEFT loads this copy over the base weight: it must be the SFT's
        if not _same_values(path, slot, sft.tensors[name]):
            raise _fail(path, f"its copy of the base weight {name} ({slot.name}) differs from --sft's {name}: the "
                              f"adapter was trained on another base (a resized vocabulary?); is it an adapter for "
                              f"{sft.source}?")
    tensors = {n: saved.get(n, t) for n, t in sft.tensors.items()}
    aligned = Checkpoint(path, path, None, "lora adapter", (WEIGHTS_NAME, *sft.files), tensors, ())
    return Adapter(path, cfg, loras, saved, aligned, sft, saved_as, untied, tuple(notes), record)


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


def write_scaled_adapter(adapter: Adapter, alpha: float, folder: str) -> list[str]:
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
    sft = adapter.sft  # with a tied head written out, where the adapter unties it
    inputs = Inputs([os.path.join(adapter.path, WEIGHTS_NAME)] + [sft.tensors[n].file for n in adapter.saved])
    tensors = {}
    try:
        for slot in slots:
            value = _read(inputs, slot).to(dtypes.TORCH[slot.dtype])
            base = sft.tensors.get(adapter.saved_as.get(slot.name, ""))  # a module saved whole (or its tied twin)
            if base is not None and slot.dtype in dtypes.FLOATS:
                s = _read(inputs, base).to(dtypes.TORCH[base.dtype])
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


def change_stats(adapter: Adapter, chunk_bytes: int) -> dict[str, kernels.Stats]:
    """`expo norms SFT ADAPTER` for the adapted weights: the statistics of the change s B A against the SFT
    weights (A = sft, B = sft + s B A), float64 sums, the SFT rows read and B @ A formed a row block at a time."""
    import torch

    out: dict[str, kernels.Stats] = {}
    sft = adapter.sft  # with a tied head written out, where the adapter unties it
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
