"""The POSIX backend: DRAM <-> FILE as loopback transfers, asynchronous, one syscall per batch.

FILE descriptors follow NIXL: ``addr`` = file offset, ``len`` (0 = unbounded in a registration),
``dev`` = the file. A FILE registration is either

- **fd mode**: ``dev`` is an open file descriptor the caller owns, or
- **path mode**: the region's meta is ``<modes>:<path>`` with modes ``ro`` or ``rw`` plus any of
  ``direct``, ``sync``, ``noatime``, ``create`` (e.g. ``b"rw,direct,create:/data/kv.bin"``);
  ``dev`` is then any id the caller picks for the file, and the backend opens the file at
  registration and closes it at deregistration.

Transfers are loopback (peer = the agent's own name): the local side is DRAM, the remote side
FILE. WRITE writes memory to the file, READ reads the file into memory.

Engines (param ``engine``): ``uring`` (default where the kernel allows it) submits a whole request
to an io_uring with one ``io_uring_enter``: the submission entries are written by numpy, so no
Python code runs per descriptor, and a completion thread reaps them. ``threads`` runs
``pread``/``pwrite`` from worker threads (the GIL is released in each call, but Python loops per
descriptor); it is the fallback where io_uring is disabled (many container seccomp profiles).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from nixl_core.backend import Availability, Backend, BackendRequest, XferOp, XferSide, XferStatus
from nixl_core.errors import (
    InvalidDescriptorError,
    InvalidParamError,
    NotSupportedError,
    RegistrationError,
    RepostActiveError,
    TransferError,
)
from nixl_core.memory import MemType
from nixl_posix._staging import Stager, VramRequest, require_staging
from nixl_posix.params import MAX_IO_ALIGN, PARAMS

__all__ = ["FileIOError", "PosixBackend", "parse_path_meta"]

logger = logging.getLogger("nixl_posix")

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

_MODES = frozenset({"ro", "rw", "direct", "sync", "noatime", "create"})
_DIRECT_ALIGN = 512  # logical block size every Linux block device accepts for O_DIRECT
_WAKE = 0  # user_data id of the wake-up no-op; requests use ids >= 1


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


class _File:
    """A FILE registration's handle."""

    __slots__ = ("dev", "direct", "fd", "nowait", "owned", "path")

    def __init__(self, fd: int, path: str, owned: bool, direct: bool, dev: int) -> None:
        self.fd, self.path, self.owned, self.direct, self.dev = fd, path, owned, direct, dev
        self.nowait = _preadv2 is not None  # RWF_NOWAIT reads work here (until refused once)


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


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<fd {fd}>"


