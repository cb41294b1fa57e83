"""`expo demo`: a tiny Llama-shaped SFT/aligned pair, extrapolated and checked element by element."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from .api import extrapolate
from .kernels import error_steps

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def llama_state_dict(config: dict, seed: int, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights with a Llama checkpoint's names and shapes."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }
    return {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}


def write_checkpoint(folder: str, tensors: dict[str, torch.Tensor], config: dict, shards: int = 1) -> None:
    """Save like `save_pretrained`: config.json plus one `model.safetensors` or `shards` indexed shards."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def run_demo(alpha: float, keep: str | None = None, describe=str) -> int:
    """Build the tiny pair, extrapolate it, check every element, printing as it goes; `describe` renders the run's
    Summary (the CLI passes its own)."""
    root = keep or tempfile.mkdtemp(prefix="expo-demo-")
    try:
        return _demo(root, alpha, overwrite=keep is not None, describe=describe)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def _demo(root: str, alpha: float, overwrite: bool, describe) -> int:
    sft_dir, aligned_dir, out_dir = (os.path.join(root, n) for n in ("sft", "aligned", "expo"))
    sft = llama_state_dict(CONFIG, seed=0)
    # "Alignment": a small change on top of the SFT weights, as DPO makes.
    drift = llama_state_dict(CONFIG, seed=1, dtype=torch.float32)
    aligned = {k: (v.float() + 0.05 * drift[k]).to(torch.bfloat16) for k, v in sft.items()}
    write_checkpoint(sft_dir, sft, CONFIG, shards=1)
    write_checkpoint(aligned_dir, aligned, CONFIG, shards=3)
    n = sum(t.numel() for t in sft.values())
    print(f"built a tiny Llama-shaped pair ({n:,} parameters each, bf16) in {root}")
    print(f"  sft:     {sft_dir} (1 file)\n  aligned: {aligned_dir} (3 shards, cut differently)")

    summary = extrapolate(sft_dir, aligned_dir, alpha, out_dir, max_shard_size="100KB", chunk_bytes=16 * 1024,
                          overwrite=overwrite)
    print(describe(summary))
    print(f"  files: {', '.join(sorted(summary.files))} and expo.json")

    out = {}
    for name in summary.files:
        if name.endswith(".safetensors"):
            out |= load_file(os.path.join(out_dir, name))
    worst = max(error_steps(out[k], sft[k], aligned[k], alpha).max().item() for k in sft)
    ok = worst <= 1
    print(f"checked all {n:,} elements against the float64 formula rounded once to bf16: "
          f"{'all within one step' if ok else 'FAILED'} (worst {worst:.2f} step)")
    if overwrite:
        print(f"kept everything in {root}")
    else:
        print("removed the temp folder (expo demo --keep DIR keeps the files)")
    return 0 if ok else 1
