"""NVLINK: GPU memory of processes on one host, moved by one copy kernel per transfer.

How it works (each part in its own module; this one wires them into the backend contract):

- **Regions** (:mod:`nixl_nvlink._regions`). A VRAM region's public data is the CUDA IPC handle
  of the allocation holding it (VMM allocations: the POSIX fds of its chunks, served over a Unix
  stream socket); DRAM is pinned and mapped for every GPU, so the same kernel moves
  DRAM <-> VRAM. A peer's allocations are mapped once per process and cached; a peer's DRAM
  cannot be mapped into this process and is refused with a reason.
- **Peers.** Connection info carries the process's :class:`~nixl_core.host.HostIdentity` and
  the notification socket: :meth:`~nixl_core.host.HostIdentity.check_peer` refuses a peer on
  another host or in another network namespace (the sockets are abstract Unix sockets) and the
  message says to use UCX. Another pid namespace is fine (CUDA IPC does not address the peer by
  pid).
- **Transfers** (:mod:`nixl_nvlink._tables`). ``prepare`` / ``prepare_indexed`` build the
  request's (source, destination, length) table on the GPU; ``post`` is one kernel launch on the
  backend's stream (:mod:`nixl_nvlink._devices`) plus one event record; ``poll`` is an event
  query. WRITE pushes (the kernel runs on the local GPU and stores to the peer's memory), READ
  pulls.
- **Notifications** go over the core's :class:`~nixl_core.notif_socket.NotifSocket`, sent once
  the transfer's event has completed (:mod:`nixl_nvlink._notifier`), so the data is visible
  before the notification arrives.
- **Stream order and device access.** ``req.post(stream=s)`` (the core calls
  :meth:`NvlinkBackend.post_stream`) makes the copy wait on the caller's CUDA stream on the GPU;
  ``req.completion_event()`` (:meth:`NvlinkBackend.completion_event`) gives the transfer's CUDA
  event. :meth:`NvlinkBackend.mem_view` turns descriptors resolved by
  :meth:`~nixl_core.agent.Agent.resolve` into a device array of mapped pointers for the caller's
  own kernels.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from nixl_core.backend import Availability, Backend, BackendRequest, XferOp, XferSide, XferStatus
from nixl_core.errors import (
    InvalidParamError,
    NotPostedError,
    NotSupportedError,
    TransferError,
    UnknownAgentError,
)
from nixl_core.host import local_identity
from nixl_core.memory import MemType
from nixl_core.notif_socket import NotifSocket
from nixl_core.params import Param
from nixl_nvlink._devices import Devices
from nixl_nvlink._notifier import Notifier
from nixl_nvlink._regions import LocalReg, LocalRegions, PeerRegions, RemoteReg
from nixl_nvlink._tables import Request, Tables, pointers
from nixl_nvlink._wire import ConnInfo, decode_conn, encode_conn

__all__ = ["NvlinkBackend"]

U64 = npt.NDArray[np.uint64]
_INSTALL = "pip install './plugins/nixl_nvlink[cu13]' (or [cu12], from a nixl-py clone)"


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package raises instead of answering
        return False


def _stream_handle(stream: Any) -> int:
    """The cudaStream_t of a cupy / torch / cuda.core stream, or of a raw handle."""
    if isinstance(stream, int):
        return stream
    for attr in ("ptr", "cuda_stream", "handle"):
        v = getattr(stream, attr, None)
        if v is None:
            continue
        try:
            return int(v)
        except (TypeError, ValueError):
            continue
    raise InvalidParamError(
        f"cannot use {type(stream).__name__} as a CUDA stream: pass a cupy or torch stream, a "
        "cuda.core Stream or a raw cudaStream_t int"
    )


class NvlinkBackend(Backend):
    """CUDA IPC between processes of one host; one copy kernel and one event per transfer.

    Its parameters are :attr:`param_specs` (``chunk_bytes``, ``blocks_per_sm``,
    ``device_gather``, ``host_gather_max``; each declaration says what it does, the plugin's
    README lists them with defaults and environment variables).
    """

    name = "NVLINK"
    mem_types = frozenset({MemType.VRAM, MemType.DRAM})
    supports_local = True
    supports_remote = True
    supports_notif = True
    supports_stream = True
    api_version = 2
    param_specs = (
        Param.integer(
            "chunk_bytes",
            16384,
            "descriptors longer than this are split into chunks of this size, one per warp",
            minimum=512,
            multiple_of=16,
        ),
        Param.integer(
            "blocks_per_sm",
            8,
            "the copy kernel's grid, in 256-thread blocks per multiprocessor",
            minimum=1,
            maximum=32,
        ),
        Param.boolean(
            "device_gather",
            True,
            "prepared lists keep their columns on the GPU and make gathers the table there; "
            "false: make gathers on the host and uploads the table (the create path)",
        ),
        Param.integer(
            "host_gather_max",
            1024,
            "with device_gather, make of at most this many descriptors gathers on the host into "
            "pinned staging memory, uploaded by one async copy (no kernel); 0: always on the GPU",
            minimum=0,
        ),
    )

    @classmethod
    def probe(cls) -> Availability:
        if not sys.platform.startswith("linux"):
            return Availability(False, "CUDA IPC between processes needs Linux")
        if not _findable("cupy"):
            return Availability(False, f"cupy is not installed: {_INSTALL}")
        if not (_findable("cuda.bindings") or _findable("cuda.cuda")):
            return Availability(False, f"cuda-bindings is not installed: {_INSTALL}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from nixl_nvlink import _cuda

                cu = _cuda.load()
                n = cu.device_count()
        except ImportError as exc:
            return Availability(False, f"cuda-bindings is not importable ({exc}): {_INSTALL}")
        except Exception as exc:  # no driver, no device: cupy raises its own error types
            return Availability(False, f"CUDA is not usable here: {exc}")
        if n < 1:
            return Availability(False, "no CUDA device is visible")
        return Availability(True)

    def __init__(self, agent_name: str, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(agent_name, params)
        avail = self.probe()
        if not avail:
            raise NotSupportedError(f"NVLINK is not available: {avail.reason}")
        from nixl_nvlink import _cuda

        self._cu = _cuda.load()
        self._cp: Any = self._cu.cupy
        self._kernel = self._cu.kernel()
        self._me = local_identity()
        self._peers: dict[str, ConnInfo] = {}
        self._closed = False
        self._devices = Devices(self._cu)
        self._tables = Tables(  # compiles the gather kernel
            self._cu,
            self._devices,
            self._route,
            chunk_bytes=self.params["chunk_bytes"],
            blocks_per_sm=self.params["blocks_per_sm"],
            device_gather=self.params["device_gather"],
            host_gather_max=self.params["host_gather_max"],
        )
        # Notifications: an abstract Unix datagram socket (same host, no file to clean up).
        self._notifs = NotifSocket(self.name, agent_name)
        self._addr = self._notifs.addr
        self._local = LocalRegions(self._cu, self._devices, self._addr)
        self._remote = PeerRegions(self._cu, self._devices, self.name)
        # One thread serves both sockets: notifications and the VMM fd server.
        self._notifs.start([(self._local.fd_socket, self._local.serve_fd)])
        self._notifier = Notifier(agent_name, self._event_done, self.send_notif)

    # ------------------------------------------------------------------ memory
    def register(self, mem_type: MemType, rows: U64, metas: Sequence[bytes]) -> list[Any]:
        return self._local.register(mem_type, rows)

    def deregister(self, handles: Sequence[Any]) -> None:
        self._local.deregister(handles)

    def public_data(self, handle: Any) -> bytes:
        assert isinstance(handle, LocalReg)
        return handle.blob

    # ------------------------------------------------------------------ remote agents
    def connection_info(self) -> bytes:
        return encode_conn(ConnInfo(self._me, self._addr))

    def load_remote_conn(self, peer: str, info: bytes) -> None:
        conn = decode_conn(info)
        self._me.check_peer(conn.ident, peer=peer, backend=self.name)
        self._peers[peer] = conn

    def _in_process(self, conn: ConnInfo) -> bool:
        """Whether the peer is an agent of this very process (its addresses are ours)."""
        return conn.ident.pid == self._me.pid and conn.ident.pid_ns == self._me.pid_ns

    def load_remote(
        self, peer: str, mem_type: MemType, rows: U64, blobs: Sequence[bytes]
    ) -> list[Any]:
        conn = self._peers.get(peer)
        if conn is None:
            raise UnknownAgentError(peer)
        return self._remote.load(
            peer, conn.sock_addr, self._in_process(conn), mem_type, rows, blobs
        )

    def unload_remote(self, peer: str, handles: Sequence[Any]) -> None:
        self._remote.unload(handles)

    def disconnect(self, peer: str) -> None:
        self._peers.pop(peer, None)

    # ------------------------------------------------------------------ transfers
    def _route(self, peer: str, ldevs: set[int], rdevs: set[int], host: bool) -> tuple[int, str]:
        """(GPU the kernel runs on, path) of a transfer; enables peer access it needs."""
        if peer != self.agent_name and peer not in self._peers:
            raise UnknownAgentError(peer)
        if len(ldevs) > 1:
            raise NotSupportedError(
                f"the local descriptors of one NVLINK transfer must lie on one GPU; these span "
                f"GPUs {sorted(ldevs)}: make one transfer per GPU"
            )
        if ldevs:
            dev = next(iter(ldevs))
        elif rdevs:
            dev = min(rdevs)
        else:
            dev = int(self._cp.cuda.runtime.getDevice())
        for other in rdevs:
            self._devices.enable_peer(dev, other)
        if peer == self.agent_name:
            path = "nvlink:local"
        else:
            path = "nvlink:process" if self._in_process(self._peers[peer]) else "nvlink:ipc"
        return dev, path + "+host" if host else path

    def prepare(self, op: XferOp, local: XferSide, remote: XferSide, peer: str) -> BackendRequest:
        if peer != self.agent_name and peer not in self._peers:
            raise UnknownAgentError(peer)
        return self._tables.prepare(op, local, remote, peer)

    def prep_side(self, side: XferSide, peer: str) -> Any:
        """Device addresses of a whole prepared list, kept (and uploaded) for ``make``.

        Returns None (``make`` then takes the host path, which raises the per-request error)
        for initiator lists spanning several GPUs, and with ``device_gather`` off.

        Raises:
            NotSupportedError: the list lies in a peer's DRAM.
        """
        return self._tables.prep_side(side, peer)

    def release_side(self, state: Any) -> None:
        self._tables.release_side(state)

    def prepare_indexed(
        self,
        op: XferOp,
        local_state: Any,
        local_idx: npt.NDArray[np.integer[Any]],
        remote_state: Any,
        remote_idx: npt.NDArray[np.integer[Any]],
        peer: str,
    ) -> BackendRequest:
        """The request's table, gathered from the lists' device columns by index (see
        :meth:`nixl_nvlink._tables.Tables.prepare_indexed`)."""
        return self._tables.prepare_indexed(
            op, local_state, local_idx, remote_state, remote_idx, peer
        )

    def post(self, req: BackendRequest, notif: bytes | None) -> XferStatus:
        return self._post(req, notif, None)

    def post_stream(self, req: BackendRequest, notif: bytes | None, stream: Any) -> XferStatus:
        """Post so that the copy starts after the work queued on ``stream`` (on the GPU).

        The core calls it for ``req.post(stream=...)``: the backend records an event on
        ``stream`` and its own stream waits for it, so a producer kernel and the transfer need no
        host synchronize.

        Args:
            req: the request.
            notif: the notification to send once the data is in place, or None.
            stream: a cupy, torch or cuda.core stream, or a raw cudaStream_t (int), of the GPU
                the transfer runs on.

        Raises:
            InvalidParamError: ``stream`` is none of those (names its type).
        """
        return self._post(req, notif, _stream_handle(stream))

    def _post(self, req: BackendRequest, notif: bytes | None, after: int | None) -> XferStatus:
        assert isinstance(req, Request)
        req.error = None
        dev = req.dev
        stream = self._devices.stream(dev)
        try:
            with self._cp.cuda.Device(dev):
                if after is not None:
                    if req.wait_event is None:
                        req.wait_event = self._cp.cuda.Event(block=False, disable_timing=True)
                    rt = self._cu.rt
                    rt.eventRecord(req.wait_event.ptr, after)
                    rt.streamWaitEvent(stream.ptr, req.wait_event.ptr, 0)
                if req.chunks:
                    with stream:
                        self._kernel((req.grid,), (256,), req.args)
                req.event.record(stream)
        except self._cu.rt.CUDARuntimeError as exc:
            req.error = TransferError(
                f"NVLINK {req.op.value} to {req.peer!r} could not start: {exc}", backend=self.name
            )
            return XferStatus.ERROR
        req.posted = True
        if notif is not None:
            self._notifier.add(req, notif)
        return XferStatus.IN_PROGRESS

    def _event_done(self, req: Request) -> bool:
        """Whether the request's kernel finished; a CUDA fault sets ``req.error`` and is True."""
        try:
            return bool(req.event.done)
        except self._cu.rt.CUDARuntimeError as exc:
            req.error = TransferError(
                f"NVLINK {req.op.value} with {req.peer!r} failed on GPU {req.dev}: {exc}",
                backend=self.name,
            )
            return True

    def poll(self, req: BackendRequest) -> XferStatus:
        assert isinstance(req, Request)
        if not req.posted:
            return XferStatus.ERROR if req.error else XferStatus.PENDING
        if not self._event_done(req):
            return XferStatus.IN_PROGRESS
        if req.notif is not None:
            self._notifier.flush(req)
        return XferStatus.ERROR if req.error is not None else XferStatus.DONE

    def block(self, req: BackendRequest, timeout: float) -> None:
        assert isinstance(req, Request)
        if not req.posted:
            return
        # Spin on the event (yielding the GIL) for the first 200 us, then sleep in 50 us steps:
        # small transfers finish in microseconds, and a poll-only API must not add a millisecond.
        start = time.perf_counter()
        deadline = start + timeout
        while not self._event_done(req):
            now = time.perf_counter()
            if now >= deadline:
                return
            time.sleep(0 if now - start < 2e-4 else 5e-5)

    def release(self, req: BackendRequest) -> None:
        assert isinstance(req, Request)
        if req.posted and req.event is not None and not self._event_done(req):
            # A launched kernel cannot be aborted; it ends within the transfer's duration.
            with contextlib.suppress(Exception):
                req.event.synchronize()
        elif (req.keep or req.staged) and not req.posted:
            # Never posted: its gather kernel may still be queued; its arrays go back to the
            # memory pool only after it ran.
            with contextlib.suppress(Exception):
                self._devices.stream(req.dev).synchronize()
        if req.notif is not None:
            self._notifier.flush(req)
        req.table = None
        req.keep = ()
        req.posted = False

    def completion_event(self, req: BackendRequest) -> Any:
        """The CUDA event (a ``cupy.cuda.Event``) that completes with the request's last post.

        The core calls it for ``req.completion_event()``. Make a stream wait on it
        (``stream.wait_event(ev)``) to consume the data on the GPU without a host round trip.

        Raises:
            NotPostedError: the request's post failed before the copy was queued (no event
                was recorded).
        """
        assert isinstance(req, Request)
        if not req.posted:
            raise NotPostedError(
                f"NVLINK {req.op.value} to {req.peer!r} was not queued (its post failed): it has "
                "no completion event"
            )
        return req.event

    # ------------------------------------------------------------------ device-side access
    def mem_view(self, side: XferSide, *, device: int | None = None) -> Any:
        """A device array (cupy, uint64) of pointers to a side's descriptors, for kernels on
        ``device``.

        Pass ``agent.resolve(peer, descs, "VRAM", backend="NVLINK")``: ``peer`` is a remote
        agent whose metadata was loaded (its regions are mapped here through CUDA IPC), or
        ``""`` / this agent's name for its own memory (its registered DRAM too). Element ``i``
        is the device address of descriptor ``i``'s first byte; descriptor ``i`` may be read or
        written for its length. The view stays valid until the peer's metadata is removed or
        the regions are deregistered.

        Args:
            side: the descriptors, resolved to NVLINK's registrations by the agent.
            device: the GPU whose kernels use the pointers (default: the current one); peer
                access to the GPUs holding the memory is enabled from it.

        Raises:
            InvalidParamError: ``side`` was resolved for another backend.
            NotSupportedError: a peer's DRAM (not mappable into this process), or GPUs without
                peer access (names both).
        """
        if not all(isinstance(h, LocalReg | RemoteReg) for h in side.slot_handles.values()):
            raise InvalidParamError(
                "mem_view needs descriptors resolved for NVLINK: pass "
                "agent.resolve(peer, descs, 'VRAM', backend='NVLINK')"
            )
        ptrs, devs, _ = pointers(side, "mem_view")
        if device is None:
            device = int(self._cp.cuda.runtime.getDevice())
        for other in devs:
            self._devices.enable_peer(device, other)
        with self._cp.cuda.Device(device):
            return self._cp.asarray(ptrs)

    # ------------------------------------------------------------------ notifications
    def send_notif(self, peer: str, msg: bytes) -> None:
        if peer == self.agent_name:
            self._notifs.send(peer, b"", msg)
            return
        conn = self._peers.get(peer)
        if conn is None:
            raise UnknownAgentError(peer)
        self._notifs.send(peer, conn.sock_addr, msg)

    def get_notifs(self) -> list[tuple[str, bytes]]:
        return self._notifs.take()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._notifier.close()
        self._devices.sync_all()
        self._remote.close()
        self._notifs.close()
        self._local.close()
        self._tables.close()
