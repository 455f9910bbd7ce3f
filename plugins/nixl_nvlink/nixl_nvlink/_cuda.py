"""The CUDA side of NVLINK: the copy kernel's source and thin wrappers over cupy and the driver.

Nothing here is imported by the entry point; :mod:`nixl_nvlink.backend` imports this module in
``probe()`` and its constructor, :mod:`nixl_nvlink._regions` when it exports or imports VMM
memory. cupy provides the runtime (IPC handles, pinned host memory, streams, events, NVRTC
kernels); cuda-bindings provides the two driver queries cupy lacks (the allocation that contains
a pointer, and whether that allocation can be exported as a legacy CUDA IPC handle).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
from typing import Any

__all__ = ["COPY_KERNEL", "GATHER_KERNEL", "Cuda", "Vmm", "load"]

#: One warp copies one descriptor (the host splits descriptors into chunks of at most
#: ``chunk_bytes``), so a transfer of 65536 4 KiB blocks and one of 32 16 MiB blocks both fill
#: the GPU with one launch. Each lane keeps four 16-byte loads in flight before it stores, which
#: covers the latency of reads over NVLink (READ pulls). Pairs whose addresses agree modulo 16
#: use 16-byte accesses after a byte head; modulo 4, 4-byte ones; anything else copies bytes.
COPY_KERNEL = r"""
typedef unsigned long long u64;
struct alignas(16) v16 { u64 a, b; };

__device__ __forceinline__ void copy_bytes(unsigned char* d, const unsigned char* s, u64 n,
                                           int lane) {
    for (u64 k = lane; k < n; k += 32) d[k] = s[k];
}

template <typename T, int U>
__device__ __forceinline__ void copy_vec(T* d, const T* s, u64 n, int lane) {
    u64 k = lane;
    for (; k + 32 * (U - 1) < n; k += 32 * U) {
        T r[U];
#pragma unroll
        for (int u = 0; u < U; ++u) r[u] = s[k + 32 * u];
#pragma unroll
        for (int u = 0; u < U; ++u) d[k + 32 * u] = r[u];
    }
    for (; k < n; k += 32) d[k] = s[k];
}

template <typename T, int U>
__device__ __forceinline__ void copy_aligned(u64 s, u64 d, u64 n, int lane) {
    const u64 a = sizeof(T);
    u64 head = (a - (s & (a - 1))) & (a - 1);
    if (head > n) head = n;
    copy_bytes((unsigned char*)d, (const unsigned char*)s, head, lane);
    s += head;
    d += head;
    n -= head;
    const u64 nv = n / a;
    copy_vec<T, U>((T*)d, (const T*)s, nv, lane);
    const u64 done = nv * a;
    copy_bytes((unsigned char*)(d + done), (const unsigned char*)(s + done), n - done, lane);
}

