"""VRAM <-> FILE without GPUDirect Storage: a pinned, device-mapped staging pool.

A VRAM request is cut into chunks that fit one half of the pool. For each chunk one copy kernel
gathers the GPU blocks into the pinned host slot (WRITE) or scatters the slot into them (READ);
the kernel reads and writes the mapped host memory directly over PCIe, so there is no extra
device buffer and no copy call per descriptor. The file side of a chunk is an ordinary DRAM
request on the slot, run by the backend's I/O engines. The two halves alternate, so the GPU copy
of one chunk overlaps the file I/O of the other.

cupy is imported only when the first VRAM request is prepared: a CPU-only install never loads it.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from nixl_core.backend import BackendRequest, XferOp, XferStatus
from nixl_core.errors import NotSupportedError, RepostActiveError, TransferCanceledError
from nixl_posix._request import Request

__all__ = ["Stager", "VramRequest", "require_staging", "staging_unavailable_reason"]

U64 = npt.NDArray[np.uint64]

_ALIGN = 512  # staging offsets: O_DIRECT-aligned and 16-byte vector copies for every block

_KERNEL = r"""
extern "C" __global__ void nixl_posix_copy(const unsigned long long* __restrict__ d, long long n)
{
    // d holds three rows of n: source address, destination address, length.
    for (long long k = blockIdx.x; k < n; k += gridDim.x) {
        unsigned long long sa = d[k], ta = d[n + k], len = d[2 * n + k];
        const unsigned char* s = (const unsigned char*)sa;
        unsigned char* t = (unsigned char*)ta;
        unsigned long long head = 0;
        if (((sa | ta) & 15ULL) == 0) {
            const uint4* s4 = (const uint4*)s;
            uint4* t4 = (uint4*)t;
            unsigned long long v = len >> 4;
            for (unsigned long long i = threadIdx.x; i < v; i += blockDim.x) t4[i] = s4[i];
            head = v << 4;
        }
        for (unsigned long long i = head + threadIdx.x; i < len; i += blockDim.x) t[i] = s[i];
    }
}
"""


@functools.cache
def staging_unavailable_reason() -> str | None:
    """Why VRAM <-> FILE cannot run here (no cupy, no GPU), or None when it can (asked once)."""
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed (pip install cupy-cuda12x or cupy-cuda13x)"
    try:
        import cupy

        if int(cupy.cuda.runtime.getDeviceCount()) < 1:
            return "no CUDA device is visible"
    except Exception as exc:  # no driver or no device: cupy raises its own error types
        return f"CUDA is not usable here: {exc}"
    return None


class _Chunk:
    """One chunk of a VRAM request: its file-side DRAM request and the copy kernel's table."""

    __slots__ = ("io", "nbytes", "table")

    def __init__(self, io: Request, table: Any, nbytes: int) -> None:
        self.io, self.table, self.nbytes = io, table, nbytes


class _Device:
    """Per-GPU resources: a stream, the copy kernel, the pinned pool, one event per slot."""

    def __init__(self, dev: int, nbytes: int) -> None:
        import cupy

        self.dev = dev
        with cupy.cuda.Device(dev) as d:
            self.stream = cupy.cuda.Stream(non_blocking=True)
            self.kernel = cupy.RawKernel(_KERNEL, "nixl_posix_copy")
            self.grid = 4 * int(d.attributes["MultiProcessorCount"])
            # cudaHostAllocPortable | cudaHostAllocMapped: every device maps it, at the host's
            # address (unified addressing), so kernels take host pointers as they are.
            self.base = int(cupy.cuda.runtime.hostAlloc(nbytes, 1 | 2))
            self.events = [cupy.cuda.Event(), cupy.cuda.Event()]

    def launch(self, table: Any, slot: int) -> None:
        """Run the copy kernel over a chunk's table; record the slot's event after it."""
        import cupy

        n = int(table.shape[0]) // 3
        with cupy.cuda.Device(self.dev):
            self.kernel((min(n, self.grid),), (256,), (table, np.int64(n)), stream=self.stream)
            self.events[slot].record(self.stream)

    def close(self) -> None:
        import cupy

        with cupy.cuda.Device(self.dev):
            self.stream.synchronize()
            cupy.cuda.runtime.freeHost(self.base)


class VramRequest(BackendRequest):
    """A VRAM <-> FILE request: chunks run one after another by the stager's thread."""

    def __init__(self, op: XferOp, dev: int, chunks: list[_Chunk], n: int) -> None:
        super().__init__()
        self.op, self.dev, self.chunks, self.n = op, dev, chunks, n
        self.status = XferStatus.PENDING
        self.canceled = False


