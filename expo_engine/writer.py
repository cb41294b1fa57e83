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
from concurrent.futures import ThreadPoolExecutor

from .errors import FormatError, OutputError
from .ownership import OutputLock, live_locks_under, old_path, require_owner, staging_path, temp_paths
from .plan import INDEX_NAME, Plan, Unit
from .reading import ALIGN, direct_io, hash_range, input_paths, pwrite_all
from .sources import SIDE_FILE_PATTERNS, Checkpoint

PROVENANCE_NAME = "expo.json"
JOURNAL_NAME = ".expo-journal.jsonl"
CARD_NAME = "README.md"
_bounce = threading.local()  # per writer thread: one page-aligned buffer for O_DIRECT writes, reused


def _bounce_buffer(nbytes: int) -> mmap.mmap:
    buf = getattr(_bounce, "buf", None)
    if buf is None or len(buf) < nbytes:
        if buf is not None:
            buf.close()
        buf = _bounce.buf = mmap.mmap(-1, -(-nbytes // ALIGN) * ALIGN)  # anonymous maps are page-aligned
    return buf


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
        for temp in temp_paths(real):
            if _within(src, temp) or _within(temp, src):
                raise OutputError(f"output {out} needs {temp} beside it as a temporary folder, but the input "
                                  f"checkpoint {src} is there; choose another output name")
    check_target(out_abs, overwrite, out)
    probe = os.path.dirname(out_abs)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {out}: {probe} is not a writable folder")
    return out_abs


def journal_key(plan: Plan, units: tuple[Unit, ...], stats: bool, executor: str) -> str:
    """What a journal must match to be resumed: the exact output layout, alpha (and every tensor's, under alpha
    rules), the units, the inputs as they are now (path, size, mtime), whether statistics are computed, and the
    executor that journals ("local" records no per-unit checksum; Ray's do)."""
    ident = [(p, (st := os.stat(p)).st_size, st.st_mtime_ns) for p in sorted(set(input_paths(plan)))]
    blob = json.dumps([plan.alpha, plan.alpha_overrides, plan.chunk_bytes, stats, executor,
                       [(s.filename, hashlib.sha256(s.header).hexdigest(), s.size) for s in plan.shards],
                       [(u.shard, u.start, u.stop, u.first, u.last) for u in units], ident])
    return hashlib.sha256(blob.encode()).hexdigest()


def check_target(out_abs: str, overwrite: bool, shown: str | None = None) -> None:
    """What is at the output path may be replaced: nothing, an empty folder, or (with `overwrite`) a folder.
    Checked when planning and again once the run owns the output (another run may have published meanwhile)."""
    out = shown or out_abs
    if os.path.lexists(out_abs):
        if os.path.islink(out_abs):
            raise OutputError(f"output {out} is a symbolic link; give a real folder path or remove the link")
        if not os.path.isdir(out_abs):
            raise OutputError(f"output {out} exists and is not a folder; remove it or choose another path")
        if os.listdir(out_abs) and not overwrite:
            raise OutputError(f"output {out} exists and is not empty; pass --overwrite to replace it")


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
    """The output under construction, in `.<name>.expo-staging` beside it. Use as a context manager while holding
    the output's :class:`~expo_engine.ownership.OutputLock`: leaving it with an exception removes it, unless
    `keep` was set (an interrupted run, kept for resume).

    With a `journal_key`, the staging folder keeps a journal of finished units (JOURNAL_NAME). A staging folder
    left by an earlier run (its lock free: that run is dead) is reused only if its journal was written for the
    same key (same layout, alpha, inputs and executor); anything else left there is removed. `note` says which.
    """

    def __init__(self, out: str, plan: Plan, lock: OutputLock, journal_key: str | None = None):
        self.out = out
        self.plan = plan
        self.lock = lock
        self.dir = staging_path(out)
        self.journal_key = journal_key
        self.keep = False
        self.resumed = False
        self.note = ""  # what was done with a staging folder left by an earlier run
        self._fds: dict[str, int] = {}
        self._hashes: dict[str, object] = {}
        self._next: dict[str, int] = {}  # the offset at which each shard's running hash continues
        # O_DIRECT writes (in-order writes only): a second descriptor per shard, and the bytes since the last
        # ALIGN boundary that wait for the rest of their block: {shard: (aligned offset, bytes)}
        self._direct: dict[str, int] = {}
        self._carry: dict[str, tuple[int, bytes]] = {}
        self._waiting: list[tuple[Unit, dict]] = []  # finished units not yet durable on disk (see unit_written)
        self._hash_pool: ThreadPoolExecutor | None = None
        self._journal_pool: ThreadPoolExecutor | None = None
        self._syncs: list = []  # futures of _sync_and_journal, in order

    def __enter__(self) -> Staging:
        require_owner(self.lock, self.out)  # whatever is at self.dir belongs to no live run
        if os.path.lexists(self.dir):
            key = self._journal_key_on_disk()
            if self.journal_key and key == self.journal_key and all(
                    os.path.isfile(f := os.path.join(self.dir, s.filename)) and os.path.getsize(f) == s.size
                    for s in self.plan.shards):
                self.resumed = True
                self.note = f"resuming from {self.dir}, left by a run that stopped"
            else:
                shutil.rmtree(self.dir)
                why = "it was made for another alpha, layout, inputs or executor" if key else \
                    "it has no journal to resume from"
                self.note = f"removed {self.dir}, left by a run that stopped ({why})"
        if not self.resumed:
            os.mkdir(self.dir)
        try:
            for shard in self.plan.shards:
                flags = os.O_RDWR if self.resumed else os.O_RDWR | os.O_CREAT | os.O_EXCL
                fd = os.open(os.path.join(self.dir, shard.filename), flags, 0o644)
                self._fds[shard.filename] = fd
                _preallocate(fd, shard.size, shard.filename)
                pwrite_all(fd, shard.header, 0)
                self._hashes[shard.filename] = hashlib.sha256(shard.header)
                self._next[shard.filename] = len(shard.header)
            if self.journal_key and not self.resumed:  # after the space is reserved: a full disk fails there
                self.journal_add({"key": self.journal_key})
                # the folder and its files' names must survive a power loss as surely as the journal lines do
                _fsync_dir(self.dir)
                _fsync_dir(os.path.dirname(self.dir))
        except BaseException:
            self.__exit__(None, None, None)
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        return self

    def direct_writes(self) -> None:
        """Write shards in plan order with O_DIRECT from here on, where the filesystem allows it (the in-process
        executors; Ray units write with descriptors of their own)."""
        if not direct_io():
            return
        for shard in self.plan.shards:
            start = self._next[shard.filename] // ALIGN * ALIGN
            try:
                self._direct[shard.filename] = os.open(os.path.join(self.dir, shard.filename),
                                                       os.O_WRONLY | os.O_DIRECT)
            except (OSError, AttributeError):
                return  # a filesystem without O_DIRECT (tmpfs): page-cache writes
            tail = os.pread(self._fds[shard.filename], self._next[shard.filename] - start, start)
            self._carry[shard.filename] = (start, tail)

    def resume_at(self, shard: str, offset: int) -> None:
        """Continue `shard` at `offset`: the bytes before it are kept from the earlier run (hashed again from disk, so
        the shard's checksum is still computed on the fly for the rest). Call before direct_writes()."""
        fd = self._fds[shard]
        self._hashes[shard] = hash_range(fd, 0, offset)
        self._next[shard] = offset

    def __exit__(self, exc_type, exc, tb) -> None:
        for pool in (self._hash_pool, self._journal_pool):
            if pool is not None:
                pool.shutdown()  # waits: nothing may still use the descriptors closed below
        self._hash_pool = self._journal_pool = None
        for fd in [*self._fds.values(), *self._direct.values()]:
            os.close(fd)
        self._fds.clear()
        self._direct.clear()
        if exc_type is not None and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

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
        path = os.path.join(self.dir, JOURNAL_NAME)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise write_error(e, path) from None

    def unit_written(self, unit: Unit, record: dict) -> None:
        """All of `unit` has been passed to write() (in plan order): journal it as soon as its bytes are durable.
        Bytes up to the O_DIRECT carry are on disk after an fdatasync; the carry itself is written with the next
        block, or at the shard's end, so a unit ending inside it is journaled with the next one."""
        shard = unit.shard
        if self._next[shard] == -1:
            return  # an out-of-order write (after a failed one): nothing of this shard is journaled any more
        self._waiting.append((unit, record))
        size = next(s.size for s in self.plan.shards if s.filename == shard)
        if unit.stop == size:
            try:
                self._flush_carry(shard)
            except OSError as e:
                raise write_error(e, os.path.join(self.dir, shard)) from None
        durable = self._carry[shard][0] if shard in self._direct else size  # every byte before it has been written
        ready = []
        while self._waiting and self._waiting[0][0].stop <= durable:
            ready.append(self._waiting.pop(0)[1])
        # The fdatasync and the journal lines on a thread of their own (in order): the writes go on meanwhile.
        for f in [f for f in self._syncs if f.done()]:
            self._syncs.remove(f)
            f.result()  # surfaces a failed sync early
        if ready:
            self._syncs.append(self._journaler().submit(self._sync_and_journal, shard, ready))

    def _sync_and_journal(self, shard: str, records: list[dict]) -> None:
        try:
            os.fdatasync(self._fds[shard])
        except OSError as e:
            raise write_error(e, os.path.join(self.dir, shard)) from None
        for record in records:
            self.journal_add(record)

    def _journaler(self) -> ThreadPoolExecutor:
        if self._journal_pool is None:
            self._journal_pool = ThreadPoolExecutor(1, "expo-journal")
        return self._journal_pool

    def journal_drain(self) -> None:
        """Wait until every finished unit handed to unit_written is synced and journaled (raising what failed)."""
        while self._syncs:
            self._syncs.pop(0).result()

    def write(self, shard: str, offset: int, data: memoryview) -> None:
        """Write `data` at `offset` of `shard`. Writes in plan order let the checksum be kept on the fly."""
        fd = self._fds[shard]
        in_order = self._next.get(shard) == offset
        # The checksum is computed on another thread while the bytes go to the disk (sha256 of a 64 MiB chunk takes
        # about a quarter of the time of writing it here; one after the other, it slowed every run by as much).
        hashed = self._hasher().submit(self._hashes[shard].update, data) if in_order else None
        try:
            if in_order and shard in self._direct:
                self._write_direct(shard, offset, data)
            else:
                self._flush_carry(shard)  # out of order: page-cache writes from here on
                pwrite_all(fd, data, offset)
                # Starts writeback of these pages now (Linux: DONTNEED on dirty pages queues them for writing) so
                # the disk writes while the next chunks are computed, instead of all at the final fsync.
                os.posix_fadvise(fd, offset, len(data), os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise write_error(e, os.path.join(self.dir, shard)) from None
        finally:
            if hashed is not None:
                hashed.result()  # `data` is the caller's again once this returns
        if in_order:
            self._next[shard] = offset + len(data)
        else:
            self._next[shard] = -1  # out of order: hash it by reading it back in finish()

    def _hasher(self) -> ThreadPoolExecutor:
        if self._hash_pool is None:
            self._hash_pool = ThreadPoolExecutor(1, "expo-hash")
        return self._hash_pool

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
            pwrite_all(self._fds[shard], carry, start)

    def flush(self) -> None:
        """Write every carried tail, so that the shards on disk hold every byte written so far (before they are
        read back, e.g. by the NaN/Inf scan), and finish journaling. Later writes go through the page cache."""
        self.journal_drain()
        for shard in list(self._direct):
            try:
                self._flush_carry(shard)
            except OSError as e:
                raise write_error(e, os.path.join(self.dir, shard)) from None

    def finish(self, side: dict[str, bytes], provenance: dict) -> dict[str, dict]:
        """Fsync the shards, add side files, index, card and provenance: everything but the rename (`publish`), so
        that a sweep can finish every output before it publishes any.

        Returns {file name: {"size", "sha256"}} of everything written but expo.json itself.
        """
        self.journal_drain()
        checksums = {}
        for shard in self.plan.shards:
            fd = self._fds[shard.filename]
            try:
                self._flush_carry(shard.filename)
                os.fsync(fd)  # also makes the O_DIRECT writes durable (a device cache flush for the file)
            except OSError as e:
                raise write_error(e, os.path.join(self.dir, shard.filename)) from None
            if self._next[shard.filename] != shard.size:
                self._hashes[shard.filename] = hash_range(fd)
            checksums[shard.filename] = {"size": shard.size, "sha256": self._hashes[shard.filename].hexdigest()}
        for name, data in side.items():
            checksums[name] = self._put(name, data)
        if len(self.plan.shards) > 1:
            index = {"metadata": {"total_size": self.plan.total_size}, "weight_map": self.plan.weight_map}
            checksums[INDEX_NAME] = self._put(INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
        checksums[CARD_NAME] = self._put(CARD_NAME, model_card(provenance).encode())
        provenance = {**provenance, "files": dict(sorted(checksums.items()))}
        self._put(PROVENANCE_NAME, (json.dumps(provenance, indent=2) + "\n").encode())
        _fsync_dir(self.dir)
        return provenance["files"]

    def publish(self, overwrite: bool) -> None:
        """Rename the finished staging folder into place. What is at the output path is checked once more: it may
        be replaced only if it is empty or `overwrite` was given, and never while another run writes inside it; a
        refusal keeps the finished staging folder, so that the same command publishes it without recomputing."""
        fault_point("publish")
        require_owner(self.lock, self.out)
        try:
            check_target(self.out, overwrite)
            busy = live_locks_under(self.out)
            if busy:
                raise OutputError(f"output {self.out} holds {busy[0]}, which another expo run is writing; nothing "
                                  "was published: wait for that run, or choose another output")
        except OutputError as e:
            self.keep = True
            raise OutputError(f"{e}; the finished model is kept in {self.dir}: run the same command again to "
                              "publish it") from None
        if os.path.exists(journal := os.path.join(self.dir, JOURNAL_NAME)):
            os.remove(journal)  # the output holds only the model and its provenance
        self._publish()

    def _put(self, name: str, data: bytes) -> dict:
        path = os.path.join(self.dir, name)
        try:
            with open(path, "wb") as f:  # a resumed staging folder may hold it from the run that stopped
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise write_error(e, path) from None
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def _publish(self) -> None:
        require_owner(self.lock, self.out)
        parent = os.path.dirname(self.out)
        old = None
        if os.path.isdir(self.out) and os.listdir(self.out):  # --overwrite was checked once the lock was held
            old = old_path(self.out)  # the lock's recover() has settled any left by a dead run
            os.rename(self.out, old)
        os.rename(self.dir, self.out)  # replaces an empty folder, if one is there
        _fsync_dir(parent)
        if old:
            shutil.rmtree(old)


FAULT_KILL_AT = "EXPO_FAULT_KILL_AT"  # test switch: "publish" or "chunk:K": this process SIGKILLs itself there


def fault_point(where: str, settle=None) -> None:
    """Fault injection for the kill tests: this process dies of SIGKILL here (as under kill -9 or the OOM killer:
    nothing runs after it) if FAULT_KILL_AT names `where`, after calling `settle` (so that the point is exact:
    e.g. after the journal has caught up); otherwise nothing happens."""
    if os.environ.get(FAULT_KILL_AT) == where:
        import signal

        if settle:
            settle()
        os.kill(os.getpid(), signal.SIGKILL)


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
- alpha: {p['alpha']}{_card_rules(p)}{_card_inputs(p)}

Config, generation config and tokenizer come from the aligned model. `expo.json` records the inputs and a sha256
checksum of every file.
"""


def _card_rules(p: dict) -> str:
    """The alpha rules, when there were any: which tensors got another alpha is in expo.json."""
    if not p.get("alpha_rules"):
        return ""
    return ("\n- alpha rules (first match wins; the alpha of every tensor that differs from the base alpha is in "
            "`expo.json`, `alpha_by_tensor`):\n" + "".join(f"  - `{r}`\n" for r in p["alpha_rules"])).rstrip("\n")


def _card_inputs(p: dict) -> str:
    """A resized vocabulary and tensors left out on purpose, when there were any."""
    lines = []
    v = p.get("vocab")
    if v:
        lines.append(f"- vocabulary: {v['aligned_rows']} rows in the aligned model, {v['sft_rows']} in the SFT one "
                     f"(matched {v['matched']}): in {', '.join(f'`{t}`' for t in v['tensors'])}, "
                     f"{v['rows_extrapolated']} rows extrapolated and {v['rows_copied']} copied from the aligned "
                     "model (`expo.json`, `vocab`)")
    d = p.get("dropped")
    if d:
        lines.append(f"- left out on purpose (`--drop {' '.join(d['patterns'])}`): "
                     + ", ".join(f"`{t}`" for t in d["tensors"]))
    return "".join("\n" + line for line in lines)


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
