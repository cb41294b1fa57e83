"""Generation for `expo search`: one inference model, loaded once from the aligned checkpoint, whose weights are set
to theta(alpha) in place before each evaluation, and sampled on the prompts.

Two backends behind one interface (`load_weights(alpha)`, `generate(prompts, sampling)`):
- "transformers": CPU or GPU, batched `generate`; the weights are the model's own tensors, written chunk by chunk
  (`weights.LiveWeights`);
- "vllm": GPU only, when vllm is importable; whole tensors are pushed into the running engine with its own
  `load_weights` (which shards and fuses them), and the prefix cache is reset after each update. UNTESTED: it has
  not run on a GPU yet (see docs/search.md).

Sampling follows the paper's scripts (temperature 0.7, presence and frequency penalty 0.1, seed 42). Every alpha
draws the same random numbers (the generator is reseeded per batch with `seed + batch`), so differences between
alphas are paired.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import OptionError
from .sources import Checkpoint

BACKENDS = ("transformers", "vllm")


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

    def __init__(self, sft: Checkpoint, aligned: Checkpoint, device, chunk_bytes: int):
        import torch

        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise OptionError("expo search needs transformers: pip install 'expo-engine[search]'") from None

        from .weights import LiveWeights

        self.device = torch.device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(aligned.path)
        except Exception as e:  # transformers raises OSError, ValueError or its own errors for a missing tokenizer
            raise OptionError(f"{aligned.path}: no tokenizer that transformers can load ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); expo search generates with the "
                              "aligned model's own tokenizer") from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(aligned.path, dtype="auto").to(self.device).eval()
        state = self.model.state_dict()
        self.weights = LiveWeights(sft, aligned, state, chunk_bytes=chunk_bytes,
                                   placement=transformers_placement(self.model, aligned, state))

    def load_weights(self, alpha: float) -> None:
        self.weights.update(alpha)

    def render(self, prompt: str | None, messages: list | None, chat_template: bool) -> str:
        return render(self.tokenizer, prompt, messages, chat_template)

    def generate(self, texts: list[str], sampling: Sampling,
                 on_batch: Callable[[int], None] | None = None) -> list[list[Response]]:
        """`sampling.samples` responses per text, in batches of `sampling.batch_size` texts."""
        import torch

        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])
        pad = self.tokenizer.pad_token_id
        out: list[list[Response]] = []
        for b, start in enumerate(range(0, len(texts), sampling.batch_size)):
            batch = texts[start:start + sampling.batch_size]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            torch.manual_seed(sampling.seed + b)  # the same random numbers for every alpha: paired comparisons
            with torch.no_grad():
                ids = self.model.generate(
                    **enc, do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                    top_p=sampling.top_p, top_k=sampling.top_k, max_new_tokens=sampling.max_new_tokens,
                    num_return_sequences=sampling.samples, pad_token_id=pad,
                    logits_processor=[_Penalties(enc["input_ids"].shape[1], sampling.presence_penalty,
                                                 sampling.frequency_penalty)])
            new = ids[:, enc["input_ids"].shape[1]:].tolist()
            for k in range(len(batch)):
                rows = new[k * sampling.samples:(k + 1) * sampling.samples]
                out.append([self._response(row, eos, pad, sampling.max_new_tokens) for row in rows])
            if on_batch:
                on_batch(min(start + sampling.batch_size, len(texts)))
        return out

    def _response(self, row: list[int], eos: set, pad, limit: int) -> Response:
        end = next((i for i, t in enumerate(row) if t in eos), None)
        kept = row if end is None else row[:end]
        if end is None:
            while kept and kept[-1] == pad and pad not in eos:
                kept = kept[:-1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        tokens = len(kept) + (end is not None)
        return Response(text, tokens, end is None and len(row) >= limit)


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


class VllmBackend:
    """vLLM on the visible GPUs (tensor parallel over all of them). UNTESTED on a GPU: written against vLLM's
    public `LLM` API (`generate`, `collective_rpc`, `reset_prefix_cache`); see docs/search.md."""

    name = "vllm"

    def __init__(self, sft: Checkpoint, aligned: Checkpoint, device, chunk_bytes: int):
        try:
            import torch
            from vllm import LLM
        except ImportError:
            raise OptionError("--backend vllm needs vllm installed (pip install vllm; it runs on a GPU only); "
                              "--backend transformers runs anywhere") from None
        if not torch.cuda.is_available():
            raise OptionError("--backend vllm needs a CUDA GPU; use --backend transformers here")
        self.sft, self.aligned, self.chunk_bytes = sft, aligned, chunk_bytes
        self.llm = LLM(model=aligned.path, dtype="auto", tensor_parallel_size=torch.cuda.device_count(),
                       enable_prefix_caching=True)
        self.tokenizer = self.llm.get_tokenizer()

    def load_weights(self, alpha: float) -> None:
        from .weights import stream_tensors

        def sink(name, tensor):
            self.llm.collective_rpc(_load_one, args=(name, tensor.cuda()))

        stream_tensors(self.sft, self.aligned, alpha, sink, self.chunk_bytes)
        self.llm.reset_prefix_cache()

    def render(self, prompt: str | None, messages: list | None, chat_template: bool) -> str:
        return render(self.tokenizer, prompt, messages, chat_template)

    def generate(self, texts: list[str], sampling: Sampling,
                 on_batch: Callable[[int], None] | None = None) -> list[list[Response]]:
        from vllm import SamplingParams

        params = [SamplingParams(n=sampling.samples, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k or -1, presence_penalty=sampling.presence_penalty,
                                 frequency_penalty=sampling.frequency_penalty, max_tokens=sampling.max_new_tokens,
                                 seed=sampling.seed + i) for i in range(len(texts))]
        done = self.llm.generate(texts, params, use_tqdm=False)
        if on_batch:
            on_batch(len(texts))
        return [[Response(o.text, len(o.token_ids), o.finish_reason == "length") for o in r.outputs] for r in done]


def _load_one(worker, name, tensor):
    """Runs in each vLLM worker: the model's own loader places (shards, fuses) the tensor."""
    worker.model_runner.model.load_weights(weights=[(name, tensor)])


def open_backend(name: str, sft: Checkpoint, aligned: Checkpoint, device, chunk_bytes: int):
    if name not in BACKENDS:
        raise OptionError(f"--backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    started = time.monotonic()
    backend = (TransformersBackend if name == "transformers" else VllmBackend)(sft, aligned, device, chunk_bytes)
    backend.load_seconds = time.monotonic() - started
    return backend
