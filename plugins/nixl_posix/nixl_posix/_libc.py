"""The plain file system calls, from libc through ctypes: ``pread``, ``pwrite``, ``preadv2``.

The thread engine moves each I/O with ``pread``/``pwrite``; the backend's one-call path serves a
one-I/O request with ``pwrite`` or ``preadv2(..., RWF_NOWAIT)`` (a read the page cache can serve,
or EAGAIN without blocking). ctypes releases the GIL around each call and keeps ``errno``
(``ctypes.get_errno()``).
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable

__all__ = ["RWF_NOWAIT", "pread", "preadv2", "pwrite"]

RWF_NOWAIT = 0x8

_libc = ctypes.CDLL(None, use_errno=True)
pread = _libc.pread
pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
pread.restype = ctypes.c_ssize_t
pwrite = _libc.pwrite
pwrite.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
pwrite.restype = ctypes.c_ssize_t


def _preadv2_missing(fd: int, iov: object, iovcnt: int, offset: int, flags: int) -> int:
    """Where libc has no ``preadv2`` (glibc < 2.26): fail as an old kernel does, with ENOSYS.

    The one-call path then stops asking for that file, as it does for a file system that
    refuses ``RWF_NOWAIT``.
    """
    ctypes.set_errno(errno.ENOSYS)
    return -1


preadv2: Callable[..., int]
if hasattr(_libc, "preadv2"):
    preadv2 = _libc.preadv2
    preadv2.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    preadv2.restype = ctypes.c_ssize_t
else:
    preadv2 = _preadv2_missing
