"""The memory NVLINK moves: regions of this process (registered, exported) and of peers (mapped).

- **This process** (:class:`LocalRegions`). A VRAM region's public data is the legacy CUDA IPC
  handle of the allocation that contains it, plus the allocation's base and size and the
  region's offset in it (PyTorch's caching allocator hands out tensors inside larger
  allocations); the allocation comes from the driver (``cuMemGetAddressRange``). VMM
  allocations (``cuMemCreate``, PyTorch's ``expandable_segments``) have no legacy IPC handle:
  their blob lists the allocations (chunks) mapped back to back under the region, each exported
  once as a POSIX fd that :meth:`LocalRegions.serve_fd` hands to peers of the same user over a
  Unix stream socket (SCM_RIGHTS). VMM memory created without the POSIX fd handle type raises
  :class:`~nixl_core.errors.NotSupportedError` naming the fix. DRAM is pinned and mapped for
  every GPU (``cudaHostRegister``).
- **Peers** (:class:`PeerRegions`). Each peer allocation is mapped once per process
  (``cudaIpcOpenMemHandle``; VMM spans: the chunks' fds imported and mapped into one reserved
  range) and cached in ``_MAPS`` with a reference count, shared by every NVLINK agent of the
  process; a region's device address here is its address in the peer plus one offset per
  allocation. A peer's DRAM cannot be mapped into this process: its handle only says so.

Handles (:class:`LocalReg`, :class:`RemoteReg`) carry ``delta``, what turns a descriptor's
address into the device address a kernel of this process uses, and ``dev``, the GPU holding it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from nixl_core.errors import (
    MetadataError,
    NotSupportedError,
    RegistrationError,
    TransferError,
)
from nixl_core.memory import MemType
from nixl_nvlink._devices import Devices
from nixl_nvlink._wire import (
    KIND_DEVICE,
    KIND_HOST,
    KIND_VMM,
    RegionBlob,
    decode_region,
    encode_region,
)

__all__ = ["VMM_HINT", "LocalReg", "LocalRegions", "PeerRegions", "Reg", "RemoteReg"]

U64 = npt.NDArray[np.uint64]
_CUDA_MEMORY_TYPE_DEVICE = 2

# Peer allocations mapped into this process, shared by every NVLINK agent of the process (a
# CUDA IPC handle is opened once per process): key (IPC handle, or the VMM span's identity) ->
# [mapped base, references, unmap function, GPU it was mapped on].
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


class LocalReg:
    """A region of this process. ``delta`` turns its addresses into device addresses."""

    __slots__ = ("addr", "blob", "delta", "dev", "exports", "host", "pinned")

    def __init__(
        self, addr: int, dev: int, host: bool, delta: int, pinned: bool, blob: bytes
    ) -> None:
        self.addr = addr
        self.dev = dev  # GPU ordinal; -1 for DRAM
        self.host = host
        self.delta = delta
        self.pinned = pinned  # this backend pinned it (and unpins it)
        self.blob = blob
        self.exports: tuple[int, ...] = ()  # VMM chunk bases whose fds this region holds


class RemoteReg:
    """A peer's region as this process reaches it (``delta`` added to its peer address)."""

    __slots__ = ("delta", "dev", "host", "key", "peer")

    def __init__(self, peer: str, host: bool, dev: int, delta: int, key: bytes) -> None:
        self.peer = peer
        self.host = host
        self.dev = dev  # local ordinal of the GPU holding it; -1 for host memory
        self.delta = delta
        self.key = key  # IPC handle of the mapped allocation; b"" when not mapped


Reg = LocalReg | RemoteReg


class _Export:
    """A VMM allocation of this process exported as a POSIX fd, served to peers by id."""

    __slots__ = ("aid", "fd", "refs", "size")

    def __init__(self, aid: int, fd: int, size: int) -> None:
        self.aid = aid
        self.fd = fd
        self.size = size
        self.refs = 0


def _vmm() -> Any:
    from nixl_nvlink import _cuda

    return _cuda.vmm()