class _Request(BackendRequest):
    """A prepared request: per-I/O arrays, built once, reposted as is."""

    def __init__(
        self,
        op: XferOp,
        fds: int | npt.NDArray[np.int32],
        offs: U64,
        addrs: U64,
        lens: U64,
        desc: I64 | None,
        files: dict[int, _File],
        flags: int | npt.NDArray[np.uint8],
    ) -> None:
        super().__init__()
        self.op, self.fds, self.offs, self.addrs, self.lens = op, fds, offs, addrs, lens
        self.desc = desc  # descriptor of each I/O when large ones were split, else None
        self.files = files
        self.flags = flags
        self.n = int(offs.shape[0])
        self.nbytes = int(lens.sum(dtype=np.uint64))
        lo = int(lens.min()) if self.n else 0
        self.uniform_len = lo if self.n and lo == int(lens.max()) else -1
        self.engine: _UringEngine | _AioEngine | _ThreadEngine | None = None
        self.id = 0  # the engine's id, assigned at the first post and kept for reposts
        self.prepared: Any = None  # the engine's per-request submission arrays, built once
        self.submitted = 0
        self.completed = 0
        self.status = XferStatus.PENDING
        self.canceled = False
        self.stopped = False  # nothing more will be submitted (released, or a submit failed)
        self.bad: tuple[int, int] | None = None  # (I/O index, res) of the first failure
        # One buffered I/O of at most inline_max_bytes, for post's one-call path:
        # (fd, iovec, file offset, the file's handle).
        self.single: tuple[int, Any, int, _File] | None = None

    def fd_of(self, i: int) -> int:
        return int(self.fds) if np.ndim(self.fds) == 0 else int(self.fds[i])  # type: ignore[index]

    def reset(self) -> None:
        self.submitted = self.completed = 0
        self.bad = None
        self.error = None
        self.canceled = self.stopped = False
        self.status = XferStatus.IN_PROGRESS

    def ended(self) -> bool:
        """Every I/O that will run has completed."""
        return self.completed == self.n or (self.stopped and self.completed == self.submitted)

    def fail(self, i: int, res: int) -> None:
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
            from nixl_core.errors import TransferCanceledError

            self.error = TransferCanceledError("request released while running", backend=backend)
        self.status = XferStatus.ERROR

    def _error(self, backend: str, i: int, res: int) -> FileIOError:
        fd = self.fd_of(i)
        f = self.files.get(fd)
        path = f.path if f is not None else _fd_path(fd)
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
                f"{_DIRECT_ALIGN} — use aligned buffers or register the file without 'direct'"
            )
        elif e == errno.EBADF:
            msg = (
                f"cannot {verb} {where} (descriptor {idx}): fd {fd} is not open for "
                f"{'reading' if self.op is XferOp.READ else 'writing'}"
            )
        else:
            msg = f"{verb} failed: {where}, length {ln} (descriptor {idx}): {os.strerror(e)}"
        return FileIOError(msg, path=path, offset=off, index=idx, err=e, backend=backend)