extern "C" __global__ void __launch_bounds__(256)
nvl_copy(const u64* __restrict__ src, const u64* __restrict__ dst, const u64* __restrict__ len,
         long long n) {
    const int lane = threadIdx.x & 31;
    const long long step = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < n; w += step) {
        const u64 s = src[w], d = dst[w], m = len[w];
        if (((s ^ d) & 15) == 0) {
            copy_aligned<v16, 4>(s, d, m, lane);
        } else if (((s ^ d) & 3) == 0) {
            copy_aligned<unsigned int, 8>(s, d, m, lane);
        } else {
            copy_bytes((unsigned char*)d, (const unsigned char*)s, m, lane);
        }
    }
}
"""

#: Builds a request's (source, destination, length) table from two prepared lists' device-resident
#: columns and the request's index arrays: one thread per descriptor (``make`` on the GPU).
#: ``ulen`` >= 0 is the common length (``ll`` is then not read).
GATHER_KERNEL = r"""
typedef unsigned long long u64;
extern "C" __global__ void nvl_gather(const u64* __restrict__ lp, const u64* __restrict__ rp,
                                      const u64* __restrict__ ll, const int* __restrict__ li,
                                      const int* __restrict__ ri, u64* __restrict__ src,
                                      u64* __restrict__ dst, u64* __restrict__ len, long long n,
                                      long long ulen, int write) {
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n;
         k += (long long)gridDim.x * blockDim.x) {
        const int a = li[k];
        const u64 lv = lp[a], rv = rp[ri[k]];
        src[k] = write ? lv : rv;
        dst[k] = write ? rv : lv;
        len[k] = ulen >= 0 ? (u64)ulen : ll[a];
    }
}
"""

#: Threads per block of the copy kernel (8 warps).
BLOCK_THREADS = 256
WARPS_PER_BLOCK = BLOCK_THREADS // 32
#: Blocks per multiprocessor the grid is sized for (more only queue; fewer leave SMs idle).
BLOCKS_PER_SM = 8

_CUDA_HOST_REGISTER_PORTABLE = 1
_CUDA_HOST_REGISTER_MAPPED = 2
_ERR_HOST_ALREADY_REGISTERED = 712
_ERR_PEER_ALREADY_ENABLED = 704


class CudaCallError(RuntimeError):
    """A CUDA call failed; ``code`` is its status and ``name`` the status's name."""

    def __init__(self, what: str, code: int, name: str) -> None:
        super().__init__(f"{what} failed: {name} ({code})")
        self.code = code
        self.name = name


