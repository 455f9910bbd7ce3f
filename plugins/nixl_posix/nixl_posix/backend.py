"""The POSIX backend: DRAM/VRAM <-> FILE as loopback transfers, asynchronous, one syscall per batch.

Transfers are loopback (peer = the agent's own name): the local side is DRAM or VRAM, the remote
side FILE. WRITE writes memory to the file, READ reads the file into memory. FILE registrations
(fd mode, path mode) are in :mod:`nixl_posix._files`.

``prepare`` turns the descriptor columns into per-I/O arrays (large descriptors split, O_DIRECT
alignment checked, all with numpy) and picks an engine (:mod:`nixl_posix._engines`, param
``engine``): with ``auto``, buffered writes go to Linux AIO and the rest to io_uring, with the
thread engine where neither works. ``post`` serves a one-I/O buffered request itself with one
system call (:meth:`PosixBackend._one_call`) and hands the rest to the engine. A VRAM request goes
through the pinned staging pool (:mod:`nixl_posix._staging`), whose file side runs on the same
engines.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from nixl_core.backend import Availability, Backend, BackendRequest, XferOp, XferSide, XferStatus
from nixl_core.errors import InvalidDescriptorError, InvalidParamError, NotSupportedError
from nixl_core.memory import MemType
from nixl_posix._engines import AioEngine, Engine, ThreadEngine, UringEngine
from nixl_posix._files import (
    DIRECT_ALIGN,
    FileHandle,
    FileIOError,
    close_files,
    parse_path_meta,
    register_file,
)
from nixl_posix._libc import RWF_NOWAIT, preadv2, pwrite
from nixl_posix._request import Fds, Request
from nixl_posix._staging import Stager, VramRequest, require_staging
from nixl_posix.params import MAX_IO_ALIGN, PARAMS

__all__ = ["FileIOError", "PosixBackend", "parse_path_meta"]

logger = logging.getLogger(__name__)

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

_ONE_CALL_PATH = "posix:one-call"  # telemetry path of a request served by post's one system call


class PosixBackend(Backend):
    """DRAM/VRAM <-> FILE through io_uring, Linux AIO or a thread pool; loopback transfers only.

    Attributes:
        engine_name: the engines this instance runs, e.g. ``"uring+aio"`` or ``"threads"``.
    """

    name: ClassVar[str] = "POSIX"
    mem_types: ClassVar[frozenset[MemType]] = frozenset({MemType.DRAM, MemType.VRAM, MemType.FILE})
    supports_local = True
    supports_remote = False
    supports_notif = False
    param_specs = PARAMS
    api_version = 2

    @classmethod
    def probe(cls) -> Availability:
        """Available on Linux (positional reads and writes on file descriptors)."""
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
        self._uring: UringEngine | None = None
        self._aio: AioEngine | None = None
        self._threads: ThreadEngine | None = None
        if engine in ("auto", "uring"):
            from nixl_posix._uring import UringUnavailableError

            try:
                self._uring = UringEngine(self.name, entries)
            except UringUnavailableError as exc:
                if engine == "uring":
                    raise InvalidParamError(
                        f"POSIX engine 'uring' is unavailable: {exc}", param="engine", value=engine
                    ) from exc
                logger.info("io_uring unavailable (%s)", exc)
        if engine in ("auto", "aio"):
            from nixl_posix._aio import AioUnavailableError

            try:
                self._aio = AioEngine(self.name, entries, self._inline_max)
            except AioUnavailableError as exc:
                if engine == "aio":
                    raise InvalidParamError(
                        f"POSIX engine 'aio' is unavailable: {exc}", param="engine", value=engine
                    ) from exc
                logger.info("Linux AIO unavailable (%s)", exc)
        if self._uring is None and self._aio is None:
            if engine == "auto":
                logger.info("POSIX uses its thread engine (neither io_uring nor AIO works here)")
            self._threads = ThreadEngine(self.name, p["num_threads"])
        self.engine_name = "+".join(
            n for n, e in (("uring", self._uring), ("aio", self._aio), ("threads", self._threads))
            if e is not None
        )  # fmt: skip
        self._stager = Stager(self.name, staging, self._run_io)
        self._auto = engine == "auto"  # a forced engine runs every request, one-I/O ones too
        self._closed = False

    def _run_io(self, req: Request) -> BaseException | None:
        """Run a staging chunk's file I/O to its end (the stager's thread waits here)."""
        assert req.engine is not None
        req.reset()
        req.engine.start(req)
        while req.status is XferStatus.IN_PROGRESS:
            req.engine.block(req, 1.0)
        return req.error

    def _engine_for(self, op: XferOp, direct: bool) -> Engine:
        """Buffered writes go to AIO (io_uring hands them to its worker pool); the rest to io_uring."""
        if self._threads is not None:
            return self._threads
        if self._uring is None or (self._aio is not None and op is XferOp.WRITE and not direct):
            assert self._aio is not None
            return self._aio
        return self._uring

    # ------------------------------------------------------------------ memory
    def register(self, mem_type: MemType, rows: U64, metas: Sequence[bytes]) -> list[Any]:
        """FILE: open or check each file (see :mod:`nixl_posix._files`); memory needs nothing."""
        if mem_type is not MemType.FILE:
            return [None] * int(rows.shape[0])
        out: list[FileHandle] = []
        try:
            for i, (dev, meta) in enumerate(zip(rows[:, 2].tolist(), metas, strict=True)):
                out.append(register_file(i, int(dev), meta))
        except BaseException:
            close_files(out)
            raise
        return out

    def deregister(self, handles: Sequence[Any]) -> None:
        """Close the files path-mode registrations opened."""
        close_files(handles)

    def query_mem(
        self, mem_type: MemType, rows: U64, metas: Sequence[bytes]
    ) -> list[dict[str, Any] | None]:
        """Size, mode and mtime of each file named by a meta (a path, or a path-mode meta)."""
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
        """Per-I/O arrays for the request (vectorized), on the engine that will run it.

        Raises:
            NotSupportedError: not a loopback DRAM/VRAM <-> FILE transfer, VRAM of several GPUs,
                or VRAM without cupy or a GPU.
            InvalidDescriptorError: a misaligned I/O on an O_DIRECT file (names it).
        """
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
        files: dict[int, FileHandle] = {}
        fds: Fds
        if remote.single_slot >= 0:
            h = remote.slot_handles[remote.single_slot]
            files[h.fd] = h
            fds = h.fd
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
            if not isinstance(fds, int):
                fds = fds[desc]
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
        req = Request(op, fds, offs, addrs, lens, desc, files, flags)
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
        fds: Fds,
        offs: U64,
        vaddrs: U64,
        lens: U64,
        desc: I64 | None,
        files: dict[int, FileHandle],
        engine: Engine,
    ) -> VramRequest:
        """Chunks of staged I/O: each chunk's file side is a DRAM request on a pool slot."""

        def make_io(lo: int, hi: int, host: U64) -> Request:
            cfds = fds if isinstance(fds, int) else fds[lo:hi]
            cdesc = np.arange(lo, hi, dtype=np.int64) if desc is None else desc[lo:hi]
            io = Request(op, cfds, offs[lo:hi], host, lens[lo:hi], cdesc, files, 0)
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
        fds: Fds,
        files: dict[int, FileHandle],
    ) -> None:
        a = np.uint64(DIRECT_ALIGN - 1)
        bad = direct & ((((offs | lens) if addrs is None else (offs | addrs | lens)) & a) != 0)
        if bad.any():
            i = int(np.argmax(bad))
            fd = fds if isinstance(fds, int) else int(fds[i])
            raise InvalidDescriptorError(
                f"misaligned O_DIRECT {'read' if op is XferOp.READ else 'write'}: descriptor {i} "
                f"({files[fd].path} at offset {int(offs[i])}, length {int(lens[i])}"
                f"{'' if addrs is None else f', buffer 0x{int(addrs[i]):x}'}); offsets, lengths and "
                f"buffer addresses must be multiples of {DIRECT_ALIGN}",
                index=i,
            )

    def post(self, req: BackendRequest, notif: bytes | None) -> XferStatus:
        """Serve a one-I/O request inside this call when it can, else start its engine."""
        if notif is not None:
            raise NotSupportedError("POSIX delivers no notifications (it has no peers)")
        if isinstance(req, VramRequest):
            self._stager.start(req)
            return req.status
        assert isinstance(req, Request)
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

    def _one_call(self, req: Request) -> bool:
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
            r = preadv2(fd, iov, 1, off, RWF_NOWAIT)
            if r < 0 and ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS):
                handle.nowait = False  # this kernel or file system lacks RWF_NOWAIT reads
                return False
        else:
            r = pwrite(fd, iov[0], iov[1], off)
        if r != iov[1]:
            return False
        req.submitted = req.completed = 1
        return True

    def poll(self, req: BackendRequest) -> XferStatus:
        """The request's state; yields the GIL while it runs."""
        assert isinstance(req, (Request, VramRequest))
        st = req.status
        if st is XferStatus.IN_PROGRESS:
            # Hand the GIL to the completion thread: a polling loop must not starve it.
            time.sleep(0)
        return st

    def block(self, req: BackendRequest, timeout: float) -> None:
        """Wait on the engine (or the stager) for the request's completion."""
        if isinstance(req, VramRequest):
            self._stager.block(req, timeout)
            return
        assert isinstance(req, Request) and req.engine is not None
        req.engine.block(req, timeout)

    def release(self, req: BackendRequest) -> None:
        """Stop the request; wait (up to 10 s) for the I/O the kernel still holds of it."""
        if isinstance(req, VramRequest):
            self._stager.cancel(req, timeout=10.0)
            return
        assert isinstance(req, Request)
        if req.engine is not None:
            req.engine.cancel(req, timeout=10.0)

    def close(self) -> None:
        """Stop the stager and the engines."""
        if self._closed:
            return
        self._closed = True
        self._stager.close()
        for e in (self._uring, self._aio, self._threads):
            if e is not None:
                e.close()
