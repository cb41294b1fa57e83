"""User errors: one clear line on stderr, exit status 2, no traceback, nothing at the output path, inputs untouched.

Every test builds tiny checkpoints (a few KB, written with safetensors' save_file or torch.save) under tmp_path and
runs the CLI in-process. The strongest check is `unchanged(tmp_path)`: after a refused run, every file, folder and
link under tmp_path (inputs, the output path, its parent, the staging folder's place) is exactly as it was before.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import struct
import zipfile

import pytest
import torch
from helpers import (
    CONFIG,
    HIDDEN,
    LAYERS,
    SHARDS,
    ST_INDEX,
    VOCAB,
    aligned_from,
    assert_user_error,
    cli_args,
    expo_process,
    leftovers,
    make_pair,
    read_json,
    refused,
    run_cli,
    safetensors_bytes,
    snapshot,
    tiny_state,
    unchanged,
    write_bytes,
    write_checkpoint,
    write_json,
)
from safetensors.torch import load_file

import expo_engine
from expo_engine.writer import check_output_path

# ---------------------------------------------------------------------------------------------------------------
# 1-4: the checkpoints do not match


def _delete(name):
    return lambda state: state.pop(name)


def _rename(*names):
    def edit(state):
        for n in names:
            state[n.replace("model.", "transformer.", 1)] = state.pop(n)
    return edit


UP = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(LAYERS)]


@pytest.mark.parametrize(
    "sft_edit, aligned_edit, needles",
    [
        (_delete("lm_head.weight"), None, ["1 only in the aligned checkpoint", "lm_head.weight"]),
        (None, _delete("model.norm.weight"), ["1 only in the SFT checkpoint", "model.norm.weight"]),
        (None, _rename(UP[3]), ["only in the SFT checkpoint", UP[3], "only in the aligned checkpoint",
                                UP[3].replace("model.", "transformer.")]),
        (_rename(*UP), None, [f"{LAYERS} only in the SFT checkpoint", "transformer.layers.0.mlp",
                              f"{LAYERS} only in the aligned checkpoint", UP[0]]),
    ],
    ids=["sft-lacks-one", "aligned-lacks-one", "renamed", "many-renamed"],
)
def test_tensor_names_differ(tmp_path, capsys, sft_edit, aligned_edit, needles):
    sft, aligned = make_pair(tmp_path, sft_edit, aligned_edit)
    out = tmp_path / "out"
    line = refused(capsys, tmp_path, cli_args(sft, aligned, out), *needles, out=out)
    assert len(line) < 1000 and f"layers.{LAYERS - 1}." not in line  # the first few names of each side, not all


def test_shapes_differ(tmp_path, capsys):
    def resize(state):  # two added tokens
        state["model.embed_tokens.weight"] = torch.cat([state["model.embed_tokens.weight"]] * 2)[: VOCAB + 2]

    sft, aligned = make_pair(tmp_path, aligned_edit=resize)
    out = tmp_path / "out"
    # a resized vocabulary without tokenizers to match its rows: the message says what is missing and which flag
    # accepts it anyway (tests/test_vocab.py covers the cases that go through)
    refused(capsys, tmp_path, cli_args(sft, aligned, out), "model.embed_tokens.weight",
            f"{VOCAB} rows in the SFT checkpoint, {VOCAB + 2} in the aligned one", "no tokenizer",
            "--vocab aligned-extends-sft", out=out)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_float_tensor_differs(tmp_path, capsys, dtype):
    buf = "model.position_ids"
    sft, aligned = make_pair(
        tmp_path,
        sft_edit=lambda s: s.update({buf: torch.arange(16).reshape(1, 16).to(dtype)}),
        aligned_edit=lambda s: s.update({buf: (torch.arange(16).reshape(1, 16) % 2 == 0).to(dtype)}),
    )
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out), buf, "differs", out=out)


@pytest.mark.parametrize("sft_layout", ["safetensors", "bin"])
def test_identical_non_float_tensor_is_copied_byte_for_byte(tmp_path, capsys, sft_layout):
    """The positive control of the test above: identical int64 buffers are copied, not refused."""
    buf = "model.position_ids"
    values = torch.arange(16, dtype=torch.int64).reshape(1, 16) * 1_000_003
    sft, aligned = make_pair(tmp_path, lambda s: s.update({buf: values.clone()}),
                             lambda s: s.update({buf: values.clone()}), sft_layout=sft_layout)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *cli_args(sft, aligned, out))
    assert rc == 0, err
    got = load_file(os.path.join(out, "model.safetensors"))[buf]
    assert got.dtype == torch.int64 and got.shape == values.shape
    assert got.numpy().tobytes() == values.numpy().tobytes()
    assert not leftovers(out)


@pytest.mark.parametrize(
    "sft_dtype, aligned_dtype, names",
    [(torch.float32, torch.int64, ["F32", "I64"]), (torch.int64, torch.bfloat16, ["I64", "BF16"]),
     (torch.int64, torch.int32, ["I64", "I32"])],
    ids=["float-vs-int", "int-vs-float", "int64-vs-int32"],
)
def test_dtype_kinds_differ(tmp_path, capsys, sft_dtype, aligned_dtype, names):
    t = "model.norm.weight"
    sft, aligned = make_pair(tmp_path, lambda s: s.update({t: s[t].to(sft_dtype)}),
                             lambda s: s.update({t: s[t].to(aligned_dtype)}))
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out), t, *names, out=out)


# ---------------------------------------------------------------------------------------------------------------
# 5-6: bad options


@pytest.fixture
def tiny_pair(tmp_path):
    """(sft folder, aligned folder) of a matching pair; the usual starting point of an option or output test."""
    return make_pair(tmp_path)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--alpha=nan"], ["--alpha", "'nan'", "not a finite number"]),
        (["--alpha=inf"], ["--alpha", "'inf'", "not a finite number"]),
        (["--alpha", "-inf"], ["--alpha", "'-inf'", "not a finite number"]),
        (["--alpha", "1e999"], ["--alpha", "'1e999'", "not a finite number"]),
        (["--alpha", "abc"], ["--alpha", "'abc'", "not a number"]),
        (["--alpha="], ["--alpha", "''", "not a number"]),
        (["--alpha", "0.5", "--chunk-mb", "0"], ["--chunk-mb", "'0'", "positive"]),
        (["--alpha", "0.5", "--chunk-mb=nan"], ["--chunk-mb", "'nan'", "not a finite number"]),
        (["--alpha", "0.5", "--dtype", "fp8"], ["--dtype", "'fp8'"]),
        (["--alpha", "0.5", "--overwite"], ["--overwite"]),
        ([], ["--alpha"]),  # a required option left out
    ],
    ids=["alpha-nan", "alpha-inf", "alpha-minus-inf", "alpha-overflows", "alpha-abc", "alpha-empty", "chunk-0",
         "chunk-nan", "dtype-fp8", "misspelt-option", "no-alpha"],
)
def test_bad_option(tmp_path, capsys, tiny_pair, args, needles):
    """argparse's refusals take the same one-line form as the engine's."""
    out = tmp_path / "out"
    refused(capsys, tmp_path, ["--sft", tiny_pair[0], "--aligned", tiny_pair[1], "--out", out, *args], *needles,
            out=out)


@pytest.mark.parametrize("alpha", ["-1e-3", "-0.5", "-1"])
def test_negative_alpha_is_accepted(tmp_path, capsys, tiny_pair, alpha):
    """A negative alpha interpolates; argparse alone would take `-1e-3` for an option and refuse it."""
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *cli_args(*tiny_pair, out, alpha=alpha))
    assert rc == 0, err


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "abc", None])
def test_api_rejects_alpha(tmp_path, tiny_pair, alpha):
    out = tmp_path / "out"
    with unchanged(tmp_path, out), pytest.raises(expo_engine.OptionError, match="alpha"):
        expo_engine.extrapolate(sft=tiny_pair[0], aligned=tiny_pair[1], alpha=alpha, out=str(out))


@pytest.mark.parametrize("size", ["5XB", "-1", "0", "-5GB", "GB", "1.5.5GB"])
def test_bad_max_shard_size(tmp_path, capsys, tiny_pair, size):
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(*tiny_pair, out, f"--max-shard-size={size}"), repr(size), out=out)


# ---------------------------------------------------------------------------------------------------------------
# 7-9: unusable output paths


def test_nonempty_output_is_kept_without_overwrite(tmp_path, capsys, tiny_pair):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    refused(capsys, tmp_path, cli_args(*tiny_pair, out), out, "not empty", "--overwrite")
    assert (out / "precious.txt").read_text() == "mine"


def test_overwrite_replaces_the_old_output(tmp_path, capsys, tiny_pair):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("old")
    (out / "model.safetensors").write_bytes(b"old shard")
    inputs = [snapshot(path) for path in tiny_pair]
    rc, _, err = run_cli(capsys, *cli_args(*tiny_pair, out, "--overwrite"))
    assert rc == 0, err
    assert not (out / "precious.txt").exists()
    assert set(load_file(out / "model.safetensors")) == set(tiny_state())
    assert not leftovers(out)
    assert [snapshot(path) for path in tiny_pair] == inputs


def test_empty_output_folder_is_used(tmp_path, capsys, tiny_pair):
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = run_cli(capsys, *cli_args(*tiny_pair, out))
    assert rc == 0, err
    assert (out / "model.safetensors").is_file() and not leftovers(out)


@pytest.mark.parametrize("where", ["equal", "inside", "inside-existing", "inside-via-symlink", "contains"])
def test_output_overlapping_an_input(tmp_path, capsys, where):
    root = tmp_path / "models"
    sft, aligned = make_pair(root)
    os.makedirs(os.path.join(sft, "sub"))
    (tmp_path / "alias").symlink_to(root)
    out, src = {
        "equal": (sft, sft),
        "inside": (os.path.join(aligned, "expo"), aligned),
        "inside-existing": (os.path.join(sft, "sub"), sft),
        "inside-via-symlink": (tmp_path / "alias" / "aligned" / "expo", aligned),
        "contains": (root, sft),
    }[where]
    refused(capsys, tmp_path, cli_args(sft, aligned, out, "--overwrite"), out, f"input checkpoint {src}")
    assert not leftovers(out)


def test_output_root_that_contains_the_inputs_is_refused(tmp_path):
    sft = os.path.realpath(make_pair(tmp_path)[0])
    with pytest.raises(expo_engine.OutputError, match="input checkpoint"):
        check_output_path(os.path.dirname(sft), [sft], overwrite=True)  # a pure check: creates nothing


def test_output_at_filesystem_root_is_refused(tmp_path):
    sft = os.path.realpath(make_pair(tmp_path)[0])
    with pytest.raises(expo_engine.OutputError):
        check_output_path("/", [sft], overwrite=True)  # a pure check: creates nothing


@pytest.mark.parametrize("temp", ["expo-staging", "expo-old"])
def test_engine_temp_folders_never_touch_an_input(tmp_path, capsys, temp):
    """The engine removes `.<out>.expo-staging` and `.<out>.expo-old` beside the output: never when it is an input."""
    sft_state = tiny_state()
    sft = write_checkpoint(tmp_path / f".out.{temp}", sft_state)
    aligned = write_checkpoint(tmp_path / "aligned", aligned_from(sft_state))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    refused(capsys, tmp_path, cli_args(sft, aligned, out, "--overwrite"), out, f".out.{temp}")


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", ["file", "symlink-to-input"])
def test_output_is_not_a_folder(tmp_path, capsys, tiny_pair, kind, overwrite):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("a file")
    else:
        out.symlink_to(tiny_pair[0])
    needle = "not a folder" if kind == "file" else "symbolic link"
    refused(capsys, tmp_path, cli_args(*tiny_pair, out, *(["--overwrite"] if overwrite else [])), out, needle)


# ---------------------------------------------------------------------------------------------------------------
# 10-11: sources that cannot be resolved, indexes that lie


def _no_source(tmp_path, kind):
    """A source argument that is not a checkpoint, and the text its error must contain."""
    if kind == "relative":
        return "./nope", "./nope"
    if kind == "absolute":
        return str(tmp_path / "nope"), str(tmp_path / "nope")
    if kind == "repo-like":  # looks like org/name; HF_HUB_OFFLINE is set by conftest, so no network
        return "nope/model", "nope/model"
    if kind == "file":
        path = tmp_path / "weights.safetensors"
        path.write_bytes(safetensors_bytes({}))
        return str(path), "weights.safetensors"
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "config-only":
        write_json(folder / "config.json", CONFIG)
    elif kind == "other-weights":
        write_bytes(folder / "model.ckpt", b"\0" * 64)
        write_bytes(folder / "model-00001-of-00002.safetensors", safetensors_bytes({}))  # a shard without index
    return str(folder), f"{kind}: no weights found"


@pytest.mark.parametrize("side", ["sft", "aligned"])
@pytest.mark.parametrize("kind", ["relative", "absolute", "repo-like", "file", "empty", "config-only",
                                  "other-weights"])
def test_source_without_a_checkpoint(tmp_path, capsys, monkeypatch, kind, side):
    monkeypatch.chdir(tmp_path)
    sft, aligned = make_pair(tmp_path)
    bad, needle = _no_source(tmp_path, kind)
    sft, aligned = (bad, aligned) if side == "sft" else (sft, bad)
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out), needle, out=out)


def _break_index(folder, how):
    index_path = os.path.join(folder, ST_INDEX)
    index = read_json(index_path)
    first = next(iter(index["weight_map"]))
    if how == "missing-shard":
        os.remove(os.path.join(folder, SHARDS[1]))
    elif how == "parent-path":  # the file exists, outside the folder: still refused
        write_bytes(os.path.join(folder, "..", "x.safetensors"), safetensors_bytes({}))
        index["weight_map"][first] = "../x.safetensors"
    elif how == "absolute-path":
        index["weight_map"][first] = os.path.abspath(os.path.join(folder, SHARDS[0]))
    elif how == "wrong-shard":  # names a real shard that does not hold the tensor
        index["weight_map"][first] = SHARDS[1]
    elif how == "tensor-not-listed":
        del index["weight_map"][first]
    elif how == "no-weight-map":
        del index["weight_map"]
    elif how == "not-json":
        index = None
        write_bytes(index_path, b"{ not json")
    if index is not None:
        write_json(index_path, index)


@pytest.mark.parametrize("how", ["missing-shard", "parent-path", "absolute-path", "wrong-shard",
                                 "tensor-not-listed", "no-weight-map", "not-json"])
def test_index_that_lies(tmp_path, capsys, how):
    sft, aligned = make_pair(tmp_path, aligned_layout="sharded")
    _break_index(aligned, how)
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out), f"aligned/{ST_INDEX}", out=out)


def test_bin_index_naming_a_missing_shard(tmp_path, capsys):
    sft, aligned = make_pair(tmp_path)
    state = aligned_from(tiny_state())
    folder = tmp_path / "bin-sharded"
    write_checkpoint(folder, state, "bin")
    write_json(folder / "pytorch_model.bin.index.json",
               {"weight_map": {n: "pytorch_model-00002-of-00002.bin" for n in state}})
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, folder, out),
            "bin-sharded/pytorch_model.bin.index.json", "pytorch_model-00002-of-00002.bin", out=out)


# ---------------------------------------------------------------------------------------------------------------
# 12: corrupt safetensors

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _corrupt_safetensors(valid: bytes, how: str) -> bytes:
    if how == "truncated":
        return valid[:-10]
    if how == "padded":
        return valid + b"\0" * 8
    if how == "too-short":
        return valid[:5]
    if how == "header-longer-than-file":
        return struct.pack("<Q", len(valid)) + valid[8:]
    if how == "header-length-huge":
        return struct.pack("<Q", 2**64 - 1) + valid[8:]
    if how == "header-not-json":
        return safetensors_bytes(b"{this is not json}", b"\0" * 8)
    if how == "header-not-utf8":
        return safetensors_bytes(b'{"\xff": 1}', b"\0" * 8)
    if how == "header-not-object":
        return safetensors_bytes([1, 2])
    if how == "overlapping-offsets":
        return safetensors_bytes({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12)
    if how == "gap":
        return safetensors_bytes({"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}}, b"\0" * 20)
    if how == "size-disagrees-with-shape":
        return safetensors_bytes({"a": {**F32x2, "shape": [3]}}, b"\0" * 8)
    if how == "unknown-dtype":
        return safetensors_bytes({"a": {**F32x2, "dtype": "F12"}}, b"\0" * 8)
    if how == "negative-shape":
        return safetensors_bytes({"a": {**F32x2, "shape": [-2]}}, b"\0" * 8)
    if how == "missing-field":
        return safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)
    if how == "metadata-not-strings":
        return safetensors_bytes({"__metadata__": {"format": 1}, "a": F32x2}, b"\0" * 8)
    if how == "dtype-not-a-string":
        return safetensors_bytes({"a": {**F32x2, "dtype": ["F32"]}}, b"\0" * 8)
    raise ValueError(how)


@pytest.mark.parametrize("how", [
    "truncated", "padded", "too-short", "header-longer-than-file", "header-length-huge", "header-not-json",
    "header-not-utf8", "header-not-object", "overlapping-offsets", "gap", "size-disagrees-with-shape",
    "unknown-dtype", "negative-shape", "missing-field", "metadata-not-strings", "dtype-not-a-string",
])
def test_corrupt_safetensors(tmp_path, capsys, how):
    sft, aligned = make_pair(tmp_path)
    path = os.path.join(sft, "model.safetensors")
    with open(path, "rb") as f:
        valid = f.read()
    write_bytes(path, _corrupt_safetensors(valid, how))
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out), "sft/model.safetensors", out=out)


# ---------------------------------------------------------------------------------------------------------------
# 13: `.bin` files that must not be unpickled, and malformed ones


class RunsShell:
    """Unpickling this runs a shell command (what a malicious `.bin` does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class RunsPython:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("side", ["sft", "aligned"])
@pytest.mark.parametrize("payload, refused_name", [(RunsShell, "system"), (RunsPython, "exec")])
def test_bin_whose_pickle_would_run_code(tmp_path, capsys, side, payload, refused_name):
    marker = tmp_path / "pwned"
    def poison(state):
        state["model.norm.weight"] = payload(marker)
    sft, aligned = make_pair(tmp_path, **{f"{side}_edit": poison, f"{side}_layout": "bin"})
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out), f"{side}/pytorch_model.bin", "refuses to unpickle",
            refused_name, out=out)
    assert not marker.exists()
    # The payload is live: the unrestricted unpickler runs it (this is what the engine must never do).
    torch.load(os.path.join(tmp_path, side, "pytorch_model.bin"), weights_only=False)
    assert marker.exists()


