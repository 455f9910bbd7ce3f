"""Transfer tables: what one launch of the copy kernel reads, built on the host or on the GPU.

A request's table is three uint64 rows on the GPU (source, destination and length of each chunk),
in device addresses of this process (peer addresses already mapped here, see
:mod:`nixl_nvlink._regions`).

- ``create`` (:meth:`Tables.prepare`): numpy turns both sides into (source, destination,
  length) arrays (one offset per registration, no Python loop per descriptor), splits
  descriptors longer than ``chunk_bytes`` into chunks (one per warp) and uploads the table once.
- ``prep`` + ``make``: a prepared list keeps a device-resident copy of its pointer (and length)
  columns (:meth:`Tables.prep_side`, uploaded on the first ``make``); ``make``
  (:meth:`Tables.prepare_indexed`) gathers the request's table from the index arrays, on the
  host into a pinned staging buffer (a ring of :data:`_STAGE_SLOTS` per GPU) that one async copy
  uploads when the request has at most ``host_gather_max`` descriptors, else by one gather
  kernel on the backend's stream after an int32 index upload. Lists with descriptors longer
  than ``chunk_bytes`` gather on the host (they are few) and upload the chunked table.

The copy kernel follows on the same stream, so no path synchronizes the host after ``make``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from nixl_core.backend import BackendRequest, XferOp, XferSide
from nixl_core.errors import NotSupportedError
from nixl_nvlink._devices import Devices
from nixl_nvlink._regions import Reg, RemoteReg

__all__ = ["Request", "Route", "SideState", "Tables", "pointers"]

U64 = npt.NDArray[np.uint64]
_MASK = (1 << 64) - 1
#: Pinned staging buffers per GPU for make()'s uploads (a ring: a slot is rewritten only once
#: the copy that read it has run).
_STAGE_SLOTS = 8
_MEMCPY_H2D = 1

#: ``route(peer, local GPUs, remote GPUs, any host memory) -> (GPU the kernel runs on, path)``;
#: enables the peer access the transfer needs, raises for a transfer NVLINK cannot carry.
Route = Callable[[str, set[int], set[int], bool], tuple[int, str]]


class Request(BackendRequest):
    """One NVLINK transfer: its device table, the copy kernel's arguments and its event."""

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


