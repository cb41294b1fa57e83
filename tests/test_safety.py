"""Symbolic links: a checkpoint's files may lead out of its folder only where huggingface_hub's cache puts them.

Every case builds real checkpoints (tiny safetensors files written with save_file, `.bin` with torch.save) under
tmp_path. The links that must be refused point at *valid* files (the same weights, moved out of the folder), so
that without the check the run would succeed: the tests see the refusal, not some later format error. The links
that must be accepted (inside the folder, the Hub cache layout) are checked to give the same output as plain files.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil

import pytest
import torch
from helpers import expo_process, fake_hub_repo, load_output, run_expo, snapshot
from safetensors.torch import save_file

from expo_engine.errors import SourceError
from expo_engine.sources import check_in_folder, open_checkpoint

ST_SINGLE, ST_INDEX, BIN_SINGLE = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}
WHAT_TO_DO = "copy the file into the folder"

# ---------------------------------------------------------------------------------------------------------------
# Helpers


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
             "model.norm.weight", "lm_head.weight"]
    return {n: torch.randn(16, 8, generator=g).to(torch.bfloat16) for n in names}


def write_checkpoint(folder, state: dict[str, torch.Tensor], layout: str = "single") -> str:
    """config.json, tokenizer_config.json and the weights: "single" file, "sharded" (two + index) or "bin"."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), CONFIG)
    write_json(os.path.join(folder, "tokenizer_config.json"), {"model_max_length": 64})
    if layout == "single":
        save_file(state, os.path.join(folder, ST_SINGLE), metadata={"format": "pt"})
    elif layout == "sharded":
        names = list(state)
        parts = {SHARDS[0]: names[:2], SHARDS[1]: names[2:]}
        for file, part in parts.items():
            save_file({n: state[n] for n in part}, os.path.join(folder, file), metadata={"format": "pt"})
        write_json(os.path.join(folder, ST_INDEX),
                   {"metadata": {"total_size": 0}, "weight_map": {n: f for f, part in parts.items() for n in part}})
    elif layout == "bin":
        torch.save(state, os.path.join(folder, BIN_SINGLE))
    else:
        raise ValueError(layout)
    return folder


def make_pair(root, sft_layout: str = "single", aligned_layout: str = "single") -> tuple[str, str]:
    sft = tiny_state(0)
    aligned = {n: (t.float() + 0.01 * torch.randn_like(t.float())).to(t.dtype) for n, t in sft.items()}
    return (write_checkpoint(os.path.join(root, "sft"), sft, sft_layout),
            write_checkpoint(os.path.join(root, "aligned"), aligned, aligned_layout))


def write_json(path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def move_out(folder: str, name: str, elsewhere: str) -> str:
    """Move folder/name to elsewhere/name (a valid file, just outside the folder); return its new path."""
    os.makedirs(elsewhere, exist_ok=True)
    dest = os.path.join(elsewhere, name)
    shutil.move(os.path.join(folder, name), dest)
    return dest


def extrapolate_args(sft, aligned, out) -> list[str]:
    return ["extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5", "--out", out]


def assert_nothing_at(out) -> None:
    parent, name = os.path.split(os.path.abspath(out))
    for p in (name, f".{name}.expo-staging", f".{name}.expo-old"):
        assert not os.path.lexists(os.path.join(parent, p)), p


def assert_one_error_line(rc: int, err: str, *needles) -> str:
    assert "Traceback" not in err, err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("expo: error: "), err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def spy_on_opens(monkeypatch) -> list[str]:
    """The real paths of every file opened by os.open, open or io.open from now on."""
    seen = []
    real_os_open, real_open = os.open, builtins.open

    def spy_os_open(path, flags, *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)) and kwargs.get("dir_fd") is None:
            seen.append(os.path.realpath(os.fsdecode(path)))
        return real_os_open(path, flags, *args, **kwargs)

    def spy_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            seen.append(os.path.realpath(os.fsdecode(file)))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    return seen