def test_bin_holding_a_class_outside_the_tensor_rebuild_functions(tmp_path, capsys):
    sft, aligned = make_pair(tmp_path, aligned_edit=lambda s: s.update({"extra": collections.Counter("ab")}),
                             aligned_layout="bin")
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out), "aligned/pytorch_model.bin",
            "refuses to unpickle collections.Counter", out=out)


def test_legacy_pickle_bin_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    sft, aligned = make_pair(tmp_path)
    os.remove(os.path.join(aligned, "model.safetensors"))
    with open(os.path.join(aligned, "pytorch_model.bin"), "wb") as f:
        pickle.dump({"model.norm.weight": RunsShell(marker)}, f)  # pre-1.6 torch.save: a bare pickle, not a zip
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out), "aligned/pytorch_model.bin", out=out)
    assert not marker.exists()


class _Storage:
    def __init__(self, numel):
        self.numel = numel


class _FakeTensor:
    """Pickles as torch.save pickles a float32 tensor, with any storage size, shape and stride we like."""

    def __init__(self, numel=4, size=(4,), stride=(1,)):
        self.numel, self.size, self.stride = numel, size, stride

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_Storage(self.numel), 0, self.size, self.stride, False,
                                                 collections.OrderedDict())


class _TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", obj.numel) if isinstance(obj, _Storage) else None


