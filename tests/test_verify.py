"""`verify`: passes on a correct output; names the file or tensor of every corruption made on purpose."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import torch
from helpers import copy_tree, nudge_element
from safetensors.torch import save_file

from expo_engine import MismatchError, OptionError, SourceError, extrapolate
from expo_engine.sources import read_safetensors_layout
from expo_engine.verify import format_report, verify

ALPHA = 0.3
CHUNK = 1000  # bytes: every tensor of the tiny model is cut into several chunks
INDEX = "model.safetensors.index.json"
SHARD2 = "model-00002-of-{n:05d}.safetensors"


@pytest.fixture(scope="module")
def made(pairs, tmp_path_factory):
    """A correct sharded output of the untied mixed pair, made once; tests corrupt copies of it."""
    p = pairs["untied-mixed"]
    out = str(tmp_path_factory.mktemp("verify") / "expo")
    extrapolate(p.sft, p.aligned, ALPHA, out, max_shard_size="20KB", chunk_bytes=CHUNK)
    return out


@pytest.fixture
def out(made, tmp_path):
    return copy_tree(made, str(tmp_path / "expo"))


def _shard2(out: str) -> str:
    n = sum(f.endswith(".safetensors") for f in os.listdir(out))
    assert n >= 3
    return SHARD2.format(n=n)


def _rehash(out: str, name: str) -> None:
    """Record `name`'s current size and sha256 in expo.json, so that only the other checks can catch a change."""
    path = os.path.join(out, "expo.json")
    with open(path) as f:
        prov = json.load(f)
    with open(os.path.join(out, name), "rb") as f:
        data = f.read()
    prov["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with open(path, "w") as f:
        json.dump(prov, f)


def _edit_json(out: str, name: str, change) -> None:
    path = os.path.join(out, name)
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _mentions(report, *words) -> bool:
    return any(all(w in p for w in words) for p in report.problems)


def test_correct_output_passes(pair, out):
    report = verify(out, pair.sft, pair.aligned, chunk_bytes=CHUNK)
    assert report.ok, format_report(report)
    assert report.alpha == ALPHA  # taken from expo.json
    assert report.shards >= 3 and report.files_checked == len(os.listdir(out)) - 1
    n = sum(t.numel() for t in pair.aligned_state.values())
    assert report.elements_checked == report.elements_total == n and report.sampled_fraction == 1.0
    assert 0 <= report.worst_steps <= 1
    assert format_report(report).startswith(f"verify {out}: OK")


def test_structure_only_without_sources(out):
    report = verify(out)
    assert report.ok and report.alpha is None and report.elements_checked == 0
    assert "not checked" in format_report(report)


def test_single_file_output_passes(pair, tmp_path):
    out = str(tmp_path / "one")
    extrapolate(pair.sft, pair.aligned, -0.5, out, chunk_bytes=CHUNK)
    assert os.path.exists(os.path.join(out, "model.safetensors")) and not os.path.exists(os.path.join(out, INDEX))
    assert verify(out, pair.sft, pair.aligned, chunk_bytes=CHUNK).ok


def test_flipped_element_fails_the_element_check(pair, out):
    _, name = nudge_element(out, _shard2(out), index=7)
    _rehash(out, _shard2(out))
    report = verify(out, pair.sft, pair.aligned, chunk_bytes=CHUNK)
    assert not report.ok and report.problems == []
    assert [(t, bad) for t, _, bad in report.failing_tensors] == [(name, 1)]
    assert report.worst_steps > 8
    assert f"tensor '{name}': 1 element(s)" in format_report(report)


def test_flipped_element_fails_the_checksum(out):
    nudge_element(out, _shard2(out), index=7)
    report = verify(out)
    assert report.problems == [f"{_shard2(out)}: its sha256 differs from the one expo.json records"]


def test_wrong_alpha_fails(pair, out):
    report = verify(out, pair.sft, pair.aligned, alpha=0.4, chunk_bytes=CHUNK)
    assert not report.ok and report.problems == [] and report.alpha == 0.4
    assert len(report.failing_tensors) > 10


def test_sample_checks_a_seeded_subset(pair, out):
    full = verify(out, pair.sft, pair.aligned, chunk_bytes=CHUNK)
    half = verify(out, pair.sft, pair.aligned, sample=0.5, chunk_bytes=CHUNK, seed=1)
    again = verify(out, pair.sft, pair.aligned, sample=0.5, chunk_bytes=CHUNK, seed=1)
    assert half.ok and 0 < half.elements_checked < full.elements_checked
    assert 0.3 < half.sampled_fraction < 0.7 and again.elements_checked == half.elements_checked
    assert "seed 1" in format_report(half)


def test_truncated_shard(out):
    shard = _shard2(out)
    last = max(read_safetensors_layout(os.path.join(out, shard)), key=lambda slot: slot.offset).name
    os.truncate(os.path.join(out, shard), os.path.getsize(os.path.join(out, shard)) - 10)
    report = verify(out)
    assert _mentions(report, shard, "truncated or padded", f"tensor '{last}' and after are cut")
    assert _mentions(report, shard, "bytes, but expo.json records")


def test_weight_map_pointing_at_the_wrong_shard(out):
    shard = _shard2(out)
    with open(os.path.join(out, INDEX)) as f:
        name, holder = next((n, s) for n, s in json.load(f)["weight_map"].items() if s != shard)
    _edit_json(out, INDEX, lambda index: index["weight_map"].__setitem__(name, shard))
    _rehash(out, INDEX)
    assert verify(out).problems == [f"{INDEX}: says tensor '{name}' is in {shard}, but {holder} holds it"]


def test_missing_shard(pair, out):
    shard = _shard2(out)
    os.remove(os.path.join(out, shard))
    report = verify(out, pair.sft, pair.aligned, chunk_bytes=CHUNK)
    assert _mentions(report, shard, "missing, but the index names it")
    assert _mentions(report, shard, "listed in expo.json but missing")
    assert _mentions(report, "the output lacks")
    assert report.elements_checked == report.elements_total > 0  # the other shards are still checked


def test_extra_tensor_in_index(out):
    _edit_json(out, INDEX, lambda index: index["weight_map"].__setitem__("ghost.weight", _shard2(out)))
    _rehash(out, INDEX)
    assert verify(out).problems == [f"{INDEX}: names tensor 'ghost.weight' (in {_shard2(out)}), which no shard holds"]


def test_wrong_total_size_misnamed_shard_and_unlisted_file(out):
    _edit_json(out, INDEX, lambda index: index["metadata"].__setitem__("total_size", 1))
    _rehash(out, INDEX)
    open(os.path.join(out, "notes.txt"), "w").close()
    report = verify(out)
    assert len(report.problems) == 2
    assert report.problems[0].startswith(f"{INDEX}: metadata.total_size is 1, but the shards' tensors hold ")
    assert report.problems[1] == "notes.txt: in the folder but not listed in expo.json"
    os.rename(os.path.join(out, _shard2(out)), os.path.join(out, "model-2.safetensors"))
    assert _mentions(verify(out), "are not named model-0000i-of-0000N.safetensors")


def test_non_float_tensor_must_equal_the_aligned_bytes(tmp_path):
    ids = torch.arange(300)
    for side, shift in (("sft", 0.0), ("aligned", 0.01)):
        os.makedirs(tmp_path / side)
        save_file({"w": torch.full((40, 30), 1.0 + shift, dtype=torch.bfloat16), "ids": ids},
                  str(tmp_path / side / "model.safetensors"), metadata={"format": "pt"})
    out = str(tmp_path / "out")
    extrapolate(str(tmp_path / "sft"), str(tmp_path / "aligned"), 2.0, out, chunk_bytes=256)
    assert verify(out, str(tmp_path / "sft"), str(tmp_path / "aligned"), chunk_bytes=256).ok
    slot = next(s for s in read_safetensors_layout(os.path.join(out, "model.safetensors")) if s.name == "ids")
    with open(slot.file, "r+b") as f:
        f.seek(slot.offset + 8 * 299)
        f.write(struct.pack("<q", -1))
    report = verify(out, str(tmp_path / "sft"), str(tmp_path / "aligned"), chunk_bytes=256)
    assert report.failing_tensors == [("ids", float("inf"), 1)]


def test_user_errors(pairs, pair, out, tmp_path):
    with pytest.raises(SourceError, match="no such folder"):
        verify(str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match="not a model folder"):
        verify(str(tmp_path))
    with pytest.raises(SourceError):
        verify(out, str(tmp_path / "nowhere"), pair.aligned)
    with pytest.raises(OptionError, match="sample"):
        verify(out, sample=1.5)
    with pytest.raises(OptionError, match="both"):
        verify(out, pair.sft)
    tied = pairs["tied-mixed"]  # no lm_head.weight in its safetensors: the output holds a tensor it lacks
    with pytest.raises(MismatchError, match="lm_head.weight"):
        verify(out, tied.aligned, tied.aligned)
    os.remove(os.path.join(out, "expo.json"))
    with pytest.raises(OptionError, match="alpha"):
        verify(out, pair.sft, pair.aligned)
    assert verify(out, pair.sft, pair.aligned, alpha=ALPHA, chunk_bytes=CHUNK).problems == [
        "expo.json: missing, so no checksum can be checked"]


@pytest.mark.parametrize("metadata", [{"format": "np"}, None])
def test_shard_metadata_must_say_format_pt(out, metadata):
    """A shard rewritten with other (or no) __metadata__ but the same tensors and bytes fails only that check."""
    from safetensors.torch import load_file

    shard = _shard2(out)
    path = os.path.join(out, shard)
    tensors = load_file(path)
    save_file(tensors, path, metadata=metadata)
    _rehash(out, shard)
    report = verify(out)
    assert len(report.problems) == 1 and _mentions(report, shard, "__metadata__", "'pt'"), report.problems


def test_an_adapter_as_a_source_is_one_clear_line(tmp_path, capsys):
    """`expo verify OUT --sft BASE --aligned ADAPTER` (an adapter merge): one line saying that verify takes full
    checkpoints and how an adapter merge is checked, not "no weights found"; `expo verify OUT` alone passes."""
    from helpers import assert_user_error, llama_config, run_expo
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config()).to(torch.bfloat16)
    base_dir, ad_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    base.save_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    model.save_pretrained(ad_dir)
    out = str(tmp_path / "out")
    extrapolate(base_dir, ad_dir, ALPHA, out)
    capsys.readouterr()
    rc, _, err = run_expo(capsys, "verify", out, "--sft", base_dir, "--aligned", ad_dir)
    assert_user_error(rc, err, f"--aligned {ad_dir} is a LoRA adapter", "expo verify OUT", "PEFT")
    with pytest.raises(OptionError, match="is a LoRA adapter"):
        verify(out, ad_dir, base_dir)
    rc, printed, err = run_expo(capsys, "verify", out)
    assert rc == 0 and f"verify {out}: OK" in printed, printed + err
