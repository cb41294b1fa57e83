"""Builders of tiny real checkpoints for the tests: transformers models, safetensors and `.bin` shards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from expo_engine.kernels import error_steps


def llama_config(tied: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tied,
    )


def llama_pair(tied: bool = False, dtype=torch.bfloat16, scale: float = 0.01):
    """An SFT model and an "aligned" one that differs from it by a small random change, as DPO makes."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234 + tied)
    sft = LlamaForCausalLM(llama_config(tied)).to(dtype)
    aligned = LlamaForCausalLM(llama_config(tied)).to(dtype)
    aligned.load_state_dict(sft.state_dict())
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_((torch.randn_like(p, dtype=torch.float32) * scale).to(dtype))
    return sft, aligned


def save_bin_sharded(state_dict: dict[str, torch.Tensor], folder: str, shards: int) -> None:
    """Write `.bin` shards with torch.save plus a pytorch_model.bin.index.json, as older transformers did."""
    os.makedirs(folder, exist_ok=True)
    names = list(state_dict)
    if shards == 1:
        torch.save({n: state_dict[n].contiguous() for n in names}, os.path.join(folder, "pytorch_model.bin"))
        return
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state_dict[n].contiguous() for n in names[k::shards]}
        torch.save(part, os.path.join(folder, file))
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def save_model(model, folder: str, fmt: str = "safetensors", shard_size: str | None = None, bin_shards: int = 1):
    """Save a transformers model as safetensors (save_pretrained, optionally sharded) or as `.bin` shards."""
    if fmt == "safetensors":
        kwargs = {"max_shard_size": shard_size} if shard_size else {}
        model.save_pretrained(folder, **kwargs)
    else:
        model.config.save_pretrained(folder)
        state, seen = {}, set()
        for k, v in model.state_dict().items():
            # A single torch.save keeps tied tensors as views of one storage; across shards, keep the first only.
            if bin_shards == 1 or v.data_ptr() not in seen:
                state[k] = v
                seen.add(v.data_ptr())
        save_bin_sharded(state, folder, bin_shards)
    return folder


def load_output(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out |= load_file(os.path.join(folder, name))
    return out


def worst_steps(out: dict, sft: dict, aligned: dict, alpha: float, names=None) -> float:
    """The largest distance, in output-dtype steps, between the output and the float64 formula rounded once."""
    worst = 0.0
    for name in names or out:
        if out[name].numel():
            worst = max(worst, error_steps(out[name], sft[name], aligned[name], alpha).max().item())
    return worst


def copy_tree(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def fake_hub_repo(cache: str, repo: str, folder: str, commit: str, ref: str | None = "main") -> str:
    """huggingface_hub's cache layout for `folder`: models--ORG--NAME/{blobs/<sha256>, refs/main, snapshots/<commit>/}
    with every snapshot file a relative link `../../blobs/<sha256>`. Returns the snapshot folder. `ref` None writes
    no refs/ file (as a download by commit hash leaves none)."""
    repo_dir = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(repo_dir, "snapshots", commit)
    for sub in ("blobs", "refs", snap):
        os.makedirs(os.path.join(repo_dir, sub), exist_ok=True)
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo_dir, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snap, name))
    if ref:
        with open(os.path.join(repo_dir, "refs", ref), "w") as f:
            f.write(commit)
    return snap


def require_native(why: str) -> None:
    """Fail where the compiled kernel must exist (EXPO_REQUIRE_NATIVE=1, as CI sets), else skip with `why`."""
    if os.environ.get("EXPO_REQUIRE_NATIVE") == "1":
        pytest.fail(why)
    pytest.skip(why)