def _bin_bytes(how: str) -> bytes:
    """A `.bin` (zip with data.pkl and a storage record) broken in one way."""
    state, pkl, data, compress = {"w": _FakeTensor()}, None, b"\0" * 16, zipfile.ZIP_STORED
    if how == "storage-size-infinite":
        state = {"w": _FakeTensor(numel=float("inf"))}
    elif how == "negative-shape":
        state = {"w": _FakeTensor(size=(-1,))}
    elif how == "float-shape":
        state = {"w": _FakeTensor(size=(2.0,))}
    elif how == "build-opcode":  # OrderedDict() then BUILD with a dict state
        pkl = b"\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00aK\x01sb."
    elif how == "corrupt-deflated-pickle":
        compress = zipfile.ZIP_DEFLATED
    elif how == "non-string-name":  # two names for one storage, as a tied .bin has; one of them an int
        state = {0: _FakeTensor(), "w": _FakeTensor()}
    elif how == "not-a-state-dict":
        state = [_FakeTensor()]
    elif how == "storage-record-missing":
        data = None
    elif how == "big-endian":
        pass
    if pkl is None:
        buf = io.BytesIO()
        _TorchLikePickler(buf, protocol=2).dump(state)
        pkl = buf.getvalue()
    mem = io.BytesIO()
    with zipfile.ZipFile(mem, "w") as z:
        z.writestr("archive/data.pkl", pkl, compress_type=compress)
        z.writestr("archive/byteorder", b"big" if how == "big-endian" else b"little")
        if data is not None:
            z.writestr("archive/data/0", data)
    raw = bytearray(mem.getvalue())
    if how == "corrupt-deflated-pickle":
        start = raw.index(b"archive/data.pkl") + len(b"archive/data.pkl")
        raw[start: start + 16] = bytes(b ^ 0x5A for b in raw[start: start + 16])
    if how == "truncated":
        raw = raw[: len(raw) // 2]
    return bytes(raw)


@pytest.mark.parametrize("how", [
    "truncated", "not-a-state-dict", "storage-record-missing", "big-endian", "storage-size-infinite",
    "negative-shape", "float-shape", "build-opcode", "corrupt-deflated-pickle",
    "non-string-name",
])
def test_malformed_bin(tmp_path, capsys, how):
    sft, aligned = make_pair(tmp_path)
    for folder in (sft, aligned):  # both sides alike, so nothing but the file itself can be refused
        os.remove(os.path.join(folder, "model.safetensors"))
        write_bytes(os.path.join(folder, "pytorch_model.bin"), _bin_bytes(how))
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out), "sft/pytorch_model.bin", out=out)


