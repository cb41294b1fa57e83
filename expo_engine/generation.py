"""Generation for `expo search`: one inference model, loaded once from the aligned checkpoint, whose weights are set
to theta(alpha) in place before each evaluation, and sampled on the prompts.

The transformers backend (`TransformersBackend`: CPU or GPU, batched `generate`; the weights are the model's own
tensors, written chunk by chunk by `weights.LiveWeights`, or a LoRA adapter's scalings set by `ScaledAdapter`), and
what every backend shares: `Sampling`, `Response`, `render`, the prompt-length checks. The vLLM backend is in
`vllm_backend`; `backends.open_backend` picks one by name.

Sampling follows the paper's scripts (temperature 0.7, presence and frequency penalty 0.1, seed 42), and only
those: the checkpoint's generation_config.json extras (repetition_penalty, no_repeat_ngram_size, min_new_tokens,
suppress_tokens, ...) are not applied; only its end-of-sequence ids are. `generation_record()` says what was applied
and which keys were ignored. Every alpha draws the same random numbers (the generator is reseeded per batch with
`seed + batch`), so differences between alphas are paired.

Non-finite logits (an fp16 overflow at a large alpha) never crash generation: the row's step is replaced by the
end-of-sequence token and its Response is flagged `nonfinite`, which makes that alpha degenerate in the search.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .errors import OptionError
from .sources import Checkpoint


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn. `presence_penalty` and `frequency_penalty` are OpenAI's (and vLLM's): a generated
    token's logit is lowered by presence (once it has appeared) plus frequency times its count so far."""

    max_new_tokens: int = 512
    samples: int = 1
    seed: int = 42
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    presence_penalty: float = 0.1
    frequency_penalty: float = 0.1
    batch_size: int = 8


@dataclass(frozen=True)
class Response:
    text: str
    tokens: int  # generated tokens, the end-of-sequence token included when there is one
    truncated: bool  # stopped by max_new_tokens, not by an end-of-sequence token
    nonfinite: bool = False  # some step's logits held NaN or +Inf (that step was made end-of-sequence)


# config keys that bound a model's positions, in the order they are looked for (GPT-2: n_positions; Llama and most:
# max_position_embeddings; MPT: max_seq_len; ChatGLM, Qwen 1: seq_length)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx",
                 "max_sequence_length")
# generation_config keys that are not settings of how responses are drawn: never reported as ignored
NOT_SETTINGS = {"transformers_version", "_from_model_config", "_commit_hash", "bos_token_id",  # prompts are given
                "decoder_start_token_id", "use_cache", "output_attentions", "output_hidden_states",
                "return_dict_in_generate", "output_scores", "output_logits"}


def position_limit(config) -> tuple[int, str] | None:
    """The most positions (prompt plus generated tokens) the model takes, and the config key that says so; None
    when its config names no limit."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in POSITION_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, getattr(text, "attribute_map", {}).get(key, key)  # the name config.json uses (GPT-2's)
    return None


def check_prompt_lengths(counts: list[int], max_new_tokens: int, limit: tuple[int, str] | None) -> None:
    """One OptionError for a prompt that renders to no tokens, or for the longest prompt plus max_new_tokens
    beyond the model's positions (`limit` from position_limit). Prompts are numbered from 1, in file order."""
    for k, n in enumerate(counts):
        if n == 0:
            raise OptionError(f"prompt {k + 1} is empty once rendered (an empty prompt, or empty messages without a "
                              "chat template): give it some text or leave it out")
    if limit is None or not counts:
        return
    positions, key = limit
    k = max(range(len(counts)), key=lambda i: counts[i])
    longest = counts[k]
    if longest + max_new_tokens > positions:
        fix = (f"use --max-new-tokens {positions - longest} or less, or shorten it" if longest < positions else
               "shorten it")
        raise OptionError(f"prompt {k + 1} is {longest} tokens, and with --max-new-tokens {max_new_tokens} it would "
                          f"need {longest + max_new_tokens} positions, more than the model's {positions} "
                          f"({key} in its config): {fix}")


