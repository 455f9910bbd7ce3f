"""NVLINK: GPU memory of processes on one host, moved by one copy kernel per transfer.

How it works:

- **Registration.** A VRAM region's public data is the legacy CUDA IPC handle of the allocation
  that contains it, plus the allocation's base and size and the region's offset in it (PyTorch's
  caching allocator hands out tensors inside larger allocations). The allocation comes from the
  driver (``cuMemGetAddressRange``). VMM allocations (``cuMemCreate``, PyTorch's
  ``expandable_segments``) have no legacy IPC handle: their region blob lists the allocations
  (chunks) mapped back to back under it, each exported as a POSIX fd that the backend serves to
  peers over its own Unix stream socket (SCM_RIGHTS); the importer maps them into one reserved
  range (cuMemImportFromShareableHandle, cuMemMap, cuMemSetAccess). VMM memory created without
  the POSIX fd handle type raises :class:`~nixl_core.errors.NotSupportedError` naming the fix.
  DRAM is pinned and mapped for every GPU (``cudaHostRegister``), so the same kernel moves
  DRAM <-> VRAM; a peer's DRAM cannot be mapped into this process and is refused with a reason.
- **Remote load.** Each peer allocation is mapped once (``cudaIpcOpenMemHandle``) and cached;
  a region's device address here is its address in the peer plus one offset per allocation.
  Connection info carries the host identity (boot id and hostname): a peer on another host is
  refused with a message that says to use UCX.
- **Transfers.** ``prepare`` turns both sides into (source, destination, length) arrays with
  numpy (one offset per registration, no Python loop per descriptor), splits long descriptors
  into chunks, and uploads the table to the GPU once. ``post`` is one kernel launch on the
  backend's stream plus one event record; ``poll`` is an event query. WRITE pushes (the kernel
  runs on the local GPU and stores to the peer's memory), READ pulls.
- **Notifications** go over a Unix datagram socket the backend owns, sent once the transfer's
  event has completed (by whichever of ``poll`` or the backend's notifier thread sees it first),
  so the data is visible before the notification arrives.
- **Prepared lists on the GPU.** ``prep`` lists keep a device-resident copy of their pointer
  (and length) columns (:meth:`NvlinkBackend.prep_side`, built on the first ``make``); ``make``
  uploads only the request's index arrays (int32) and one gather kernel writes the table on the
  backend's stream (:meth:`NvlinkBackend.prepare_indexed`). Lists with descriptors longer than
  ``chunk_bytes`` gather on the host (they are few) and upload the chunked table.
- **Stream order and device access**: ``req.post(stream=s)`` makes the copy wait on the caller's
  CUDA stream on the GPU, ``req.completion_event()`` gives the transfer's CUDA event; the backend
  also offers :meth:`NvlinkBackend.stream_order` / :meth:`post_after` (the same, for code that
  posts through other layers) and :meth:`mem_view`, a device array of mapped pointers for the
  caller's own kernels.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import logging
import os
import socket
import struct
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from nixl_core.backend import Availability, Backend, BackendRequest, XferOp, XferSide, XferStatus
from nixl_core.descriptors import as_descs
from nixl_core.errors import (
    InvalidDescriptorError,
    InvalidParamError,
    MetadataError,
    NixlError,
    NotSupportedError,
    RegistrationError,
    TransferError,
    UnknownAgentError,
)
from nixl_core.memory import MemType
from nixl_core.notif_socket import NotifSocket
from nixl_core.xfer import XferRequest
from nixl_nvlink._wire import (
    KIND_DEVICE,
    KIND_HOST,
    KIND_VMM,
    ConnInfo,
    RegionBlob,
    decode_conn,
    decode_region,
    encode_conn,
    encode_region,
)

__all__ = ["NvlinkBackend"]

logger = logging.getLogger(__name__)

U64 = npt.NDArray[np.uint64]
_MASK = (1 << 64) - 1
_CUDA_MEMORY_TYPE_DEVICE = 2
_INIT_NAMES = ("", "NIXL_INIT_AGENT")

# Peer allocations mapped into this process, shared by every NVLINK agent of the process (a
# CUDA IPC handle is opened once per process): key (IPC handle, or the VMM span's identity) ->
# [mapped base, references, unmap function].
_MAPS: dict[bytes, list[Any]] = {}
_MAPS_LOCK = threading.Lock()

VMM_HINT = (
    "it lies in a CUDA VMM allocation (cuMemCreate; PyTorch's expandable_segments allocator "
    "makes these) created without the POSIX file-descriptor handle type (requestedHandleTypes "
    "= {types}), so NVLINK cannot share it with other processes (it passes such allocations as "
    "POSIX fds over a Unix socket). Fix: create it with requestedHandleTypes including "
    "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, or allocate it with cudaMalloc (PyTorch: set "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False before CUDA starts), or register it with "
    "the UCX backend only (register(..., backends=['UCX']))"
)
_FD_MAGIC = b"NVF1"
#: Pinned staging buffers per GPU for make()'s uploads (a ring: a slot is rewritten only once
#: the copy that read it has run).
_STAGE_SLOTS = 8
_MEMCPY_H2D = 1


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package raises instead of answering
        return False


def _host_identity() -> tuple[bytes, str]:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
    except OSError:
        boot = b""
    return boot, socket.gethostname()


class _LocalReg:
    """A region of this process. ``delta`` turns its addresses into device addresses."""

    __slots__ = ("addr", "blob", "delta", "dev", "exports", "host", "length", "pinned")

    def __init__(
        self, addr: int, length: int, dev: int, host: bool, delta: int, pinned: bool, blob: bytes
    ) -> None:
        self.addr = addr
        self.length = length
        self.dev = dev  # GPU ordinal; -1 for DRAM
        self.host = host
        self.delta = delta
        self.pinned = pinned  # this backend pinned it (and unpins it)
        self.blob = blob
        self.exports: tuple[int, ...] = ()  # VMM chunk bases whose fds this region holds


class _Export:
    """A VMM allocation of this process exported as a POSIX fd, served to peers by id."""

    __slots__ = ("aid", "fd", "refs", "size")

    def __init__(self, aid: int, fd: int, size: int) -> None:
        self.aid = aid
        self.fd = fd
        self.size = size
        self.refs = 0


class _Stage:
    """A pinned host buffer make() writes into and one async copy reads from."""

    __slots__ = ("event", "host", "mem", "nbytes", "ptr")

    def __init__(self, cp: Any, nbytes: int) -> None:
        self.mem = cp.cuda.alloc_pinned_memory(nbytes)
        self.ptr = int(self.mem.ptr)
        self.nbytes = nbytes
        self.host = np.frombuffer(self.mem, np.uint8, nbytes)
        self.event = cp.cuda.Event(block=False, disable_timing=True)


class _RemoteReg:
    """A peer's region as this process reaches it (``delta`` added to its peer address)."""

    __slots__ = ("addr", "delta", "dev", "host", "key", "length", "peer")

    def __init__(
        self, peer: str, addr: int, length: int, host: bool, dev: int, delta: int, key: bytes
    ) -> None:
        self.peer = peer
        self.addr = addr
        self.length = length
        self.host = host
        self.dev = dev  # local ordinal of the GPU holding it; -1 for host memory
        self.delta = delta
        self.key = key  # IPC handle of the mapped allocation; b"" when not mapped


