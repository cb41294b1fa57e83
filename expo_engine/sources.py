"""Sources: find a checkpoint's weight files, read their headers, and say where every tensor's bytes lie.

Nothing here reads tensor data. A checkpoint is described by a :class:`Checkpoint`: for every tensor, the file
and absolute byte range of its (contiguous, little-endian) elements. Safetensors headers are parsed by hand and
validated strictly; `.bin` files (PyTorch's zip format) are described by unpickling their `data.pkl` with an
unpickler that only knows how to *describe* tensors: it constructs nothing and refuses every other class, so it
is stricter than `torch.load(weights_only=True)` and never maps a shard into memory.

Every file this module hands out or opens (weights, indexes, side files) first passes :func:`check_in_folder`: a
symbolic link may lead out of the checkpoint folder only where huggingface_hub's cache puts it (a file in
`models--ORG--NAME/snapshots/REV/` pointing into `models--ORG--NAME/blobs/`).
"""

from __future__ import annotations

import fnmatch
import glob
import importlib
import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field

from . import dtypes
from .errors import FormatError, SourceError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Files besides the weights that make a checkpoint usable: copied from the aligned model into the output, and the
# only ones fetched from the Hub besides the weights.
SIDE_FILE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
    "preprocessor_config.json",
    "*.py",
]

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UnsafeLinkError(SourceError):
    """A file of a checkpoint is a symbolic link that leads outside its folder (see check_in_folder)."""


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor's elements lie: `nbytes` contiguous bytes from `offset` in `file` (an absolute path)."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Checkpoint:
    """One side of the job: a resolved folder and every tensor in it, in file order."""

    source: str  # what the user gave: a folder or `org/name[@revision]`
    path: str  # the resolved local folder
    revision: str | None  # the Hub commit, when the source came from the Hub
    format: str  # "safetensors" or "bin"
    files: tuple[str, ...]  # weight file names, relative to path
    tensors: dict[str, TensorSlot] = field(repr=False)
    side_files: tuple[str, ...] = ()  # config, tokenizer, ... files in path (SIDE_FILE_PATTERNS), links checked

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(source: str) -> Checkpoint:
    """Resolve `source` (a folder, or a Hub repo id with optional `@revision`) and describe its tensors."""
    path, revision = resolve(source)
    side = find_side_files(path)
    fmt, files = find_weight_files(path)
    tensors: dict[str, TensorSlot] = {}
    for name in files:
        full = os.path.join(path, name)
        slots = read_safetensors_layout(full) if fmt == "safetensors" else read_bin_layout(full)
        for slot in slots:
            if slot.name in tensors:
                raise FormatError(f"{full}: tensor '{slot.name}' also appears in {tensors[slot.name].file}")
            tensors[slot.name] = slot
    _check_against_index(path, fmt, files, tensors)
    return Checkpoint(source, path, revision, fmt, tuple(files), tensors, tuple(side))


# ---------------------------------------------------------------------------------------------------------------
# Resolution: folder or Hugging Face Hub


def resolve(source: str) -> tuple[str, str | None]:
    """Return (local folder, Hub commit or None). A folder that exists wins over a repo id of the same name."""
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        return os.path.realpath(expanded), None
    if os.path.exists(expanded):
        raise SourceError(f"{source} is a file; give the checkpoint's folder (the one holding config.json)")
    repo_id, _, revision = source.partition("@")
    if not _REPO_ID.match(repo_id) or source.startswith((".", "/", "~")):
        raise SourceError(f"{source}: no such folder, and not a Hugging Face repo id (org/name[@revision])")
    return _resolve_hub(repo_id, revision or None)


