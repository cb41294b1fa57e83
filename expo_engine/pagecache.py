"""How much of a file range sits in the page cache, asked without reading (or faulting in) any of it.

The reader uses this to pick, per chunk, between O_DIRECT (right for inputs that are not cached: no copy, no cache
churn) and a plain read (right for inputs already in memory: a 7B pair just downloaded or read by the previous
run; O_DIRECT would fetch them from the disk again). Linux ≥ 6.5 answers with the `cachestat` syscall; older
kernels with `mincore` on a mapping that is never touched. Elsewhere, or if both fail, the answer is None
(unknown) and the reader keeps O_DIRECT.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys

_CACHESTAT = {"x86_64": 451, "aarch64": 451, "arm64": 451, "ppc64le": 451, "s390x": 451, "riscv64": 451}
_PAGE = mmap.PAGESIZE


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    lib.syscall.restype = ctypes.c_long
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return lib


_LIBC = _libc()
_NR = _CACHESTAT.get(os.uname().machine) if hasattr(os, "uname") else None
_use_cachestat = _NR is not None


def method() -> str:
    """How this system is asked (for `expo doctor`): "cachestat", "mincore" or "none"."""
    if _LIBC is None:
        return "none"
    return "cachestat" if _use_cachestat else "mincore"


def _pages(offset: int, length: int) -> tuple[int, int]:
    """The first page and the page count that cover [offset, offset + length)."""
    first = offset // _PAGE
    return first, -(-(offset + length) // _PAGE) - first


def resident_fraction(fd: int, offset: int, length: int) -> float | None:
    """The fraction (0..1) of the pages of [offset, offset + length) of the open file `fd` that are in the page
    cache, or None if this system cannot tell."""
    global _use_cachestat
    if _LIBC is None or length <= 0:
        return None
    first, count = _pages(offset, length)
    if _use_cachestat:
        rng, st = _Range(first * _PAGE, count * _PAGE), _Stat()
        if _LIBC.syscall(ctypes.c_long(_NR), ctypes.c_uint(fd), ctypes.byref(rng), ctypes.byref(st),
                         ctypes.c_uint(0)) == 0:
            return min(1.0, st.nr_cache / count)
        _use_cachestat = False  # ENOSYS on an older kernel (or blocked by a seccomp filter): use mincore
    return _mincore(fd, first, count)


def _mincore(fd: int, first: int, count: int) -> float | None:
    size = count * _PAGE
    addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, first * _PAGE)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        vec = ctypes.create_string_buffer(count)
        if _LIBC.mincore(addr, size, vec) != 0:
            return None
        return sum(b & 1 for b in vec.raw) / count
    finally:
        _LIBC.munmap(addr, size)
