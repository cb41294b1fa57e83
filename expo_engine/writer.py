"""Writer: a staging folder of preallocated shards, filled at planned offsets, that becomes the output by rename.

Nothing half-written ever sits at the output path: shards, side files, the index and `expo.json` are written and
fsynced inside `.<name>.expo-staging` beside the output, and the output appears by one rename only when all of it
is complete. On failure the staging folder is removed and the output path is left as it was.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import mmap
import os
import shutil
import threading

from .errors import FormatError, OutputError
from .plan import INDEX_NAME, Plan
from .sources import SIDE_FILE_PATTERNS, Checkpoint

PROVENANCE_NAME = "expo.json"
JOURNAL_NAME = ".expo-journal.jsonl"
CARD_NAME = "README.md"
ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in multiples of this


def direct_io() -> bool:
    """Read inputs and write shards with O_DIRECT unless EXPO_BUFFERED_IO=1. Measured here: page-cache reads cost
    twice the kernel CPU time (4.7 vs 2.4 s for a 4 GB pair), and buffered writes of 2 GB cost 3.8 s of system CPU
    against 0.1 s with O_DIRECT; a model read or written once gains nothing from the page cache."""
    return os.environ.get("EXPO_BUFFERED_IO") != "1"


_bounce = threading.local()  # per writer thread: one page-aligned buffer for O_DIRECT writes, reused


def _bounce_buffer(nbytes: int) -> mmap.mmap:
    buf = getattr(_bounce, "buf", None)
    if buf is None or len(buf) < nbytes:
        if buf is not None:
            buf.close()
        buf = _bounce.buf = mmap.mmap(-1, -(-nbytes // ALIGN) * ALIGN)  # anonymous maps are page-aligned
    return buf


def staging_path(out: str) -> str:
    parent, name = os.path.split(out)
    return os.path.join(parent, f".{name}.expo-staging")


def old_path(out: str) -> str:
    """Where a replaced output waits, during --overwrite, until the new one is in place."""
    parent, name = os.path.split(out)
    return os.path.join(parent, f".{name}.expo-old")


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_output_path(out: str, inputs: list[str], overwrite: bool) -> str:
    """Return the absolute output path after refusing every unusable one. Creates nothing."""
    out_abs = os.path.abspath(os.path.expanduser(out))
    real = os.path.join(os.path.realpath(os.path.dirname(out_abs)), os.path.basename(out_abs))
    if os.path.dirname(real) == real:
        raise OutputError(f"output {out} is the filesystem root; choose a folder")
    # The engine also writes (and on failure removes) the staging and old folders beside the output.
    for src in inputs:
        if real == src:
            raise OutputError(f"output {out} is the input checkpoint {src}; choose another folder")
        if _within(real, src):
            raise OutputError(f"output {out} is inside the input checkpoint {src}; choose a folder outside it")
        if _within(src, real):
            raise OutputError(f"output {out} contains the input checkpoint {src}; choose another folder")
        for temp in (staging_path(real), old_path(real)):
            if _within(src, temp) or _within(temp, src):
                raise OutputError(f"output {out} needs {temp} beside it as a temporary folder, but the input "
                                  f"checkpoint {src} is there; choose another output name")
    if os.path.lexists(out_abs):
        if os.path.islink(out_abs):
            raise OutputError(f"output {out} is a symbolic link; give a real folder path or remove the link")
        if not os.path.isdir(out_abs):
            raise OutputError(f"output {out} exists and is not a folder; remove it or choose another path")
        if os.listdir(out_abs) and not overwrite:
            raise OutputError(f"output {out} exists and is not empty; pass --overwrite to replace it")
    probe = os.path.dirname(out_abs)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {out}: {probe} is not a writable folder")
    return out_abs


def side_files(aligned: Checkpoint, config_dtype: str | None) -> dict[str, bytes]:
    """The aligned model's config, generation config and tokenizer files, read (and config.json updated) up front
    so that a bad one is refused before any output byte."""
    files = {}
    for name in sorted(os.listdir(aligned.path)):
        src = os.path.join(aligned.path, name)
        if os.path.isfile(src) and any(fnmatch.fnmatch(name, p) for p in SIDE_FILE_PATTERNS):
            with open(src, "rb") as f:
                files[name] = f.read()
    if config_dtype and "config.json" in files:
        files["config.json"] = _set_config_dtype(files["config.json"], config_dtype,
                                                 os.path.join(aligned.path, "config.json"))
    return files


class Staging:
    """The output under construction. Use as a context manager: leaving it with an exception removes it, unless
    `keep` was set (an interrupted journaled run, kept for resume).

    With a `journal_key`, the staging folder keeps a journal of finished units (JOURNAL). A staging folder left by
    an earlier run is reused only if its journal was written for the same key (same layout, alpha and inputs);
    anything else left there is removed.
    """

    def __init__(self, out: str, plan: Plan, journal_key: str | None = None):
        self.out = out
        self.plan = plan
        self.dir = staging_path(out)
        self.journal_key = journal_key
        self.keep = False
        self.resumed = False
        self._fds: dict[str, int] = {}
        self._hashes: dict[str, object] = {}
        self._next: dict[str, int] = {}  # the offset at which each shard's running hash continues
        # O_DIRECT writes (in-order writes only): a second descriptor per shard, and the bytes since the last
        # ALIGN boundary that wait for the rest of their block: {shard: (aligned offset, bytes)}
        self._direct: dict[str, int] = {}
        self._carry: dict[str, tuple[int, bytes]] = {}
        self._made: list[str] = []

    def __enter__(self) -> Staging:
        parent = os.path.dirname(os.path.abspath(self.dir))
        while not os.path.lexists(parent):  # the folders this run creates, removed again if it fails
            self._made.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(os.path.dirname(self.dir), exist_ok=True)
        if os.path.lexists(self.dir):
            if self.journal_key and self._journal_key_on_disk() == self.journal_key and all(
                    os.path.isfile(f := os.path.join(self.dir, s.filename)) and os.path.getsize(f) == s.size
                    for s in self.plan.shards):
                self.resumed = True
            else:  # left by a run that was killed, or planned differently: nothing in it can be trusted
                shutil.rmtree(self.dir)
        if not self.resumed:
            os.mkdir(self.dir)
            if self.journal_key:
                self.journal_add({"key": self.journal_key})
        try:
            for shard in self.plan.shards:
                flags = os.O_RDWR if self.resumed else os.O_RDWR | os.O_CREAT | os.O_EXCL
                fd = os.open(os.path.join(self.dir, shard.filename), flags, 0o644)
                self._fds[shard.filename] = fd
                _preallocate(fd, shard.size, shard.filename)
                _pwrite_all(fd, shard.header, 0)
                self._hashes[shard.filename] = hashlib.sha256(shard.header)
                self._next[shard.filename] = len(shard.header)
                if direct_io() and not self.journal_key:  # Ray units write with their own descriptors
                    try:
                        self._direct[shard.filename] = os.open(os.path.join(self.dir, shard.filename),
                                                               os.O_WRONLY | os.O_DIRECT)
                        start = len(shard.header) // ALIGN * ALIGN
                        self._carry[shard.filename] = (start, shard.header[start:])
                    except (OSError, AttributeError):
                        pass  # a filesystem without O_DIRECT (tmpfs): page-cache writes
        except BaseException:
            self.__exit__(None, None, None)
            shutil.rmtree(self.dir, ignore_errors=True)
            self._remove_made()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for fd in [*self._fds.values(), *self._direct.values()]:
            os.close(fd)
        self._fds.clear()
        self._direct.clear()
        if exc_type is not None and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._remove_made()

    def _remove_made(self) -> None:
        for folder in self._made:  # deepest first; a folder something else has put files in stays
            try:
                os.rmdir(folder)
            except OSError:
                break

    # The journal: one JSON object per line, fsynced; the first holds the key. A torn last line (a kill during
    # the append) is ignored: that unit is simply done again.
    def _journal_lines(self) -> list[dict]:
        lines = []
        try:
            with open(os.path.join(self.dir, JOURNAL_NAME)) as f:
                for line in f:
                    try:
                        lines.append(json.loads(line))
                    except ValueError:
                        break
        except OSError:
            pass
        return lines

    def _journal_key_on_disk(self) -> str | None:
        lines = self._journal_lines()
        return lines[0].get("key") if lines and isinstance(lines[0], dict) else None

    def journal_done(self) -> dict[int, dict]:
        """Units recorded as finished: {unit index: record}."""
        return {r["index"]: r for r in self._journal_lines()[1:] if isinstance(r, dict) and "index" in r}

    def journal_add(self, record: dict) -> None:
        fd = os.open(os.path.join(self.dir, JOURNAL_NAME), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def write(self, shard: str, offset: int, data: memoryview) -> None:
        """Write `data` at `offset` of `shard`. Writes in plan order let the checksum be kept on the fly."""
        fd = self._fds[shard]
        in_order = self._next.get(shard) == offset
        try:
            if in_order and shard in self._direct:
                self._write_direct(shard, offset, data)
            else:
                self._flush_carry(shard)  # out of order: page-cache writes from here on
                _pwrite_all(fd, data, offset)
                # Starts writeback of these pages now (Linux: DONTNEED on dirty pages queues them for writing) so
                # the disk writes while the next chunks are computed, instead of all at the final fsync.
                os.posix_fadvise(fd, offset, len(data), os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise write_error(e, os.path.join(self.dir, shard)) from None
        if in_order:
            self._hashes[shard].update(data)
            self._next[shard] = offset + len(data)
        else:
            self._next[shard] = -1  # out of order: hash it by reading it back in finish()

    def _write_direct(self, shard: str, offset: int, data) -> None:
        """Write the whole ALIGN blocks of (carried bytes + data) with O_DIRECT, through the thread's page-aligned
        bounce buffer (one copy, instead of the kernel's copy into the page cache and its writeback work); keep the
        tail for the next write or for finish()."""
        start, carry = self._carry[shard]
        data = memoryview(data).cast("B")
        full = (len(carry) + len(data)) // ALIGN * ALIGN
        if full == 0:
            self._carry[shard] = (start, carry + bytes(data))
            return
        buf = _bounce_buffer(full)
        buf[:len(carry)] = carry
        used = full - len(carry)
        buf[len(carry):full] = data[:used]
        view, at = memoryview(buf)[:full], start
        try:
            while view:
                n = os.pwrite(self._direct[shard], view, at)
                view, at = view[n:], at + n
        finally:
            view.release()
        self._carry[shard] = (start + full, bytes(data[used:]))

    def _flush_carry(self, shard: str) -> None:
        """Write the carried bytes of `shard` through the page cache and stop O_DIRECT writes to it."""
        if shard in self._direct:
            start, carry = self._carry.pop(shard)
            os.close(self._direct.pop(shard))
            _pwrite_all(self._fds[shard], carry, start)

    def flush(self) -> None:
        """Write every carried tail, so that the shards on disk hold every byte written so far (before they are
        read back, e.g. by the NaN/Inf scan). Later writes go through the page cache."""
        for shard in list(self._direct):
            try:
                self._flush_carry(shard)
            except OSError as e:
                raise write_error(e, os.path.join(self.dir, shard)) from None

    def finish(self, side: dict[str, bytes], provenance: dict) -> dict[str, dict]:
        """Fsync the shards, add side files, index, card and provenance, and rename the staging folder into place.

        Returns {file name: {"size", "sha256"}} of everything written but expo.json itself.
        """
        checksums = {}
        for shard in self.plan.shards:
            fd = self._fds[shard.filename]
            try:
                self._flush_carry(shard.filename)
                os.fsync(fd)  # also makes the O_DIRECT writes durable (a device cache flush for the file)
            except OSError as e:
                raise write_error(e, os.path.join(self.dir, shard.filename)) from None
            if self._next[shard.filename] != shard.size:
                self._hashes[shard.filename] = hash_fd(fd)
            checksums[shard.filename] = {"size": shard.size, "sha256": self._hashes[shard.filename].hexdigest()}
        for name, data in side.items():
            checksums[name] = self._put(name, data)
        if len(self.plan.shards) > 1:
            index = {"metadata": {"total_size": self.plan.total_size}, "weight_map": self.plan.weight_map}
            checksums[INDEX_NAME] = self._put(INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
        checksums[CARD_NAME] = self._put(CARD_NAME, model_card(provenance).encode())
        if os.path.exists(journal := os.path.join(self.dir, JOURNAL_NAME)):
            os.remove(journal)  # the output holds only the model and its provenance
        provenance = {**provenance, "files": dict(sorted(checksums.items()))}
        self._put(PROVENANCE_NAME, (json.dumps(provenance, indent=2) + "\n").encode())
        _fsync_dir(self.dir)
        self._publish()
        return provenance["files"]

    def _put(self, name: str, data: bytes) -> dict:
        path = os.path.join(self.dir, name)
        try:
            with open(path, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise write_error(e, path) from None
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def _publish(self) -> None:
        parent = os.path.dirname(self.out)
        old = None
        if os.path.isdir(self.out) and os.listdir(self.out):  # --overwrite was checked before staging began
            old = old_path(self.out)
            if os.path.lexists(old):
                shutil.rmtree(old)
            os.rename(self.out, old)
        os.rename(self.dir, self.out)  # replaces an empty folder, if one is there
        _fsync_dir(parent)
        if old:
            shutil.rmtree(old)


def model_card(p: dict) -> str:
    def side(s: dict) -> str:
        return f"`{s['source']}`" + (f" (revision `{s['revision']}`)" if s.get("revision") else "")

    aligned = p["aligned"]
    base = aligned["source"].partition("@")[0] if aligned.get("revision") else aligned["source"]  # a Hub repo id
    return f"""---
base_model: {json.dumps(base)}
tags:
- expo
---
# ExPO model (alpha = {p['alpha']})

Made by expo_engine {p['engine_version']} with model extrapolation (ExPO, "Model Extrapolation Expedites Alignment",
ACL 2025; github.com/chujiezheng/LLM-Extrapolation):

    theta_expo = theta_aligned + alpha * (theta_aligned - theta_sft)

computed in float32 and rounded once to {", ".join(p['dtypes'])}.

- SFT model: {side(p['sft'])}
- aligned model: {side(p['aligned'])}
- alpha: {p['alpha']}{_card_rules(p)}

Config, generation config and tokenizer come from the aligned model. `expo.json` records the inputs and a sha256
checksum of every file.
"""


def _card_rules(p: dict) -> str:
    """The alpha rules, when there were any: which tensors got another alpha is in expo.json."""
    if not p.get("alpha_rules"):
        return ""
    return ("\n- alpha rules (first match wins; the alpha of every tensor that differs from the base alpha is in "
            "`expo.json`, `alpha_by_tensor`):\n" + "".join(f"  - `{r}`\n" for r in p["alpha_rules"])).rstrip("\n")


def write_error(e: OSError, path: str) -> OutputError:
    """An OSError while writing the staging folder, as the user error it is (full disk, quota, read-only or
    failing filesystem); the caller's `with Staging` then removes the staging folder."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{path}: the disk is full ({e.strerror}); nothing was published: free space and rerun")
    return OutputError(f"{path}: cannot write ({e.strerror}); nothing was published")


def _preallocate(fd: int, size: int, name: str) -> None:
    try:
        os.posix_fallocate(fd, 0, size)  # reserves the space: a full disk fails here, not hours into the run
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(f"not enough disk space for {name} ({size / 1e9:.2f} GB); free space and rerun") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def hash_fd(fd: int):
    """sha256 of a whole open file, read in 16 MiB pieces."""
    h, offset = hashlib.sha256(), 0
    while block := os.pread(fd, 16 << 20, offset):
        h.update(block)
        offset += len(block)
    return h


def _set_config_dtype(data: bytes, torch_dtype: str, path: str) -> bytes:
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON, so the output dtype cannot be recorded in it ({e})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: is not a JSON object, so the output dtype cannot be recorded in it")
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = torch_dtype
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
