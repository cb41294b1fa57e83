"""Session-wide tiny checkpoints, made with transformers' save_pretrained and torch.save (no network)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from helpers import llama_pair, require_native, save_model  # noqa: E402


@dataclass
class Pair:
    sft: str  # folder
    aligned: str  # folder
    sft_state: dict
    aligned_state: dict
    sft_model: object
    aligned_model: object


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """Tiny Llama pairs (hidden 32, 2 layers) in several layouts, built once per session."""
    root = tmp_path_factory.mktemp("pairs")
    made = {}
    for tied in (False, True):
        sft, aligned = llama_pair(tied=tied)
        tag = "tied" if tied else "untied"
        # SFT as `.bin` in 3 shards, aligned as safetensors sharded differently (20 KB shards).
        made[f"{tag}-mixed"] = Pair(
            save_model(sft, str(root / f"{tag}-sft-bin"), "bin", bin_shards=3),
            save_model(aligned, str(root / f"{tag}-aligned-st"), shard_size="20KB"),
            _state(sft), _state(aligned), sft, aligned,
        )
        # Both single-file: sft model.safetensors, aligned pytorch_model.bin.
        made[f"{tag}-single"] = Pair(
            save_model(sft, str(root / f"{tag}-sft-st1")),
            save_model(aligned, str(root / f"{tag}-aligned-bin1"), "bin", bin_shards=1),
            _state(sft), _state(aligned), sft, aligned,
        )
    return made


@pytest.fixture
def pair(pairs):
    return pairs["untied-mixed"]


@pytest.fixture(params=["compiled", "generic", "torch"])
def kernel(request):
    """Run a kernel test on each implementation: the compiled kernel as this CPU runs it, its untuned loop, and
    torch ops. Without a built kernel (an install with no C compiler) its cases skip, saying so; CI sets
    EXPO_REQUIRE_NATIVE=1, where they fail instead (see require_native)."""
    from expo_engine import kernels

    with kernels.using(request.param) as available:
        if not available:
            require_native("expo_engine/_fused.c is not built (pip install -e . with a C compiler)")
        yield request.param