def render(tokenizer, prompt: str | None, messages: list | None, chat_template: bool) -> str:
    """The text the model is given: the chat template applied to the conversation (a plain prompt is one user
    turn) with the assistant turn opened, or the prompt as it is without a template."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        turns = messages if messages is not None else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    if messages is not None:
        return "\n".join(str(m.get("content", "")) for m in messages)
    return prompt


class TransformersBackend:
    """A transformers causal LM loaded from the aligned checkpoint on `device`, with its tokenizer."""

    name = "transformers"

    def __init__(self, sft: Checkpoint, aligned: Checkpoint, device, chunk_bytes: int, drop=(), adapter=None,
                 drop_shared: bool = False):
        import torch

        try:
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        except ImportError:
            raise OptionError("expo search needs transformers: pip install 'expo-engine[search]'") from None

        from .weights import LiveWeights

        self.device = torch.device(device)
        # an adapter folder often has the tokenizer it was trained with (a chat template added); else the SFT's
        source = aligned.path if adapter is None else adapter.path if has_tokenizer(adapter.path) else sft.path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as e:  # transformers raises OSError, ValueError or its own errors for a missing tokenizer
            raise OptionError(f"{source}: no tokenizer that transformers can load ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); expo search generates with the "
                              "aligned model's own tokenizer") from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if adapter is None:
            self.model = AutoModelForCausalLM.from_pretrained(aligned.path, dtype="auto").to(self.device).eval()
            state = self.model.state_dict()
            self.weights = LiveWeights(sft, aligned, state, chunk_bytes=chunk_bytes,
                                       placement=transformers_placement(self.model, aligned, state), drop=drop,
                                       drop_shared=drop_shared)
            inner = self.model
        else:
            try:
                from peft import PeftModel
            except ImportError:
                raise OptionError("expo search with a LoRA adapter as --aligned needs peft: pip install peft") from None
            base = AutoModelForCausalLM.from_pretrained(sft.path, dtype="auto")
            self.model = PeftModel.from_pretrained(base, adapter.path).to(self.device).eval()
            self.weights = ScaledAdapter(self.model)
            inner = self.model.get_base_model()
        # The paper's sampling only: the checkpoint's generation config (generation_config.json, or generation
        # keys of an old config.json) is replaced by one holding its end-of-sequence ids and the pad id. generate()
        # fills every setting it is not given from the model's generation config, so passing our own config to
        # generate() alone would still apply the checkpoint's extras.
        loaded = inner.generation_config
        eos = loaded.eos_token_id
        eos = eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id]
        self.eos = sorted({int(e) for e in eos if e is not None})
        pad = self.tokenizer.pad_token_id
        self.pad = int(pad if pad is not None else self.eos[0])
        self.base = {"eos_token_id": self.eos, "pad_token_id": self.pad}
        # ignored: what the checkpoint sets (to_diff_dict: the keys it gives a value) and generation does not apply
        self.ignored = sorted(k for k, v in loaded.to_diff_dict().items()
                              if k not in NOT_SETTINGS and k != "eos_token_id" and self.base.get(k) != v)
        inner.generation_config = GenerationConfig(**self.base)  # PEFT's generate() uses its base model's
        self.versions = {"transformers": transformers.__version__, "torch": torch.__version__}

    def load_weights(self, alpha: float) -> dict[str, int]:
        """theta(alpha) into the model; returns {tensor: NaN/Inf count} of the tensors that hold any."""
        return self.weights.update(alpha)

    def check_lengths(self, texts: list[str], max_new_tokens: int) -> None:
        """Refuses (OptionError, one line) a rendered prompt with no tokens, and a longest prompt that with
        max_new_tokens would go beyond the model's positions: call it before the first evaluation."""
        counts = [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        check_prompt_lengths(counts, max_new_tokens, position_limit(self.model.config))

    def generation_settings(self, sampling: Sampling) -> dict:
        """The GenerationConfig that generate() is given, as a dict: sampling plus the eos and pad ids, nothing else
        (transformers' global defaults fill the rest, and with the model's own config replaced they change nothing:
        no repetition penalty, n-gram ban, minimum length or suppressed tokens)."""
        greedy = sampling.temperature <= 0
        return self.base | {"max_new_tokens": sampling.max_new_tokens, "num_return_sequences": sampling.samples,
                            "do_sample": not greedy} | ({} if greedy else {
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k})

    def generation_record(self, sampling: Sampling | None = None) -> dict:
        """Every setting that generation applies, JSON-able, for the search's record and resume key: the eos and
        pad ids, the logits processors (in order), the reseeding, the library versions, the checkpoint's
        generation-config keys that were ignored (set there to a value that generation does not use) and, with
        `sampling`, the exact GenerationConfig given to generate()."""
        out = {"backend": self.name, "eos_token_id": self.eos, "pad_token_id": self.pad,
               "ignored_generation_config": self.ignored,
               "logits_processors": ["nonfinite: a row whose logits hold NaN or +Inf takes end-of-sequence, flagged",
                                     "presence and frequency penalties on the generated tokens (OpenAI's)"],
               "reseed": "torch.manual_seed(seed + batch) before each batch", "padding": "left",
               "versions": self.versions}
        if sampling is not None:
            out["generate"] = self.generation_settings(sampling)
            out["presence_penalty"], out["frequency_penalty"] = sampling.presence_penalty, sampling.frequency_penalty
        return out

    def render(self, prompt: str | None, messages: list | None, chat_template: bool) -> str:
        return render(self.tokenizer, prompt, messages, chat_template)

    def generate(self, texts: list[str], sampling: Sampling,
                 on_batch: Callable[[int], None] | None = None) -> list[list[Response]]:
        """`sampling.samples` responses per text, in batches of `sampling.batch_size` texts. A response whose
        logits were NaN or +Inf at some step ends there (with end-of-sequence) and is flagged `nonfinite`."""
        import torch
        from transformers import GenerationConfig

        self.check_lengths(texts, sampling.max_new_tokens)
        config = GenerationConfig(**self.generation_settings(sampling))
        eos, pad = set(self.eos), self.pad
        out: list[list[Response]] = []
        for b, start in enumerate(range(0, len(texts), sampling.batch_size)):
            batch = texts[start:start + sampling.batch_size]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            prompt_len = enc["input_ids"].shape[1]
            guard = _NonFinite(prompt_len, self.eos or [pad])
            torch.manual_seed(sampling.seed + b)  # the same random numbers for every alpha: paired comparisons
            with torch.no_grad():
                # the guard first, so that it sees the model's own logits and hands the others finite ones
                ids = self.model.generate(**enc, generation_config=config, logits_processor=[
                    guard, _Penalties(prompt_len, sampling.presence_penalty, sampling.frequency_penalty)])
            new = ids[:, prompt_len:].tolist()
            flags = guard.flags(len(new))
            for k in range(len(batch)):
                rows = range(k * sampling.samples, (k + 1) * sampling.samples)
                out.append([self._response(new[r], eos, pad, sampling.max_new_tokens, flags[r]) for r in rows])
            if on_batch:
                on_batch(min(start + sampling.batch_size, len(texts)))
        return out

    def _response(self, row: list[int], eos: set, pad, limit: int, nonfinite: bool = False) -> Response:
        end = next((i for i, t in enumerate(row) if t in eos), None)
        kept = row if end is None else row[:end]
        if end is None:
            while kept and kept[-1] == pad and pad not in eos:
                kept = kept[:-1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        tokens = len(kept) + (end is not None)
        return Response(text, tokens, end is None and len(row) >= limit, nonfinite)


def has_tokenizer(folder: str) -> bool:
    """Whether `folder` holds tokenizer files (an adapter folder often has the tokenizer it was trained with)."""
    import os

    return any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer_config.json",
                                                                  "tokenizer.model"))