class Cuda:
    """cupy and the driver bindings, imported once; small typed helpers over them."""

    def __init__(self) -> None:
        import cupy

        # By name: one binding whichever module provides it, typed or not (no redefinition).
        try:
            driver = importlib.import_module("cuda.bindings.driver")
        except ImportError:  # cuda-python before 12.6 named the module cuda.cuda
            driver = importlib.import_module("cuda.cuda")

        self.cupy: Any = cupy
        self.rt: Any = cupy.cuda.runtime
        self.drv: Any = driver
        self._kernel: Any = None
        self._gather: Any = None
        self._sm_count: dict[int, int] = {}
        self._uuids: dict[int, bytes] | None = None

    # ------------------------------------------------------------------ errors
    def runtime_error(self, exc: BaseException) -> tuple[int, str]:
        """(status, name) of a cupy CUDARuntimeError (or (-1, text) for anything else)."""
        code = int(getattr(exc, "status", -1))
        return code, str(exc)

    def _drv_call(self, what: str, fn: Any, *args: Any) -> tuple[Any, ...]:
        res = fn(*args)
        err = res[0] if isinstance(res, tuple) else res
        code = int(err)
        if code != 0:
            _, name = self.drv.cuGetErrorName(err)
            text = name.decode() if isinstance(name, bytes) else str(name)
            raise CudaCallError(what, code, text)
        return tuple(res[1:]) if isinstance(res, tuple) else ()

    # ------------------------------------------------------------------ devices
    def device_count(self) -> int:
        """Visible CUDA devices."""
        return int(self.rt.getDeviceCount())

    def uuid_of(self, dev: int) -> bytes:
        """A 16-byte identity of GPU ``dev`` that every process of the host agrees on."""
        if self._uuids is None:
            self._uuids = {}
            for d in range(self.device_count()):
                props = self.rt.getDeviceProperties(d)
                uid = props.get("uuid", b"")
                if not isinstance(uid, (bytes, bytearray)) or len(uid) != 16:
                    # No uuid in this cupy: the PCI location is as unique within one host.
                    loc = (props["pciDomainID"], props["pciBusID"], props["pciDeviceID"])
                    uid = b"PCI:" + b"".join(int(v).to_bytes(4, "little") for v in loc)
                self._uuids[d] = bytes(uid)
        return self._uuids[dev]

    def ordinal_of(self, uuid: bytes) -> int:
        """The local ordinal of the GPU with this identity, or -1 when it is not visible here."""
        self.uuid_of(0)
        assert self._uuids is not None
        for d, u in self._uuids.items():
            if u == uuid:
                return d
        return -1

    def sm_count(self, dev: int) -> int:
        """Multiprocessors of GPU ``dev``."""
        n = self._sm_count.get(dev)
        if n is None:
            attr = getattr(self.rt, "cudaDevAttrMultiProcessorCount", 16)
            n = int(self.rt.deviceGetAttribute(attr, dev))
            self._sm_count[dev] = n
        return n

    def enable_peer(self, dev: int, peer_dev: int) -> None:
        """Let kernels on ``dev`` access memory of ``peer_dev`` (no-op when already enabled)."""
        if dev == peer_dev:
            return
        with self.cupy.cuda.Device(dev):
            try:
                self.rt.deviceEnablePeerAccess(peer_dev)
            except self.rt.CUDARuntimeError as exc:
                if self.runtime_error(exc)[0] != _ERR_PEER_ALREADY_ENABLED:
                    raise

    # ------------------------------------------------------------------ memory
    def pointer_device(self, ptr: int) -> tuple[int, int]:
        """(memory type, device) of a pointer as the runtime sees it (type 2 = device)."""
        attrs = self.rt.pointerGetAttributes(ptr)
        return int(attrs.type), int(attrs.device)

    def alloc_range(self, ptr: int) -> tuple[int, int]:
        """(base, size) of the allocation containing device pointer ``ptr``."""
        base, size = self._drv_call("cuMemGetAddressRange", self.drv.cuMemGetAddressRange, ptr)
        return int(base), int(size)

    def legacy_ipc_capable(self, ptr: int) -> bool | None:
        """Whether cudaIpcGetMemHandle can export the allocation (None when the driver won't say)."""
        attr = self.drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE
        try:
            (value,) = self._drv_call(
                "cuPointerGetAttribute", self.drv.cuPointerGetAttribute, attr, ptr
            )
        except (CudaCallError, AttributeError, TypeError):
            return None
        return bool(int(value))

    def ipc_handle(self, base: int) -> bytes:
        """The legacy IPC handle (64 bytes) of the allocation at ``base``."""
        return bytes(self.rt.ipcGetMemHandle(base))

    def ipc_open(self, handle: bytes) -> int:
        """Map a peer's allocation into this process (current device; peer access enabled)."""
        return int(self.rt.ipcOpenMemHandle(handle, self.rt.cudaIpcMemLazyEnablePeerAccess))

    def ipc_close(self, ptr: int) -> None:
        """Unmap what :meth:`ipc_open` mapped."""
        self.rt.ipcCloseMemHandle(ptr)

    def host_register(self, ptr: int, size: int) -> bool:
        """Pin and map host memory for every device; False when it was pinned already."""
        try:
            self.rt.hostRegister(
                ptr, size, _CUDA_HOST_REGISTER_PORTABLE | _CUDA_HOST_REGISTER_MAPPED
            )
        except self.rt.CUDARuntimeError as exc:
            if self.runtime_error(exc)[0] == _ERR_HOST_ALREADY_REGISTERED:
                return False
            raise
        return True

    def host_unregister(self, ptr: int) -> None:
        """Undo :meth:`host_register`."""
        self.rt.hostUnregister(ptr)

    def host_device_pointer(self, ptr: int) -> int:
        """The device address of pinned, mapped host memory (equal to ``ptr`` under UVA)."""
        (dptr,) = self._drv_call(
            "cuMemHostGetDevicePointer", self.drv.cuMemHostGetDevicePointer, ptr, 0
        )
        return int(dptr)

    # ------------------------------------------------------------------ kernel
    def kernel(self) -> Any:
        """The copy kernel, compiled by NVRTC once per process (cupy caches it on disk too)."""
        if self._kernel is None:
            self._kernel = self.cupy.RawKernel(COPY_KERNEL, "nvl_copy", options=("-std=c++17",))
        return self._kernel

    def gather_kernel(self) -> Any:
        """The table-gather kernel of ``make`` (compiled once per process, like :meth:`kernel`)."""
        if self._gather is None:
            self._gather = self.cupy.RawKernel(GATHER_KERNEL, "nvl_gather")
        return self._gather

    def grid_for(self, dev: int, chunks: int, per_sm: int = BLOCKS_PER_SM) -> int:
        """Blocks for ``chunks`` warp-sized work items on GPU ``dev``: enough to fill it, no more."""
        need = -(-chunks // WARPS_PER_BLOCK)
        return max(1, min(need, self.sm_count(dev) * per_sm))


#: CUmemAllocationHandleType bits and the other VMM constants of cuda.h (stable ABI values).
HANDLE_POSIX_FD = 1
HANDLE_FABRIC = 8
_ALLOCATION_PINNED = 1
_LOCATION_DEVICE = 1
_ACCESS_READWRITE = 3


class _Location(ctypes.Structure):
    _fields_ = (("type", ctypes.c_int), ("id", ctypes.c_int))


class _AllocFlags(ctypes.Structure):
    _fields_ = (
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    )


class _AllocProp(ctypes.Structure):
    """CUmemAllocationProp."""

    _fields_ = (
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
        ("_spare", ctypes.c_ubyte * 64),  # room should a later cuda.h grow the struct
    )


class _AccessDesc(ctypes.Structure):
    """CUmemAccessDesc."""

    _fields_ = (("location", _Location), ("flags", ctypes.c_int))


class Vmm:
    """The driver's virtual memory management calls (cuMem*), through ctypes on libcuda.

    ctypes rather than cuda-bindings: these calls pass raw handles, fds and structs whose
    Python wrappers differ between cuda-bindings releases; the C ABI does not. Every method
    needs a current context (the runtime's, set by ``cupy.cuda.Device(dev)``).
    """

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        u64, vp, sz = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t
        sigs: dict[str, tuple[Any, ...]] = {
            "cuGetErrorName": (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)),
            "cuMemRetainAllocationHandle": (ctypes.POINTER(u64), vp),
            "cuMemGetAllocationPropertiesFromHandle": (ctypes.POINTER(_AllocProp), u64),
            "cuMemExportToShareableHandle": (vp, u64, ctypes.c_int, ctypes.c_ulonglong),
            "cuMemImportFromShareableHandle": (ctypes.POINTER(u64), vp, ctypes.c_int),
            "cuMemRelease": (u64,),
            "cuMemAddressReserve": (ctypes.POINTER(u64), sz, sz, u64, ctypes.c_ulonglong),
            "cuMemAddressFree": (u64, sz),
            "cuMemMap": (u64, sz, sz, u64, ctypes.c_ulonglong),
            "cuMemUnmap": (u64, sz),
            "cuMemSetAccess": (u64, sz, ctypes.POINTER(_AccessDesc), sz),
            "cuMemCreate": (
                ctypes.POINTER(u64),
                sz,
                ctypes.POINTER(_AllocProp),
                ctypes.c_ulonglong,
            ),
            "cuMemGetAllocationGranularity": (
                ctypes.POINTER(sz),
                ctypes.POINTER(_AllocProp),
                ctypes.c_int,
            ),
        }
        for name, argtypes in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes = list(argtypes)
            fn.restype = ctypes.c_int
        self._lib = lib

    def _call(self, name: str, *args: Any) -> None:
        rc = int(getattr(self._lib, name)(*args))
        if rc != 0:
            text = ctypes.c_char_p()
            self._lib.cuGetErrorName(rc, ctypes.byref(text))
            raise CudaCallError(name, rc, (text.value or b"CUDA_ERROR").decode())

    def retain(self, ptr: int) -> int | None:
        """The allocation handle mapped at ``ptr`` (retained: :meth:`release` it), or None when
        ``ptr`` is not VMM memory (cudaMalloc memory has no such handle)."""
        h = ctypes.c_uint64()
        try:
            self._call("cuMemRetainAllocationHandle", ctypes.byref(h), ctypes.c_void_p(ptr))
        except CudaCallError:
            return None
        return int(h.value)

    def release(self, handle: int) -> None:
        """Drop one reference to an allocation handle."""
        self._call("cuMemRelease", handle)

    def handle_types(self, handle: int) -> int:
        """The shareable handle types (CUmemAllocationHandleType bits) the allocation allows."""
        prop = _AllocProp()
        self._call("cuMemGetAllocationPropertiesFromHandle", ctypes.byref(prop), handle)
        return int(prop.requestedHandleTypes)

    def export_fd(self, handle: int) -> int:
        """A POSIX fd for the allocation (the caller owns and closes it)."""
        fd = ctypes.c_int(-1)
        self._call("cuMemExportToShareableHandle", ctypes.byref(fd), handle, HANDLE_POSIX_FD, 0)
        return int(fd.value)

    def import_fd(self, fd: int) -> int:
        """The allocation handle of a peer's exported fd (the fd stays open; close it after)."""
        h = ctypes.c_uint64()
        self._call(
            "cuMemImportFromShareableHandle",
            ctypes.byref(h),
            ctypes.c_void_p(fd),
            HANDLE_POSIX_FD,
        )
        return int(h.value)

    def map_chunks(self, chunks: list[tuple[int, int, int]], size: int, devs: list[int]) -> int:
        """Reserve ``size`` bytes of address space, map each (offset, size, handle) chunk at its
        offset, and grant read/write access to ``devs``; returns the base address."""
        base = ctypes.c_uint64()
        self._call("cuMemAddressReserve", ctypes.byref(base), size, 0, 0, 0)
        va = int(base.value)
        mapped: list[tuple[int, int]] = []
        try:
            for off, n, h in chunks:
                self._call("cuMemMap", va + off, n, 0, h, 0)
                mapped.append((va + off, n))
            descs = (_AccessDesc * len(devs))()
            for k, d in enumerate(devs):
                descs[k].location.type = _LOCATION_DEVICE
                descs[k].location.id = d
                descs[k].flags = _ACCESS_READWRITE
            self._call("cuMemSetAccess", va, size, descs, len(devs))
        except BaseException:
            for p, n in mapped:
                with contextlib.suppress(CudaCallError):
                    self._call("cuMemUnmap", p, n)
            with contextlib.suppress(CudaCallError):
                self._call("cuMemAddressFree", va, size)
            raise
        return va

    def unmap(self, va: int, size: int) -> None:
        """Undo :meth:`map_chunks` (the physical memory goes once its exporter frees it too)."""
        self._call("cuMemUnmap", va, size)
        self._call("cuMemAddressFree", va, size)

    def create(self, size: int, dev: int, handle_types: int = HANDLE_POSIX_FD) -> int:
        """cuMemCreate of ``size`` bytes on ``dev`` (tests and examples); returns the handle."""
        prop = _AllocProp()
        prop.type = _ALLOCATION_PINNED
        prop.requestedHandleTypes = handle_types
        prop.location.type = _LOCATION_DEVICE
        prop.location.id = dev
        h = ctypes.c_uint64()
        self._call("cuMemCreate", ctypes.byref(h), size, ctypes.byref(prop), 0)
        return int(h.value)

    def granularity(self, dev: int) -> int:
        """The minimum VMM allocation granularity of ``dev``."""
        prop = _AllocProp()
        prop.type = _ALLOCATION_PINNED
        prop.location.type = _LOCATION_DEVICE
        prop.location.id = dev
        g = ctypes.c_size_t()
        self._call("cuMemGetAllocationGranularity", ctypes.byref(g), ctypes.byref(prop), 0)
        return int(g.value)


@functools.cache
def vmm() -> Vmm:
    """The process's :class:`Vmm` (loads libcuda on first call)."""
    return Vmm()


@functools.cache
def load() -> Cuda:
    """The process's :class:`Cuda` (imports cupy and cuda-bindings on first call)."""
    return Cuda()