class LocalRegions:
    """This process's registered regions, and the fd server of its exported VMM allocations.

    Args:
        cu: the process's :class:`nixl_nvlink._cuda.Cuda`.
        devices: the backend's streams (deregistration waits for them).
        addr: the backend's notification socket address; the fd server listens at
            ``addr + b"-fd"`` (serve it with :meth:`serve_fd` when :attr:`fd_socket` is readable).
    """

    def __init__(self, cu: Any, devices: Devices, addr: bytes) -> None:
        self._cu = cu
        self._cp: Any = cu.cupy
        self._devices = devices
        self._regs: dict[int, LocalReg] = {}
        self._exports: dict[int, _Export] = {}  # chunk base -> export
        self._fds: dict[int, int] = {}  # allocation id -> fd
        self._next_aid = 1
        self._fds_lock = threading.Lock()
        #: The fd server's listening socket (a Unix stream socket next to the datagram one).
        self.fd_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.fd_socket.bind(addr + b"-fd")
        self.fd_socket.listen(64)
        self.fd_socket.setblocking(False)

    def register(self, mem_type: MemType, rows: U64) -> list[Any]:
        """One :class:`LocalReg` per ``[addr, len, dev]`` row; all undone when one fails."""
        out: list[LocalReg] = []
        try:
            for i, (addr, length, dev) in enumerate(rows.tolist()):
                if mem_type is MemType.VRAM:
                    reg = self._register_vram(i, addr, length, dev)
                else:
                    reg = self._register_dram(i, addr, length)
                out.append(reg)
                self._regs[id(reg)] = reg
        except BaseException:
            self.deregister(out)
            raise
        return list(out)

    def _register_vram(self, i: int, addr: int, length: int, dev: int) -> LocalReg:
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
        return LocalReg(addr, dev, False, 0, False, blob)

    def _register_vmm(self, i: int, addr: int, length: int, dev: int, where: str) -> LocalReg:
        """A VMM region: export every allocation mapped under it (current device: ``dev``)."""
        from nixl_nvlink._cuda import HANDLE_POSIX_FD, CudaCallError

        vmm = _vmm()
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
        reg = LocalReg(addr, dev, False, 0, False, blob)
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
                fd = _vmm().export_fd(handle)
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

    def _register_dram(self, i: int, addr: int, length: int) -> LocalReg:
        blob = encode_region(RegionBlob(KIND_HOST))
        if length == 0:
            return LocalReg(addr, -1, True, 0, False, blob)
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
        return LocalReg(addr, -1, True, delta, pinned, blob)

    def deregister(self, handles: Sequence[Any]) -> None:
        """Unpin and unexport what :meth:`register` returned, once no kernel can use it."""
        if not handles:
            return
        self._devices.sync_all()  # no kernel may still read or write what is released
        for h in handles:
            self._regs.pop(id(h), None)
            if isinstance(h, LocalReg) and h.pinned:
                with contextlib.suppress(Exception):
                    self._cu.host_unregister(h.addr)
                h.pinned = False
            if isinstance(h, LocalReg) and h.exports:
                self._unexport(h.exports)
                h.exports = ()

    def serve_fd(self) -> None:
        """Answer one fd request: b"NVF1" | u64 allocation id -> b"\\0" + the fd (SCM_RIGHTS),
        or b"\\1" when the id is unknown or the asking process belongs to another user."""
        try:
            conn, _ = self.fd_socket.accept()
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

    def close(self) -> None:
        """Unpin what is still registered, close the fd server and every exported fd (call once
        the socket's serving thread has stopped)."""
        for reg in list(self._regs.values()):
            if reg.pinned:
                with contextlib.suppress(Exception):
                    self._cu.host_unregister(reg.addr)
                reg.pinned = False
        self._regs.clear()
        self.fd_socket.close()
        with self._fds_lock:
            for ex in self._exports.values():
                with contextlib.suppress(OSError):
                    os.close(ex.fd)
            self._exports.clear()
            self._fds.clear()