class SideState:
    """A prepared list as NVLINK keeps it (:meth:`Tables.prep_side`).

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


class _Stage:
    """A pinned host buffer make() writes into and one async copy reads from."""

    __slots__ = ("event", "host", "mem", "nbytes", "ptr")

    def __init__(self, cp: Any, nbytes: int) -> None:
        self.mem = cp.cuda.alloc_pinned_memory(nbytes)
        self.ptr = int(self.mem.ptr)
        self.nbytes = nbytes
        self.host = np.frombuffer(self.mem, np.uint8, nbytes)
        self.event = cp.cuda.Event(block=False, disable_timing=True)


def pointers(side: XferSide, what: str) -> tuple[U64, set[int], bool]:
    """(device addresses, GPUs holding them, whether any is host memory) of a side, vectorized.

    Raises:
        NotSupportedError: a descriptor lies in a peer's DRAM (names the peer).
    """
    if side.single_slot >= 0:
        inv = None
        hs: list[Reg] = [side.slot_handles[side.single_slot]]
    else:
        inv, hs = side.unique_handles()
    for h in hs:
        if isinstance(h, RemoteReg) and h.host:
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


class Tables:
    """Builds requests' tables for one backend (its params, streams and staging rings).

    Args:
        cu: the process's :class:`nixl_nvlink._cuda.Cuda`.
        devices: the backend's streams.
        route: the backend's :data:`Route`.
        chunk_bytes: the chunk size (a multiple of 16).
        blocks_per_sm: the copy kernel's grid, in blocks per multiprocessor.
        device_gather: prepared lists keep device-resident columns (else ``prep_side`` returns
            None and ``make`` takes the ``create`` path).
        host_gather_max: requests of at most this many descriptors gather on the host.
    """

    def __init__(
        self,
        cu: Any,
        devices: Devices,
        route: Route,
        *,
        chunk_bytes: int,
        blocks_per_sm: int,
        device_gather: bool,
        host_gather_max: int,
    ) -> None:
        self._cu = cu
        self._cp: Any = cu.cupy
        self._devices = devices
        self._route = route
        self._chunk = chunk_bytes
        self._per_sm = blocks_per_sm
        self._device_gather = device_gather
        self._host_gather_max = host_gather_max
        self._gather = cu.gather_kernel()
        self._stages: dict[int, list[_Stage]] = {}
        self._stage_next: dict[int, int] = {}
        self._stage_lock = threading.Lock()

    def close(self) -> None:
        """Free the staging buffers (call once the backend's streams are idle)."""
        self._stages.clear()

    def _chunks(self, src: U64, dst: U64, lens: U64, max_len: int) -> tuple[U64, U64, U64]:
        """Split descriptors longer than ``chunk_bytes`` into chunks of it (vectorized)."""
        chunk = self._chunk
        if max_len <= chunk:
            return src, dst, lens
        c = np.uint64(chunk)
        pieces = (lens + (c - np.uint64(1))) // c
        owner = np.repeat(np.arange(lens.size), pieces.astype(np.int64))
        first = np.cumsum(pieces) - pieces
        off = (np.arange(owner.size, dtype=np.uint64) - first[owner]) * c
        return src[owner] + off, dst[owner] + off, np.minimum(lens[owner] - off, c)

    def _finish(self, req: Request, d_table: Any, m: int, row: int = 0) -> Request:
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

    def _host_table(self, req: Request, src: U64, dst: U64, lens: U64, max_len: int) -> Request:
        """Chunk a table built on the host and upload it (``create``, and long descriptors)."""
        src, dst, lens = self._chunks(src, dst, lens, max_len)
        m = int(lens.size)
        table = np.empty((3, max(m, 1)), np.uint64)
        table[0, :m] = src
        table[1, :m] = dst
        table[2, :m] = lens
        stream = self._devices.stream(req.dev)
        with self._cp.cuda.Device(req.dev):
            d_table = self._cp.empty(table.shape, self._cp.uint64)
            d_table.set(table, stream=stream)
            stream.synchronize()
            req.event = self._cp.cuda.Event(block=False, disable_timing=True)
        return self._finish(req, d_table, m)

    def prepare(self, op: XferOp, local: XferSide, remote: XferSide, peer: str) -> Request:
        """A request for two sides (``create``): its table built on the host and uploaded.

        Raises:
            NotSupportedError: a peer's DRAM, or a transfer :data:`Route` refuses.
        """
        lptr, ldevs, lhost = pointers(local, "local")
        rptr, rdevs, rhost = pointers(remote, "remote")
        dev, path = self._route(peer, ldevs, rdevs, lhost or rhost)
        n = len(local)
        if local.uniform_len >= 0:
            max_len = local.uniform_len
            lens = np.full(n, local.uniform_len, np.uint64)
        else:
            lens = np.ascontiguousarray(local.lengths, np.uint64)
            max_len = int(lens.max()) if n else 0
        src, dst = (lptr, rptr) if op is XferOp.WRITE else (rptr, lptr)
        return self._host_table(Request(op, peer, dev, path), src, dst, lens, max_len)

    def prep_side(self, side: XferSide, peer: str) -> Any:
        """Device addresses of a whole prepared list, kept (and uploaded) for ``make``.

        Returns None (``make`` then takes the host path, which raises the per-request error)
        for initiator lists spanning several GPUs. A peer's DRAM raises NotSupportedError.
        """
        if not self._device_gather:
            return None
        ptrs, devs, host = pointers(side, "remote" if peer else "local")
        if not peer and len(devs) > 1:
            return None
        n = len(side)
        lens: U64 | None = None
        if side.uniform_len >= 0:
            ulen = max_len = side.uniform_len
        else:
            lens = np.ascontiguousarray(side.lengths, np.uint64)
            ulen, max_len = -1, int(lens.max()) if n else 0
        st = SideState(np.ascontiguousarray(ptrs), lens, ulen, max_len, devs, host)
        if max_len <= self._chunk:  # upload now where the kernel will most likely run
            self._cols(st, min(devs) if devs else int(self._cp.cuda.runtime.getDevice()))
        return st

    def release_side(self, state: Any) -> None:
        """Drop a prepared list's device columns."""
        if isinstance(state, SideState):
            state.cols.clear()  # requests made from it keep the arrays they read

    def _cols(self, st: SideState, dev: int) -> Any:
        """The state's device columns on GPU ``dev`` (uploaded once, on the backend's stream)."""
        cols = st.cols.get(dev)
        if cols is None:
            host = st.ptrs[None, :] if st.lens is None else np.stack([st.ptrs, st.lens])
            stream = self._devices.stream(dev)
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
    ) -> Request:
        """The request's table, on the backend's stream (the copy kernel follows on it, so no
        synchronize).

        Up to ``host_gather_max`` descriptors: numpy gathers the table into a pinned staging
        buffer and one async copy uploads it. More: one int32 index upload (one array when both
        sides use the same indices) from pinned staging into the request's one device buffer,
        and one gather kernel reads the lists' resident columns.
        """
        ls, rs = local_state, remote_state
        assert isinstance(ls, SideState) and isinstance(rs, SideState)
        dev, path = self._route(peer, ls.devs, rs.devs, ls.host or rs.host)
        req = Request(op, peer, dev, path)
        n = int(local_idx.size)
        max_len = max(ls.max_len, rs.max_len)
        if max_len > self._chunk:  # long descriptors: chunk on the host (few descriptors)
            lptr, rptr = ls.ptrs.take(local_idx), rs.ptrs.take(remote_idx)
            lens = np.full(n, ls.ulen, np.uint64) if ls.lens is None else ls.lens.take(local_idx)
            src, dst = (lptr, rptr) if op is XferOp.WRITE else (rptr, lptr)
            return self._host_table(req, src, dst, lens, max_len)
        cp = self._cp
        stream = self._devices.stream(dev)
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
