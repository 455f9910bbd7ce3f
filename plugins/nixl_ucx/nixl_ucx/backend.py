"""UCX: one-sided READ/WRITE between agents (and within one) over libucp.

Per agent a UCP context (RMA + active messages + wakeup) and ``num_workers`` workers; the
workers' addresses are the connection info. A registration is ``ucp_mem_map`` (host or CUDA
memory type) and its packed remote key is the region's public data. Loading a peer creates one
endpoint per local worker; its keys are unpacked once per region and endpoint and cached in the
region's handle. A request is built once (``prepare``: the descriptor arrays and key tables go to
C); each ``post`` is ONE call into C that posts every put/get and a flush per endpoint, then the
notification as an active message once every flush completed.

Teardown never frees what UCX may still use. UCX keeps posted operations after the call that
posted them (cma queues its copies; a closed endpoint's transport endpoints finish theirs in the
background), including those of a request released while in flight. So remote keys are freed,
memory unmapped and the context destroyed only after a drain (a flush of every worker, bounded in
time) completed; what a drain could not clear in time is kept and freed at close after the last
drain, and if even that one does not complete, the context is leaked rather than destroyed
(destroying a worker under a queued operation aborts the process inside UCX).

This module imports nothing native, and :meth:`UcxBackend.probe` loads nothing either (it looks
for the wheel's files and the extension's import spec); libucp and the extension load in the
constructor, see :mod:`nixl_ucx._native`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import struct
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from nixl_core.backend import Availability, Backend, BackendRequest, XferOp, XferSide, XferStatus
from nixl_core.errors import (
    BackendUnavailableError,
    InvalidParamError,
    MetadataError,
    NixlError,
    NotSupportedError,
    RegistrationError,
    RemoteDisconnectError,
    TransferCanceledError,
    TransferError,
    UnknownAgentError,
)
from nixl_core.memory import MemType
from nixl_ucx.params import PARAMS, UcxConfig

__all__ = ["UcxBackend"]

logger = logging.getLogger(__name__)

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

_CONN_MAGIC = b"NXU1"
_BLOB_MAGIC = b"NXK1"
_ERR_MODES = {"none": 0, "peer": 1}
_MEM_CODE = {MemType.DRAM: 0, MemType.VRAM: 1}
_UCS_MEMORY_TYPE_CUDA = 1
_INPROG, _DONE = 1, 0
_UCS_ERR_CANCELED = -16
#: UCS statuses that mean the peer is gone or unreachable (I/O error is what cma reports for a
#: dead process; -40..-89 are link and endpoint failures).
_DISCONNECT = {-3, -6, -20, -23, -24, -25}
#: Bound on each teardown wait: a peer's posting threads leaving it, closing its endpoints
#: (FORCE close: never waits on an unresponsive peer), draining the workers.
_TEARDOWN_MS = 5000


def _is_disconnect(status: int) -> bool:
    return status in _DISCONNECT or -89 <= status <= -40


class _Local:
    """A registration: the mapped region and its packed key."""

    __slots__ = ("addr", "length", "mem", "mem_type", "rkey")

    def __init__(self, mem: Any, rkey: bytes, addr: int, length: int, mem_type: MemType) -> None:
        self.mem = mem
        self.rkey = rkey
        self.addr = addr
        self.length = length
        self.mem_type = mem_type


class _Peer:
    """Endpoints to one agent (or to this agent itself) and what was learnt about them."""

    __slots__ = ("closed", "name", "path", "ptr")

    def __init__(self, name: str, ptr: Any) -> None:
        self.name = name
        self.ptr = ptr
        self.path = ""
        self.closed = False


class _Remote:
    """A peer's region: its key unpacked once per endpoint."""

    __slots__ = ("peer", "rkey")

    def __init__(self, peer: _Peer, rkey: Any) -> None:
        self.peer = peer
        self.rkey = rkey