class ScaledAdapter:
    """theta(alpha) of a LoRA adapter loaded with PEFT on the SFT model, in place and without streaming a weight:
    theta_aligned - theta_sft is s * B @ A for every adapted weight, so theta(alpha) is the same adapter with every
    LoRA layer's scaling (1 + alpha) times its own (A and B untouched); a module the adapter saved whole
    (modules_to_save) is set to sft + (1 + alpha) * (saved - sft) with the engine's kernel (float32, one rounding),
    from a copy of the saved values kept aside. The model is PEFT's own, so what it computes at alpha = 0 is what
    PEFT computes with the adapter loaded (tied embeddings included)."""

    def __init__(self, model):
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        self.scalings = [(m, name, s) for m in model.modules() if isinstance(m, LoraLayer)
                         for name, s in m.scaling.items()]
        self.saved = []  # (module tensor to set, the SFT's, the saved values)
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                original = dict(module.original_module.named_parameters())
                for copy in module.modules_to_save.values():
                    for pname, p in copy.named_parameters():
                        if p.is_floating_point():
                            self.saved.append((p, original[pname], p.detach().clone()))

    def update(self, alpha: float) -> dict[str, int]:
        """Scale to alpha; returns {saved tensor: NaN/Inf count} of saved modules that overflow (the scaled LoRA
        product is computed by the model itself: an overflow there shows in its logits)."""
        import torch

        from .kernels import extrapolate_chunk

        for layer, name, s in self.scalings:
            layer.scaling[name] = s * (1 + alpha)
        bad = {}
        with torch.no_grad():
            for k, (target, sft, saved) in enumerate(self.saved):
                flat = target.data.view(-1)
                extrapolate_chunk(flat, sft.data.reshape(-1).to(flat.device), saved.view(-1), alpha)
                n = int((~torch.isfinite(flat)).sum())
                if n:
                    bad[f"modules_to_save[{k}]"] = n
        return bad


