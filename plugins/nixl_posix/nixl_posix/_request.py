"""A DRAM <-> FILE request and its completion accounting.

A :class:`Request` holds one array per I/O column (fd, file offset, buffer address, length),
built once by ``prepare`` and reposted as is. Engines hand completions to :func:`account` as
arrays (user data = request id << 32 | I/O index, result): it counts them and records the first
failure with numpy, never a Python loop per I/O, and ends a request whose I/Os all completed.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt

from nixl_core.backend import BackendRequest, XferOp, XferStatus
from nixl_core.errors import TransferCanceledError
from nixl_posix._files import DIRECT_ALIGN, FileHandle, FileIOError, fd_path

if TYPE_CHECKING:
    from nixl_posix._engines import Engine

__all__ = ["Fds", "Request", "account"]

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
#: The fd of every I/O, or one fd per I/O.
Fds: TypeAlias = int | npt.NDArray[np.int32]


class Request(BackendRequest):
    """A prepared request: per-I/O arrays, built once, reposted as is.

    Args:
        op: READ (file -> memory) or WRITE (memory -> file).
        fds: the fd of every I/O, or one fd per I/O.
        offs: file offset of each I/O.
        addrs: buffer address of each I/O.
        lens: length of each I/O.
        desc: the descriptor of each I/O when large descriptors were split, else None.
        files: fd -> the file's registration handle (for messages and the one-call path).
        flags: io_uring submission flags, one for all or one per I/O.
    """

    def __init__(
        self,
        op: XferOp,
        fds: Fds,
        offs: U64,
        addrs: U64,
        lens: U64,
        desc: I64 | None,
        files: dict[int, FileHandle],
        flags: int | npt.NDArray[np.uint8],
    ) -> None:
        super().__init__()
        self.op, self.fds, self.offs, self.addrs, self.lens = op, fds, offs, addrs, lens
        self.desc = desc
        self.files = files
        self.flags = flags
        self.n = int(offs.shape[0])
        self.nbytes = int(lens.sum(dtype=np.uint64))
        lo = int(lens.min()) if self.n else 0
        self.uniform_len = lo if self.n and lo == int(lens.max()) else -1
        self.engine: Engine | None = None
        self.id = 0  # the engine's id, assigned at the first post and kept for reposts
        self.prepared: Any = None  # the engine's per-request submission arrays, built once
        self.submitted = 0
        self.completed = 0
        self.parts_left = 0  # the thread engine's workers still running this post
        self.status = XferStatus.PENDING
        self.canceled = False
        self.stopped = False  # nothing more will be submitted (released, or a submit failed)
        self.bad: tuple[int, int] | None = None  # (I/O index, res) of the first failure
        # One buffered I/O of at most inline_max_bytes, for post's one-call path:
        # (fd, iovec, file offset, the file's handle).
        self.single: tuple[int, ctypes.Array[ctypes.c_uint64], int, FileHandle] | None = None

    def fd_of(self, i: int) -> int:
        """The fd of I/O ``i``."""
        return self.fds if isinstance(self.fds, int) else int(self.fds[i])

    def reset(self) -> None:
        """Start a post: nothing submitted, no failure, IN_PROGRESS."""
        self.submitted = self.completed = 0
        self.bad = None
        self.error = None
        self.canceled = self.stopped = False
        self.status = XferStatus.IN_PROGRESS

    def ended(self) -> bool:
        """Every I/O that will run has completed."""
        return self.completed == self.n or (self.stopped and self.completed == self.submitted)

    def fail(self, i: int, res: int) -> None:
        """Record that I/O ``i`` ended with ``res`` (-errno, or a short byte count)."""
        if self.bad is None or i < self.bad[0]:
            self.bad = (i, res)

    def finish(self, backend: str) -> None:
        """Set the final status once every submitted I/O completed."""
        if self.bad is None and not self.canceled:
            self.status = XferStatus.DONE
            return
        if self.bad is not None:
            self.error = self._error(backend, *self.bad)
        else:
            self.error = TransferCanceledError("request released while running", backend=backend)
        self.status = XferStatus.ERROR

    def _error(self, backend: str, i: int, res: int) -> FileIOError:
        fd = self.fd_of(i)
        f = self.files.get(fd)
        path = f.path if f is not None else fd_path(fd)
        off, ln, addr = int(self.offs[i]), int(self.lens[i]), int(self.addrs[i])
        idx = int(self.desc[i]) if self.desc is not None else i
        verb = "read" if self.op is XferOp.READ else "write"
        where = f"{path} at offset {off}"
        if res >= 0:
            if self.op is XferOp.READ:
                msg = (
                    f"short read at EOF: {where} gave {res} of {ln} bytes (descriptor {idx}; the "
                    f"file ends at offset {off + res})"
                )
            else:
                msg = f"short write: {where} took {res} of {ln} bytes (descriptor {idx})"
            return FileIOError(msg, path=path, offset=off, index=idx, err=None, backend=backend)
        e = -res
        if e == errno.EINVAL and f is not None and f.direct:
            msg = (
                f"misaligned O_DIRECT {verb}: {where}, length {ln}, buffer 0x{addr:x} (descriptor "
                f"{idx}); offsets, lengths and buffer addresses must be multiples of "
                f"{DIRECT_ALIGN} — use aligned buffers or register the file without 'direct'"
            )
        elif e == errno.EBADF:
            msg = (
                f"cannot {verb} {where} (descriptor {idx}): fd {fd} is not open for "
                f"{'reading' if self.op is XferOp.READ else 'writing'}"
            )
        else:
            msg = f"{verb} failed: {where}, length {ln} (descriptor {idx}): {os.strerror(e)}"
        return FileIOError(msg, path=path, offset=off, index=idx, err=e, backend=backend)


def account(
    live: dict[int, Request],
    ud: U64,
    res: npt.NDArray[np.signedinteger[Any]],
    backend: str,
    only_requests: bool = True,
) -> None:
    """Apply completions (user data = request id << 32 | I/O index, result) to their requests.

    A request whose I/Os all completed leaves ``live`` and gets its final status.

    Args:
        live: id -> request, for the requests with I/O in the kernel.
        ud: the completions' user data.
        res: their results (bytes moved, or -errno).
        backend: the backend's name, for errors.
        only_requests: False when a wake-up no-op may be among them (the io_uring engine's
            close).
    """
    if ud.size == 0:
        return
    if only_requests and len(live) == 1:  # one request in the kernel: every completion is its
        ((only_id, only),) = live.items()
        if (
            only.uniform_len >= 0
            and int(ud[0]) >> 32 == only_id
            and ud.size <= only.n - only.completed
        ):
            bad = res != only.uniform_len
            if bad.any():
                k = int(np.argmax(bad))
                only.fail(int(ud[k]) & 0xFFFFFFFF, int(res[k]))
            only.completed += int(ud.size)
            if only.ended():
                del live[only_id]
                only.finish(backend)
            return
    ids = ud >> np.uint64(32)
    rid0 = int(ids[0])
    one = ud.size == 1 or bool((ids == rid0).all())  # the common case: one request's I/Os
    for rid in [rid0] if one else np.unique(ids).tolist():
        req = live.get(rid)
        if req is None:  # the wake-up no-op
            continue
        sel = None if one else ids == rid
        r = res if sel is None else res[sel]
        # A negative result (-errno) wraps to a huge unsigned value: never a valid length.
        got = r.astype(np.uint64)
        if req.uniform_len >= 0:
            bad = got != req.uniform_len
        else:
            idx = ud & np.uint64(0xFFFFFFFF)
            bad = got != req.lens[idx if sel is None else idx[sel]]
        n_done = int(r.size)
        if bad.any():
            k = int(np.argmax(bad))
            i = (ud if sel is None else ud[sel]) & np.uint64(0xFFFFFFFF)
            req.fail(int(i[k]), int(r[k]))
        req.completed += n_done
        if req.ended():
            del live[rid]
            req.finish(backend)