class _Request(BackendRequest):
    """A prepared request; ``x`` is None once its native state was handed back (freed or
    parked as an orphan)."""

    __slots__ = ("backend", "keep", "peer", "x")

    def __init__(self, backend: UcxBackend, x: Any, keep: tuple[Any, ...], peer: _Peer) -> None:
        self.backend = backend
        self.x = x
        self.keep = keep
        self.peer = peer
        self.path = peer.path or "ucx"
        self.error = None

    def __del__(self) -> None:
        # May run from the garbage collector in any thread, also during close.
        if self.x is not None:
            self.backend._drop(self)


def _dense_index(
    slots: I64, handles: Mapping[int, Any]
) -> tuple[npt.NDArray[np.uint32], list[Any]]:
    """(index into the distinct handles per descriptor, the distinct handles), vectorized."""
    top = int(slots.max()) + 1
    present = np.zeros(top, np.bool_)
    present[slots] = True
    uniq = np.flatnonzero(present)
    remap = np.cumsum(present, dtype=np.int64) - 1
    idx = remap[slots].astype(np.uint32)
    return idx, [handles[int(s)] for s in uniq.tolist()]


class UcxBackend(Backend):
    """UCX backend: DRAM (and VRAM where UCX has CUDA support), local and remote, notifications.

    Params: :data:`nixl_ucx.params.PARAMS` (``python -m nixl_core backends --params``).
    """

    name = "UCX"
    mem_types = frozenset({MemType.DRAM, MemType.VRAM})
    supports_local = True
    supports_remote = True
    supports_notif = True
    api_version = 2
    param_specs = PARAMS

    @classmethod
    def probe(cls) -> Availability:
        """Whether the libucx wheel and the built extension are present; loads nothing and
        changes nothing in the process (UCX loads in the constructor)."""
        from nixl_ucx import _native

        try:
            why = _native.check()
        except Exception as exc:  # probe must never raise: report anything unexpected
            return Availability(False, f"checking for UCX failed: {type(exc).__name__}: {exc}")
        return Availability(False, why) if why else Availability(True)

    def __init__(self, agent_name: str, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(agent_name, params)
        from nixl_ucx import _native

        self.config = UcxConfig.of(self.params)
        try:
            self._ffi, self._lib = _native.load()
        except _native.NativeUnavailableError as exc:
            raise BackendUnavailableError(f"backend UCX is not available here: {exc}") from exc
        ffi, lib = self._ffi, self._lib
        self._ucx_options = self._options()
        keys = [ffi.new("char[]", k.encode()) for k, _ in self._ucx_options]
        vals = [ffi.new("char[]", v.encode()) for _, v in self._ucx_options]
        err = ffi.new("char[]", 512)
        ctx = lib.nx_ctx_new(
            agent_name.encode(),
            ffi.new("char *[]", keys),
            ffi.new("char *[]", vals),
            len(keys),
            self.config.workers,
            _ERR_MODES[self.config.error_handling_mode],
            int(self.config.threads),
            err,
            512,
        )
        if ctx == ffi.NULL:
            msg = ffi.string(err).decode(errors="replace")
            if msg.startswith("UCX option"):
                raise InvalidParamError(f"backend UCX: {msg}")
            raise BackendUnavailableError(f"backend UCX could not start: {msg}")
        self._ctx = ctx
        self._nworkers = self.config.workers
        self._threads = bool(lib.nx_ctx_threads(ctx))
        self._addresses = [self._worker_address(k) for k in range(self._nworkers)]
        self._peers: dict[str, _Peer] = {}
        self._self_peer: _Peer | None = None
        self._locals: set[_Local] = set()
        self._remotes: dict[int, _Remote] = {}
        self._self_notifs: collections.deque[tuple[str, bytes]] = collections.deque()
        #: Native requests released in flight, until UCX finished them (keyed by pointer).
        self._orphans: dict[Any, tuple[Any, ...]] = {}
        #: Remote keys and mapped regions whose free waits for a drain that completes.
        self._deferred_rkeys: list[Any] = []
        self._deferred_mems: list[Any] = []
        self._requests: weakref.WeakSet[_Request] = weakref.WeakSet()
        # Reentrant: a request's __del__ may run from the garbage collector inside a locked
        # section of this very thread.
        self._lock = threading.RLock()
        self._rr = 0
        self._closed = False

    @property
    def ucx_options(self) -> tuple[tuple[str, str], ...]:
        """The UCX options applied with ``ucp_config_modify`` (without the ``UCX_`` prefix)."""
        return tuple(self._ucx_options)

    def _options(self) -> list[tuple[str, str]]:
        """UCX options applied with ucp_config_modify (an env var the user set wins)."""
        cfg = self.config
        opts: list[tuple[str, str]] = []
        if "UCX_WARN_UNUSED_ENV_VARS" not in os.environ:
            opts.append(("WARN_UNUSED_ENV_VARS", "n"))
        if cfg.error_handling_mode == "peer" and "UCX_RNDV_THRESH" not in os.environ:
            # Peer error handling otherwise turns RMA into software emulation over TCP.
            opts.append(("RNDV_THRESH", "inf"))
        if cfg.transports:
            opts.append(("TLS", cfg.transports))
        if cfg.device_list:
            opts.append(("NET_DEVICES", cfg.device_list))
        opts.extend(cfg.engine_config)
        return opts

    def _worker_address(self, k: int) -> bytes:
        ffi, lib = self._ffi, self._lib
        out = ffi.new("void **")
        length = ffi.new("size_t *")
        st = lib.nx_worker_address(self._ctx, k, out, length)
        if st != 0:
            raise BackendUnavailableError(f"UCX worker {k} has no address: {self._status_text(st)}")
        try:
            return bytes(ffi.buffer(out[0], length[0]))
        finally:
            lib.nx_free_address(self._ctx, k, out[0])

    def _status_text(self, status: int) -> str:
        return str(self._ffi.string(self._lib.nx_status_string(status)).decode())

    # ------------------------------------------------------------------ memory
    def register(self, mem_type: MemType, rows: U64, metas: Sequence[bytes]) -> list[Any]:
        cuda = mem_type is MemType.VRAM
        if cuda and not int(self._lib.nx_ctx_mem_types(self._ctx)) >> _UCS_MEMORY_TYPE_CUDA & 1:
            raise NotSupportedError(
                "UCX cannot register VRAM here: its CUDA support did not load (no NVIDIA driver "
                "or libcuda.so.1 on this host)"
            )
        if mem_type not in _MEM_CODE:
            raise NotSupportedError(f"UCX cannot register {mem_type.value} memory")
        ffi, lib = self._ffi, self._lib
        status = ffi.new("int *")
        buf = ffi.new("const void **")
        out: list[Any] = []
        try:
            for i, (addr, length, _dev) in enumerate(rows.tolist()):
                mem = lib.nx_mem_map(self._ctx, addr, length, int(cuda), status)
                if mem == ffi.NULL:
                    raise RegistrationError(
                        f"UCX could not map region {i} [addr=0x{addr:x}, len={length}]: "
                        f"{self._status_text(status[0])}",
                        index=i,
                    )
                n = lib.nx_mem_rkey(mem, buf)
                handle = _Local(mem, bytes(ffi.buffer(buf[0], n)), int(addr), int(length), mem_type)
                out.append(handle)
                self._locals.add(handle)
        except BaseException:
            self.deregister(out)
            raise
        return out

    def deregister(self, handles: Sequence[Any]) -> None:
        mine = [h for h in handles if h in self._locals]
        if not mine:
            return
        self._locals.difference_update(mine)
        mems = [h.mem for h in mine]
        # A request released in flight may still have UCX operations on these regions.
        if self._drain("unmapping memory"):
            for m in mems:
                self._lib.nx_mem_unmap(self._ctx, m)
        else:
            with self._lock:
                self._deferred_mems.extend(mems)

    def _drain(self, what: str) -> bool:
        """Wait (bounded) until UCX holds no operation issued so far; False (logged) if not."""
        if self._lib.nx_ctx_drain(self._ctx, _TEARDOWN_MS) == 0:
            return True
        logger.warning(
            "UCX operations still running after %d s: %s is deferred to close",
            _TEARDOWN_MS // 1000,
            what,
        )
        return False

    def _free_rkeys(self, rkeys: list[Any], drained: bool) -> None:
        """Free native remote keys now when UCX was drained, else at close."""
        if drained:
            for rk in rkeys:
                self._lib.nx_rkey_free(rk)
        elif rkeys:
            with self._lock:
                self._deferred_rkeys.extend(rkeys)

    def public_data(self, handle: Any) -> bytes:
        h: _Local = handle
        return _BLOB_MAGIC + bytes((_MEM_CODE[h.mem_type],)) + h.rkey

    def _self(self) -> _Peer:
        if self._self_peer is None:
            self._self_peer = self._new_peer(self.agent_name, self._addresses)
        return self._self_peer

    def load_local(self, handle: Any) -> Any:
        return self._unpack(self._self(), handle.rkey, 0)

    def unload_local(self, handle: Any) -> None:
        if self._remotes.pop(id(handle), None) is not None:
            self._free_rkeys([handle.rkey], self._drain("freeing a remote key"))

    def _unpack(self, peer: _Peer, rkey: bytes, index: int) -> _Remote:
        status = self._ffi.new("int *")
        rk = self._lib.nx_rkey_unpack(peer.ptr, rkey, status)
        if rk == self._ffi.NULL:
            raise MetadataError(
                f"UCX remote key {index} of agent {peer.name!r} cannot be unpacked: "
                f"{self._status_text(status[0])}"
            )
        remote = _Remote(peer, rk)
        self._remotes[id(remote)] = remote
        return remote

    # ------------------------------------------------------------------ remote agents
    def connection_info(self) -> bytes:
        parts = [
            _CONN_MAGIC,
            struct.pack("<BH", _ERR_MODES[self.config.error_handling_mode], self._nworkers),
        ]
        for a in self._addresses:
            parts.append(struct.pack("<I", len(a)))
            parts.append(a)
        return b"".join(parts)

    def _parse_conn(self, peer: str, info: bytes) -> tuple[int, list[bytes]]:
        try:
            if info[:4] != _CONN_MAGIC:
                raise ValueError("bad magic")
            mode, n = struct.unpack_from("<BH", info, 4)
            off = 7
            addrs = []
            for _ in range(n):
                (ln,) = struct.unpack_from("<I", info, off)
                off += 4
                a = info[off : off + ln]
                if len(a) != ln or ln == 0:
                    raise ValueError("truncated worker address")
                addrs.append(a)
                off += ln
            if off != len(info) or n == 0 or mode not in (0, 1):
                raise ValueError("length mismatch")
        except (struct.error, ValueError) as exc:
            raise MetadataError(f"malformed UCX connection info from {peer!r}: {exc}") from exc
        return mode, addrs

    def load_remote_conn(self, peer: str, info: bytes) -> None:
        mode, addrs = self._parse_conn(peer, info)
        ours = _ERR_MODES[self.config.error_handling_mode]
        if mode != ours:
            names = {v: k for k, v in _ERR_MODES.items()}
            raise NotSupportedError(
                f"agent {peer!r} uses UCX error handling mode {names[mode]!r}, this agent "
                f"{names[ours]!r}: set ucx_error_handling_mode the same on both"
            )
        old = self._peers.pop(peer, None)
        if old is not None:
            self._close_peer(old)
        self._peers[peer] = self._new_peer(peer, addrs)

    def _new_peer(self, name: str, addrs: Sequence[bytes]) -> _Peer:
        ffi = self._ffi
        bufs = [ffi.from_buffer(a) for a in addrs]
        arr = ffi.new("void *[]", bufs)
        status = ffi.new("int *")
        ptr = self._lib.nx_peer_new(self._ctx, arr, len(bufs), status)
        if ptr == ffi.NULL:
            raise RemoteDisconnectError(
                f"UCX cannot create endpoints to agent {name!r}: {self._status_text(status[0])}",
                backend=self.name,
            )
        return _Peer(name, ptr)

    def load_remote(
        self, peer: str, mem_type: MemType, rows: U64, blobs: Sequence[bytes]
    ) -> list[Any]:
        p = self._peers.get(peer)
        if p is None:
            raise UnknownAgentError(peer, f"UCX has no connection info for agent {peer!r}")
        out: list[Any] = []
        try:
            for i, blob in enumerate(blobs):
                if blob[:4] != _BLOB_MAGIC or len(blob) < 6:
                    raise MetadataError(f"UCX region blob {i} of agent {peer!r} is malformed")
                if blob[4] != _MEM_CODE.get(mem_type, -1):
                    raise MetadataError(
                        f"UCX region blob {i} of agent {peer!r} is not {mem_type.value} memory"
                    )
                out.append(self._unpack(p, blob[5:], i))
        except BaseException:
            self.unload_remote(peer, out)
            raise
        return out

    def unload_remote(self, peer: str, handles: Sequence[Any]) -> None:
        rkeys = [h.rkey for h in handles if self._remotes.pop(id(h), None) is not None]
        if not rkeys:
            return
        p = self._peers.get(peer)
        # Chunks being posted by progress threads read these keys: stop them; operations
        # already posted use them until a drain.
        quiet = p is None or self._lib.nx_peer_quiesce(p.ptr, _TEARDOWN_MS) == 0
        self._free_rkeys(rkeys, quiet and self._drain("freeing remote keys"))

    def disconnect(self, peer: str) -> None:
        p = self._peers.pop(peer, None)
        if p is not None:
            self._close_peer(p)

    def _close_peer(self, p: _Peer) -> None:
        """Stop posts to the peer, close its endpoints, drain, then free its keys."""
        if p.closed:
            return
        p.closed = True
        lib = self._lib
        rkeys = []
        for key, r in list(self._remotes.items()):
            if r.peer is p:
                del self._remotes[key]
                rkeys.append(r.rkey)
        # nx_peer_close frees the peer only once its endpoints closed and the workers drained.
        closed = (
            lib.nx_peer_quiesce(p.ptr, _TEARDOWN_MS) == 0
            and lib.nx_peer_close(p.ptr, _TEARDOWN_MS) == 0
        )
        if not closed:
            logger.warning(
                "UCX endpoints to %s did not close and drain within %d s; the endpoints are "
                "leaked and their keys freed at close",
                p.name,
                _TEARDOWN_MS // 1000,
            )
        self._free_rkeys(rkeys, closed)

    def _peer(self, name: str) -> _Peer:
        if name == self.agent_name:
            return self._self()
        p = self._peers.get(name)
        if p is None:
            raise UnknownAgentError(name)
        return p

    def transport(self, peer: str) -> str:
        """The UCX transport that carries RMA to ``peer`` (e.g. "cma", "tcp"), "" if unknown.

        Read from ``ucp_ep_print_info`` of the first endpoint once its lanes are wired.
        """
        p = self._peer(peer)
        if not p.path:
            self._learn_path(p)
        return p.path[4:] if p.path.startswith("ucx:") else ""

    def _learn_path(self, p: _Peer) -> None:
        buf = self._ffi.new("char[]", 16384)
        n = self._lib.nx_peer_info(p.ptr, 0, buf, 16384)
        text = bytes(self._ffi.buffer(buf, n)).decode(errors="replace")
        tls = _rma_transports(text)
        if tls:
            p.path = "ucx:" + "+".join(tls)

    # ------------------------------------------------------------------ transfers
    def prepare(self, op: XferOp, local: XferSide, remote: XferSide, peer: str) -> BackendRequest:
        self._reap()
        p = self._peer(peer)
        ffi, lib = self._ffi, self._lib
        n = len(local)
        laddr = np.ascontiguousarray(local.addrs, dtype=np.uint64)
        raddr = np.ascontiguousarray(remote.addrs, dtype=np.uint64)
        keep: list[Any] = [laddr, raddr]
        if local.uniform_len >= 0:
            lens_p, ulen = ffi.NULL, local.uniform_len
        else:
            lens = np.ascontiguousarray(local.lengths, dtype=np.uint64)
            keep.append(lens)
            lens_p, ulen = ffi.from_buffer("uint64_t[]", lens), 0
        if local.single_slot >= 0:
            lidx_p, lhandles = ffi.NULL, [local.slot_handles[local.single_slot]]
        else:
            lidx, lhandles = _dense_index(local.reg_slots, local.slot_handles)
            keep.append(lidx)
            lidx_p = ffi.from_buffer("uint32_t[]", lidx)
        if remote.single_slot >= 0:
            ridx_p, rhandles = ffi.NULL, [remote.slot_handles[remote.single_slot]]
        else:
            ridx, rhandles = _dense_index(remote.reg_slots, remote.slot_handles)
            keep.append(ridx)
            ridx_p = ffi.from_buffer("uint32_t[]", ridx)
        for h in rhandles:
            if h.peer is not p or p.closed:
                raise UnknownAgentError(
                    peer, f"UCX keys of agent {peer!r} were unloaded; prepare again"
                )
        lms = ffi.new("nx_mem *[]", [h.mem for h in lhandles])
        rks = ffi.new("nx_rkey *[]", [h.rkey for h in rhandles])
        keep.extend((lms, rks, lens_p, lidx_p, ridx_p))
        with self._lock:
            wsel = self._rr
            self._rr = (self._rr + 1) % self._nworkers
        x = lib.nx_xfer_new(
            self._ctx,
            p.ptr,
            1 if op is XferOp.READ else 0,
            n,
            ffi.from_buffer("uint64_t[]", laddr),
            ffi.from_buffer("uint64_t[]", raddr),
            lens_p,
            ulen,
            lidx_p,
            lms,
            ridx_p,
            rks,
            wsel,
            self.config.split_batch_size,
        )
        req = _Request(self, x, tuple(keep), p)
        self._requests.add(req)
        return req

    def _settle(self, req: _Request, st: int) -> XferStatus:
        if st == _INPROG:
            return XferStatus.IN_PROGRESS
        if st == _DONE:
            if not req.peer.path:
                self._learn_path(req.peer)
            req.path = req.peer.path or "ucx"
            return XferStatus.DONE
        req.error = self._error(req, st)
        return XferStatus.ERROR

    def _error(self, req: _Request, st: int) -> TransferError:
        p = req.peer
        failed = 0 if p.closed else int(self._lib.nx_peer_failed(p.ptr))
        text = self._status_text(st)
        if failed or _is_disconnect(st):
            why = self._status_text(failed) if failed else text
            return RemoteDisconnectError(
                f"UCX transfer with agent {p.name!r} failed: the peer is gone or unreachable "
                f"({why})",
                backend=self.name,
            )
        if st == _UCS_ERR_CANCELED:
            return TransferCanceledError(
                f"UCX transfer with agent {p.name!r} was canceled (its endpoints were closed)",
                backend=self.name,
            )
        return TransferError(
            f"UCX transfer with agent {p.name!r} failed: {text}", backend=self.name
        )

    def post(self, req: BackendRequest, notif: bytes | None) -> XferStatus:
        assert isinstance(req, _Request)
        if req.peer.closed:
            raise UnknownAgentError(req.peer.name, f"agent {req.peer.name!r} was disconnected")
        req.error = None
        if notif is None:
            st = self._lib.nx_xfer_post(req.x, self._ffi.NULL, 0, 0)
        else:
            st = self._lib.nx_xfer_post(req.x, notif, len(notif), 1)
        return self._settle(req, st)

    def poll(self, req: BackendRequest) -> XferStatus:
        assert isinstance(req, _Request)
        return self._settle(req, self._lib.nx_xfer_poll(req.x))

    def block(self, req: BackendRequest, timeout: float) -> None:
        assert isinstance(req, _Request)
        self._lib.nx_xfer_wait(req.x, int(timeout * 1e6))

    def release(self, req: BackendRequest) -> None:
        assert isinstance(req, _Request)
        self._drop(req)

    def _drop(self, req: _Request) -> None:
        """Free a request's native state, or park it until UCX finished with it (once, from
        release, close or the garbage collector, in any thread)."""
        with self._lock:
            x, keep = req.x, req.keep
            if x is None:
                return
            req.x, req.keep = None, ()
            if self._closed:
                return  # freed with the context, or leaked with it
            lib = self._lib
            if lib.nx_xfer_status(x) == _INPROG:
                # UCX cannot abort posted RMA: the request finishes in the background and sends
                # no notification; its arrays stay alive until then.
                lib.nx_xfer_orphan(x)
                self._orphans[x] = keep
            else:
                lib.nx_xfer_free(x)

    def _reap(self) -> None:
        if not self._orphans:
            return
        lib = self._lib
        with self._lock:
            # A snapshot: the garbage collector may park another orphan meanwhile.
            done = [x for x in list(self._orphans) if lib.nx_xfer_status(x) != _INPROG]
            for x in done:
                del self._orphans[x]
                lib.nx_xfer_free(x)

    # ------------------------------------------------------------------ notifications
    def get_notifs(self) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        while self._self_notifs:
            out.append(self._self_notifs.popleft())
        lib = self._lib
        if not self._threads:
            lib.nx_progress(self._ctx, 16)
        pending = int(lib.nx_notif_pending(self._ctx))
        if pending:
            buf = self._ffi.new("char[]", pending)
            got = int(lib.nx_notif_take(self._ctx, buf, pending))
            data = self._ffi.buffer(buf, got)[:]
            off = 0
            while off < got:
                hlen, dlen = struct.unpack_from("<II", data, off)
                off += 8
                sender = data[off : off + hlen].decode("utf-8", "replace")
                out.append((sender, data[off + hlen : off + hlen + dlen]))
                off += hlen + dlen
        return out

    def send_notif(self, peer: str, msg: bytes) -> None:
        if peer == self.agent_name:
            self._self_notifs.append((self.agent_name, bytes(msg)))
            return
        p = self._peers.get(peer)
        if p is None:
            raise UnknownAgentError(peer)
        st = self._lib.nx_send_notif(p.ptr, bytes(msg), len(msg))
        if st != 0:
            failed = int(self._lib.nx_peer_failed(p.ptr))
            if failed or _is_disconnect(st):
                raise RemoteDisconnectError(
                    f"UCX notification to {peer!r} failed: the peer is gone "
                    f"({self._status_text(failed or st)})",
                    backend=self.name,
                )
            raise TransferError(
                f"UCX notification to {peer!r} failed: {self._status_text(st)}",
                backend=self.name,
            )

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            lib = self._lib
            for req in list(self._requests):
                self._drop(req)
            for p in list(self._peers.values()):
                self._close_peer(p)
            self._peers.clear()
            if self._self_peer is not None:
                self._close_peer(self._self_peer)
            lib.nx_ctx_stop_threads(self._ctx)
            drained = lib.nx_ctx_drain(self._ctx, _TEARDOWN_MS) == 0
            self._closed = True
            if not drained:
                # Destroying the workers now would abort inside UCX, and freeing keys or
                # memory would hand them to operations still queued: leak all of it instead.
                logger.warning(
                    "UCX operations still running %d s after close; the UCX context, %d "
                    "requests and %d registrations are leaked",
                    _TEARDOWN_MS // 1000,
                    len(self._orphans),
                    len(self._locals) + len(self._deferred_mems),
                )
                return
            for rk in [r.rkey for r in self._remotes.values()] + self._deferred_rkeys:
                lib.nx_rkey_free(rk)
            for m in [h.mem for h in self._locals] + self._deferred_mems:
                lib.nx_mem_unmap(self._ctx, m)
            self._remotes.clear()
            self._locals.clear()
            self._deferred_rkeys.clear()
            self._deferred_mems.clear()
            lib.nx_ctx_free(self._ctx)
            # Only now, with the workers destroyed, can nothing in UCX still read the
            # descriptor arrays of a request released in flight.
            for x in self._orphans:
                lib.nx_xfer_free(x)
            self._orphans.clear()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and hasattr(self, "_ctx"):
            with contextlib.suppress(NixlError):
                self.close()


def _rma_transports(text: str) -> list[str]:
    """Transport names of the RMA lanes in ``ucp_ep_print_info`` output (in order, distinct)."""
    found: list[str] = []
    for line in text.splitlines():
        if "lane[" not in line or "rma" not in line:
            continue
        m = re.search(r"lane\[\d+\]:\s*\d+:([A-Za-z0-9_]+)", line)
        if m and m.group(1) not in found:
            found.append(m.group(1))
    return found
