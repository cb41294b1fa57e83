"""The planner at real scale (Llama-3-70B shapes from meta tensors, no data) and the writer's byte layout."""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import load_output
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from expo_engine import extrapolate, make_plan
from expo_engine.dtypes import NAME
from expo_engine.errors import OptionError
from expo_engine.plan import parse_size
from expo_engine.sources import Checkpoint, TensorSlot, parse_safetensors_header


def _meta_llama3_70b() -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return dict(model.state_dict())


def _fake_checkpoint(state: dict[str, torch.Tensor], files: int, label: str) -> Checkpoint:
    """A checkpoint description with the layout save_pretrained would give, without any file."""
    names = list(state)
    per_file = math.ceil(len(names) / files)
    tensors, offset = {}, {}
    for i, name in enumerate(names):
        file = f"/nowhere/{label}/model-{i // per_file + 1:05d}.safetensors"
        t = state[name]
        nbytes = t.numel() * t.element_size()
        start = offset.get(file, 1000)
        tensors[name] = TensorSlot(name, NAME[t.dtype], tuple(t.shape), file, start, nbytes)
        offset[file] = start + nbytes
    return Checkpoint(label, f"/nowhere/{label}", None, "safetensors", tuple(sorted(offset)), tensors)


@pytest.fixture(scope="module")
def llama70b():
    return _meta_llama3_70b()


def test_plan_at_llama3_70b_scale(llama70b):
    # zephyr-style: the SFT parent sharded in 2 files, the aligned model in 30, as on the Hub.
    sft, aligned = _fake_checkpoint(llama70b, 2, "sft"), _fake_checkpoint(llama70b, 30, "aligned")
    plan = make_plan(sft, aligned, 0.3)  # 64 MiB chunks, 5 GB shards

    total = sum(t.numel() * 2 for t in llama70b.values())
    assert plan.total_size == total and 140e9 < total < 142e9
    # The same shard boundaries huggingface_hub would give the same tensors in the same order.
    hub = split_torch_state_dict_into_shards(llama70b, max_shard_size="5GB")
    assert {f: set(ns) for f, ns in hub.filename_to_tensors.items()} == {
        s.filename: set(s.tensors) for s in plan.shards}
    assert len(plan.shards) == len(hub.filename_to_tensors) >= 29
    assert plan.weight_map == dict(sorted(hub.tensor_to_filename.items()))

    for shard in plan.shards:
        header = parse_safetensors_header(shard.header[8:], shard.size, shard.filename)
        in_shard = [t for t in plan.tensors if t.shard == shard.filename]
        # Header, plan and file size agree; tensors are contiguous from the end of the header to the end.
        assert [(h.name, h.offset, h.nbytes) for h in header] == [(t.name, t.offset, t.nbytes) for t in in_shard]
        assert in_shard[0].offset == len(shard.header) and len(shard.header) % 8 == 0
        assert in_shard[-1].offset + in_shard[-1].nbytes == shard.size
        assert shard.size - len(shard.header) <= 5e9 or len(in_shard) == 1

    # Chunks cover every tensor exactly once, in write order, each at most 64 MiB of any side.
    covered = {}
    for c in plan.chunks:
        t = plan.tensors[c.tensor]
        assert covered.get(c.tensor, 0) == c.start < c.stop <= t.numel
        assert (c.stop - c.start) * 2 <= 64 * 2**20
        covered[c.tensor] = c.stop
    assert all(covered[i] == t.numel for i, t in enumerate(plan.tensors))
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert embed.nbytes == 128256 * 8192 * 2  # 2.1 GB: 32 chunks, never held whole
    assert sum(1 for c in plan.chunks if plan.tensors[c.tensor] is embed) == math.ceil(embed.nbytes / 2**26)


def test_tensor_larger_than_shard_cap_gets_its_own_shard(llama70b):
    ck = _fake_checkpoint(llama70b, 3, "x")
    plan = make_plan(ck, ck, 1.0, max_shard_size="1GB")
    big = [s for s in plan.shards if s.size > 1e9 + len(s.header)]
    assert all(len(s.tensors) == 1 for s in big)
    over = [n for n, t in llama70b.items() if t.numel() * t.element_size() > 1e9]  # embedding and head, 2.1 GB
    assert len(over) == 2 and len(big) == len(over)


def test_dtype_override_changes_sizes(llama70b):
    ck = _fake_checkpoint(llama70b, 3, "x")
    plan = make_plan(ck, ck, 0.5, dtype="fp32")
    assert plan.total_size == sum(t.numel() * 4 for t in llama70b.values())
    assert {t.dtype for t in plan.tensors} == {"F32"}
    for c in plan.chunks[:50]:
        assert (c.stop - c.start) * 4 <= plan.chunk_bytes


@pytest.mark.parametrize("text,value", [("5GB", 5_000_000_000), ("500MB", 500_000_000), ("20KB", 20_000),
                                        ("12345", 12345), (4096, 4096), ("1.5GB", 1_500_000_000),
                                        (" 5gb ", 5_000_000_000), ("2 MB", 2_000_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["5XB", "-1", "0", "GB", "", "infGB", "nanMB", "0.1B"])
def test_parse_size_rejects(text):
    with pytest.raises(OptionError):
        parse_size(text)


def test_writer_is_byte_identical_to_save_file(pair, tmp_path):
    """With alpha = 0 the output holds aligned's tensors: the shard must equal safetensors' own file of them."""
    out = str(tmp_path / "out")
    extrapolate(pair.sft, pair.aligned, 0.0, out, max_shard_size="10GB", chunk_bytes=777)
    tensors = load_output(pair.aligned)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "model.safetensors"), "rb") as f, open(tmp_path / "ref.safetensors", "rb") as g:
        assert f.read() == g.read()


def test_mixed_dtypes_in_one_shard_follow_safetensors_order(tmp_path):
    tensors = {"b.weight": torch.randn(4, 3).to(torch.bfloat16), "a.weight": torch.randn(5),
               "c.weight": torch.randn(2, 2).half(), "pos": torch.arange(6)}
    for side in ("s", "a"):
        os.makedirs(tmp_path / side)
        save_file(tensors, str(tmp_path / side / "model.safetensors"))
    out = str(tmp_path / "out")
    extrapolate(str(tmp_path / "s"), str(tmp_path / "a"), 0.0, out)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "model.safetensors"), "rb") as f, open(tmp_path / "ref.safetensors", "rb") as g:
        assert f.read() == g.read()