# ---------------------------------------------------------------------------------------------------------------
# An aligned config.json that cannot take the output dtype


@pytest.mark.parametrize("config", [b"{ not json", b"[]", b"null", b'"llama"', b'{"model_type": "\xff"}'],
                         ids=["not-json", "list", "null", "string", "not-utf8"])
def test_aligned_config_that_cannot_take_the_dtype(tmp_path, capsys, config):
    sft, aligned = make_pair(tmp_path)
    write_bytes(os.path.join(aligned, "config.json"), config)
    out = tmp_path / "out"
    refused(capsys, tmp_path, cli_args(sft, aligned, out, "--dtype", "fp32"), "aligned/config.json", out=out)


def test_aligned_config_is_checked_before_the_first_output_byte(tmp_path):
    """As api.extrapolate promises: a config.json that cannot take the output dtype is refused before any work."""
    sft, aligned = make_pair(tmp_path)
    write_bytes(os.path.join(aligned, "config.json"), b"{ not json")
    written = []
    with pytest.raises(expo_engine.ExpoError, match="config.json"):
        expo_engine.extrapolate(sft, aligned, 0.5, str(tmp_path / "out"), dtype="fp32", on_progress=written.append)
    assert written == []


# ---------------------------------------------------------------------------------------------------------------
# Inputs are opened read-only