class PeerRegions:
    """Peers' regions mapped into this process: this backend's references into ``_MAPS``.

    Args:
        cu: the process's :class:`nixl_nvlink._cuda.Cuda`.
        devices: the backend's streams (unloading waits for them).
        backend: the backend's name (for errors).
    """

    def __init__(self, cu: Any, devices: Devices, backend: str) -> None:
        self._cu = cu
        self._cp: Any = cu.cupy
        self._devices = devices
        self._backend = backend
        self._mapped: collections.Counter[bytes] = collections.Counter()  # our references

    def _open_ipc(self, key: bytes, dev: int, where: str) -> tuple[int, Callable[[], None]]:
        try:
            base = self._cu.ipc_open(key)
        except self._cu.rt.CUDARuntimeError as exc:
            raise TransferError(
                f"cannot map {where} (cudaIpcOpenMemHandle: {exc}); the peer must be "
                "a process of this host that shares its IPC and pid namespaces with "
                "this one",
                backend=self._backend,
            ) from exc
        return base, lambda: self._cu.ipc_close(base)

    def _fetch_fd(self, sock_addr: bytes, aid: int, where: str) -> int:
        """The POSIX fd of a peer's VMM allocation ``aid``, received over its fd socket."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10.0)
                s.connect(sock_addr + b"-fd")
                s.sendall(_FD_MAGIC + struct.pack("<Q", aid))
                msg, fds, _, _ = socket.recv_fds(s, 1, 1)
        except OSError as exc:
            raise TransferError(
                f"cannot map {where}: fetching the fd of its VMM allocation from the peer "
                f"failed ({exc})",
                backend=self._backend,
            ) from exc
        if msg != b"\0" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise TransferError(
                f"cannot map {where}: the peer did not hand over the fd of its VMM allocation "
                f"{aid} (deregistered, or another user)",
                backend=self._backend,
            )
        return fds[0]

    def _open_vmm(
        self, sock_addr: bytes, b: RegionBlob, dev: int, where: str
    ) -> tuple[int, Callable[[], None]]:
        """Import a peer's VMM span: one reserved range, each chunk mapped at its offset."""
        from nixl_nvlink._cuda import CudaCallError

        vmm = _vmm()
        self._cu.rt.free(0)  # the device's context exists and is current (driver calls below)
        handles: list[tuple[int, int, int]] = []
        try:
            for off, size, aid in b.chunks:
                fd = self._fetch_fd(sock_addr, aid, where)
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
                f"cannot map {where} (VMM import: {exc})", backend=self._backend
            ) from exc
        finally:
            for _, _, h in handles:  # the mappings keep the allocations alive
                with contextlib.suppress(Exception):
                    vmm.release(h)
        size = b.alloc_size
        return va, lambda: vmm.unmap(va, size)

    def _map(self, key: bytes, dev: int, opener: Callable[[], tuple[int, Any]]) -> int:
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

    def load(
        self,
        peer: str,
        sock_addr: bytes,
        in_process: bool,
        mem_type: MemType,
        rows: U64,
        blobs: Sequence[bytes],
    ) -> list[Any]:
        """One :class:`RemoteReg` per row of a peer's regions, mapped here; all undone when one
        fails.

        Args:
            peer: the peer agent.
            sock_addr: its notification socket address (its fd server adds ``b"-fd"``).
            in_process: the peer is an agent of this very process (its addresses are ours).
            mem_type: the regions' memory type.
            rows: their ``[addr, len, dev]`` rows in the peer.
            blobs: their public data.

        Raises:
            MetadataError: a blob that does not describe its row.
            NotSupportedError: a region on a GPU this process cannot see.
            TransferError: mapping a region failed.
        """
        out: list[RemoteReg] = []
        try:
            for i, ((addr, length, _dev), raw) in enumerate(zip(rows.tolist(), blobs, strict=True)):
                b = decode_region(raw, i)
                where = f"agent {peer!r}'s {mem_type.value} region {i} [addr=0x{addr:x}]"
                if b.is_host:
                    out.append(RemoteReg(peer, True, -1, 0, b""))
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
                if in_process:  # an agent of this very process: same addresses
                    out.append(RemoteReg(peer, False, dev, 0, b""))
                    continue
                if b.kind == KIND_VMM:
                    key = (
                        b"VMM"
                        + sock_addr
                        + struct.pack(f"<{len(b.chunks)}Q", *(c[2] for c in b.chunks))
                    )
                    opener: Callable[[], tuple[int, Any]] = functools.partial(
                        self._open_vmm, sock_addr, b, dev, where
                    )
                else:
                    key = b.ipc_handle
                    opener = functools.partial(self._open_ipc, key, dev, where)
                mapped = self._map(key, dev, opener)
                out.append(RemoteReg(peer, False, dev, mapped - b.alloc_base, key))
        except BaseException:
            for r in out:
                if r.key:
                    self._unmap(r.key)
            raise
        return list(out)

    def unload(self, handles: Sequence[Any]) -> None:
        """Unmap what :meth:`load` returned, once no kernel can use it."""
        if not handles:
            return
        self._devices.sync_all()
        for h in handles:
            if isinstance(h, RemoteReg) and h.key:
                self._unmap(h.key)
                h.key = b""

    def close(self) -> None:
        """Drop every reference this backend still holds (call after its streams are idle)."""
        for key, refs in list(self._mapped.items()):
            for _ in range(refs):
                self._unmap(key)
        self._mapped.clear()