def _resolve_hub(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    label = f"{repo_id}@{revision}" if revision else repo_id
    try:
        try:
            folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
        except LocalEntryNotFoundError as e:
            # huggingface_hub >= 1 calls a snapshot incomplete when it lacks any file of the repo's listing (a
            # README expo never fetched); what expo needs is judged below, by the weights and their index
            folder = getattr(e, "snapshot_path", None)
            if not folder:
                raise
            folder = str(folder)
        find_weight_files(folder)
        return folder, os.path.basename(folder.rstrip("/"))
    except UnsafeLinkError:
        raise  # the cache holds the repo, but a link in it leads elsewhere: say so, do not report it as missing
    except (LocalEntryNotFoundError, SourceError, FormatError, OSError, ValueError) as e:
        # Not cached, or cached in part (an index naming a shard that is missing): download it unless offline.
        if constants.HF_HUB_OFFLINE:
            why = f": {e}" if isinstance(e, FormatError | SourceError) else ""
            raise SourceError(
                f"{label}: no such local folder, and as a Hub repo it is not complete in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set{why}; check the path, or download it first"
            ) from None
    return _download_hub(repo_id, revision, label)


def _download_hub(repo_id: str, revision: str | None, label: str) -> tuple[str, str | None]:
    """Download the weights (one format; for a sharded repo only the shards its index names) and side files.

    The revision is resolved to a commit once, and every file is fetched at that commit, so the index and the
    shards cannot come from two different pushes.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().model_info(repo_id, revision=revision)
        commit = info.sha
        weights = [_main_weight_file([s.rfilename for s in info.siblings or []], label)]
        if weights[0].endswith(".index.json"):  # fetch the shards the index names, not every weight-like file
            weight_map = read_index(hf_hub_download(repo_id, weights[0], revision=commit), check_files=False)
            weights += dict.fromkeys(weight_map.values())
        # Escaped: a weight_map value is a file name, not a pattern (`*.safetensors` must not fetch every file).
        patterns = [glob.escape(name) for name in weights] + SIDE_FILE_PATTERNS
        folder = snapshot_download(repo_id, revision=commit, allow_patterns=patterns)
        _remember_revision(folder, revision or "main", commit)
    except HfHubHTTPError as e:
        raise SourceError(f"{label}: the Hugging Face Hub refused it ({type(e).__name__}: {_one_line(e)})") from None
    except (*_transport_errors(), OSError, ValueError) as e:  # no network, a file missing after the download, ...
        raise SourceError(
            f"{label}: could not download it from the Hugging Face Hub ({type(e).__name__}: {_one_line(e)}); "
            "check the network (or HF_ENDPOINT and proxy settings), or fetch the repo on a connected machine and "
            "set HF_HUB_OFFLINE=1 with the complete repo in the Hugging Face cache"
        ) from None
    return folder, os.path.basename(folder.rstrip("/"))


def _remember_revision(snapshot: str, revision: str, commit: str) -> None:
    """Record in the cache that `revision` (a branch or tag) is `commit`, as huggingface_hub does when it downloads
    by name: files fetched by commit leave no `refs/<revision>`, and the next run, offline, would not find them."""
    if revision == commit:
        return  # found by its snapshots/<commit> folder
    repo_dir = os.path.dirname(os.path.dirname(os.path.normpath(snapshot)))  # .../models--org--name
    ref = os.path.join(repo_dir, "refs", revision)  # the cache's documented layout; a branch may hold a "/"
    os.makedirs(os.path.dirname(ref), exist_ok=True)
    with open(ref + ".expo-tmp", "w") as f:
        f.write(commit)
    os.replace(ref + ".expo-tmp", ref)  # atomic: a concurrent reader sees the old ref or the new one


def _transport_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub lets through when a request gets no usable response. Before 1.0 it used requests,
    whose errors are OSErrors; 1.x uses httpx and 2.x httpx2, whose RequestError (connect, timeout, proxy, protocol,
    decoding, redirects) is not, so those are listed here, from whichever of the two is installed."""
    errors = []
    for module in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(module).RequestError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())  # the Hub's messages span lines; the CLI prints an error as one line


