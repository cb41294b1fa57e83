"""Sources: `.bin` layouts against torch.load, strict safetensors headers (fuzzed), Hugging Face cache layout."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile

import pytest
import torch
from helpers import expo_process, fake_hub_repo, load_output, save_bin_sharded, worst_steps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from expo_engine.errors import FormatError, SourceError
from expo_engine.sources import open_checkpoint, parse_safetensors_header, read_bin_layout, resolve


def _read(slot) -> bytes:
    with open(slot.file, "rb") as f:
        f.seek(slot.offset)
        return f.read(slot.nbytes)


def test_bin_layout_matches_torch_load(tmp_path):
    base = torch.randn(10, 8)
    state = {
        "w": torch.randn(7, 5).to(torch.bfloat16),
        "tied_a": base,
        "tied_b": base,  # same storage: saved once
        "row_view": base[3:6],  # a view with a storage offset
        "half": torch.randn(33).half(),
        "ids": torch.arange(12),
        "scalar": torch.tensor(3.5),
    }
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(state, path)
    slots = {s.name: s for s in read_bin_layout(path)}
    loaded = torch.load(path, mmap=True, weights_only=True)
    assert set(slots) == set(loaded)
    for name, t in loaded.items():
        s = slots[name]
        assert s.shape == tuple(t.shape) and s.nbytes == t.numel() * t.element_size()
        assert _read(s) == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), name
    assert slots["tied_a"].offset == slots["tied_b"].offset


def test_bin_non_contiguous_tensor_is_refused(tmp_path):
    path = str(tmp_path / "pytorch_model.bin")
    torch.save({"t": torch.randn(4, 6).t()}, path)
    with pytest.raises(FormatError, match="non-contiguously"):
        read_bin_layout(path)


def test_bin_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = str(tmp_path / "pytorch_model.bin")
    torch.save({"w": torch.zeros(2), "x": Evil()}, path)
    with pytest.raises(FormatError, match="refuses to unpickle"):
        read_bin_layout(path)
    assert not marker.exists()


def test_sharded_bin_and_safetensors_describe_the_same_tensors(tmp_path):
    state = {f"layer.{i}.weight": torch.randn(3 + i, 4).to(torch.bfloat16) for i in range(7)}
    save_bin_sharded(state, str(tmp_path / "bin"), 3)
    os.makedirs(tmp_path / "st")
    save_file(state, str(tmp_path / "st" / "model.safetensors"))
    a, b = open_checkpoint(str(tmp_path / "bin")), open_checkpoint(str(tmp_path / "st"))
    assert a.format == "bin" and b.format == "safetensors" and len(a.files) == 3
    for name, t in state.items():
        assert _read(a.tensors[name]) == _read(b.tensors[name]) == t.view(torch.uint8).numpy().tobytes()


def _header(entries: dict, meta=None) -> bytes:
    h = dict(entries)
    if meta is not None:
        h["__metadata__"] = meta
    return json.dumps(h).encode()


def test_header_rules():
    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "BF16", "shape": [3], "data_offsets": [8, 14]}}
    raw = _header(good, {"format": "pt"})
    slots = parse_safetensors_header(raw, 8 + len(raw) + 14)
    assert [(s.name, s.offset) for s in slots] == [("a", 8 + len(raw)), ("b", 16 + len(raw))]
    bad_cases = [
        ({**good, "b": {"dtype": "BF16", "shape": [3], "data_offsets": [6, 12]}}, 14, "overlaps"),
        ({**good, "b": {"dtype": "BF16", "shape": [3], "data_offsets": [10, 16]}}, 16, "gap"),
        ({**good, "b": {"dtype": "X9", "shape": [3], "data_offsets": [8, 14]}}, 14, "unknown dtype"),
        ({**good, "b": {"dtype": "BF16", "shape": [-3], "data_offsets": [8, 14]}}, 14, "bad shape"),
        ({**good, "b": {"dtype": "BF16", "shape": [4], "data_offsets": [8, 14]}}, 14, "needs"),
        (good, 20, "truncated or padded"),
    ]
    for header, data_len, message in bad_cases:
        raw = _header(header)
        with pytest.raises(FormatError, match=message):
            parse_safetensors_header(raw, 8 + len(raw) + data_len)
    with pytest.raises(FormatError, match="__metadata__"):
        raw = _header(good, {"format": 1})
        parse_safetensors_header(raw, 8 + len(raw) + 14)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


# EXPO_FUZZ_EXAMPLES=N runs N examples per fuzz test instead of the CI budget (400 and 300).
FUZZ_EXAMPLES = int(os.environ.get("EXPO_FUZZ_EXAMPLES", "0") or 0)


@settings(max_examples=FUZZ_EXAMPLES or 400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.dictionaries(st.text(max_size=6), _json, max_size=4), extra=st.integers(0, 64),
       mutate=st.binary(max_size=16))
def test_header_parser_fuzz(header, extra, mutate):
    """Any header either parses into a valid contiguous layout or raises FormatError, nothing else."""
    for raw in (json.dumps(header).encode(), mutate, json.dumps(header).encode()[: len(mutate)]):
        try:
            slots = parse_safetensors_header(raw, 8 + len(raw) + extra)
        except FormatError:
            continue
        end = 8 + len(raw)
        for s in sorted(slots, key=lambda s: s.offset):
            assert s.offset == end
            end += s.nbytes
        assert end == 8 + len(raw) + extra


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face cache: repo ids resolve from a real cache layout (blobs, refs, snapshots with relative symlinks).


def test_repo_id_resolves_from_cache(pair, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = str(tmp_path / "hub")
    snap = fake_hub_repo(cache, "org/tiny-sft", pair.sft, "b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    assert resolve("org/tiny-sft") == (snap, "b" * 40)
    assert resolve("org/tiny-sft@main") == (snap, "b" * 40)
    assert resolve("org/tiny-sft@" + "b" * 40) == (snap, "b" * 40)
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE"):
        resolve("org/absent")
    with pytest.raises(SourceError, match="not a Hugging Face repo id"):
        resolve("./no/such/folder")


def test_cli_extrapolates_from_hub_cache(pair, tmp_path):
    cache = str(tmp_path / "hub")
    fake_hub_repo(cache, "org/sft", pair.sft, "c" * 40)
    fake_hub_repo(cache, "org/dpo", pair.aligned, "d" * 40)
    out = str(tmp_path / "out")
    proc = expo_process("extrapolate", "--sft", "org/sft", "--aligned", "org/dpo@main", "--alpha", "0.3", "--out",
                        out, env={"HF_HUB_CACHE": cache})
    assert proc.returncode == 0, proc.stderr
    assert worst_steps(load_output(out), pair.sft_state, pair.aligned_state, 0.3) <= 1
    with open(os.path.join(out, "expo.json")) as f:
        prov = json.load(f)
    assert prov["sft"]["revision"] == "c" * 40 and prov["aligned"]["source"] == "org/dpo@main"
    shutil.rmtree(cache)



# Online resolution, with the Hub faked: `model_info` gives the listing and the commit, downloads fill a real cache
# layout from a "remote" folder (fake_hub_repo), and the local-only lookup is huggingface_hub's own.
def _connect_error() -> Exception:
    """The connection error the installed huggingface_hub lets through (httpx2 for 2.x, httpx for 1.x)."""
    for module in ("httpx2", "httpx"):
        try:
            return __import__(module).ConnectError("[Errno -3] Temporary failure in name resolution")
        except ImportError:
            pass
    import requests  # huggingface_hub < 1.0

    return requests.ConnectionError("[Errno -3] Temporary failure in name resolution")


class FakeHub:
    """`remote` (a folder) served as repo `org/remote` at commit `commit`; records what each call asked for."""

    def __init__(self, monkeypatch, tmp_path, remote: str, commit: str = "e" * 40):
        import huggingface_hub
        from huggingface_hub import constants

        self.remote, self.commit, self.cache, self.tmp = remote, commit, str(tmp_path / "hub"), tmp_path
        self.downloads: list[tuple[str, str | None, list[str]]] = []  # (call, revision, names or patterns)
        self.real_snapshot_download = huggingface_hub.snapshot_download
        monkeypatch.setattr(constants, "HF_HUB_CACHE", self.cache)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", self.model_info)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)

    def model_info(self, repo_id, revision=None, **_):
        from types import SimpleNamespace

        siblings = [SimpleNamespace(rfilename=name) for name in os.listdir(self.remote)]
        return SimpleNamespace(sha=self.commit, siblings=siblings)

    def put(self, names) -> str:
        """Copy `names` from the remote into the cache snapshot (those not there yet); return the snapshot."""
        staging = tempfile.mkdtemp(dir=self.tmp)
        snap = os.path.join(self.cache, "models--org--remote", "snapshots", self.commit)
        for name in names:
            if not os.path.lexists(os.path.join(snap, name)):
                shutil.copy(os.path.join(self.remote, name), staging)
        # As huggingface_hub downloads by commit: no refs/ entry; and (huggingface_hub >= 1) the repo's whole
        # listing cached beside the snapshot, which then counts as "incomplete" for local_files_only lookups.
        snap = fake_hub_repo(self.cache, "org/remote", staging, self.commit, ref=None)
        try:
            from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
        except ImportError:
            return snap
        write_tree_cache(os.path.dirname(os.path.dirname(snap)), self.commit,
                         {n: TreeCacheEntry(size=1, blob_id="b" * 40) for n in os.listdir(self.remote) + ["README.md"]})
        return snap

    def hf_hub_download(self, repo_id, filename, revision=None, **_):
        self.downloads.append(("hf_hub_download", revision, [filename]))
        return os.path.join(self.put([filename]), filename)

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, local_files_only=False, **kw):
        if local_files_only:
            return self.real_snapshot_download(repo_id, revision=revision, local_files_only=True, **kw)
        self.downloads.append(("snapshot_download", revision, list(allow_patterns)))
        return self.put([n for n in os.listdir(self.remote) if any(fnmatch.fnmatch(n, p) for p in allow_patterns)])


def test_unreachable_hub_is_a_source_error(pair, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from helpers import assert_user_error, run_cli

    def unreachable(*args, **kwargs):
        raise _connect_error()

    FakeHub(monkeypatch, tmp_path, pair.aligned)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(SourceError, match="someorg/some-model: could not download it .* HF_HUB_OFFLINE=1"):
        open_checkpoint("someorg/some-model")
    rc, _, err = run_cli(capsys, "--sft", "someorg/some-model", "--aligned", pair.aligned, "--alpha", "0.3",
                         "--out", tmp_path / "out")
    assert_user_error(rc, err, "someorg/some-model", "ConnectError", "check the network")
    assert not os.path.exists(tmp_path / "out")


@pytest.fixture
def remote_with_strays(pair, tmp_path):
    """The sharded aligned checkpoint as a Hub repo would hold it, with a stray consolidated weights file beside
    the shards (as Mistral-7B-v0.3 ships) and a README."""
    remote = tmp_path / "remote"
    shutil.copytree(pair.aligned, remote)
    (remote / "consolidated.safetensors").write_bytes(b"not downloaded")
    (remote / "README.md").write_text("# model card")
    return str(remote)


def test_sharded_hub_repo_downloads_only_the_indexed_shards(remote_with_strays, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path, remote_with_strays)
    ckpt = open_checkpoint("org/remote")
    with open(os.path.join(remote_with_strays, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 1 and ckpt.revision == hub.commit and sorted(ckpt.files) == shards
    assert [(call, rev) for call, rev, _ in hub.downloads] == [("hf_hub_download", hub.commit),
                                                              ("snapshot_download", hub.commit)]
    patterns = hub.downloads[1][2]
    fetched = {n for n in os.listdir(remote_with_strays) if any(fnmatch.fnmatch(n, p) for p in patterns)}
    assert fetched == {"model.safetensors.index.json", "config.json", "generation_config.json", *shards}
    assert sorted(os.listdir(ckpt.path)) == sorted(fetched)
    expected = open_checkpoint(remote_with_strays)
    for name, slot in expected.tensors.items():
        assert _read(ckpt.tensors[name]) == _read(slot), name


def test_partially_cached_hub_repo_is_completed_or_refused_offline(remote_with_strays, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = FakeHub(monkeypatch, tmp_path, remote_with_strays)
    with open(os.path.join(remote_with_strays, "model.safetensors.index.json")) as f:
        first_shard = sorted(json.load(f)["weight_map"].values())[0]
    hub.put(["config.json", "model.safetensors.index.json", first_shard])  # an interrupted download
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="org/remote: .*not complete in the Hugging Face cache"):
        open_checkpoint("org/remote")
    assert hub.downloads == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    ckpt = open_checkpoint("org/remote")
    assert ckpt.revision == hub.commit and len(ckpt.files) > 1 and "consolidated.safetensors" not in ckpt.files


# Mutations of real files: what a damaged download or a hostile uploader could hand the readers.
def _valid_files(tmp_dir: str) -> dict[str, bytes]:
    import torch

    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(5, dtype=torch.bfloat16),
             "c": torch.zeros(0, dtype=torch.float16)}
    save_file(state, os.path.join(tmp_dir, "m.safetensors"), metadata={"format": "pt"})
    torch.save(state, os.path.join(tmp_dir, "m.bin"))
    out = {}
    for name in ("m.safetensors", "m.bin"):
        with open(os.path.join(tmp_dir, name), "rb") as f:
            out[name] = f.read()
    return out


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1), st.just(0)),
)


@settings(max_examples=FUZZ_EXAMPLES or 300, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["m.safetensors", "m.bin"]), mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_real_files_parse_or_raise_format_error(tmp_path, which, mutations):
    """Byte flips, truncations, insertions and forged 8-byte header lengths on real safetensors and `.bin` files:
    each reader returns a layout whose every range lies inside the file, or raises FormatError; nothing else,
    within the 2 s deadline per example (no hangs, no huge allocations from forged lengths)."""
    from expo_engine.sources import read_bin_layout, read_safetensors_layout

    data = bytearray(_valid_files(str(tmp_path))[which])
    for kind, pos, value in mutations:
        if kind == "flip" and data:
            data[pos % len(data)] ^= value
        elif kind == "truncate":
            del data[pos % (len(data) + 1):]
        elif kind == "insert":
            data.insert(pos % (len(data) + 1), value)
        elif kind == "length" and which == "m.safetensors" and len(data) >= 8:
            data[:8] = pos.to_bytes(8, "little")
    path = os.path.join(tmp_path, "x" + which)
    with open(path, "wb") as f:
        f.write(data)
    reader = read_safetensors_layout if which == "m.safetensors" else read_bin_layout
    try:
        slots = reader(path)
    except FormatError:
        return
    for s in slots:
        assert 0 <= s.offset and s.offset + s.nbytes <= len(data)


def test_a_downloaded_repo_opens_again_offline(pair, tmp_path, monkeypatch):
    """What a download leaves in the cache is found by the next run with HF_HUB_OFFLINE=1: by branch name (the
    ref expo records) and by commit, although the repo holds files expo never fetched (README.md)."""
    from huggingface_hub import constants

    hub = FakeHub(monkeypatch, tmp_path, pair.aligned)
    online = open_checkpoint("org/remote")
    assert online.revision == hub.commit and hub.downloads
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.downloads.clear()
    for source in ("org/remote", "org/remote@main", f"org/remote@{hub.commit}"):
        again = open_checkpoint(source)
        assert again.revision == hub.commit and set(again.tensors) == set(online.tensors), source
    assert hub.downloads == []