# ---------------------------------------------------------------------------------------------------------------
# Weight and index files that lead out of the folder


def _link_out(folder: str, how: str, elsewhere: str) -> tuple[str, str]:
    """Make one of `folder`'s weight or index files a link leading out of it. Returns (file, real target)."""
    if how == "absolute":
        target = move_out(folder, ST_SINGLE, elsewhere)
        os.symlink(target, os.path.join(folder, ST_SINGLE))
        return ST_SINGLE, target
    if how == "relative":  # model.safetensors -> ../other_model/model.safetensors
        target = move_out(folder, ST_SINGLE, elsewhere)
        os.symlink(os.path.relpath(target, folder), os.path.join(folder, ST_SINGLE))
        return ST_SINGLE, target
    if how == "chain":  # a link inside the folder to a link inside the folder that leads out
        target = move_out(folder, ST_SINGLE, elsewhere)
        os.symlink(target, os.path.join(folder, "hop.safetensors"))
        os.symlink("hop.safetensors", os.path.join(folder, ST_SINGLE))
        return ST_SINGLE, target
    if how == "etc-passwd":
        os.remove(os.path.join(folder, ST_SINGLE))
        os.symlink("/etc/passwd", os.path.join(folder, ST_SINGLE))
        return ST_SINGLE, os.path.realpath("/etc/passwd")
    if how == "shard":  # one shard named by the index
        target = move_out(folder, SHARDS[1], elsewhere)
        os.symlink(target, os.path.join(folder, SHARDS[1]))
        return SHARDS[1], target
    if how == "index":
        target = move_out(folder, ST_INDEX, elsewhere)
        os.symlink(target, os.path.join(folder, ST_INDEX))
        return ST_INDEX, target
    if how == "bin":
        target = move_out(folder, BIN_SINGLE, elsewhere)
        os.symlink(target, os.path.join(folder, BIN_SINGLE))
        return BIN_SINGLE, target
    raise ValueError(how)


LAYOUT = {"absolute": "single", "relative": "single", "chain": "single", "etc-passwd": "single",
          "shard": "sharded", "index": "sharded", "bin": "bin"}


@pytest.mark.parametrize("side", ["sft", "aligned"])
@pytest.mark.parametrize("how", list(LAYOUT))
def test_weight_file_linking_out_of_the_folder_is_refused(tmp_path, capsys, monkeypatch, side, how):
    root = tmp_path / "models"
    sft, aligned = make_pair(root, **{f"{side}_layout": LAYOUT[how]})
    folder = os.path.realpath(sft if side == "sft" else aligned)
    name, target = _link_out(folder, how, str(tmp_path / "other_model"))
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    opened = spy_on_opens(monkeypatch)
    rc, stdout, err = run_expo(capsys, *extrapolate_args(sft, aligned, out))
    monkeypatch.undo()
    assert_one_error_line(rc, err, os.path.join(folder, name), f"to {target}", WHAT_TO_DO)
    assert stdout == ""
    assert target not in opened  # refused before a byte of it was read
    assert_nothing_at(out)
    assert snapshot(tmp_path) == before


def test_process_refuses_a_weight_file_linking_out(tmp_path):
    """A real `expo extrapolate` process: exit status 2, one line on stderr, nothing written, inputs unchanged."""
    sft, aligned = make_pair(tmp_path / "models")
    name, target = _link_out(os.path.realpath(aligned), "relative", str(tmp_path / "other_model"))
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    proc = expo_process(*extrapolate_args(sft, aligned, out))
    assert proc.stdout == ""
    assert_one_error_line(proc.returncode, proc.stderr, os.path.join(os.path.realpath(aligned), name), target,
                          WHAT_TO_DO)
    assert_nothing_at(out)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# Side files (config, tokenizer) that lead out of the folder