def _main_weight_file(listing: list[str], label: str) -> str:
    """The index, or else the single weights file, of one format (safetensors preferred) in a repo's listing."""
    for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, BIN_INDEX, BIN_SINGLE):
        if name in listing:
            return name
    wanted = ", ".join([SAFETENSORS_SINGLE, SAFETENSORS_INDEX, BIN_SINGLE, BIN_INDEX])
    raise SourceError(f"{label}: the repo has none of {wanted}")


def find_weight_files(path: str) -> tuple[str, list[str]]:
    """The format of the checkpoint in `path` and its weight files (plain names inside `path`), safetensors first."""
    for index, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        if os.path.isfile(os.path.join(path, index)):
            weight_map = read_index(os.path.join(path, index))
            return fmt, list(dict.fromkeys(weight_map.values()))
        single = index.removesuffix(".index.json")
        if os.path.isfile(os.path.join(path, single)):
            check_in_folder(path, os.path.join(path, single))
            return fmt, [single]
    raise SourceError(
        f"{path}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX}, {BIN_SINGLE})"
    )


def read_index(index_path: str, check_files: bool = True) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index, checked: plain file names inside the folder, all present
    (the last two only with `check_files`: a Hub repo's index is read before its shards are downloaded)."""
    folder = os.path.dirname(index_path)
    check_in_folder(folder, index_path)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{index_path}: not a readable JSON index ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index_path}: has no 'weight_map' object naming tensors and their files")
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or not file or file != os.path.basename(file) or file in (".", ".."):
            raise FormatError(f"{index_path}: tensor '{tensor}' maps to {file!r}, which is not a plain file name")
        if not check_files:
            continue
        check_in_folder(folder, os.path.join(folder, file))
        if not os.path.isfile(os.path.join(folder, file)):
            raise FormatError(f"{index_path}: names {file} (for tensor '{tensor}'), which is missing from {folder}")
    return weight_map


def find_side_files(path: str) -> list[str]:
    """The side files in `path` (names matching SIDE_FILE_PATTERNS that are files), each checked by check_in_folder.

    The writer copies these from the aligned checkpoint; checking them here refuses a link leading outside the
    folder before any byte of any file is read.
    """
    found = []
    for name in sorted(os.listdir(path)):
        if any(fnmatch.fnmatch(name, p) for p in SIDE_FILE_PATTERNS):
            full = os.path.join(path, name)
            check_in_folder(path, full)
            if os.path.isfile(full):
                found.append(name)
    return found


def check_in_folder(folder: str, path: str) -> str:
    """Return `path` (a file in checkpoint `folder`) if reading it stays inside the folder; else UnsafeLinkError.

    The file may be a symbolic link (or a chain of them) as long as its final target lies inside `folder`. The one
    exception is huggingface_hub's cache layout: a file under `.../models--ORG--NAME/snapshots/REV/` may point into
    that same repo's `.../models--ORG--NAME/blobs/` (a real folder: a `blobs` link leading elsewhere does not count).
    Nothing is opened or read.
    """
    real_folder = os.path.realpath(folder)
    target = os.path.realpath(path)
    if _within(target, real_folder):
        return path
    blobs = _hub_blobs(real_folder)
    if blobs is not None and _within(target, blobs):
        return path
    if blobs is None:
        raise UnsafeLinkError(
            f"{path} is a symbolic link to {target}, outside the checkpoint folder {real_folder}; expo reads only "
            "files inside the folders it is given: copy the file into the folder instead of linking to it"
        )
    raise UnsafeLinkError(
        f"{path} is a symbolic link to {target}, outside its Hugging Face cache snapshot {real_folder} and that "
        f"repo's {blobs}; the cache was edited by hand or is damaged: download the repo again, or copy the file "
        "into the folder"
    )


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _hub_blobs(real_folder: str) -> str | None:
    """For a folder inside a Hub cache snapshot (`.../models--ORG--NAME/snapshots/REV[/...]`), that repo's `blobs/`
    folder, else None. It is not resolved: a target (resolved) lies in it only if `blobs` is a real folder."""
    parts = real_folder.split(os.sep)
    for i in range(len(parts) - 3, 0, -1):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots" and parts[i + 2]:
            return os.sep.join([*parts[: i + 1], "blobs"])
    return None


