"""Tiny SFT/aligned pairs that vLLM's CPU kernels take (head_dim 64), saved by transformers with a real tokenizer."""

from __future__ import annotations

import os
import string

import torch

PAIRS = {  # family -> (config class, config keywords, dtype)
    "llama": ("LlamaConfig", {"num_key_value_heads": 1, "tie_word_embeddings": False}, torch.bfloat16),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2, "tie_word_embeddings": True}, torch.float16),
}


def tiny_config(family: str):
    import transformers

    cls, extra, dtype = PAIRS[family]
    return getattr(transformers, cls)(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=128, max_position_embeddings=256,
                                      rms_norm_eps=1e-6, **extra), dtype


def save_pair(family: str, root: str, scale: float = 0.02, seed: int = 7) -> tuple[str, str]:
    """An SFT model and an aligned one that differs from it by random noise of `scale`, each folder with the tiny
    tokenizer (tiny_tokenizer: 109 of the 128 rows). Returns (sft folder, aligned folder)."""
    from transformers import AutoModelForCausalLM

    config, dtype = tiny_config(family)
    torch.manual_seed(seed)
    sft = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for p in sft.parameters():  # larger weights than the default init, so that outputs depend on alpha
            if p.dim() > 1:
                p.normal_(0, 0.08)
    aligned = AutoModelForCausalLM.from_config(config).to(dtype)
    aligned.load_state_dict(sft.state_dict())
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_((torch.randn_like(p, dtype=torch.float32) * scale).to(dtype))
    folders = []
    for model, name in ((sft, "sft"), (aligned, "aligned")):
        folder = os.path.join(root, f"{family}-{name}")
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


LETTERS = string.ascii_letters  # 52 words: each " x" is one token, "Ġx" in byte-level BPE


def tiny_tokenizer():
    """A byte-level BPE tokenizer of 109 tokens (<pad> <s> </s> <unk>, "Ġ", the 52 letters and the 52 "Ġ"+letter
    merges), built with `tokenizers`. Byte-level because transformers 5 loads a Qwen2 folder's tokenizer as its own
    Qwen2Tokenizer (a byte-level BPE rebuilt from the file's vocabulary and merges) whatever tokenizer_config.json
    says: a word-level vocabulary would tokenize every prompt to nothing there. Llama loads the same file as it is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "Ġ": 4}
    vocab |= {c: 5 + i for i, c in enumerate(LETTERS)}
    vocab |= {"Ġ" + c: 5 + len(LETTERS) + i for i, c in enumerate(LETTERS)}
    merges = [("Ġ", c) for c in LETTERS]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def prompts(n: int = 4, seed: int = 3) -> list[str]:
    """Prompts of 140 to 200 one-letter words (one token each): longer than a KV block (128 tokens on the CPU), so
    that the prefix cache holds their first block."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(140, 201, (1,), generator=g))
        out.append(" ".join(LETTERS[int(i)] for i in torch.randint(0, len(LETTERS), (k,), generator=g)))
    return out


def save_lora(family: str, root: str, dtype=torch.float32, targets=("q_proj", "v_proj", "down_proj"), r: int = 4,
              lora_alpha: float = 8, alpha_pattern: dict | None = None, saved: tuple[str, ...] = (),
              scale: float = 0.1, seed: int = 11, name: str = "lora") -> tuple[str, str]:
    """An SFT model of `family` in `dtype` (tokenizer included; saved once per root) and a PEFT LoRA adapter on it
    written as PEFT saves one (adapter_config.json, adapter_model.safetensors with base_model.model. names), without
    peft: A and B random (B of `scale`, so that theta depends on alpha), `saved` modules (e.g. "lm_head") written
    whole as modules_to_save. Returns (sft folder, adapter folder)."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config, _ = tiny_config(family)
    sft = os.path.join(root, f"{family}-lora-sft")
    if not os.path.isdir(sft):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.08)
        model.save_pretrained(sft)
        tiny_tokenizer().save_pretrained(sft)
    state = AutoModelForCausalLM.from_pretrained(sft, dtype=dtype).state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for key, w in state.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module.rsplit(".", 1)[-1] in targets:
            out, inp = w.shape
            a, b = torch.randn(r, inp, generator=g) / inp ** 0.5, torch.randn(out, r, generator=g) * scale
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype)
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype)
        elif module in saved:
            tensors[f"base_model.model.{key}"] = (w.float() + torch.randn(w.shape, generator=g) * 0.02).to(dtype)
    folder = os.path.join(root, f"{family}-{name}")
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": sft, "r": r,
           "lora_alpha": lora_alpha, "alpha_pattern": alpha_pattern or {}, "rank_pattern": {},
           "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
           "modules_to_save": list(saved) or None, "init_lora_weights": True, "use_rslora": False,
           "use_dora": False}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return sft, folder