def transformers_placement(model, aligned: Checkpoint, state: dict) -> dict[str, tuple[str, int]]:
    """Where transformers' own loader puts each checkpoint tensor that does not keep its name: {checkpoint name:
    (model tensor name, element offset)}. Taken from the library's conversion mapping for this model
    (`get_model_conversion_mapping`, the one its loader and PEFT use): renamings, and converters that stack experts
    (MergeModulelist(dim=0)) and then concatenate their projections (Concatenate(dim=1)), as MoE models load. A
    tensor under any other transform is left out, and LiveWeights refuses it by name."""
    import re
    from collections import defaultdict

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
    except ImportError:  # a transformers without conversions: names are kept
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    placed: dict[str, tuple[str, int]] = {}
    groups: dict[str, list] = defaultdict(list)  # fused model tensor -> [(projection k, expert e, name, shape)]
    for name, slot in aligned.tensors.items():
        if name in state:
            continue
        key = name
        for r in renamings:
            key = r.rename_source_key(key)[0]
        if key in state:
            placed[name] = (key, 0)
            continue
        for c in converters:
            target, pattern = c.rename_source_key(key)
            if pattern is None:
                continue
            ops = list(c.operations)
            stackable = (len(ops) in (1, 2) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
                         and (len(ops) == 1 or (isinstance(ops[1], Concatenate) and ops[1].dim == 1)))
            m = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
            if stackable and m and len(slot.shape) >= 1:
                groups[target].append((c.source_patterns.index(pattern), int(m.group(1)), name, slot.shape))
            break
    for target, parts in groups.items():
        rows = {k: shape[0] for k, _, _, shape in parts}
        inner = parts[0][3][1:]
        experts = {e for _, e, _, _ in parts}
        total = sum(rows.values())
        param = state.get(target)
        if (param is None or tuple(param.shape) != (len(experts), total, *inner)
                or len(parts) != len(experts) * len(rows) or any(shape[1:] != inner for *_, shape in parts)):
            continue  # not the layout this placement knows: left to LiveWeights to refuse
        start = {k: sum(rows[j] for j in rows if j < k) for k in rows}
        cols = math.prod(inner)
        for k, e, name, _ in parts:
            placed[name] = (target, (e * total + start[k]) * cols)
    return placed


class _NonFinite:
    """A transformers LogitsProcessor, run before the penalties and the sampling warpers: a row whose logits hold
    NaN or +Inf, or no finite value at all, is recorded, unless it has already ended (its later steps are padding),
    and its step is made end-of-sequence (every other logit -inf), so sampling never sees a NaN and the response
    ends there. A -Inf beside finite logits is a token masked out (transformers' own processors, were any applied,
    run before this one and mask that way), not an overflow."""

    def __init__(self, prompt_len: int, eos: list[int]):
        self.prompt_len, self.eos, self.bad = prompt_len, eos, None

    def __call__(self, input_ids, scores):
        import torch

        broken = (torch.isnan(scores) | torch.isposinf(scores)).any(dim=1) | ~torch.isfinite(scores).any(dim=1)
        if self.bad is None:
            self.bad = torch.zeros_like(broken)
        if not broken.any():
            return scores
        generated = input_ids[:, self.prompt_len:]
        ended = torch.isin(generated, torch.tensor(self.eos, device=generated.device)).any(dim=1)
        self.bad |= broken & ~ended
        safe = torch.full_like(scores, -math.inf)
        safe[:, self.eos[0]] = 0.0
        return torch.where(broken[:, None], safe, scores)

    def flags(self, rows: int) -> list[bool]:
        return self.bad.tolist() if self.bad is not None else [False] * rows


class _Penalties:
    """Presence and frequency penalties on the tokens generated so far (not the prompt's), as OpenAI and vLLM
    define them; a transformers LogitsProcessor."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        import torch

        if (not self.presence and not self.frequency) or input_ids.shape[1] <= self.prompt_len:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, input_ids[:, self.prompt_len:], torch.ones_like(input_ids[:, self.prompt_len:],
                                                                                dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