def _check_against_index(path: str, fmt: str, files: list[str], tensors: dict[str, TensorSlot]) -> None:
    index_name = SAFETENSORS_INDEX if fmt == "safetensors" else BIN_INDEX
    index_path = os.path.join(path, index_name)
    if not os.path.isfile(index_path):
        return
    weight_map = read_index(index_path)
    for name, file in weight_map.items():
        slot = tensors.get(name)
        if slot is None or os.path.basename(slot.file) != file:
            raise FormatError(f"{index_path}: says tensor '{name}' is in {file}, but that file does not hold it")
    extra = [n for n in tensors if n not in weight_map]
    if extra:
        raise FormatError(
            f"{index_path}: {len(extra)} tensor(s) in the weight files are missing from the index "
            f"(first: {', '.join(extra[:3])}); the index and the shards disagree"
        )


# ---------------------------------------------------------------------------------------------------------------
# Safetensors


def read_safetensors_layout(path: str) -> list[TensorSlot]:
    """Parse and validate a safetensors header; return its tensors in file order. Reads only the header."""
    raw, size = _read_header(path)
    return parse_safetensors_header(raw, size, path)


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` map of a safetensors file (validated with the rest of its header; {} when absent)."""
    raw, size = _read_header(path)
    parse_safetensors_header(raw, size, path)
    return json.loads(raw.decode("utf-8")).get("__metadata__", {})


def _read_header(path: str) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise FormatError(f"{path}: header length {n} is impossible for a file of {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    return raw, size


def parse_safetensors_header(raw: bytes, file_size: int, path: str = "<header>") -> list[TensorSlot]:
    """Validate a safetensors JSON header to the format's rules and return its tensors sorted by offset."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{path}: tensor '{name}' needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in dtypes.ITEMSIZE:
            raise FormatError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise FormatError(f"{path}: tensor '{name}' has a bad shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            raise FormatError(f"{path}: tensor '{name}' has bad data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtypes.itemsize(dtype):
            raise FormatError(
                f"{path}: tensor '{name}' spans {end - begin} bytes but shape {shape} of {dtype} needs "
                f"{math.prod(shape) * dtypes.itemsize(dtype)}"
            )
        entries.append((begin, end, name, dtype, tuple(shape)))
    entries.sort()
    expected = 0
    for begin, end, name, _, _ in entries:
        if begin != expected:
            what = "overlaps the previous tensor" if begin < expected else "leaves a gap before it"
            raise FormatError(f"{path}: tensor '{name}' starts at byte {begin} and {what}; the file is corrupt")
        expected = end
    if data_start + expected != file_size:
        cut = next((f" (tensor '{n}' and after are cut)" for _, e, n, _, _ in entries if data_start + e > file_size),
                   "")
        raise FormatError(
            f"{path}: tensors end at byte {data_start + expected} but the file has {file_size} bytes "
            f"(truncated or padded){cut}; re-download or re-save it"
        )
    return [TensorSlot(n, d, s, path, data_start + b, e - b) for b, e, n, d, s in entries]


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# ---------------------------------------------------------------------------------------------------------------
# PyTorch `.bin` (zip archive with data.pkl and one stored record per storage)

_STORAGE_DTYPES = {
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "DoubleStorage": "F64",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_):
    return data


class _LayoutUnpickler(pickle.Unpickler):
    """Unpickles a state dict into _TensorRefs. Knows five callables; refuses everything else."""

    _ALLOWED = {
        ("collections", "OrderedDict"): dict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise FormatError(
            f"{self.path}: refuses to unpickle {module}.{name}; a weights file holds only tensors "
            "(convert it to safetensors if it is yours)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise FormatError(f"{self.path}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise FormatError(f"{self.path}: storage {key} has an unsupported type")
        return _StorageRef(str(key), storage_type.dtype, numel)


def read_bin_layout(path: str) -> list[TensorSlot]:
    """Describe a `.bin` state dict (PyTorch zip format) without reading tensor data. Tensors must be contiguous."""
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            infos = {i.filename: i for i in zf.infolist()}
            pkl = next((n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise FormatError(f"{path}: no data.pkl inside; not a PyTorch weights file")
            prefix = pkl[: -len("data.pkl")]
            order = infos.get(prefix + "byteorder")
            if order is not None and zf.read(order).strip() != b"little":
                raise FormatError(f"{path}: stored big-endian; re-save it on a little-endian machine")
            with zf.open(pkl) as f:
                state = _LayoutUnpickler(f, path).load()
            if not isinstance(state, dict):
                raise FormatError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
            slots = []
            for name, ref in state.items():
                if not isinstance(name, str):
                    raise FormatError(f"{path}: entry {name!r} is not named by a string; not a state dict")
                if not isinstance(ref, _TensorRef):
                    raise FormatError(f"{path}: entry '{name}' is not a tensor")
                info = infos.get(f"{prefix}data/{ref.storage.key}")
                if info is None:
                    raise FormatError(f"{path}: tensor '{name}' refers to a missing storage record")
                slots.append(_bin_slot(path, name, ref, info, raw))
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        if zipped:
            raise FormatError(f"{path}: truncated or corrupt zip archive; re-download or re-save it") from None
        raise FormatError(
            f"{path}: not a zip archive; legacy (pre-1.6) PyTorch files are not supported, re-save with torch.save"
        ) from None
    except FormatError:
        raise
    except Exception as e:  # noqa: BLE001 - the pickle and the zip are untrusted input: any failure is theirs
        raise FormatError(f"{path}: cannot read it as a PyTorch weights file ({type(e).__name__}: {e})") from None
    slots.sort(key=lambda s: s.offset)
    return slots


def _bin_slot(path: str, name: str, ref: _TensorRef, info: zipfile.ZipInfo, raw) -> TensorSlot:
    if not (all(_is_uint(d) for d in ref.shape) and all(_is_uint(d) for d in ref.stride)
            and len(ref.stride) == len(ref.shape) and _is_uint(ref.storage_offset) and _is_uint(ref.storage.numel)):
        raise FormatError(f"{path}: tensor '{name}' has an impossible shape, stride or offset")
    itemsize = dtypes.itemsize(ref.storage.dtype)
    if info.compress_type != zipfile.ZIP_STORED:
        raise FormatError(f"{path}: storage of '{name}' is compressed; re-save it with torch.save")
    if info.file_size != ref.storage.numel * itemsize:
        raise FormatError(f"{path}: storage of '{name}' has {info.file_size} bytes, expected its declared size")
    numel = math.prod(ref.shape)
    if ref.storage_offset < 0 or ref.storage_offset + numel > ref.storage.numel:
        raise FormatError(f"{path}: tensor '{name}' reaches past the end of its storage")
    expected_stride, acc = [], 1
    for d in reversed(ref.shape):
        expected_stride.append(acc)
        acc *= d
    if any(d > 1 and s != e for d, s, e in zip(ref.shape, ref.stride, reversed(expected_stride), strict=False)):
        raise FormatError(f"{path}: tensor '{name}' is stored non-contiguously; re-save it with .contiguous()")
    # The record's data begins after its local file header: 30 fixed bytes, then the name and the extra field.
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise FormatError(f"{path}: broken zip entry for the storage of '{name}'")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    data_offset = info.header_offset + 30 + name_len + extra_len
    if data_offset + info.file_size > os.fstat(raw.fileno()).st_size:
        raise FormatError(f"{path}: the storage of '{name}' reaches past the end of the file; truncated or corrupt "
                          "zip archive: re-download or re-save it")
    return TensorSlot(name, ref.storage.dtype, ref.shape, path, data_offset + ref.storage_offset * itemsize,
                      numel * itemsize)