def _spy_on_opens(monkeypatch, roots) -> list[tuple[str, bool]]:
    """Record (path, opened for writing?) for every open of a file under `roots`, by os.open, open or io.open."""
    roots = [os.path.realpath(r) + os.sep for r in roots]
    seen = []
    real_os_open, real_open = os.open, builtins.open

    def record(path, writes):
        if isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.realpath(os.fsdecode(path))
            if any(full.startswith(r) for r in roots):
                seen.append((full, writes))

    def spy_os_open(path, flags, *args, **kwargs):
        if kwargs.get("dir_fd") is None:
            record(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)))
        return real_os_open(path, flags, *args, **kwargs)

    def spy_open(file, mode="r", *args, **kwargs):
        record(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    return seen


@pytest.mark.parametrize("outcome", ["success", "mismatch"])
def test_inputs_are_opened_read_only(tmp_path, capsys, monkeypatch, outcome):
    buf = "model.position_ids"
    sft, aligned = make_pair(
        tmp_path,
        lambda s: s.update({buf: torch.zeros(1, 4, dtype=torch.int64)}),
        lambda s: s.update({buf: torch.zeros(1, 4, dtype=torch.int64) + (outcome == "mismatch")}),
        sft_layout="bin", aligned_layout="sharded",
    )
    out = tmp_path / "out"
    before = snapshot(tmp_path / "sft") | snapshot(tmp_path / "aligned")
    seen = _spy_on_opens(monkeypatch, [sft, aligned])
    rc, _, err = run_cli(capsys, *cli_args(sft, aligned, out, "--dtype", "fp32"))
    monkeypatch.undo()
    assert rc == (0 if outcome == "success" else 2), err
    opened = {os.path.basename(p) for p, _ in seen}
    assert {"pytorch_model.bin", *SHARDS} <= opened, opened  # the spy saw the engine read them
    assert [p for p, writes in seen if writes] == []
    assert snapshot(tmp_path / "sft") | snapshot(tmp_path / "aligned") == before


# ---------------------------------------------------------------------------------------------------------------
# A real process: exit status 2 and no traceback


def test_process_shape_mismatch(tmp_path):
    # (a row fewer in lm_head alone would now read as a resized vocabulary: tests/test_vocab.py)
    sft, aligned = make_pair(tmp_path, sft_edit=lambda s: s.update({UP[0]: s[UP[0]][:-1]}))
    out = tmp_path / "out"
    with unchanged(tmp_path, out):
        proc = expo_process("extrapolate", *cli_args(sft, aligned, out), cwd=tmp_path)
    assert proc.stdout == ""
    assert_user_error(proc.returncode, proc.stderr, UP[0], f"[{HIDDEN - 1}, {HIDDEN}]")


def test_process_unsafe_pickle(tmp_path):
    marker = tmp_path / "pwned"
    sft, aligned = make_pair(tmp_path, sft_edit=lambda s: s.update({"x": RunsShell(marker)}), sft_layout="bin")
    out = tmp_path / "out"
    with unchanged(tmp_path, out):
        proc = expo_process("extrapolate", *cli_args(sft, aligned, out), cwd=tmp_path)
    assert_user_error(proc.returncode, proc.stderr, "sft/pytorch_model.bin", "refuses to unpickle")
    assert not marker.exists()