@pytest.mark.parametrize("side", ["sft", "aligned"])
@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "generation_config.json"])
def test_side_file_linking_out_of_the_folder_is_refused(tmp_path, capsys, monkeypatch, side, name):
    sft, aligned = make_pair(tmp_path / "models")
    folder = os.path.realpath(sft if side == "sft" else aligned)
    if not os.path.exists(os.path.join(folder, name)):
        write_json(os.path.join(folder, name), {"max_new_tokens": 8})
    target = move_out(folder, name, str(tmp_path / "shared_configs"))
    os.symlink(target, os.path.join(folder, name))
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    opened = spy_on_opens(monkeypatch)
    rc, _, err = run_expo(capsys, *extrapolate_args(sft, aligned, out))
    monkeypatch.undo()
    assert_one_error_line(rc, err, os.path.join(folder, name), f"to {target}", WHAT_TO_DO)
    assert target not in opened
    assert_nothing_at(out)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# Links that stay inside the folder are fine


def _relink_inside(folder: str) -> None:
    """Move every file of `folder` into folder/store/ and link to it: relative, absolute and chained links."""
    store = os.path.join(folder, "store")
    os.makedirs(store)
    for k, name in enumerate(sorted(n for n in os.listdir(folder) if n != "store")):
        shutil.move(os.path.join(folder, name), os.path.join(store, name))
        if k % 3 == 0:
            os.symlink(os.path.join("store", name), os.path.join(folder, name))
        elif k % 3 == 1:
            os.symlink(os.path.join(store, name), os.path.join(folder, name))
        else:
            os.symlink(os.path.join("store", name), os.path.join(folder, f"hop-{name}"))
            os.symlink(f"hop-{name}", os.path.join(folder, name))


@pytest.mark.parametrize("aligned_layout", ["single", "sharded", "bin"])
def test_links_inside_the_folder_are_accepted(tmp_path, capsys, aligned_layout):
    plain = make_pair(tmp_path / "plain", sft_layout="sharded", aligned_layout=aligned_layout)
    linked = [shutil.copytree(p, str(tmp_path / "linked" / os.path.basename(p))) for p in plain]
    for folder in linked:
        _relink_inside(folder)
    rc, _, err = run_expo(capsys, *extrapolate_args(*plain, tmp_path / "out-plain"))
    assert rc == 0, err
    rc, _, err = run_expo(capsys, *extrapolate_args(*linked, tmp_path / "out-linked"))
    assert rc == 0, err
    want, got = load_output(str(tmp_path / "out-plain")), load_output(str(tmp_path / "out-linked"))
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    for name in ("config.json", "tokenizer_config.json"):  # the side files came through the links
        with open(tmp_path / "out-plain" / name, "rb") as a, open(tmp_path / "out-linked" / name, "rb") as b:
            assert a.read() == b.read()


# ---------------------------------------------------------------------------------------------------------------
# The Hugging Face cache: snapshot files are relative links into the repo's own blobs/


@pytest.fixture
def hub(tmp_path):
    """A cache holding org/sft (sharded), org/dpo (one file) and org/other (a copy of org/dpo's files)."""
    sft, aligned = make_pair(tmp_path / "plain", sft_layout="sharded")
    cache = str(tmp_path / "hub")
    snaps = {
        "org/sft": fake_hub_repo(cache, "org/sft", sft, "c" * 40),
        "org/dpo": fake_hub_repo(cache, "org/dpo", aligned, "d" * 40),
        "org/other": fake_hub_repo(cache, "org/other", aligned, "e" * 40),
    }
    return cache, snaps, (sft, aligned)


def test_hub_cache_layout_is_accepted(tmp_path, hub):
    """Repo ids resolve from HF_HUB_CACHE with HF_HUB_OFFLINE=1; the snapshot folder given as a folder works too."""
    cache, snaps, plain = hub
    out_plain, out_ids, out_snap = (tmp_path / n for n in ("out-plain", "out-ids", "out-snap"))
    runs = [(*plain, out_plain), ("org/sft", "org/dpo@main", out_ids), (snaps["org/sft"], snaps["org/dpo"], out_snap)]
    for args in runs:
        proc = expo_process(*extrapolate_args(*args), env={"HF_HUB_CACHE": cache})
        assert proc.returncode == 0, proc.stderr
    want = load_output(str(out_plain))
    for out in (out_ids, out_snap):
        got = load_output(str(out))
        assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    with open(out_ids / "expo.json") as f:
        assert json.load(f)["aligned"]["revision"] == "d" * 40