def _account(
    live: dict[int, _Request],
    ud: npt.NDArray[np.uint64],
    res: npt.NDArray[Any],
    backend: str,
    only_requests: bool = True,
) -> None:
    """Apply completions (user data = request id << 32 | I/O index, result) to their requests.

    ``only_requests`` False: a wake-up no-op may be among them (the io_uring engine's close).
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


def _stop_queued(
    req: _Request, queue: collections.deque[_Request], live: dict[int, _Request], backend: str
) -> None:
    """Release: submit nothing more of ``req``; end it now if the kernel holds none of it."""
    req.canceled = req.stopped = True
    if req in queue:
        queue.remove(req)
    if req.completed == req.submitted:
        live.pop(req.id, None)
        req.finish(backend)


class _KernelEngine:
    """What the io_uring and AIO engines share: the request table, the queue of what waits for
    room in the kernel, the condition the completion thread signals, and release/wait."""

    path = ""

    def __init__(self, backend: str, thread_name: str) -> None:
        self._backend = backend
        self._cond = threading.Condition()
        self._queue: collections.deque[_Request] = collections.deque()
        self._live: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._waiters = 0  # threads in block() or cancel(): they need a notify on completions
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def _new_id(self) -> int:
        return next(self._ids) & 0x7FFFFFFF or next(self._ids)

    def _run(self) -> None:
        raise NotImplementedError

    def _wait(self, req: _Request, timeout: float) -> bool:
        """Wait (holding the condition) until ``req`` leaves IN_PROGRESS; False on timeout."""
        self._waiters += 1
        try:
            return self._cond.wait_for(lambda: req.status is not XferStatus.IN_PROGRESS, timeout)
        finally:
            self._waiters -= 1

    def block(self, req: _Request, timeout: float) -> None:
        with self._cond:
            self._wait(req, timeout)

    def cancel(self, req: _Request, timeout: float) -> None:
        with self._cond:
            if req.status is not XferStatus.IN_PROGRESS:
                return
            _stop_queued(req, self._queue, self._live, self._backend)
            # Submitted I/O still reads or writes the caller's buffers: wait for it to end.
            if req.status is XferStatus.IN_PROGRESS and not self._wait(req, timeout):
                raise RepostActiveError(
                    f"POSIX request still has {req.submitted - req.completed} I/Os in the kernel "
                    f"after {timeout} s"
                )


class _UringEngine(_KernelEngine):
    """Submits requests to one io_uring; a completion thread reaps and submits what waits."""

    path = "posix:io_uring"

    def __init__(self, backend: str, entries: int) -> None:
        from nixl_posix._uring import Ring

        super().__init__(backend, "nixl-posix-uring")
        self._ring = Ring(entries)
        self._thread.start()

    def start(self, req: _Request) -> None:
        if not req.id:
            from nixl_posix._uring import OP_READ, OP_WRITE

            req.id = self._new_id()
            ud = np.arange(req.n, dtype=np.uint64) | np.uint64(req.id << 32)
            opcode = OP_READ if req.op is XferOp.READ else OP_WRITE
            req.prepared = self._ring.entries(
                opcode, req.fds, req.offs, req.addrs, req.lens, ud, req.flags
            )
        with self._cond:
            self._live[req.id] = req
            self._queue.append(req)
            # I/O the kernel served inline is already in the completion queue: reap it here
            # (right after io_uring_enter returned), so a small request is DONE when post returns;
            # what did not fit in the ring goes in as soon as reaping made room.
            while True:
                self._pump()
                self._reap()
                if not self._queue or self._ring.in_flight:
                    break
            # Wake the completion thread only when the kernel still holds I/O (or someone waits):
            # a needless wake-up costs a GIL hand-off, more than a whole small request.
            if self._ring.in_flight or self._waiters:
                self._cond.notify_all()

    def _pump(self) -> None:
        ring = self._ring
        while self._queue:
            req = self._queue[0]
            room = ring.capacity()
            if room <= 0:
                return
            lo = req.submitted
            hi = min(req.n, lo + room)
            ring.submit(req.prepared, lo, hi)
            req.submitted = hi
            if hi == req.n:
                self._queue.popleft()

    def _reap(self) -> None:
        ud, res = self._ring.reap()
        _account(self._live, ud, res, self._backend, not self._closed)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and self._ring.in_flight == 0 and not self._queue:
                    self._cond.wait()
                self._ring.flush()
                self._pump()
                if self._closed and self._ring.in_flight == 0:
                    return
                if self._ring.unsubmitted == self._ring.in_flight:
                    # The kernel holds none of it (it refused entries under pressure): waiting
                    # for completions would never end, so retry the hand-in shortly.
                    self._cond.wait(0.001)
                    continue
            self._ring.wait(1)  # GIL released while the kernel works
            with self._cond:
                self._reap()
                self._pump()
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._ring.nop(_WAKE)
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._ring.close()


class _AioEngine(_KernelEngine):
    """Linux AIO: buffered writes run inside ``io_submit`` (GIL released), in one system call.

    A request of at most ``inline_max`` bytes is submitted by ``post`` itself and is DONE when
    post returns; a larger one goes to the engine's thread, so post returns at once.
    """

    path = "posix:aio"

    def __init__(self, backend: str, entries: int, inline_max: int) -> None:
        from nixl_posix._aio import AioContext

        super().__init__(backend, "nixl-posix-aio")
        self._ctx = AioContext(entries)
        self._inline_max = inline_max
        self._reserved = 0  # context slots taken by submitted, unreaped I/O
        self._thread.start()

    def start(self, req: _Request) -> None:
        if not req.id:
            from nixl_posix._aio import CMD_PREAD, CMD_PWRITE, iocbs

            req.id = self._new_id()
            data = np.arange(req.n, dtype=np.uint64) | np.uint64(req.id << 32)
            cmd = CMD_PREAD if req.op is XferOp.READ else CMD_PWRITE
            req.prepared = iocbs(cmd, req.fds, req.offs, req.addrs, req.lens, data)
        with self._cond:
            self._live[req.id] = req
            if req.nbytes <= self._inline_max and not self._queue:
                self._submit(req)  # page-cache I/O is done when io_submit returns
                if req.submitted < req.n and not req.stopped:
                    self._queue.append(req)
                self._reap(0)
            else:
                self._queue.append(req)
            if self._queue or self._reserved or self._waiters:
                self._cond.notify_all()

    def _submit(self, req: _Request) -> int:
        """Submit what fits of ``req`` (caller holds the condition); returns how many went in."""
        lo = req.submitted
        hi = min(req.n, lo + self._ctx.entries - self._reserved)
        if hi <= lo:
            return 0
        try:
            n = self._ctx.submit(req.prepared[1][lo:hi])
        except OSError as exc:  # the kernel refused I/O number lo (bad fd, bad address...)
            req.fail(lo, -(exc.errno or errno.EIO))
            req.stopped = True
            if req.completed == req.submitted:
                self._live.pop(req.id, None)
                req.finish(self._backend)
            return 0
        req.submitted += n
        self._reserved += n
        return n

    def _reap(self, min_nr: int) -> None:
        ud, res = self._ctx.reap(min_nr, 0.0 if min_nr == 0 else 0.05)
        self._reserved -= int(ud.size)
        _account(self._live, ud, res, self._backend)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._queue and not self._reserved:
                    self._cond.wait()
                if self._closed and not self._reserved:
                    return
                # The condition is held during io_submit: a large buffered request is written
                # here, and post() of another request waits for it (one file system anyway).
                while self._queue and self._reserved < self._ctx.entries:
                    req = self._queue[0]
                    took = self._submit(req)
                    if req.submitted == req.n or req.stopped:
                        self._queue.popleft()
                    self._reap(0)
                    self._cond.notify_all()
                    if not took and not req.stopped:
                        break  # the kernel took nothing (EAGAIN): retry shortly, do not spin
                if not self._reserved:
                    if self._queue:
                        self._cond.wait(0.001)
                    continue
            # O_DIRECT I/O completes later: wait for it without holding the condition.
            ud, res = self._ctx.reap(1, 0.05)
            with self._cond:
                self._reserved -= int(ud.size)
                _account(self._live, ud, res, self._backend)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._ctx.close()


_libc = ctypes.CDLL(None, use_errno=True)
_pread = _libc.pread
_pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
_pread.restype = ctypes.c_ssize_t
_pwrite = _libc.pwrite
_pwrite.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
_pwrite.restype = ctypes.c_ssize_t
# preadv2 with RWF_NOWAIT: a read that the page cache can serve, or EAGAIN without blocking.
_preadv2 = getattr(_libc, "preadv2", None)
if _preadv2 is not None:
    _preadv2.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    _preadv2.restype = ctypes.c_ssize_t
_RWF_NOWAIT = 0x8
_ONE_CALL_PATH = "posix:one-call"  # telemetry path of a request served by post's one system call


class _ThreadEngine:
    """pread/pwrite from a thread pool; each worker takes a contiguous share of the I/Os."""

    path = "posix:threads"

    def __init__(self, backend: str, threads: int) -> None:
        self._backend = backend
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="nixl-posix")
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)

    def start(self, req: _Request) -> None:
        parts = max(1, min(self._threads, req.n))
        bounds = np.linspace(0, req.n, parts + 1).astype(np.int64).tolist()
        req.submitted = req.n
        req.parts_left = parts  # type: ignore[attr-defined]
        for lo, hi in itertools.pairwise(bounds):
            self._pool.submit(self._work, req, lo, hi)

    def _work(self, req: _Request, lo: int, hi: int) -> None:
        fn = _pread if req.op is XferOp.READ else _pwrite
        scalar_fd = np.ndim(req.fds) == 0
        fd0 = int(req.fds) if scalar_fd else 0
        offs, addrs, lens = req.offs.tolist(), req.addrs.tolist(), req.lens.tolist()
        fds = None if scalar_fd else req.fds.tolist()  # type: ignore[union-attr]
        bad: tuple[int, int] | None = None
        done = lo
        for i in range(lo, hi):
            if req.canceled:
                break
            fd = fd0 if fds is None else fds[i]
            want, got = lens[i], 0
            while got < want:
                r = fn(fd, addrs[i] + got, want - got, offs[i] + got)
                if r < 0:
                    e = ctypes.get_errno()
                    if e == errno.EINTR:
                        continue
                    bad = (i, -e)
                    break
                if r == 0:
                    bad = (i, got)
                    break
                got += r
            done = i + 1
            if bad is not None:
                break
        with self._done:
            if bad is not None:
                req.fail(*bad)
            req.completed += done - lo
            req.parts_left -= 1  # type: ignore[attr-defined]
            if req.parts_left == 0:  # type: ignore[attr-defined]
                if req.bad is None and req.completed < req.n:
                    req.canceled = True
                req.finish(self._backend)
            self._done.notify_all()

    def block(self, req: _Request, timeout: float) -> None:
        with self._done:
            self._done.wait_for(lambda: req.status is not XferStatus.IN_PROGRESS, timeout)

    def cancel(self, req: _Request, timeout: float) -> None:
        with self._done:
            if req.status is not XferStatus.IN_PROGRESS:
                return
            req.canceled = True
            if not self._done.wait_for(lambda: req.status is not XferStatus.IN_PROGRESS, timeout):
                raise RepostActiveError(f"POSIX request did not stop within {timeout} s")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)


class PosixBackend(Backend):
    """DRAM <-> FILE through io_uring (or a thread pool); loopback transfers only."""

    name: ClassVar[str] = "POSIX"
    mem_types: ClassVar[frozenset[MemType]] = frozenset({MemType.DRAM, MemType.VRAM, MemType.FILE})
    supports_local = True
    supports_remote = False
    supports_notif = False
    param_specs = PARAMS
    api_version = 2

    @classmethod
    def probe(cls) -> Availability:
        if not hasattr(os, "preadv"):
            return Availability(False, "needs Linux (pread/pwrite on file descriptors)")
        return Availability(True)

    def __init__(self, agent_name: str, params: Mapping[str, Any] | None = None) -> None:
        """Start the engines the ``engine`` param asks for.

        Args:
            agent_name: the owning agent.
            params: resolved by the core (see :mod:`nixl_posix.params`), or a plain mapping.

        Raises:
            InvalidParamError: a bad or unknown parameter, ``staging_bytes`` < 2 x
                ``max_io_size``, or a forced engine (``uring``, ``aio``) that cannot run here.
        """
        super().__init__(agent_name, params)
        p = self.params
        entries: int = p["ring_entries"]
        max_io: int = p["max_io_size"]
        staging: int = p["staging_bytes"]
        if staging < 2 * max_io:
            raise InvalidParamError(
                f"POSIX params: staging_bytes={staging} must be at least 2 x max_io_size="
                f"{max_io} (the staging pool's two slots each take a whole I/O)",
                param="staging_bytes",
                value=staging,
            )
        self._max_io = max_io & ~(MAX_IO_ALIGN - 1)  # split points stay O_DIRECT-aligned
        self._async_min: int = p["async_min_size"]
        self._inline_max: int = p["inline_max_bytes"]
        engine: str = p["engine"]
        self._cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        self._uring: _UringEngine | None = None
        self._aio: _AioEngine | None = None
        self._threads: _ThreadEngine | None = None
        if engine in ("auto", "uring"):
            from nixl_posix._uring import UringUnavailableError

            try:
                self._uring = _UringEngine(self.name, entries)
            except UringUnavailableError as exc:
                if engine == "uring":
                    raise InvalidParamError(
                        f"POSIX engine 'uring' is unavailable: {exc}", param="engine", value=engine
                    ) from exc
                logger.info("io_uring unavailable (%s)", exc)
        if engine in ("auto", "aio"):
            from nixl_posix._aio import AioUnavailableError

            try:
                self._aio = _AioEngine(self.name, entries, self._inline_max)
            except AioUnavailableError as exc:
                if engine == "aio":
                    raise InvalidParamError(
                        f"POSIX engine 'aio' is unavailable: {exc}", param="engine", value=engine
                    ) from exc
                logger.info("Linux AIO unavailable (%s)", exc)
        if self._uring is None and self._aio is None:
            if engine == "auto":
                logger.info("POSIX uses its thread engine (neither io_uring nor AIO works here)")
            self._threads = _ThreadEngine(self.name, p["num_threads"])
        self.engine_name = "+".join(
            n for n, e in (("uring", self._uring), ("aio", self._aio), ("threads", self._threads))
            if e is not None
        )  # fmt: skip
        self._stager = Stager(self.name, staging, self._run_io)
        self._auto = engine == "auto"  # a forced engine runs every request, one-I/O ones too
        self._closed = False

    def _run_io(self, req: _Request) -> BaseException | None:
        """Run a staging chunk's file I/O to its end (the stager's thread waits here)."""
        assert req.engine is not None
        req.reset()
        req.engine.start(req)
        while req.status is XferStatus.IN_PROGRESS:
            req.engine.block(req, 1.0)
        return req.error

    def _engine_for(self, op: XferOp, direct: bool) -> _UringEngine | _AioEngine | _ThreadEngine:
        """Buffered writes go to AIO (io_uring hands them to its worker pool); the rest to io_uring."""
        if self._threads is not None:
            return self._threads
        if self._uring is None or (self._aio is not None and op is XferOp.WRITE and not direct):
            assert self._aio is not None
            return self._aio
        return self._uring

    # ------------------------------------------------------------------ memory
    def register(self, mem_type: MemType, rows: U64, metas: Sequence[bytes]) -> list[Any]:
        if mem_type is not MemType.FILE:
            return [None] * int(rows.shape[0])
        out: list[_File] = []
        try:
            for i, (dev, meta) in enumerate(zip(rows[:, 2].tolist(), metas, strict=True)):
                out.append(self._register_file(i, int(dev), meta))
        except BaseException:
            self.deregister(out)
            raise
        return out

    def _register_file(self, i: int, dev: int, meta: bytes) -> _File:
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
            return _File(fd, path, True, "direct" in modes, dev)
        try:
            st = os.fstat(dev)
            fl = int(__import__("fcntl").fcntl(dev, __import__("fcntl").F_GETFL))
        except OSError as exc:
            raise RegistrationError(
                f"FILE registration {i}: dev {dev} is not an open file descriptor ({exc.strerror}); "
                "pass an open fd as dev, or a '<ro|rw>[,direct,...]:<path>' meta for path mode",
                index=i,
            ) from exc
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise RegistrationError(
                f"FILE registration {i}: fd {dev} ({_fd_path(dev)}) is not a regular file or block "
                "device",
                index=i,
            )
        return _File(dev, _fd_path(dev), False, bool(fl & os.O_DIRECT), dev)

    def deregister(self, handles: Sequence[Any]) -> None:
        for h in handles:
            if isinstance(h, _File) and h.owned and h.fd >= 0:
                try:
                    os.close(h.fd)
                except OSError as exc:  # closing is best effort; say so
                    logger.warning("closing %s: %s", h.path, exc)
                h.fd = -1

    def query_mem(
        self, mem_type: MemType, rows: U64, metas: Sequence[bytes]
    ) -> list[dict[str, Any] | None]:
        if mem_type is not MemType.FILE:
            raise NotSupportedError(f"POSIX query_mem answers for FILE, not {mem_type.value}")
        out: list[dict[str, Any] | None] = []
        for meta in metas:
            parsed = parse_path_meta(meta)
            path = parsed[1] if parsed else meta.decode("utf-8", "surrogateescape")
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
                continue
            out.append({"size": st.st_size, "mode": st.st_mode, "mtime": st.st_mtime})
        return out

    # ------------------------------------------------------------------ transfers
    def prepare(self, op: XferOp, local: XferSide, remote: XferSide, peer: str) -> BackendRequest:
        if peer != self.agent_name:
            raise NotSupportedError(
                f"POSIX moves data between this agent's memory and its files only (peer must be "
                f"{self.agent_name!r}, got {peer!r})"
            )
        if local.mem_type is MemType.FILE or remote.mem_type is not MemType.FILE:
            raise NotSupportedError(
                f"POSIX transfers DRAM or VRAM (local) <-> FILE (remote), not "
                f"{local.mem_type.value} -> {remote.mem_type.value}"
            )
        vram = local.mem_type is MemType.VRAM
        gpu = -1
        if vram:
            require_staging(self.name)
            gpu = local.uniform_dev
            if gpu < 0:  # -1 when the core did not know the devices were all equal
                devs = np.unique(local.devs)
                if devs.size == 1:
                    gpu = int(devs[0])
            if gpu < 0:
                raise NotSupportedError(
                    f"POSIX VRAM <-> FILE: one request moves one GPU's memory, this one spans "
                    f"GPUs {devs.tolist()}; post one request per GPU"
                )
        n = len(local)
        files: dict[int, _File] = {}
        if remote.single_slot >= 0:
            h = remote.slot_handles[remote.single_slot]
            files[h.fd] = h
            fds: int | npt.NDArray[np.int32] = h.fd
            direct = np.full(n, h.direct) if h.direct else None
        else:
            inverse, handles = remote.unique_handles()
            for h in handles:
                files[h.fd] = h
            fds = np.array([h.fd for h in handles], np.int32)[inverse]
            dflags = np.array([h.direct for h in handles], bool)
            direct = dflags[inverse] if dflags.any() else None
        offs = np.ascontiguousarray(remote.addrs, np.uint64)
        addrs = np.ascontiguousarray(local.addrs, np.uint64)
        lens = np.ascontiguousarray(local.lengths, np.uint64)
        if direct is not None:  # VRAM blocks are staged at aligned host addresses
            self._check_direct(op, direct, offs, None if vram else addrs, lens, fds, files)
        desc: I64 | None = None
        big = lens > np.uint64(self._max_io)
        if big.any():  # split large descriptors: vectorized, O_DIRECT alignment kept
            m = np.uint64(self._max_io)
            counts = np.maximum((lens + m - np.uint64(1)) // m, np.uint64(1)).astype(np.int64)
            desc = np.repeat(np.arange(n, dtype=np.int64), counts)
            first = np.repeat(np.cumsum(counts) - counts, counts)
            step = (np.arange(desc.size, dtype=np.int64) - first).astype(np.uint64) * m
            offs = offs[desc] + step
            addrs = addrs[desc] + step
            lens = np.minimum(lens[desc] - step, m)
            if np.ndim(fds):
                fds = fds[desc]  # type: ignore[index]
        engine = self._engine_for(op, direct is not None)
        if vram:
            return self._prepare_vram(op, gpu, fds, offs, addrs, lens, desc, files, engine)
        flags: int | npt.NDArray[np.uint8] = 0
        total = int(lens.sum(dtype=np.uint64))
        # O_DIRECT I/O is asynchronous when submitted inline (the kernel queues it to the device
        # and returns); flagging it async would make a worker thread block on each I/O instead.
        if engine is self._uring and total > self._inline_max and direct is None:
            from nixl_posix._uring import SQE_ASYNC

            # A small request is served inside io_uring_enter (no worker hand-off, DONE when post
            # returns). A larger one is shared: the first (cpus-1)/cpus of its I/Os go to the
            # kernel's workers (flagged async), the rest are served inline meanwhile.
            is_async = lens >= np.uint64(self._async_min)
            is_async[len(lens) - max(1, len(lens) // self._cpus) :] = False
            if is_async.any():
                flags = np.where(is_async, SQE_ASYNC, 0).astype(np.uint8)
        req = _Request(op, fds, offs, addrs, lens, desc, files, flags)
        req.engine = engine
        req.path = engine.path
        if self._auto and req.n == 1 and direct is None and total <= self._inline_max:
            fd = req.fd_of(0)
            iov = (ctypes.c_uint64 * 2)(int(addrs[0]), int(lens[0]))
            req.single = (fd, iov, int(offs[0]), files[fd])
        return req

    def _prepare_vram(
        self,
        op: XferOp,
        dev: int,
        fds: int | npt.NDArray[np.int32],
        offs: U64,
        vaddrs: U64,
        lens: U64,
        desc: I64 | None,
        files: dict[int, _File],
        engine: _UringEngine | _AioEngine | _ThreadEngine,
    ) -> VramRequest:
        """Chunks of staged I/O: each chunk's file side is a DRAM request on a pool slot."""

        def make_io(lo: int, hi: int, host: U64) -> _Request:
            cfds = fds if np.ndim(fds) == 0 else fds[lo:hi]  # type: ignore[index]
            cdesc = np.arange(lo, hi, dtype=np.int64) if desc is None else desc[lo:hi]
            io = _Request(op, cfds, offs[lo:hi], host, lens[lo:hi], cdesc, files, 0)
            io.engine = engine
            return io

        req = self._stager.prepare(op, dev, vaddrs, lens, make_io)
        req.path = f"{engine.path}+staged"
        return req

    @staticmethod
    def _check_direct(
        op: XferOp,
        direct: npt.NDArray[np.bool_],
        offs: U64,
        addrs: U64 | None,
        lens: U64,
        fds: int | npt.NDArray[np.int32],
        files: dict[int, _File],
    ) -> None:
        a = np.uint64(_DIRECT_ALIGN - 1)
        bad = direct & ((((offs | lens) if addrs is None else (offs | addrs | lens)) & a) != 0)
        if bad.any():
            i = int(np.argmax(bad))
            fd = int(fds) if np.ndim(fds) == 0 else int(fds[i])  # type: ignore[index]
            raise InvalidDescriptorError(
                f"misaligned O_DIRECT {'read' if op is XferOp.READ else 'write'}: descriptor {i} "
                f"({files[fd].path} at offset {int(offs[i])}, length {int(lens[i])}"
                f"{'' if addrs is None else f', buffer 0x{int(addrs[i]):x}'}); offsets, lengths and "
                f"buffer addresses must be multiples of {_DIRECT_ALIGN}",
                index=i,
            )

    def post(self, req: BackendRequest, notif: bytes | None) -> XferStatus:
        if notif is not None:
            raise NotSupportedError("POSIX delivers no notifications (it has no peers)")
        if isinstance(req, VramRequest):
            self._stager.start(req)
            return req.status
        assert isinstance(req, _Request)
        req.reset()
        assert req.engine is not None
        if req.single is not None:
            if self._one_call(req):
                req.path = _ONE_CALL_PATH
                req.status = XferStatus.DONE
                return req.status
            req.path = req.engine.path
        if req.n == 0:
            req.status = XferStatus.DONE
            return req.status
        req.engine.start(req)
        return req.status

    def _one_call(self, req: _Request) -> bool:
        """Serve a one-I/O buffered request with one system call inside post.

        A READ asks the page cache only (``preadv2`` with ``RWF_NOWAIT``), so post never waits
        for the disk; a WRITE is one ``pwrite``, which blocks no longer than the AIO engine's
        inline ``io_submit`` would. Returns False (the engine then runs the request and reports
        any error) when the data is not cached, the call moved fewer bytes, or it failed.
        """
        assert req.single is not None
        fd, iov, off, handle = req.single
        if req.op is XferOp.READ:
            if not handle.nowait:
                return False
            r = _preadv2(fd, iov, 1, off, _RWF_NOWAIT)  # type: ignore[misc]
            if r < 0 and ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS):
                handle.nowait = False  # this kernel or file system lacks RWF_NOWAIT reads
                return False
        else:
            r = _pwrite(fd, iov[0], iov[1], off)
        if r != iov[1]:
            return False
        req.submitted = req.completed = 1
        return True

    def poll(self, req: BackendRequest) -> XferStatus:
        assert isinstance(req, (_Request, VramRequest))
        st = req.status
        if st is XferStatus.IN_PROGRESS:
            time.sleep(
                0
            )  # hand the GIL to the completion thread: a polling loop must not starve it
        return st

    def block(self, req: BackendRequest, timeout: float) -> None:
        if isinstance(req, VramRequest):
            self._stager.block(req, timeout)
            return
        assert isinstance(req, _Request) and req.engine is not None
        req.engine.block(req, timeout)

    def release(self, req: BackendRequest) -> None:
        if isinstance(req, VramRequest):
            self._stager.cancel(req, timeout=10.0)
            return
        assert isinstance(req, _Request)
        if req.engine is not None:
            req.engine.cancel(req, timeout=10.0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stager.close()
        for e in (self._uring, self._aio, self._threads):
            if e is not None:
                e.close()
