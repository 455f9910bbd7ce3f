"""FILE registrations: path-mode metas, opening and closing files, and the error naming a file.

FILE descriptors follow NIXL: ``addr`` = file offset, ``len`` (0 = unbounded in a registration),
``dev`` = the file. A FILE registration is either

- **fd mode**: ``dev`` is an open file descriptor the caller owns, or
- **path mode**: the region's meta is ``<modes>:<path>`` with modes ``ro`` or ``rw`` plus any of
  ``direct``, ``sync``, ``noatime``, ``create`` (e.g. ``b"rw,direct,create:/data/kv.bin"``);
  ``dev`` is then any id the caller picks for the file, and the backend opens the file at
  registration and closes it at deregistration.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from collections.abc import Iterable

from nixl_core.errors import RegistrationError, TransferError

__all__ = [
    "DIRECT_ALIGN",
    "FileHandle",
    "FileIOError",
    "close_files",
    "fd_path",
    "parse_path_meta",
    "register_file",
]

logger = logging.getLogger(__name__)

DIRECT_ALIGN = 512  # logical block size every Linux block device accepts for O_DIRECT
_MODES = frozenset({"ro", "rw", "direct", "sync", "noatime", "create"})


class FileIOError(TransferError):
    """A file read or write failed; names the file, the offset and the descriptor.

    Attributes:
        path: the file (as registered, or /proc/self/fd's link for fd-mode files).
        offset: file offset of the failing I/O.
        index: the descriptor's position in the request (after the core's merging).
        errno: the OS error number, or None for a short read/write.
    """

    def __init__(
        self, msg: str, *, path: str, offset: int, index: int, err: int | None, backend: str
    ) -> None:
        super().__init__(msg, backend=backend)
        self.path, self.offset, self.index, self.errno = path, offset, index, err


def parse_path_meta(meta: bytes) -> tuple[frozenset[str], str] | None:
    """Split a path-mode meta ``<modes>:<path>``; None when ``meta`` is not one (fd mode)."""
    text = meta.decode("utf-8", "surrogateescape")
    head, sep, path = text.partition(":")
    if not sep or not path:
        return None
    modes = frozenset(m.strip() for m in head.split(",") if m.strip())
    if not modes or not modes <= _MODES or len(modes & {"ro", "rw"}) != 1:
        return None
    return modes, path


class FileHandle:
    """A FILE registration's handle.

    Attributes:
        fd: the open file descriptor (-1 once an owned one is closed).
        path: the file, for messages.
        owned: the backend opened it (path mode) and closes it at deregistration.
        direct: opened with O_DIRECT.
        dev: the registration's ``dev``.
        nowait: ``preadv2(RWF_NOWAIT)`` reads work on it (True until refused once).
    """

    __slots__ = ("dev", "direct", "fd", "nowait", "owned", "path")

    def __init__(self, fd: int, path: str, owned: bool, direct: bool, dev: int) -> None:
        self.fd, self.path, self.owned, self.direct, self.dev = fd, path, owned, direct, dev
        self.nowait = True


def fd_path(fd: int) -> str:
    """The file an fd is open on, for messages (``<fd N>`` when /proc does not say)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<fd {fd}>"


def _open(path: str, modes: frozenset[str]) -> int:
    flags = os.O_RDWR if "rw" in modes else os.O_RDONLY
    flags |= os.O_CLOEXEC
    if "direct" in modes:
        flags |= os.O_DIRECT
    if "sync" in modes:
        flags |= os.O_DSYNC
    if "noatime" in modes:
        flags |= os.O_NOATIME
    if "create" in modes:
        flags |= os.O_CREAT
    return os.open(path, flags, 0o644)


def register_file(i: int, dev: int, meta: bytes) -> FileHandle:
    """Open a path-mode region, or check an fd-mode one.

    Args:
        i: the region's position in the registration (for messages).
        dev: the region's ``dev``: the fd (fd mode) or the caller's id for the file.
        meta: the region's meta (``b""`` or not a path-mode meta: fd mode).

    Raises:
        RegistrationError: the path cannot be opened, or ``dev`` is not an open regular file or
            block device (names the region and the reason).
    """
    parsed = parse_path_meta(meta) if meta else None
    if parsed is not None:
        modes, path = parsed
        try:
            fd = _open(path, modes)
        except OSError as exc:
            raise RegistrationError(
                f"FILE registration {i}: cannot open {path!r} ({','.join(sorted(modes))}): "
                f"{exc.strerror}",
                index=i,
            ) from exc
        return FileHandle(fd, path, True, "direct" in modes, dev)
    try:
        st = os.fstat(dev)
        fl = fcntl.fcntl(dev, fcntl.F_GETFL)
    except OSError as exc:
        raise RegistrationError(
            f"FILE registration {i}: dev {dev} is not an open file descriptor ({exc.strerror}); "
            "pass an open fd as dev, or a '<ro|rw>[,direct,...]:<path>' meta for path mode",
            index=i,
        ) from exc
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise RegistrationError(
            f"FILE registration {i}: fd {dev} ({fd_path(dev)}) is not a regular file or block "
            "device",
            index=i,
        )
    return FileHandle(dev, fd_path(dev), False, bool(fl & os.O_DIRECT), dev)


def close_files(handles: Iterable[object]) -> None:
    """Close the files the backend opened (path mode); other handles are left alone."""
    for h in handles:
        if isinstance(h, FileHandle) and h.owned and h.fd >= 0:
            try:
                os.close(h.fd)
            except OSError as exc:  # closing is best effort; say so
                logger.warning("closing %s: %s", h.path, exc)
            h.fd = -1
