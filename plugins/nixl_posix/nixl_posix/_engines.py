"""The I/O engines: what runs a prepared :class:`~nixl_posix._request.Request`.

- :class:`UringEngine` submits a whole request to one io_uring (:mod:`nixl_posix._uring`) with
  one ``io_uring_enter``; a completion thread reaps what the kernel still holds.
- :class:`AioEngine` hands it to Linux AIO (:mod:`nixl_posix._aio`) with one ``io_submit``:
  buffered writes are performed inside that call.
- :class:`ThreadEngine` runs ``pread``/``pwrite`` (:mod:`nixl_posix._libc`) from a thread pool,
  the fallback where neither io_uring nor AIO is allowed.

The two kernel engines build a request's submission entries with numpy once, at its first post,
and apply completions with :func:`~nixl_posix._request.account`: no Python code runs per I/O.
Each engine has ``start(req)`` (after ``req.reset()``), ``block(req, timeout)``,
``cancel(req, timeout)`` and ``close()``; ``path`` is the telemetry path of what it carried.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TypeAlias

import numpy as np

from nixl_core.backend import XferOp, XferStatus
from nixl_core.errors import RepostActiveError
from nixl_posix._libc import pread, pwrite
from nixl_posix._request import Request, account

__all__ = ["AioEngine", "Engine", "ThreadEngine", "UringEngine"]

_WAKE = 0  # user_data id of the wake-up no-op; requests use ids >= 1


class _KernelEngine:
    """What the io_uring and AIO engines share: the request table, the queue of what waits for
    room in the kernel, the condition the completion thread signals, and release/wait."""

    path = ""

    def __init__(self, backend: str, thread_name: str) -> None:
        self._backend = backend
        self._cond = threading.Condition()
        self._queue: collections.deque[Request] = collections.deque()
        self._live: dict[int, Request] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._waiters = 0  # threads in block() or cancel(): they need a notify on completions
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def _new_id(self) -> int:
        return next(self._ids) & 0x7FFFFFFF or next(self._ids)

    def _run(self) -> None:
        raise NotImplementedError

    def _wait(self, req: Request, timeout: float) -> bool:
        """Wait (holding the condition) until ``req`` leaves IN_PROGRESS; False on timeout."""
        self._waiters += 1
        try:
            return self._cond.wait_for(lambda: req.status is not XferStatus.IN_PROGRESS, timeout)
        finally:
            self._waiters -= 1

    def block(self, req: Request, timeout: float) -> None:
        """Wait up to ``timeout`` s for ``req`` to leave IN_PROGRESS."""
        with self._cond:
            self._wait(req, timeout)

    def cancel(self, req: Request, timeout: float) -> None:
        """Submit nothing more of ``req`` and wait for what the kernel holds of it.

        Raises:
            RepostActiveError: I/O of ``req`` is still in the kernel after ``timeout`` s.
        """
        with self._cond:
            if req.status is not XferStatus.IN_PROGRESS:
                return
            req.canceled = req.stopped = True
            if req in self._queue:
                self._queue.remove(req)
            if req.completed == req.submitted:  # the kernel holds none of it: end it now
                self._live.pop(req.id, None)
                req.finish(self._backend)
            # Submitted I/O still reads or writes the caller's buffers: wait for it to end.
            if req.status is XferStatus.IN_PROGRESS and not self._wait(req, timeout):
                raise RepostActiveError(
                    f"POSIX request still has {req.submitted - req.completed} I/Os in the kernel "
                    f"after {timeout} s"
                )


class UringEngine(_KernelEngine):
    """Submits requests to one io_uring; a completion thread reaps and submits what waits.

    Args:
        backend: the backend's name, for errors.
        entries: the ring's submission queue size.

    Raises:
        UringUnavailableError: io_uring cannot be set up here (the reason).
    """

    path = "posix:io_uring"

    def __init__(self, backend: str, entries: int) -> None:
        from nixl_posix._uring import Ring

        super().__init__(backend, "nixl-posix-uring")
        self._ring = Ring(entries)
        self._thread.start()

    def start(self, req: Request) -> None:
        """Submit ``req`` (what fits in the ring now) and reap what the kernel served inline."""
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
        account(self._live, ud, res, self._backend, not self._closed)

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
        """Submit nothing more, wait for what the kernel holds, free the ring."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._ring.nop(_WAKE)
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._ring.close()


