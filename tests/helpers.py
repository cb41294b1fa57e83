"""The tests' shared helpers, each in one copy: tiny real checkpoints (transformers models, safetensors and `.bin`
shards, hand-written state dicts), a fake Hub cache, the float64 check, and running the CLI and checking a refusal."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import traceback

import pytest
import torch
from safetensors.torch import load_file, save_file

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


# ---------------------------------------------------------------------------------------------------------------
# Tiny checkpoints written by hand, and running the CLI and checking a refusal (test_errors, test_failures, ...)

HIDDEN, VOCAB, LAYERS = 8, 128, 8
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
ST_INDEX = "model.safetensors.index.json"
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}

# ---------------------------------------------------------------------------------------------------------------
# Helpers: tiny checkpoints


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict of a few KB: embeddings, LAYERS small projections, a norm and an lm_head."""
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g)}
    for i in range(LAYERS):
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g)
    state["model.norm.weight"] = torch.ones(HIDDEN)
    state["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g)
    return {k: v.to(torch.bfloat16) for k, v in state.items()}


def aligned_from(sft: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The "aligned" side: the SFT floats plus a small change; other tensors are identical copies."""
    g = torch.Generator().manual_seed(99)
    return {
        k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in sft.items()
    }


def write_checkpoint(folder, state: dict[str, torch.Tensor], layout: str = "safetensors"):
    """Write `state` into `folder` with a config.json: "safetensors" (one file), "sharded" (two + index) or "bin"."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    state = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    if layout == "safetensors":
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    elif layout == "sharded":
        names = list(state)
        parts = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2:]}
        for file, part in parts.items():
            save_file({n: state[n] for n in part}, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map = {n: file for file, part in parts.items() for n in part}
        write_json(os.path.join(folder, ST_INDEX), {"metadata": {"total_size": 0}, "weight_map": weight_map})
    elif layout == "bin":
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    else:
        raise ValueError(layout)
    return folder


def make_pair(root, sft_edit=None, aligned_edit=None, sft_layout="safetensors", aligned_layout="safetensors"):
    """Write an SFT/aligned pair under root/sft and root/aligned; each edit may change its side's state dict."""
    sft = tiny_state()
    aligned = aligned_from(sft)
    if sft_edit:
        sft_edit(sft)
    if aligned_edit:
        aligned_edit(aligned)
    return (write_checkpoint(os.path.join(root, "sft"), sft, sft_layout),
            write_checkpoint(os.path.join(root, "aligned"), aligned, aligned_layout))


def write_json(path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    """A safetensors file by hand: 8-byte little-endian header length, the header (JSON or raw bytes), data."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def write_bytes(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------------------------
# Helpers: running the CLI and checking a refusal


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`expo extrapolate ARGS` in-process: (exit status, stdout, stderr), as a real process would report them."""
    return run_expo(capsys, "extrapolate", *args)


def run_expo(capsys, *args) -> tuple[int, str, str]:
    """`expo ARGS` in-process: (exit status, stdout, stderr), as a real process would report them."""
    from expo_engine.cli import main

    tb = ""
    try:
        rc = main([*map(str, args)])
    except SystemExit as e:  # argparse
        rc = e.code
    except Exception:  # what the interpreter would print, and its exit status
        rc, tb = 1, traceback.format_exc()
    captured = capsys.readouterr()
    return rc, captured.out, captured.err + tb


def cli_args(sft, aligned, out, *extra, alpha="0.5") -> list[str]:
    return ["--sft", sft, "--aligned", aligned, "--alpha", alpha, "--out", out, *extra]


def snapshot(root) -> dict[str, str]:
    """Everything under root: sha256 and mtime of every file, every folder, every link target."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                seen[rel] = "link -> " + os.readlink(path)
            elif os.path.isdir(path):
                seen[rel] = "dir"
            else:
                with open(path, "rb") as f:
                    seen[rel] = f"{hashlib.sha256(f.read()).hexdigest()} mtime {os.stat(path).st_mtime_ns}"
    return seen


def leftovers(out) -> list[str]:
    """The engine's temporary folders beside `out`, if any survived."""
    parent, name = os.path.split(os.path.abspath(out))
    return [p for p in (f".{name}.expo-staging", f".{name}.expo-old", f".{name}.expo-lock")
            if os.path.lexists(os.path.join(parent, p))]


def assert_user_error(rc: int, err: str, *needles) -> str:
    """Exit status 2 and exactly one stderr line `expo: error: ...` that names every needle. Returns that line."""
    assert "Traceback" not in err, err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("expo: error: "), err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@contextlib.contextmanager
def unchanged(root, out=None):
    """Assert that nothing under root changed (inputs byte-identical, nothing created) and that `out` is absent."""
    before = snapshot(root)
    yield
    if out is not None:
        assert not os.path.lexists(out), f"{out} was created"
        assert not leftovers(out), leftovers(out)
    assert snapshot(root) == before


def refused(capsys, root, args, *needles, out=None) -> str:
    """Run the CLI with `args`, assert a user error naming `needles` and that nothing under root changed."""
    with unchanged(root, out):
        rc, _, err = run_cli(capsys, *args)
    return assert_user_error(rc, err, *needles)


OVERFLOWING = "model.layers.1.mlp.up_proj.weight"  # the tensor that overflows in `overflowing`


def to_fp16(state):
    for k in list(state):
        state[k] = state[k].to(torch.float16)


def overflowing(tmp_path, **kw):
    """An fp16 pair in which one element of OVERFLOWING is finite on both sides but aligned + 1 * (aligned - sft)
    is not."""
    def sft_edit(s):
        to_fp16(s)
        s[OVERFLOWING][3, 5] = -60000.0

    def aligned_edit(a):
        to_fp16(a)
        a[OVERFLOWING][3, 5] = 60000.0

    return make_pair(tmp_path, sft_edit=sft_edit, aligned_edit=aligned_edit, **kw)


def nudge_element(out: str, shard: str | None = None, index: int = 5, steps: int = 16) -> tuple[str, str]:
    """Move element `index` of the first 2-D bf16 tensor in output shard `shard` (default: the last) by `steps`
    bf16 steps (its bits + steps: still finite), found through the shard's own header; returns (shard, tensor)."""
    from expo_engine.sources import read_safetensors_layout

    shard = shard or sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[-1]
    slot = next(s for s in read_safetensors_layout(os.path.join(out, shard)) if len(s.shape) == 2)
    assert slot.dtype == "BF16"
    with open(slot.file, "r+b") as f:
        f.seek(slot.offset + 2 * index)
        (bits,) = struct.unpack("<H", f.read(2))
        f.seek(slot.offset + 2 * index)
        f.write(struct.pack("<H", bits + steps))
    return shard, slot.name


def expo_process(*args, env: dict | None = None, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI in a process of its own (`python -m expo_engine.cli ARGS`), offline, its output captured."""
    return subprocess.run([sys.executable, "-m", "expo_engine.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def tiny_tokenizer():
    """A real fast tokenizer for the tiny Llama models (vocab 128: <pad> <s> </s> <unk>, then words w4 .. w127),
    built with the `tokenizers` library, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, 128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>")
    t.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                       "{% if add_generation_prompt %}w5 {% endif %}")
    return t


def chat_pair(root, tied: bool = False, scale: float = 0.05) -> tuple[str, str]:
    """A tiny Llama SFT/aligned pair saved by transformers, each folder with the tiny tokenizer."""
    sft, aligned = llama_pair(tied=tied, scale=scale)
    folders = []
    for model, name in ((sft, "sft"), (aligned, "aligned")):
        folder = save_model(model, os.path.join(str(root), name))
        tiny_tokenizer().save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


def permute_rows(model, names, order: list[int]) -> None:
    """Move the rows of `model`'s parameters `names` in place: row i goes to row order[i] (a reordered vocabulary's
    embedding and head, following its tokenizer)."""
    with torch.no_grad():
        for name in names:
            w = model.get_parameter(name)
            moved = torch.empty_like(w)
            moved[torch.tensor(order)] = w
            w.copy_(moved)
