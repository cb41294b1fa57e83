"""Ownership of an output path: one run at a time writes, stages or publishes it.

A run owns `OUT` while it holds an exclusive `flock` on `.<name>.expo-lock` beside it, from before it looks at
anything there until after it has published or cleaned up. The kernel drops the lock when the process dies (kill
-9, OOM kill, power loss), so a stale lock file never blocks anyone: a lock that can be taken means that whatever
was left beside the output (a staging folder, a replaced output waiting in `.<name>.expo-old`) belongs to no live
run, and only then may it be resumed, restored or removed. Every such decision is made under a held lock:
:class:`OutputLock` is the one check.

The lock file holds who owns it (pid, host, start time), so a refused run can name the other one. It is removed by
its owner while still locked; a run that locked a file that was meanwhile removed (or replaced) tries again, so
two runs never both believe they own the output. Ray runs: the driver holds the lock while its tasks write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time

from .errors import OutputError

STAGING_SUFFIX = ".expo-staging"
OLD_SUFFIX = ".expo-old"
LOCK_SUFFIX = ".expo-lock"


def _beside(out: str, suffix: str) -> str:
    parent, name = os.path.split(out)
    return os.path.join(parent, f".{name}{suffix}")


def staging_path(out: str) -> str:
    """Where the output is built before it is renamed into place."""
    return _beside(out, STAGING_SUFFIX)


def old_path(out: str) -> str:
    """Where a replaced output waits, during --overwrite, until the new one is in place."""
    return _beside(out, OLD_SUFFIX)


def lock_path(out: str) -> str:
    return _beside(out, LOCK_SUFFIX)


def temp_paths(out: str) -> tuple[str, str, str]:
    """Everything the engine creates (and may remove) beside an output besides the output itself."""
    return staging_path(out), old_path(out), lock_path(out)


class BusyError(OutputError):
    """Another live run owns the output path."""


class OutputLock:
    """Exclusive ownership of the output path `out` (absolute) for this process, as a context manager.

    Entering creates the missing parent folders of `out` (removed again on leaving if the output was not
    published and they are empty), takes the lock or raises BusyError naming the owner, and then settles what a
    dead run left while publishing (see `recover`). `notes` collects one line per thing it settled.
    """

    def __init__(self, out: str):
        self.out = out
        self.path = lock_path(out)
        self.fd: int | None = None
        self.notes: list[str] = []
        self._made: list[str] = []

    def __enter__(self) -> OutputLock:
        parent = os.path.dirname(self.out)
        probe = parent
        while not os.path.lexists(probe):  # the folders this run creates, deepest first
            self._made.append(probe)
            probe = os.path.dirname(probe)
        try:
            os.makedirs(parent, exist_ok=True)
            self._acquire()
        except BaseException:
            self._remove_made()
            raise
        try:
            # Outputs nested in one another are one output: refuse to write inside another live run's output, or
            # around one.
            for above in _ancestors(self.out):
                if is_locked(lock_path(above)):
                    raise BusyError(f"output {self.out} is inside {above}, which another expo run is writing; "
                                    "nothing was touched: wait for that run to finish, or choose another output")
            inside = live_locks_under(self.out)
            if inside:
                raise BusyError(f"output {self.out} holds {inside[0]}, which another expo run is writing; nothing "
                                "was touched: wait for that run to finish, or choose another output")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        try:
            self.recover()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _acquire(self) -> None:
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise OutputError(f"cannot create the lock file {self.path} ({e.strerror}); nothing was "
                                  "written") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                owner = _read_owner(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"cannot lock {self.path} ({e.strerror}); nothing was written") from None
                raise BusyError(f"output {self.out} is being written by another expo run ({owner}); nothing of "
                                "it was touched: wait for that run to finish, or choose another output") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                with contextlib.suppress(OSError):  # who owns it is for the messages; the lock is the flock
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                               "started": time.time()}) + "\n").encode(), 0)
                self.fd = fd
                return
            os.close(fd)  # its owner removed it after we opened it: lock the file that is there now
        raise OutputError(f"cannot take the lock {self.path}: it keeps being replaced; nothing was written")

    def recover(self) -> None:
        """Settle a publish that a dead run did not finish: its old output waits in `.<name>.expo-old`. With no
        output in place (killed between the two renames) the old output is put back, as if the run had never
        published; with the new output in place (killed before the old one was removed) the old one is removed."""
        old = old_path(self.out)
        if not os.path.lexists(old):
            return
        if os.path.lexists(self.out) and not (os.path.isdir(self.out) and not os.listdir(self.out)):
            shutil.rmtree(old)
            self.notes.append(f"removed {old}: an output replaced by a run that stopped while publishing")
        else:
            if os.path.isdir(self.out):
                os.rmdir(self.out)
            os.rename(old, self.out)
            self.notes.append(f"restored {self.out} from {old}, where a run that stopped while publishing had "
                              "moved it")

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):  # ours, not one made after ours was gone
                os.remove(self.path)  # still locked: a run that opened it meanwhile sees it gone and retries
        os.close(self.fd)
        self.fd = None
        if not os.path.lexists(self.out):
            self._remove_made()

    def _remove_made(self) -> None:
        for folder in self._made:  # deepest first; a folder something else has put files in stays
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._made.clear()


def _ancestors(path: str) -> list[str]:
    found, parent = [], os.path.dirname(path)
    while os.path.dirname(parent) != parent:
        found.append(parent)
        parent = os.path.dirname(parent)
    return found


def is_locked(path: str) -> bool:
    """Whether a live run holds the lock file `path` (a free or missing one: no)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # also drops the shared lock, if it was taken


def live_locks_under(folder: str) -> list[str]:
    """The outputs inside `folder` that a live run is writing (their lock files are held)."""
    busy = []
    if not os.path.isdir(folder) or os.path.islink(folder):
        return busy
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        for name in files:
            if name.startswith(".") and name.endswith(LOCK_SUFFIX) and is_locked(os.path.join(root, name)):
                busy.append(os.path.join(root, name[1:-len(LOCK_SUFFIX)]))
    return sorted(busy)


def _read_owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info["started"])))
        return f"pid {int(info['pid'])} on host {info['host']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its owner has not written its name yet"


def require_owner(lock: OutputLock | None, out: str) -> None:
    """The guard of everything that removes or reuses what lies beside `out`: only its lock holder may."""
    if lock is None or not lock.held or lock.out != out:
        raise RuntimeError(f"{out}: staging without holding the output's lock")