class AioEngine(_KernelEngine):
    """Linux AIO: buffered writes run inside ``io_submit`` (GIL released), in one system call.

    A request of at most ``inline_max`` bytes is submitted by ``post`` itself and is DONE when
    post returns; a larger one goes to the engine's thread, so post returns at once.

    Args:
        backend: the backend's name, for errors.
        entries: the AIO context's size.
        inline_max: the largest request ``post`` submits itself, in bytes.

    Raises:
        AioUnavailableError: Linux AIO cannot be set up here (the reason).
    """

    path = "posix:aio"

    def __init__(self, backend: str, entries: int, inline_max: int) -> None:
        from nixl_posix._aio import AioContext

        super().__init__(backend, "nixl-posix-aio")
        self._ctx = AioContext(entries)
        self._inline_max = inline_max
        self._reserved = 0  # context slots taken by submitted, unreaped I/O
        self._thread.start()

    def start(self, req: Request) -> None:
        """Submit a small ``req`` here (done when this returns), queue a large one."""
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

    def _submit(self, req: Request) -> int:
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
        account(self._live, ud, res, self._backend)

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
                account(self._live, ud, res, self._backend)
                self._cond.notify_all()

    def close(self) -> None:
        """Submit nothing more, wait for what the kernel holds, destroy the context."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._ctx.close()


class ThreadEngine:
    """pread/pwrite from a thread pool; each worker takes a contiguous share of the I/Os.

    Args:
        backend: the backend's name, for errors.
        threads: the pool's size.
    """

    path = "posix:threads"

    def __init__(self, backend: str, threads: int) -> None:
        self._backend = backend
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="nixl-posix")
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)

    def start(self, req: Request) -> None:
        """Split ``req`` into one contiguous share per worker."""
        parts = max(1, min(self._threads, req.n))
        bounds = np.linspace(0, req.n, parts + 1).astype(np.int64).tolist()
        req.submitted = req.n
        req.parts_left = parts
        for lo, hi in itertools.pairwise(bounds):
            self._pool.submit(self._work, req, lo, hi)

    def _work(self, req: Request, lo: int, hi: int) -> None:
        fn = pread if req.op is XferOp.READ else pwrite
        fd0 = req.fds if isinstance(req.fds, int) else 0
        offs, addrs, lens = req.offs.tolist(), req.addrs.tolist(), req.lens.tolist()
        fds = None if isinstance(req.fds, int) else req.fds.tolist()
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
            req.parts_left -= 1
            if req.parts_left == 0:
                if req.bad is None and req.completed < req.n:
                    req.canceled = True
                req.finish(self._backend)
            self._done.notify_all()

    def block(self, req: Request, timeout: float) -> None:
        """Wait up to ``timeout`` s for ``req`` to leave IN_PROGRESS."""
        with self._done:
            self._done.wait_for(lambda: req.status is not XferStatus.IN_PROGRESS, timeout)

    def cancel(self, req: Request, timeout: float) -> None:
        """Have the workers stop ``req`` after their current I/O, and wait for them.

        Raises:
            RepostActiveError: a worker is still running ``req`` after ``timeout`` s.
        """
        with self._done:
            if req.status is not XferStatus.IN_PROGRESS:
                return
            req.canceled = True
            if not self._done.wait_for(lambda: req.status is not XferStatus.IN_PROGRESS, timeout):
                raise RepostActiveError(f"POSIX request did not stop within {timeout} s")

    def close(self) -> None:
        """Wait for the workers and stop them."""
        self._pool.shutdown(wait=True, cancel_futures=False)


#: Any of the engines (what a request's ``engine`` is).
Engine: TypeAlias = UringEngine | AioEngine | ThreadEngine