class Stager:
    """The staging pool of one backend: a pinned mapped buffer, a stream and a thread per device.

    Args:
        backend: backend name for errors.
        pool_bytes: size of the pinned pool (two slots of half that size).
        run_io: runs one file-side request to completion (start + wait) on the backend's engines
            and returns its error (None on success).
    """

    def __init__(
        self, backend: str, pool_bytes: int, run_io: Callable[[Request], BaseException | None]
    ) -> None:
        self._backend = backend
        self.slot_bytes = pool_bytes // 2 // _ALIGN * _ALIGN
        self._run_io = run_io
        self._dev: dict[int, _Device] = {}
        self._cond = threading.Condition()
        self._queue: collections.deque[VramRequest] = collections.deque()
        self._active: VramRequest | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ preparation
    def chunk_bounds(self, padded: U64) -> list[tuple[int, int]]:
        """[lo, hi) descriptor ranges whose padded sizes fit one slot each."""
        cum = np.cumsum(padded, dtype=np.uint64)
        out: list[tuple[int, int]] = []
        lo, n, base = 0, int(padded.shape[0]), 0
        while lo < n:
            hi = int(np.searchsorted(cum, np.uint64(base + self.slot_bytes), side="right"))
            hi = max(hi, lo + 1)
            out.append((lo, hi))
            base = int(cum[hi - 1])
            lo = hi
        return out

    def device(self, dev: int) -> _Device:
        """The device's stream, kernel, pinned pool and slot events, made at first use."""
        got = self._dev.get(dev)
        if got is None:
            got = self._dev[dev] = _Device(dev, 2 * self.slot_bytes)
        return got

    def prepare(
        self,
        op: XferOp,
        dev: int,
        vram: U64,
        lens: U64,
        make_io: Callable[[int, int, U64], Request],
    ) -> VramRequest:
        """Cut a request into chunks.

        Args:
            op: READ (file -> VRAM) or WRITE (VRAM -> file).
            dev: the GPU of every VRAM block.
            vram: GPU addresses of the blocks (after the backend's splitting).
            lens: their lengths.
            make_io: (lo, hi, staging addresses) -> the file-side DRAM request of blocks lo..hi.
        """
        import cupy

        base = self.device(dev).base
        padded = (lens + np.uint64(_ALIGN - 1)) & ~np.uint64(_ALIGN - 1)
        chunks: list[_Chunk] = []
        for k, (lo, hi) in enumerate(self.chunk_bounds(padded)):
            slot = base + (k % 2) * self.slot_bytes
            offs = np.cumsum(padded[lo:hi], dtype=np.uint64) - padded[lo:hi]
            host = np.uint64(slot) + offs
            src, dst = (vram[lo:hi], host) if op is XferOp.WRITE else (host, vram[lo:hi])
            with cupy.cuda.Device(dev):
                table = cupy.asarray(np.concatenate([src, dst, lens[lo:hi]]))
            nbytes = int(lens[lo:hi].sum(dtype=np.uint64))
            chunks.append(_Chunk(make_io(lo, hi, host), table, nbytes))
        return VramRequest(op, dev, chunks, int(lens.shape[0]))

    # ------------------------------------------------------------------ execution
    def start(self, req: VramRequest) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="nixl-posix-vram", daemon=True
                )
                self._thread.start()
            req.canceled = False
            req.error = None
            req.status = XferStatus.IN_PROGRESS
            self._queue.append(req)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._queue:
                    self._cond.wait()
                if self._closed:
                    return
                req = self._active = self._queue.popleft()
            try:
                err = self._execute(req)
            except Exception as exc:  # a CUDA failure: the request ends in ERROR with it
                err = exc
            with self._cond:
                if err is None and req.canceled:
                    err = TransferCanceledError(
                        "request released while running", backend=self._backend
                    )
                req.error = err
                req.status = XferStatus.ERROR if err is not None else XferStatus.DONE
                self._active = None
                self._cond.notify_all()

    def _execute(self, req: VramRequest) -> BaseException | None:
        gpu = self.device(req.dev)
        events, chunks = gpu.events, req.chunks
        if req.op is XferOp.WRITE:
            # GPU gathers chunk k+1 into the other slot while the file takes chunk k.
            gpu.launch(chunks[0].table, 0)
            for k, chunk in enumerate(chunks):
                events[k % 2].synchronize()
                if k + 1 < len(chunks):  # its slot was freed when chunk k-1's write returned
                    gpu.launch(chunks[k + 1].table, (k + 1) % 2)
                if req.canceled:
                    return None
                err = self._run_io(chunk.io)
                if err is not None:
                    return err
            return None
        # READ: the file fills slot k%2 while the GPU scatters the other slot.
        for k, chunk in enumerate(chunks):
            if k >= 2:
                events[k % 2].synchronize()  # the scatter of chunk k-2 has left this slot
            if req.canceled:
                break
            err = self._run_io(chunk.io)
            if err is not None:
                events[(k + 1) % 2].synchronize()
                return err
            gpu.launch(chunk.table, k % 2)
        events[0].synchronize()
        events[1].synchronize()
        return None

    def block(self, req: VramRequest, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: req.status is not XferStatus.IN_PROGRESS, timeout)

    def cancel(self, req: VramRequest, timeout: float) -> None:
        with self._cond:
            if req.status is not XferStatus.IN_PROGRESS:
                return
            req.canceled = True
            if req in self._queue:
                self._queue.remove(req)
                req.error = TransferCanceledError(
                    "request released before it ran", backend=self._backend
                )
                req.status = XferStatus.ERROR
                return
            if not self._cond.wait_for(lambda: req.status is not XferStatus.IN_PROGRESS, timeout):
                raise RepostActiveError(f"POSIX VRAM request did not stop within {timeout} s")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for req in self._queue:
                req.error = TransferCanceledError("backend closed", backend=self._backend)
                req.status = XferStatus.ERROR
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for gpu in self._dev.values():
            gpu.close()
        self._dev.clear()


def require_staging(backend: str) -> None:
    """Raise NotSupportedError when VRAM <-> FILE cannot run here."""
    why = staging_unavailable_reason()
    if why is not None:
        raise NotSupportedError(
            f"{backend} moves VRAM <-> FILE through pinned host memory, but {why}"
        )