_Reg = _LocalReg | _RemoteReg


class _SideState:
    """A prepared list as NVLINK keeps it (:meth:`NvlinkBackend.prep_side`).

    ``ptrs`` are device addresses (peer addresses already mapped into this process); ``lens`` is
    None when every descriptor has length ``ulen``. ``cols`` holds, per GPU, the device copy
    (rows: pointers, then lengths when they differ), uploaded on the backend's stream of that GPU.
    """

    __slots__ = ("cols", "devs", "host", "lens", "max_len", "ptrs", "ulen")

    def __init__(
        self, ptrs: U64, lens: U64 | None, ulen: int, max_len: int, devs: set[int], host: bool
    ) -> None:
        self.ptrs = ptrs
        self.lens = lens
        self.ulen = ulen
        self.max_len = max_len
        self.devs = devs
        self.host = host
        self.cols: dict[int, Any] = {}


class _Request(BackendRequest):
    __slots__ = (
        "args",
        "chunks",
        "dev",
        "event",
        "grid",
        "keep",
        "notif",
        "op",
        "peer",
        "posted",
        "staged",
        "table",
        "wait_event",
    )

    def __init__(self, op: XferOp, peer: str, dev: int, path: str) -> None:
        self.op = op
        self.peer = peer
        self.dev = dev
        self.path = path
        self.error = None
        self.table: Any = None  # (3, chunks) uint64 on the GPU: src, dst, len
        self.args: tuple[Any, ...] = ()
        self.chunks = 0
        self.grid = 1
        self.event: Any = None
        self.wait_event: Any = None
        self.notif: bytes | None = None
        self.posted = False
        self.keep: tuple[Any, ...] = ()  # device arrays the gather kernel reads
        self.staged = False  # its table comes from an async copy out of a staging buffer


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

    Params:
        chunk_bytes: descriptors longer than this are split into chunks of this size, one per
            warp (default 16384; a multiple of 16, at least 512).
        blocks_per_sm: the copy kernel's grid, in 256-thread blocks per multiprocessor
            (default 8).
        device_gather: "1" (default): prepared lists keep their columns on the GPU and ``make``
            gathers the table there; "0": ``make`` gathers on the host and uploads the table
            (the path of ``create``; for comparisons).
        host_gather_max: with device_gather, requests of at most this many descriptors gather
            on the host into a pinned staging buffer and reach the GPU by one async copy (no
            kernel launch); larger ones upload their indices the same way and gather on the GPU
            (default 1024; 0: always on the GPU).
    """

    name = "NVLINK"
    mem_types = frozenset({MemType.VRAM, MemType.DRAM})
    supports_local = True
    supports_remote = True
    supports_notif = True
    supports_stream = True
    default_params: ClassVar[Mapping[str, str]] = {
        "chunk_bytes": "16384",
        "blocks_per_sm": "8",
        "device_gather": "1",
        "host_gather_max": "1024",
    }
    install_hint = "pip install 'nixl-nvlink[cu13]'  (or [cu12])"

    @classmethod
    def probe(cls) -> Availability:
        if not sys.platform.startswith("linux"):
            return Availability(False, "CUDA IPC between processes needs Linux")
        if not _findable("cupy"):
            return Availability(
                False, "cupy is not installed: pip install 'nixl-nvlink[cu13]' (or [cu12])"
            )
        if not (_findable("cuda.bindings") or _findable("cuda.cuda")):
            return Availability(
                False, "cuda-bindings is not installed: pip install 'nixl-nvlink[cu13]' (or [cu12])"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from nixl_nvlink import _cuda

                cu = _cuda.load()
                n = cu.device_count()
        except ImportError as exc:
            return Availability(
                False,
                f"cuda-bindings is not importable ({exc}): pip install 'nixl-nvlink[cu13]' "
                "(or [cu12])",
            )
        except Exception as exc:  # no driver, no device: cupy raises its own error types
            return Availability(False, f"CUDA is not usable here: {exc}")
        if n < 1:
            return Availability(False, "no CUDA device is visible")
        return Availability(True)

    def __init__(self, agent_name: str, params: Mapping[str, Any]) -> None:
        super().__init__(agent_name, params)
        try:
            self._chunk = int(params.get("chunk_bytes", 16384))
            self._per_sm = int(params.get("blocks_per_sm", 8))
            self._device_gather = str(params.get("device_gather", "1")).strip() not in ("0", "")
            self._host_gather_max = int(params.get("host_gather_max", 1024))
        except (TypeError, ValueError) as exc:
            raise InvalidParamError(f"NVLINK params: {exc}") from exc
        if not 1 <= self._per_sm <= 32:
            raise InvalidParamError(f"NVLINK blocks_per_sm must be 1..32, got {self._per_sm}")
        if self._chunk < 512 or self._chunk % 16:
            raise InvalidParamError(
                f"NVLINK chunk_bytes must be a multiple of 16 and >= 512, got {self._chunk}"
            )
        avail = self.probe()
        if not avail:
            raise NotSupportedError(f"NVLINK is not available: {avail.reason}")
        from nixl_nvlink import _cuda

        self._cu = _cuda.load()
        self._cp: Any = self._cu.cupy
        self._kernel = self._cu.kernel()
        self._gather = self._cu.gather_kernel()
        self._pid = os.getpid()
        self._boot, self._host = _host_identity()
        self._streams: dict[int, Any] = {}
        self._peer_enabled: set[tuple[int, int]] = set()
        self._mapped: collections.Counter[bytes] = collections.Counter()  # our references
        self._local_regs: dict[int, _LocalReg] = {}
        self._remote_regs: dict[str, list[_RemoteReg]] = {}
        self._peers: dict[str, ConnInfo] = {}
        self._tls = threading.local()
        self._lock = threading.RLock()
        self._closed = False
        # Notifications: an abstract Unix datagram socket (same host, no file to clean up).
        self._notifs = NotifSocket(self.name, agent_name)
        self._addr = self._notifs.addr
        # VMM exports: a stream socket next to the datagram one serves their POSIX fds.
        self._exports: dict[int, _Export] = {}  # chunk base -> export
        self._fds: dict[int, int] = {}  # allocation id -> fd
        self._next_aid = 1
        self._fds_lock = threading.Lock()
        self._fdsrv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._fdsrv.bind(self._addr + b"-fd")
        self._fdsrv.listen(64)
        self._fdsrv.setblocking(False)
        self._stages: dict[int, list[_Stage]] = {}
        self._stage_next: dict[int, int] = {}
        self._stage_lock = threading.Lock()
        self._notifs.start([(self._fdsrv, self._serve_fd)])  # one thread serves both sockets
        # Posted requests whose notification waits for their event: the notifier thread sends
        # it when nobody polls (poll sends it first when someone does).
        self._nlock = threading.Condition()
        self._pending: dict[int, _Request] = {}
        self._notifier = threading.Thread(
            target=self._notify_loop, name=f"nixl-nvlink-notif-{agent_name}", daemon=True
        )
        self._notifier.start()

    # ------------------------------------------------------------------ helpers
    def _stream(self, dev: int) -> Any:
        s = self._streams.get(dev)
        if s is None:
            with self._cp.cuda.Device(dev):
                s = self._cp.cuda.Stream(non_blocking=True)
            self._streams[dev] = s
        return s

    def _sync_all(self) -> None:
        for s in self._streams.values():
            with contextlib.suppress(Exception):  # a faulted context: nothing left to wait for
                s.synchronize()

    def _enable_peer(self, dev: int, other: int) -> None:
        if dev == other or other < 0 or (dev, other) in self._peer_enabled:
            return
        try:
            self._cu.enable_peer(dev, other)
        except self._cu.rt.CUDARuntimeError as exc:
            raise NotSupportedError(
                f"GPU {dev} cannot access GPU {other} directly (peer access: {exc}); NVLINK needs "
                "peer-capable GPUs (NVLink or PCIe P2P); use UCX between them"
            ) from exc
        self._peer_enabled.add((dev, other))

    # ------------------------------------------------------------------ memory
    def register(self, mem_type: MemType, rows: U64, metas: Sequence[bytes]) -> list[Any]:
        out: list[_LocalReg] = []
        try:
            for i, (addr, length, dev) in enumerate(rows.tolist()):
                if mem_type is MemType.VRAM:
                    reg = self._register_vram(i, addr, length, dev)
                else:
                    reg = self._register_dram(i, addr, length)
                out.append(reg)
                self._local_regs[id(reg)] = reg
        except BaseException:
            self.deregister(out)
            raise
        return list(out)

    def _register_vram(self, i: int, addr: int, length: int, dev: int) -> _LocalReg:
        cu = self._cu
        where = f"VRAM region {i} [addr=0x{addr:x}, len={length}, dev={dev}]"
        if not 0 <= dev < cu.device_count():
            raise RegistrationError(f"{where}: no CUDA device {dev} is visible", index=i)
        with self._cp.cuda.Device(dev):
            try:
                kind, owner = cu.pointer_device(addr)
            except cu.rt.CUDARuntimeError as exc:
                raise RegistrationError(f"{where} is not CUDA memory: {exc}", index=i) from exc
            if kind != _CUDA_MEMORY_TYPE_DEVICE:
                raise RegistrationError(
                    f"{where} is not device memory (cudaMemoryType {kind}; managed and host "
                    "memory cannot be shared over CUDA IPC)",
                    index=i,
                )
            if owner != dev:
                raise RegistrationError(f"{where} lives on GPU {owner}, not GPU {dev}", index=i)
            if cu.legacy_ipc_capable(addr) is False:
                return self._register_vmm(i, addr, length, dev, where)
            try:
                base, size = cu.alloc_range(addr)
            except Exception as exc:
                raise RegistrationError(f"{where}: cuMemGetAddressRange: {exc}", index=i) from exc
            if addr + length > base + size:
                raise RegistrationError(
                    f"{where} runs past the end of its CUDA allocation [0x{base:x}, +{size}): "
                    "register each allocation separately",
                    index=i,
                )
            try:
                handle = cu.ipc_handle(base)
            except cu.rt.CUDARuntimeError as exc:
                raise RegistrationError(
                    f"{where}: cudaIpcGetMemHandle failed: {exc}", index=i
                ) from exc
        blob = encode_region(
            RegionBlob(KIND_DEVICE, cu.uuid_of(dev), base, size, addr - base, handle)
        )
        return _LocalReg(addr, length, dev, False, 0, False, blob)

    def _vmm(self) -> Any:
        from nixl_nvlink import _cuda

        return _cuda.vmm()

    def _register_vmm(self, i: int, addr: int, length: int, dev: int, where: str) -> _LocalReg:
        """A VMM region: export every allocation mapped under it (current device: ``dev``)."""
        from nixl_nvlink._cuda import HANDLE_POSIX_FD, CudaCallError

        vmm = self._vmm()
        chunks: list[tuple[int, int, int]] = []  # (chunk base, size, allocation id)
        p, end = addr, addr + max(length, 1)
        try:
            while p < end:
                try:
                    base, size = self._cu.alloc_range(p)
                except Exception as exc:
                    raise RegistrationError(
                        f"{where}: cuMemGetAddressRange at 0x{p:x}: {exc}", index=i
                    ) from exc
                if chunks and base != p:
                    raise RegistrationError(
                        f"{where}: its VMM mappings are not contiguous at 0x{p:x}; register "
                        "each mapped range separately",
                        index=i,
                    )
                h = vmm.retain(p)
                if h is None:
                    raise RegistrationError(
                        f"{where}: the driver says it cannot be exported as a CUDA IPC handle, "
                        "and it is no VMM allocation either",
                        index=i,
                    )
                try:
                    types = vmm.handle_types(h)
                    if not types & HANDLE_POSIX_FD:
                        raise NotSupportedError(
                            f"cannot register {where} with NVLINK: {VMM_HINT.format(types=types)}"
                        )
                    chunks.append((base, size, self._export(base, size, h)))
                except CudaCallError as exc:
                    raise NotSupportedError(
                        f"cannot register {where} with NVLINK: exporting its VMM allocation as a "
                        f"POSIX fd failed ({exc}); allocate it with cudaMalloc (PyTorch: "
                        "expandable_segments:False) or register it with UCX only"
                    ) from exc
                finally:
                    with contextlib.suppress(Exception):
                        vmm.release(h)
                p = base + size
        except BaseException:
            self._unexport(tuple(c[0] for c in chunks))
            raise
        span = chunks[0][0]
        blob = encode_region(
            RegionBlob(
                KIND_VMM,
                self._cu.uuid_of(dev),
                span,
                p - span,
                addr - span,
                b"",
                tuple((b - span, n, aid) for b, n, aid in chunks),
            )
        )
        reg = _LocalReg(addr, length, dev, False, 0, False, blob)
        reg.exports = tuple(c[0] for c in chunks)
        return reg

    def _export(self, base: int, size: int, handle: int) -> int:
        """The allocation id of the VMM chunk at ``base`` (exported once, reference counted)."""
        with self._fds_lock:
            ex = self._exports.get(base)
            if ex is None or ex.size != size:
                if ex is not None:  # a stale export of a freed allocation at the same address
                    self._fds.pop(ex.aid, None)
                    os.close(ex.fd)
                fd = self._vmm().export_fd(handle)
                ex = self._exports[base] = _Export(self._next_aid, fd, size)
                self._fds[ex.aid] = fd
                self._next_aid += 1
            ex.refs += 1
            return ex.aid

    def _unexport(self, bases: Sequence[int]) -> None:
        with self._fds_lock:
            for base in bases:
                ex = self._exports.get(base)
                if ex is None:
                    continue
                ex.refs -= 1
                if ex.refs <= 0:
                    del self._exports[base]
                    self._fds.pop(ex.aid, None)
                    with contextlib.suppress(OSError):
                        os.close(ex.fd)

    def _register_dram(self, i: int, addr: int, length: int) -> _LocalReg:
        blob = encode_region(RegionBlob(KIND_HOST))
        if length == 0:
            return _LocalReg(addr, length, -1, True, 0, False, blob)
        cu = self._cu
        try:
            pinned = cu.host_register(addr, length)
            delta = cu.host_device_pointer(addr) - addr
        except Exception as exc:
            raise RegistrationError(
                f"DRAM region {i} [addr=0x{addr:x}, len={length}]: cannot pin and map it for "
                f"the GPU: {exc}",
                index=i,
            ) from exc
        return _LocalReg(addr, length, -1, True, delta, pinned, blob)

    def deregister(self, handles: Sequence[Any]) -> None:
        if not handles:
            return
        self._sync_all()  # no kernel may still read or write what is released
        for h in handles:
            self._local_regs.pop(id(h), None)
            if isinstance(h, _LocalReg) and h.pinned:
                with contextlib.suppress(Exception):
                    self._cu.host_unregister(h.addr)
                h.pinned = False
            if isinstance(h, _LocalReg) and h.exports:
                self._unexport(h.exports)
                h.exports = ()

    def public_data(self, handle: Any) -> bytes:
        assert isinstance(handle, _LocalReg)
        return handle.blob

    # ------------------------------------------------------------------ remote agents
    def connection_info(self) -> bytes:
        return encode_conn(ConnInfo(self._pid, self._boot, self._host, self._addr))

    def load_remote_conn(self, peer: str, info: bytes) -> None:
        conn = decode_conn(info)
        if conn.boot_id != self._boot or conn.hostname != self._host:
            raise NotSupportedError(
                f"agent {peer!r} runs on host {conn.hostname!r}, not on this one ({self._host!r}): "
                "NVLINK (CUDA IPC) reaches processes of the same host only; use the UCX backend "
                "for agents on other hosts"
            )
        self._peers[peer] = conn

    def _open_ipc(self, key: bytes, dev: int, where: str) -> tuple[int, Callable[[], None]]:
        try:
            base = self._cu.ipc_open(key)
        except self._cu.rt.CUDARuntimeError as exc:
            raise TransferError(
                f"cannot map {where} (cudaIpcOpenMemHandle: {exc}); the peer must be "
                "a process of this host that shares its IPC and pid namespaces with "
                "this one",
                backend=self.name,
            ) from exc
        return base, lambda: self._cu.ipc_close(base)

    def _fetch_fd(self, conn: ConnInfo, aid: int, where: str) -> int:
        """The POSIX fd of a peer's VMM allocation ``aid``, received over its fd socket."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10.0)
                s.connect(conn.sock_addr + b"-fd")
                s.sendall(_FD_MAGIC + struct.pack("<Q", aid))
                msg, fds, _, _ = socket.recv_fds(s, 1, 1)
        except OSError as exc:
            raise TransferError(
                f"cannot map {where}: fetching the fd of its VMM allocation from the peer "
                f"failed ({exc})",
                backend=self.name,
            ) from exc
        if msg != b"\0" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise TransferError(
                f"cannot map {where}: the peer did not hand over the fd of its VMM allocation "
                f"{aid} (deregistered, or another user)",
                backend=self.name,
            )
        return fds[0]

    def _open_vmm(
        self, conn: ConnInfo, b: RegionBlob, dev: int, where: str
    ) -> tuple[int, Callable[[], None]]:
        """Import a peer's VMM span: one reserved range, each chunk mapped at its offset."""
        from nixl_nvlink._cuda import CudaCallError

        vmm = self._vmm()
        self._cu.rt.free(0)  # the device's context exists and is current (driver calls below)
        handles: list[tuple[int, int, int]] = []
        try:
            for off, size, aid in b.chunks:
                fd = self._fetch_fd(conn, aid, where)
                try:
                    handles.append((off, size, vmm.import_fd(fd)))
                finally:
                    os.close(fd)
            devs = [dev] + [
                d
                for d in range(self._cu.device_count())
                if d != dev and self._cu.rt.deviceCanAccessPeer(d, dev)
            ]
            va = vmm.map_chunks(handles, b.alloc_size, devs)
        except CudaCallError as exc:
            raise TransferError(
                f"cannot map {where} (VMM import: {exc})", backend=self.name
            ) from exc
        finally:
            for _, _, h in handles:  # the mappings keep the allocations alive
                with contextlib.suppress(Exception):
                    vmm.release(h)
        size = b.alloc_size
        return va, lambda: vmm.unmap(va, size)

    def _map(self, key: bytes, dev: int, where: str, opener: Callable[[], tuple[int, Any]]) -> int:
        with _MAPS_LOCK:
            entry = _MAPS.get(key)
            if entry is None:
                with self._cp.cuda.Device(dev):
                    base, close = opener()
                entry = _MAPS[key] = [base, 0, close, dev]
            entry[1] += 1
        self._mapped[key] += 1
        return int(entry[0])

    def _unmap(self, key: bytes) -> None:
        if self._mapped[key] <= 0:
            return
        self._mapped[key] -= 1
        with _MAPS_LOCK:
            entry = _MAPS.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del _MAPS[key]
                with contextlib.suppress(Exception), self._cp.cuda.Device(entry[3]):
                    entry[2]()

    def load_remote(
        self, peer: str, mem_type: MemType, rows: U64, blobs: Sequence[bytes]
    ) -> list[Any]:
        conn = self._peers.get(peer)
        if conn is None:
            raise UnknownAgentError(peer)
        out: list[_RemoteReg] = []
        try:
            for i, ((addr, length, _dev), raw) in enumerate(zip(rows.tolist(), blobs, strict=True)):
                b = decode_region(raw, i)
                where = f"agent {peer!r}'s {mem_type.value} region {i} [addr=0x{addr:x}]"
                if b.is_host:
                    out.append(_RemoteReg(peer, addr, length, True, -1, 0, b""))
                    continue
                if mem_type is not MemType.VRAM:
                    raise MetadataError(f"{where} carries a GPU blob for {mem_type.value} memory")
                if b.alloc_base + b.offset != addr or b.offset + length > b.alloc_size:
                    raise MetadataError(
                        f"{where}: its blob places it at 0x{b.alloc_base + b.offset:x} in a "
                        f"{b.alloc_size}-byte allocation, which does not hold it"
                    )
                dev = self._cu.ordinal_of(b.uuid)
                if dev < 0:
                    raise NotSupportedError(
                        f"{where} is on a GPU this process cannot see (uuid {b.uuid.hex()}); "
                        "make it visible (CUDA_VISIBLE_DEVICES) or use UCX"
                    )
                if conn.pid == self._pid:  # an agent of this very process: same addresses
                    out.append(_RemoteReg(peer, addr, length, False, dev, 0, b""))
                    continue
                if b.kind == KIND_VMM:
                    key = (
                        b"VMM"
                        + conn.sock_addr
                        + struct.pack(f"<{len(b.chunks)}Q", *(c[2] for c in b.chunks))
                    )
                    opener: Callable[[], tuple[int, Any]] = functools.partial(
                        self._open_vmm, conn, b, dev, where
                    )
                else:
                    key = b.ipc_handle
                    opener = functools.partial(self._open_ipc, key, dev, where)
                mapped = self._map(key, dev, where, opener)
                out.append(_RemoteReg(peer, addr, length, False, dev, mapped - b.alloc_base, key))
        except BaseException:
            for r in out:
                if r.key:
                    self._unmap(r.key)
            raise
        self._remote_regs.setdefault(peer, []).extend(out)
        return list(out)

    def unload_remote(self, peer: str, handles: Sequence[Any]) -> None:
        if not handles:
            return
        self._sync_all()
        gone = {id(h) for h in handles}
        regs = self._remote_regs.get(peer)
        if regs is not None:
            self._remote_regs[peer] = [r for r in regs if id(r) not in gone]
        for h in handles:
            if isinstance(h, _RemoteReg) and h.key:
                self._unmap(h.key)
                h.key = b""

    def disconnect(self, peer: str) -> None:
        self._peers.pop(peer, None)
        self._remote_regs.pop(peer, None)

    # ------------------------------------------------------------------ transfers
    def _pointers(self, side: XferSide, what: str) -> tuple[U64, set[int], bool]:
        """(device addresses, GPUs holding them, whether any is host memory), vectorized."""
        if side.single_slot >= 0:
            inv = None
            hs: list[_Reg] = [side.slot_handles[side.single_slot]]
        else:
            inv, hs = side.unique_handles()
        for h in hs:
            if isinstance(h, _RemoteReg) and h.host:
                raise NotSupportedError(
                    f"{what} descriptors lie in agent {h.peer!r}'s DRAM, which NVLINK cannot map "
                    "into this process (CUDA IPC shares GPU memory only); use UCX or LOOPBACK "
                    "for DRAM <-> DRAM between processes"
                )
        deltas = np.fromiter((h.delta & _MASK for h in hs), np.uint64, len(hs))
        addrs = np.asarray(side.addrs, np.uint64)
        ptrs = addrs + (deltas[0] if inv is None else deltas[inv])
        devs = {h.dev for h in hs if h.dev >= 0}
        return ptrs, devs, any(h.host for h in hs)

    def _chunks(self, src: U64, dst: U64, lens: U64, max_len: int) -> tuple[U64, U64, U64]:
        chunk = self._chunk
        if max_len <= chunk:
            return src, dst, lens
        c = np.uint64(chunk)
        pieces = (lens + (c - np.uint64(1))) // c
        owner = np.repeat(np.arange(lens.size), pieces.astype(np.int64))
        first = np.cumsum(pieces) - pieces
        off = (np.arange(owner.size, dtype=np.uint64) - first[owner]) * c
        return src[owner] + off, dst[owner] + off, np.minimum(lens[owner] - off, c)

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
            self._enable_peer(dev, other)
        if peer == self.agent_name:
            path = "nvlink:local"
        else:
            path = "nvlink:ipc" if self._peers[peer].pid != self._pid else "nvlink:process"
        return dev, path + "+host" if host else path

    def _finish(self, req: _Request, d_table: Any, m: int, row: int = 0) -> _Request:
        """Point the copy kernel's arguments at a (3, max(m, 1)) device table (or at a buffer
        whose rows of ``row`` bytes start with the table)."""
        base = int(d_table.data.ptr)
        row = row or int(d_table.shape[1]) * 8
        req.table = d_table
        req.chunks = m
        req.args = (
            np.uint64(base),
            np.uint64(base + row),
            np.uint64(base + 2 * row),
            np.int64(m),
        )
        req.grid = self._cu.grid_for(req.dev, m, self._per_sm)
        return req

    def _host_table(self, req: _Request, src: U64, dst: U64, lens: U64, max_len: int) -> _Request:
        """Chunk a table built on the host and upload it (``create``, and long descriptors)."""
        src, dst, lens = self._chunks(src, dst, lens, max_len)
        m = int(lens.size)
        table = np.empty((3, max(m, 1)), np.uint64)
        table[0, :m] = src
        table[1, :m] = dst
        table[2, :m] = lens
        stream = self._stream(req.dev)
        with self._cp.cuda.Device(req.dev):
            d_table = self._cp.empty(table.shape, self._cp.uint64)
            d_table.set(table, stream=stream)
            stream.synchronize()
            req.event = self._cp.cuda.Event(block=False, disable_timing=True)
        return self._finish(req, d_table, m)

    def prepare(self, op: XferOp, local: XferSide, remote: XferSide, peer: str) -> BackendRequest:
        if peer != self.agent_name and peer not in self._peers:
            raise UnknownAgentError(peer)
        lptr, ldevs, lhost = self._pointers(local, "local")
        rptr, rdevs, rhost = self._pointers(remote, "remote")
        dev, path = self._route(peer, ldevs, rdevs, lhost or rhost)
        n = len(local)
        if local.uniform_len >= 0:
            max_len = local.uniform_len
            lens = np.full(n, local.uniform_len, np.uint64)
        else:
            lens = np.ascontiguousarray(local.lengths, np.uint64)
            max_len = int(lens.max()) if n else 0
        src, dst = (lptr, rptr) if op is XferOp.WRITE else (rptr, lptr)
        return self._host_table(_Request(op, peer, dev, path), src, dst, lens, max_len)

    # ------------------------------------------------------------------ prepared lists
    def prep_side(self, side: XferSide, peer: str) -> Any:
        """Device addresses of a whole prepared list, kept (and uploaded) for ``make``.

        Returns None (``make`` then takes the host path, which raises the per-request error)
        for initiator lists spanning several GPUs. A peer's DRAM raises NotSupportedError.
        """
        if not self._device_gather:
            return None
        ptrs, devs, host = self._pointers(side, "local" if peer in _INIT_NAMES else "remote")
        if peer in _INIT_NAMES and len(devs) > 1:
            return None
        n = len(side)
        lens: U64 | None = None
        if side.uniform_len >= 0:
            ulen = max_len = side.uniform_len
        else:
            lens = np.ascontiguousarray(side.lengths, np.uint64)
            ulen, max_len = -1, int(lens.max()) if n else 0
        st = _SideState(np.ascontiguousarray(ptrs), lens, ulen, max_len, devs, host)
        if max_len <= self._chunk:  # upload now where the kernel will most likely run
            self._cols(st, min(devs) if devs else int(self._cp.cuda.runtime.getDevice()))
        return st

    def release_side(self, state: Any) -> None:
        if isinstance(state, _SideState):
            state.cols.clear()  # requests made from it keep the arrays they read

    def _cols(self, st: _SideState, dev: int) -> Any:
        """The state's device columns on GPU ``dev`` (uploaded once, on the backend's stream)."""
        cols = st.cols.get(dev)
        if cols is None:
            host = st.ptrs[None, :] if st.lens is None else np.stack([st.ptrs, st.lens])
            stream = self._stream(dev)
            with self._cp.cuda.Device(dev):
                cols = self._cp.empty(host.shape, self._cp.uint64)
                cols.set(host, stream=stream)
            st.cols[dev] = cols
        return cols

    def prepare_indexed(
        self,
        op: XferOp,
        local_state: Any,
        local_idx: npt.NDArray[np.integer[Any]],
        remote_state: Any,
        remote_idx: npt.NDArray[np.integer[Any]],
        peer: str,
    ) -> BackendRequest:
        """The request's table, on the backend's stream (the copy kernel follows on it, so no
        synchronize).

        Up to ``host_gather_max`` descriptors: numpy gathers the table into a pinned staging
        buffer and one async copy uploads it. More: one int32 index upload (one array when both
        sides use the same indices) from pinned staging into the request's one device buffer,
        and one gather kernel reads the lists' resident columns.
        """
        ls, rs = local_state, remote_state
        assert isinstance(ls, _SideState) and isinstance(rs, _SideState)
        dev, path = self._route(peer, ls.devs, rs.devs, ls.host or rs.host)
        req = _Request(op, peer, dev, path)
        n = int(local_idx.size)
        max_len = max(ls.max_len, rs.max_len)
        if max_len > self._chunk:  # long descriptors: chunk on the host (few descriptors)
            lptr, rptr = ls.ptrs.take(local_idx), rs.ptrs.take(remote_idx)
            lens = np.full(n, ls.ulen, np.uint64) if ls.lens is None else ls.lens.take(local_idx)
            src, dst = (lptr, rptr) if op is XferOp.WRITE else (rptr, lptr)
            return self._host_table(req, src, dst, lens, max_len)
        cp = self._cp
        stream = self._stream(dev)
        write = op is XferOp.WRITE
        if n <= self._host_gather_max:
            # Few descriptors: gather on the host straight into pinned staging memory; one async
            # copy fills the request's table (no kernel launch, no host synchronize).
            nb = 24 * n
            with cp.cuda.Device(dev):
                d_table = cp.empty((3, max(n, 1)), cp.uint64)
                with self._stage_lock:
                    st = self._staging(dev, nb)
                    t = st.host[:nb].view(np.uint64).reshape(3, n)
                    np.take(ls.ptrs, local_idx, out=t[0 if write else 1])
                    np.take(rs.ptrs, remote_idx, out=t[1 if write else 0])
                    if ls.lens is None:
                        t[2] = ls.ulen
                    else:
                        np.take(ls.lens, local_idx, out=t[2])
                    if n:
                        self._cu.rt.memcpyAsync(
                            int(d_table.data.ptr), st.ptr, nb, _MEMCPY_H2D, stream.ptr
                        )
                    st.event.record(stream)
                req.event = cp.cuda.Event(block=False, disable_timing=True)
            req.staged = True
            return self._finish(req, d_table, n)
        lc, rc = self._cols(ls, dev), self._cols(rs, dev)
        same = remote_idx is local_idx
        nidx = n if same else 2 * n
        with cp.cuda.Device(dev):
            # One device buffer: the (3, n) table, then the int32 indices (uploaded from pinned
            # staging memory by an async copy on the backend's stream).
            d_buf = cp.empty(3 * n + (nidx + 1) // 2, cp.uint64)
            tp = int(d_buf.data.ptr)
            ip = tp + 24 * n
            with self._stage_lock:
                st = self._staging(dev, 4 * nidx)
                iv = st.host[: 4 * nidx].view(np.int32)
                iv[:n] = local_idx
                if not same:
                    iv[n:] = remote_idx
                self._cu.rt.memcpyAsync(ip, st.ptr, 4 * nidx, _MEMCPY_H2D, stream.ptr)
                st.event.record(stream)
            lp = int(lc.data.ptr)
            with stream:
                self._gather(
                    (min(-(-n // 256), 4096),),
                    (256,),
                    (
                        np.uint64(lp),
                        np.uint64(rc.data.ptr),
                        np.uint64(lp + 8 * int(lc.shape[1])),
                        np.uint64(ip),
                        np.uint64(ip + (0 if same else 4 * n)),
                        np.uint64(tp),
                        np.uint64(tp + 8 * n),
                        np.uint64(tp + 16 * n),
                        np.int64(n),
                        np.int64(ls.ulen),
                        np.int32(write),
                    ),
                )
            req.event = cp.cuda.Event(block=False, disable_timing=True)
        req.keep = (d_buf, lc, rc)
        return self._finish(req, d_buf, n, row=8 * n)

    def _staging(self, dev: int, nbytes: int) -> _Stage:
        """The next pinned staging slot of GPU ``dev`` with room for ``nbytes``, free to write
        (its previous copy has run). Call with ``_stage_lock`` held and ``dev`` current."""
        ring = self._stages.setdefault(dev, [])
        k = self._stage_next.get(dev, 0)
        self._stage_next[dev] = (k + 1) % _STAGE_SLOTS
        want = max(nbytes, 1 << 16)
        if k >= len(ring):
            st = _Stage(self._cp, want)
            ring.append(st)
            return st
        st = ring[k]
        if not st.event.done:
            st.event.synchronize()
        if st.nbytes < nbytes:
            st = ring[k] = _Stage(self._cp, max(want, 2 * st.nbytes))
        return st

    def post(self, req: BackendRequest, notif: bytes | None) -> XferStatus:
        return self._post(req, notif, getattr(self._tls, "after", None))

    def post_stream(self, req: BackendRequest, notif: bytes | None, stream: Any) -> XferStatus:
        """Post so that the copy starts after the work queued on ``stream`` (on the GPU)."""
        return self._post(req, notif, _stream_handle(stream))

    def _post(self, req: BackendRequest, notif: bytes | None, after: int | None) -> XferStatus:
        assert isinstance(req, _Request)
        req.error = None
        dev = req.dev
        stream = self._stream(dev)
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
            with self._nlock:
                req.notif = bytes(notif)
                self._pending[id(req)] = req
                self._nlock.notify()
        return XferStatus.IN_PROGRESS

    def _event_done(self, req: _Request) -> bool:
        """Whether the request's kernel finished; a CUDA fault sets ``req.error`` and is True."""
        try:
            return bool(req.event.done)
        except self._cu.rt.CUDARuntimeError as exc:
            req.error = TransferError(
                f"NVLINK {req.op.value} with {req.peer!r} failed on GPU {req.dev}: {exc}",
                backend=self.name,
            )
            return True

    def _flush_notif(self, req: _Request) -> None:
        """Send the request's notification (once), now that its data is in place."""
        with self._nlock:
            self._pending.pop(id(req), None)
            msg, req.notif = req.notif, None
            if msg is None or req.error is not None:
                return
            try:
                self.send_notif(req.peer, msg)
            except NixlError as exc:
                req.error = exc

    def poll(self, req: BackendRequest) -> XferStatus:
        assert isinstance(req, _Request)
        if not req.posted:
            return XferStatus.ERROR if req.error else XferStatus.PENDING
        if not self._event_done(req):
            return XferStatus.IN_PROGRESS
        if req.notif is not None:
            self._flush_notif(req)
        return XferStatus.ERROR if req.error is not None else XferStatus.DONE

    def block(self, req: BackendRequest, timeout: float) -> None:
        assert isinstance(req, _Request)
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
        assert isinstance(req, _Request)
        if req.posted and req.event is not None and not self._event_done(req):
            # A launched kernel cannot be aborted; it ends within the transfer's duration.
            with contextlib.suppress(Exception):
                req.event.synchronize()
        elif (req.keep or req.staged) and not req.posted:
            # Never posted: its gather kernel may still be queued; its arrays go back to the
            # memory pool only after it ran.
            with contextlib.suppress(Exception):
                self._stream(req.dev).synchronize()
        if req.notif is not None:
            self._flush_notif(req)
        req.table = None
        req.keep = ()
        req.posted = False

    # ------------------------------------------------------------------ stream order, events
    @contextlib.contextmanager
    def stream_order(self, stream: Any) -> Iterator[None]:
        """Posts made inside this block (on this thread) start after the work queued on ``stream``.

        The copy waits on the GPU (an event recorded on ``stream``, waited on by the backend's
        stream), so a producer kernel and the transfer need no host synchronize::

            nv = agent.backend("NVLINK")
            produce[grid, block, stream](kv)      # writes the blocks
            with nv.stream_order(stream):
                req.post()                        # copies once produce() is done

        Args:
            stream: a cupy, torch or cuda.core stream, or a raw cudaStream_t (int), of the GPU
                the transfer runs on.
        """
        prev = getattr(self._tls, "after", None)
        self._tls.after = _stream_handle(stream)
        try:
            yield
        finally:
            self._tls.after = prev

    def post_after(self, xfer: Any, stream: Any, notif: Any = ...) -> XferStatus:
        """Post ``xfer`` (an XferRequest) so that it starts after the work queued on ``stream``.

        The same as ``xfer.post(notif, stream=stream)``.
        """
        st: XferStatus = (
            xfer.post(stream=stream) if notif is ... else xfer.post(notif, stream=stream)
        )
        return st

    def completion_event(self, xfer: Any) -> Any:
        """The CUDA event (a ``cupy.cuda.Event``) that completes with ``xfer``'s last post.

        Make a stream wait on it (``stream.wait_event(ev)``) to consume the data on the GPU
        without a host round trip. Accepts an XferRequest or this backend's request;
        ``req.completion_event()`` calls it.

        Raises:
            InvalidParamError: not an NVLINK request, or never posted.
        """
        breq = xfer.backend_request if isinstance(xfer, XferRequest) else xfer
        if not isinstance(breq, _Request) or not breq.posted:
            raise InvalidParamError(f"{xfer!r} is not a posted NVLINK transfer")
        return breq.event

    def mem_view(
        self,
        peer: str,
        descs: Any,
        mem_type: MemType | str = MemType.VRAM,
        *,
        device: int | None = None,
    ) -> Any:
        """A device array (cupy, uint64) of pointers to ``descs`` that kernels on ``device`` use.

        ``peer`` is a remote agent whose metadata was loaded (its regions are mapped through
        CUDA IPC), or ``""`` / this agent's name for its own memory. Element ``i`` is the
        device address of descriptor ``i``'s first byte; descriptor ``i`` may be read or
        written for its length. The view stays valid until the peer's metadata is removed or
        the regions are deregistered.

        Raises:
            UnknownAgentError: no metadata for ``peer``.
            InvalidDescriptorError: a descriptor outside every region (names its index).
            NotSupportedError: a peer's DRAM (not mappable into this process).
        """
        d = as_descs(descs, mem_type)
        mt = d.mem_type
        local = peer in _INIT_NAMES or peer == self.agent_name
        if local:
            regs: list[_Reg] = [
                r for r in self._local_regs.values() if r.host == (mt is MemType.DRAM)
            ]
            whose = "this agent"
        else:
            if peer not in self._peers:
                raise UnknownAgentError(peer)
            regs = [r for r in self._remote_regs.get(peer, []) if r.host == (mt is MemType.DRAM)]
            whose = f"agent {peer!r}"
        arr = d.array
        n = int(arr.shape[0])
        if device is None:
            device = int(self._cp.cuda.runtime.getDevice())
        if n == 0:
            with self._cp.cuda.Device(device):
                return self._cp.empty(0, self._cp.uint64)
        if not regs:
            raise InvalidDescriptorError(
                f"descriptor 0 lies in no {mt.value} region {whose} registered with NVLINK", index=0
            )
        starts = np.fromiter((r.addr for r in regs), np.uint64, len(regs))
        order = np.argsort(starts, kind="stable")
        starts = starts[order]
        ends = starts + np.fromiter((regs[k].length for k in order.tolist()), np.uint64, len(regs))
        addrs, lens = arr[:, 0], arr[:, 1]
        pos = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
        safe = np.maximum(pos, 0)
        bad = (pos < 0) | (addrs + lens > ends[safe])
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidDescriptorError(
                f"descriptor {i} [addr=0x{int(addrs[i]):x}, len={int(lens[i])}] lies in no "
                f"{mt.value} region {whose} registered with NVLINK",
                index=i,
            )
        picked = [regs[k] for k in order.tolist()]
        if not local and mt is MemType.DRAM:
            raise NotSupportedError(
                f"agent {peer!r}'s DRAM cannot be mapped into this process (CUDA IPC shares GPU "
                "memory only)"
            )
        deltas = np.fromiter((r.delta & _MASK for r in picked), np.uint64, len(picked))
        for other in {r.dev for r in picked}:
            self._enable_peer(device, other)
        ptrs = addrs + deltas[safe]
        with self._cp.cuda.Device(device):
            return self._cp.asarray(ptrs)

    # ------------------------------------------------------------------ notifications
    def _notify_loop(self) -> None:
        while True:
            with self._nlock:
                while not self._pending and not self._closed:
                    self._nlock.wait()
                if self._closed:
                    return
                reqs = list(self._pending.values())
            for req in reqs:
                if self._event_done(req):
                    self._flush_notif(req)
            time.sleep(2e-4)

    def send_notif(self, peer: str, msg: bytes) -> None:
        if peer == self.agent_name:
            self._notifs.send(peer, b"", msg)
            return
        conn = self._peers.get(peer)
        if conn is None:
            raise UnknownAgentError(peer)
        self._notifs.send(peer, conn.sock_addr, msg)

    def _serve_fd(self) -> None:
        """Answer one fd request: b"NVF1" | u64 allocation id -> b"\\0" + the fd (SCM_RIGHTS),
        or b"\\1" when the id is unknown or the asking process belongs to another user."""
        try:
            conn, _ = self._fdsrv.accept()
        except OSError:
            return
        with conn:
            try:
                conn.settimeout(5.0)
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                _, uid, _ = struct.unpack("3i", creds)
                req = b""
                while len(req) < 12:
                    part = conn.recv(12 - len(req))
                    if not part:
                        return
                    req += part
                (aid,) = struct.unpack_from("<Q", req, 4)
                with self._fds_lock:
                    fd = self._fds.get(aid) if req[:4] == _FD_MAGIC else None
                    if fd is None or uid != os.getuid():
                        conn.sendall(b"\1")
                        return
                    socket.send_fds(conn, [b"\0"], [fd])
            except OSError:
                return

    def get_notifs(self) -> list[tuple[str, bytes]]:
        return self._notifs.take()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._closed:
            return
        with self._nlock:
            self._closed = True
            self._nlock.notify_all()
        self._notifier.join(timeout=5.0)
        self._sync_all()
        for key, refs in list(self._mapped.items()):
            for _ in range(refs):
                self._unmap(key)
        self._mapped.clear()
        for reg in list(self._local_regs.values()):
            if reg.pinned:
                with contextlib.suppress(Exception):
                    self._cu.host_unregister(reg.addr)
                reg.pinned = False
        self._local_regs.clear()
        self._remote_regs.clear()
        self._notifs.close()
        self._fdsrv.close()
        with self._fds_lock:
            for ex in self._exports.values():
                with contextlib.suppress(OSError):
                    os.close(ex.fd)
            self._exports.clear()
            self._fds.clear()
        self._stages.clear()
