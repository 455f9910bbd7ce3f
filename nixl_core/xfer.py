"""Transfer requests: the state machine, prepared lists, per-request telemetry.

A request is PENDING when made, IN_PROGRESS or DONE after :meth:`XferRequest.post`, and ERROR when
the backend reports a failure. Every answer of the backend (post or poll) goes through one place
(``XferRequest._observe``): a request in ERROR always carries its exception in ``error``, and
:meth:`~XferRequest.check` / :meth:`~XferRequest.wait` raise it; the failure path (the agent
dropping a disconnected peer) runs whichever call saw the error. A DONE or ERROR request may be
posted again (for ERROR, the explicit reset: the old exception is dropped); posting a request
that is still IN_PROGRESS raises :class:`~nixl_core.errors.RepostActiveError`, and releasing it
aborts it (it ends in ERROR with a TransferCanceledError).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import attrs
import numpy as np
import numpy.typing as npt

from nixl_core.backend import Backend, BackendRequest, XferOp, XferStatus
from nixl_core.errors import (
    NixlError,
    NotPostedError,
    NotSupportedError,
    RepostActiveError,
    TransferCanceledError,
    TransferError,
    TransferTimeoutError,
    foreign_error,
)
from nixl_core.memory import MemType

if TYPE_CHECKING:
    from nixl_core.agent import Agent

__all__ = ["KEEP", "PreppedList", "XferRequest", "XferTelemetry"]

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


#: Sentinel for :meth:`XferRequest.post`: keep the notification given when the request was made.
KEEP: Final = _Keep()


@attrs.frozen
class XferTelemetry:
    """Per-request telemetry (NIXL's ``nixlXferTelemetry`` plus the carrier).

    Attributes:
        start_time_us: wall-clock time (µs since the epoch) when the last post began.
        post_duration_us: time spent inside the last post call.
        xfer_duration_us: from the start of the last post to completion being observed.
        total_bytes: bytes moved by one post.
        desc_count: descriptors handed to the backend (after merging).
        backend: backend name.
        path: the transport that carried the data, e.g. "loopback:cma".
    """

    start_time_us: int
    post_duration_us: float
    xfer_duration_us: float
    total_bytes: int
    desc_count: int
    backend: str
    path: str


class PreppedList:
    """A descriptor list checked once against one agent's registrations (``prep``).

    ``peer`` is the agent whose memory the descriptors describe: "" for the initiator's own
    memory, a remote agent's name, or the agent's own name for loopback. ``make`` gathers from it
    with index arrays. The address column is kept contiguous (``make`` gathers it); uniform
    lengths, devices and registrations are noted (-1 when not uniform) so that ``make`` does not
    gather them, and their columns are only built when asked for.

    Attributes:
        agent: the agent that prepared it.
        peer: whose memory the descriptors describe ("" = the initiator's own).
        mem_type: memory type of every descriptor.
        descs: the (N, 3) [addr, len, dev] array (read-only, the caller's list).
        addrs: contiguous address column.
        backends: backends that cover every descriptor, in preference order.
        generation: the remote agent's metadata generation it was checked against.
        uniform_len, uniform_dev, single_slot: the common length, device, registration slot,
            or -1.
        released: set by :meth:`release`.
    """

    __slots__ = (
        "_bstate",
        "_devs",
        "_lens",
        "_slots",
        "addrs",
        "agent",
        "backends",
        "descs",
        "generation",
        "mem_type",
        "peer",
        "released",
        "single_slot",
        "uniform_dev",
        "uniform_len",
    )

    def __init__(
        self,
        agent: Agent,
        peer: str,
        mem_type: MemType,
        descs: U64,
        addrs: U64,
        slots: I64 | None,
        backends: tuple[str, ...],
        generation: int,
        uniform_len: int = -1,
        uniform_dev: int = -1,
        single_slot: int = -1,
    ) -> None:
        self.agent, self.peer, self.mem_type = agent, peer, mem_type
        self.descs, self.addrs, self._slots = descs, addrs, slots
        self.backends, self.generation = backends, generation
        self.uniform_len, self.uniform_dev, self.single_slot = uniform_len, uniform_dev, single_slot
        self._lens: U64 | None = None
        self._devs: U64 | None = None
        # backend name -> (backend, registration epoch, Backend.prep_side's state); filled by
        # Agent.make for backends that take index arrays.
        self._bstate: dict[str, tuple[Backend, int, Any]] = {}
        self.released = False

    @property
    def lens(self) -> U64:
        """Contiguous length column (built on first access)."""
        if self._lens is None:
            self._lens = np.ascontiguousarray(self.descs[:, 1])
        return self._lens

    @property
    def devs(self) -> U64:
        """Contiguous device column (built on first access)."""
        if self._devs is None:
            self._devs = np.ascontiguousarray(self.descs[:, 2])
        return self._devs

    @property
    def reg_slots(self) -> I64:
        """Registration slot of each descriptor (built on first access when all share one)."""
        if self._slots is None:
            self._slots = np.full(len(self), self.single_slot, np.int64)
        return self._slots

    def __len__(self) -> int:
        return int(self.addrs.shape[0])

    def __repr__(self) -> str:
        who = self.peer or "<local>"
        return f"PreppedList({who}, {self.mem_type.value}, n={len(self)}, backends={self.backends})"

    def _drop_states(self) -> None:
        """Hand every cached backend state back to its backend."""
        states, self._bstate = self._bstate, {}
        for backend, _, state in states.values():
            if state is not None:
                backend.release_side(state)

    def release(self) -> None:
        """Forget the list (idempotent). Requests already made from it stay valid."""
        self.released = True
        self._drop_states()

    def __enter__(self) -> PreppedList:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class XferRequest:
    """One transfer request; post it, check it, release it. A context manager.

    Attributes:
        op: READ or WRITE.
        peer: the remote agent's name (own name for loopback).
        backend_name: the backend chosen for it.
        desc_count: descriptors handed to the backend (after merging).
        total_bytes: bytes moved per post.
        status: the last known :class:`XferStatus`.
        notif: the notification sent with the next post (None for none).
    """

    __slots__ = (
        "__weakref__",
        "_agent",
        "_breq",
        "_gen",
        "_on_error",
        "_t0",
        "_t0_wall",
        "_t_end",
        "_t_post",
        "_telemetry",
        "backend",
        "backend_name",
        "desc_count",
        "error",
        "notif",
        "op",
        "peer",
        "status",
        "total_bytes",
    )

    def __init__(
        self,
        agent: Agent,
        backend: Backend,
        breq: BackendRequest,
        op: XferOp,
        peer: str,
        notif: bytes | None,
        desc_count: int,
        total_bytes: int,
        generation: int,
        on_error: Callable[[XferRequest, BaseException], None],
    ) -> None:
        self._agent = agent
        self.backend = backend
        self.backend_name = backend.name
        self._breq: BackendRequest | None = breq
        self.op = op
        self.peer = peer
        self.notif = notif
        self.desc_count = desc_count
        self.total_bytes = total_bytes
        self._gen = generation
        self._on_error = on_error
        self.status = XferStatus.PENDING
        self.error: BaseException | None = None
        self._t0 = 0
        self._t0_wall = 0
        self._t_post = 0
        self._t_end = 0  # completion time of the last post; 0 = none completed
        self._telemetry: XferTelemetry | None = None  # built from the times when first asked for

    def __repr__(self) -> str:
        return (
            f"XferRequest({self.op.value} -> {self.peer!r}, backend={self.backend_name}, "
            f"descs={self.desc_count}, bytes={self.total_bytes}, {self.status.value})"
        )

    @property
    def path(self) -> str:
        """The transport that carries the data (backend-reported)."""
        return self._breq.path if self._breq is not None else ""

    @property
    def released(self) -> bool:
        """True once released."""
        return self._breq is None

    def _live(self) -> BackendRequest:
        if self._breq is None:
            raise NotPostedError(f"{self!r} was released")
        return self._breq

    @property
    def backend_request(self) -> BackendRequest:
        """The backend's request behind this one (for the backend's own helper methods).

        Raises:
            NotPostedError: the request was released.
        """
        return self._live()

    def completion_event(self) -> Any:
        """An event that completes with the last post, from backends with stream order.

        For NVLINK a ``cupy.cuda.Event``: ``stream.wait_event(req.completion_event())`` lets a
        consumer kernel use the data without a host round trip.

        Raises:
            NotSupportedError: the backend has no completion events (names it).
            NotPostedError: the request was never posted, or was released.
        """
        if not self.backend.supports_stream:
            raise NotSupportedError(
                f"backend {self.backend_name} has no completion events; wait for {self!r} "
                "with check() / wait()"
            )
        breq = self._live()
        if self.status is XferStatus.PENDING:
            raise NotPostedError(f"{self!r} was never posted")
        return self.backend.completion_event(breq)

    # ---------------------------------------------------------------- state machine
    def post(self, notif: bytes | str | _Keep | None = KEEP, *, stream: Any = None) -> XferStatus:
        """Start the transfer; returns DONE or IN_PROGRESS.

        A request that ended in ERROR keeps its exception (``error``; ``check()`` and
        ``wait()`` raise it) until it is posted again: posting it is the explicit reset (the
        old error is dropped, the transfer runs anew).

        Args:
            notif: replaces the notification given at creation (None = send none); omit to keep.
            stream: start only after the work queued on this stream (CUDA backends with
                ``supports_stream``: a cupy, torch or cuda.core stream, or a raw
                ``cudaStream_t``); the wait happens on the device, the host does not block.

        Raises:
            NotSupportedError: ``stream`` given to a backend without stream order (names the
                backend; the request is left as it was).
            RepostActiveError: the request is still in progress.
            TransferError: the run still in flight when this post was called had failed (its
                exception; the request is in ERROR and the next post resets it).
            StaleHandleError / UnknownAgentError: the peer's metadata was removed or replaced.
            TransferError: the backend failed to start it (status becomes ERROR, ``error`` is
                this exception).
        """
        breq = self._live()
        if stream is not None and not self.backend.supports_stream:
            raise NotSupportedError(
                f"backend {self.backend_name} cannot order a transfer after a stream "
                "(post(stream=...)); synchronize the stream and post without it"
            )
        if self.status is XferStatus.IN_PROGRESS:
            st = self._poll(breq)
            if st is XferStatus.IN_PROGRESS:
                raise RepostActiveError(
                    f"{self!r} is still in progress; wait for it before reposting"
                )
            if st is XferStatus.ERROR:  # the run in flight failed: say so (posting again resets)
                raise self._error()
        self._agent._check_generation(self.peer, self._gen)
        if not isinstance(notif, _Keep):
            self.notif = notif.encode() if isinstance(notif, str) else notif
        self.error = None  # the explicit reset of a request that ended in ERROR
        self._telemetry = None
        self._t_end = 0
        self._t0_wall = time.time_ns()
        self._t0 = time.perf_counter_ns()
        try:
            if stream is None:
                st = self.backend.post(breq, self.notif)
            else:
                st = self.backend.post_stream(breq, self.notif, stream)
        except Exception as exc:
            self._t_post = time.perf_counter_ns()
            raise self._failed(exc, "post") from exc
        self._t_post = time.perf_counter_ns()
        if self._observe(st, breq) is XferStatus.ERROR:
            raise self._error()
        return self.status

    def _poll(self, breq: BackendRequest) -> XferStatus:
        """Ask the backend once and record what it says (an exception it raised included)."""
        try:
            st = self.backend.poll(breq)
        except Exception as exc:
            self._failed(exc, "poll")
            return XferStatus.ERROR
        return self._observe(st, breq)

    def _observe(self, st: XferStatus, breq: BackendRequest) -> XferStatus:
        """The one place a backend's answer (post or poll) changes the request's state.

        ERROR always records the exception (the backend's ``error``, or a TransferError saying
        it gave none) and runs the failure path (the agent's disconnect handling).
        """
        if st is XferStatus.DONE:
            self.status = XferStatus.DONE
            self._t_end = time.perf_counter_ns()
        elif st is XferStatus.IN_PROGRESS:
            self.status = XferStatus.IN_PROGRESS
        elif st is XferStatus.ERROR:
            err = breq.error
            if not isinstance(err, NixlError):
                why = (
                    f"{type(err).__name__}: {err}"
                    if err is not None
                    else "backend reported ERROR without a reason"
                )
                err = TransferError(
                    f"{self!r} failed: {why}", backend=self.backend_name, request=self
                )
            self._fail(err)
        return self.status

    def _failed(self, exc: BaseException, what: str) -> BaseException:
        """Record an exception raised by the backend (made typed first) and return it."""
        if not isinstance(exc, NixlError):
            exc = foreign_error(exc, self.backend_name, f"{what} {self!r}", TransferError)
        self._fail(exc)
        return exc

    def _error(self) -> BaseException:
        assert self.error is not None  # ERROR always carries its exception (_fail)
        return self.error

    def check(self) -> XferStatus:
        """Progress and return the state: DONE, IN_PROGRESS (or PENDING if never posted).

        Raises:
            TransferError: the transfer ended in ERROR (its exception, kept in ``error`` until
                the request is posted again).
        """
        if self.status is XferStatus.IN_PROGRESS:
            self._poll(self._live())
        if self.status is XferStatus.ERROR:
            raise self._error()
        return self.status

    def wait(self, timeout: float | None = None, poll_interval: float = 0.0) -> XferStatus:
        """Poll until DONE; never waits forever when ``timeout`` is given.

        Raises:
            TransferTimeoutError: not done within ``timeout`` seconds (the request keeps running).
            TransferError: the transfer failed.
        """
        if self.status is XferStatus.PENDING:
            raise NotPostedError(f"{self!r} was never posted")
        deadline = None if timeout is None else time.monotonic() + timeout
        while (st := self.check()) is XferStatus.IN_PROGRESS:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise TransferTimeoutError(
                    f"{self!r} not done after {timeout} s", backend=self.backend_name, request=self
                )
            if poll_interval:
                time.sleep(poll_interval)
            else:  # let a backend with completion threads block instead of spinning
                left = 0.05 if deadline is None else min(0.05, max(0.0, deadline - now))
                try:
                    self.backend.block(self._live(), left)
                except Exception as exc:
                    raise self._failed(exc, "wait for") from exc
        return st

    def _abandon(self, exc: TransferError) -> None:
        """The peer is gone: if still in flight (asked once more), end in ERROR with ``exc``.

        The backend's part is aborted when the request is released.
        """
        if self.status is not XferStatus.IN_PROGRESS or self._breq is None:
            return
        self._poll(self._breq)
        if self.status is XferStatus.IN_PROGRESS:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.status = XferStatus.ERROR
        self.error = exc
        if isinstance(exc, TransferError):
            exc.request = exc.request or self
            exc.backend = exc.backend or self.backend_name
        self._on_error(self, exc)

    @property
    def telemetry(self) -> XferTelemetry:
        """Telemetry of the last completed post.

        Raises:
            NotPostedError: the request never completed a post.
        """
        if self._telemetry is None:
            if not self._t_end:
                raise NotPostedError(f"{self!r} has no completed post to report on")
            self._telemetry = XferTelemetry(
                start_time_us=self._t0_wall // 1000,
                post_duration_us=(self._t_post - self._t0) / 1000.0,
                xfer_duration_us=(self._t_end - self._t0) / 1000.0,
                total_bytes=self.total_bytes,
                desc_count=self.desc_count,
                backend=self.backend_name,
                path=self.path,
            )
        return self._telemetry

    def release(self) -> None:
        """Free the request; aborts it if still running (idempotent).

        A request released while in progress ends in ERROR with a TransferCanceledError (its
        ``error``); one that had failed keeps its exception.

        Raises:
            RepostActiveError: the backend could not abort it (the request stays valid).
            TransferError: the backend failed while releasing it (the request is released
                anyway).
        """
        breq = self._breq
        if breq is None:
            return
        if self.status is XferStatus.IN_PROGRESS:
            self._poll(breq)
        failure: Exception | None = None
        try:
            self.backend.release(breq)
        except RepostActiveError:
            raise
        except Exception as exc:  # the backend's state of it is gone either way: finish, then say
            failure = exc
        if self._t_end and self._telemetry is None:
            _ = self.telemetry  # built now, while the backend request still names the path
        if self.status is XferStatus.IN_PROGRESS:
            self._fail(
                TransferCanceledError(
                    f"{self!r} was released while in progress",
                    backend=self.backend_name,
                    request=self,
                )
            )
        self._breq = None
        self._agent._forget(self)
        if isinstance(failure, NixlError):
            raise failure
        if failure is not None:
            raise foreign_error(
                failure, self.backend_name, f"release {self!r}", TransferError
            ) from failure

    def __enter__(self) -> XferRequest:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