@pytest.mark.parametrize("name", [ST_SINGLE, "config.json"])
def test_hub_snapshot_linking_into_another_repos_blobs_is_refused(tmp_path, hub, name):
    cache, snaps, _ = hub
    link = os.path.join(snaps["org/dpo"], name)
    blob = os.path.basename(os.readlink(link))  # org/other holds the very same bytes under the same blob name
    other_blob = os.path.join(cache, "models--org--other", "blobs", blob)
    assert os.path.isfile(other_blob)
    os.remove(link)
    os.symlink(os.path.join("..", "..", "..", "models--org--other", "blobs", blob), link)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    proc = expo_process(*extrapolate_args("org/sft", "org/dpo", out), env={"HF_HUB_CACHE": cache})
    line = assert_one_error_line(proc.returncode, proc.stderr, link, f"to {os.path.realpath(other_blob)}",
                                 os.path.join(os.path.realpath(cache), "models--org--dpo", "blobs"),
                                 "download the repo again")
    assert "not complete" not in line  # the repo is in the cache; the link is what is wrong
    assert_nothing_at(out)
    assert snapshot(tmp_path) == before


def test_hub_snapshot_whose_blobs_folder_is_a_link_is_refused(tmp_path, hub):
    """`blobs/` must be the repo's own real folder: a blobs link to elsewhere does not make elsewhere the cache."""
    cache, snaps, _ = hub
    repo_dir = os.path.join(cache, "models--org--dpo")
    shutil.move(os.path.join(repo_dir, "blobs"), str(tmp_path / "elsewhere"))
    os.symlink(str(tmp_path / "elsewhere"), os.path.join(repo_dir, "blobs"))
    with pytest.raises(SourceError, match=WHAT_TO_DO):
        open_checkpoint(snaps["org/dpo"])


def test_check_in_folder_examples(tmp_path, hub):
    """The rule on its own: inside the folder, or a Hub snapshot into its own repo's blobs/; nothing else."""
    cache, snaps, _ = hub
    folder = tmp_path / "ck"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "w").write_bytes(b"x")
    (tmp_path / "outside").write_bytes(b"x")
    (folder / "in").symlink_to("sub/w")
    (folder / "out").symlink_to("../outside")
    (folder / "dangling-out").symlink_to("/nonexistent/w")
    assert check_in_folder(str(folder), str(folder / "in")) == str(folder / "in")
    assert check_in_folder(str(folder), str(folder / "sub" / "w"))
    for name in ("out", "dangling-out"):
        with pytest.raises(SourceError, match=WHAT_TO_DO):
            check_in_folder(str(folder), str(folder / name))
    snap = snaps["org/dpo"]
    assert check_in_folder(snap, os.path.join(snap, ST_SINGLE))
    os.symlink(os.path.join("..", "..", "blobs", "x"), os.path.join(snap, "missing-blob"))  # later: missing
    assert check_in_folder(snap, os.path.join(snap, "missing-blob"))
    os.symlink(os.path.join("..", "..", "..", "models--org--sft", "blobs", "x"), os.path.join(snap, "cross"))
    with pytest.raises(SourceError, match="download the repo again"):
        check_in_folder(snap, os.path.join(snap, "cross"))


def test_checkpoint_folder_given_through_a_link_is_accepted(tmp_path):
    """The folder itself may be a link (it is resolved first); only the files in it are held to the rule."""
    _, aligned = make_pair(tmp_path / "models")
    (tmp_path / "alias").symlink_to(aligned)
    ck = open_checkpoint(str(tmp_path / "alias"))
    assert ck.path == os.path.realpath(aligned) and ck.side_files == ("config.json", "tokenizer_config.json")
