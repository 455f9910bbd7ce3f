"""LOOPBACK: the reference DRAM backend that ships with the core.

It makes the core fully testable with no plugin installed: same-agent copies, and transfers
between two agents of one host (two processes, or two agents in one process). Bytes move with
Linux cross-memory attach (``process_vm_writev`` / ``process_vm_readv``): the descriptor arrays
become iovec arrays and one system call moves up to 1024 descriptors, so there is no Python loop
per descriptor. Small transfers run inline in ``post``; larger ones run on a worker thread (the
system call releases the GIL) so ``post`` returns at once.

Notifications travel over an abstract Unix datagram socket owned by the backend; a transfer's
notification is sent after its copy returned, so the data is visible before it arrives.

Connection info carries the process's :class:`~nixl_core.host.HostIdentity` (the core's one
same-host rule) and the notification socket: a peer on another host, network namespace or pid
namespace is refused with a clear error (use UCX there). On kernels with Yama
``ptrace_scope=1`` the backend lets any same-user process attach to this one
(``prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)``), as cross-memory attach requires: a change to the
whole process, logged once at INFO and listed by ``python -m nixl_core backends``.
``ptrace_scope >= 2`` makes the backend unavailable.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from nixl_core.backend import Availability, Backend, BackendRequest, XferOp, XferSide, XferStatus
from nixl_core.errors import (
    MetadataError,
    RemoteDisconnectError,
    RepostActiveError,
    TransferCanceledError,
    TransferError,
    UnknownAgentError,
)
from nixl_core.host import HostIdentity, local_identity
from nixl_core.memory import MemType
from nixl_core.notif_socket import NotifSocket
from nixl_core.params import Param

__all__ = ["LoopbackBackend"]

logger = logging.getLogger(__name__)

U64 = npt.NDArray[np.uint64]

_IOV_MAX = 1024
_CONN_MAGIC = b"NLB2"
_LEN = struct.Struct("<H")
_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1 & 0xFFFFFFFFFFFFFFFF)
_PTRACER_NOTE = (
    "sets prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY) on this process at creation "
    "(kernel.yama.ptrace_scope=1): any process of the same user may then attach to it, as "
    "cross-memory attach between agents needs; do not create LOOPBACK to avoid it"
)
_ptracer_lock = threading.Lock()
_ptracer_set = False


def _allow_ptracer(libc: _Libc) -> None:
    """Let same-user processes attach to this one (once per process, logged)."""
    global _ptracer_set
    with _ptracer_lock:
        if _ptracer_set:
            return
        libc.prctl(_PR_SET_PTRACER, _PR_SET_PTRACER_ANY, 0, 0, 0)
        _ptracer_set = True
    logger.info("LOOPBACK %s", _PTRACER_NOTE)


def _ptrace_scope() -> int:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


class _Libc:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.writev = libc.process_vm_writev
        self.readv = libc.process_vm_readv
        for f in (self.writev, self.readv):
            f.restype = ctypes.c_ssize_t
            f.argtypes = [
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_ulong,
                ctypes.c_void_p,
                ctypes.c_ulong,
                ctypes.c_ulong,
            ]
        self.prctl = libc.prctl


class _Request(BackendRequest):
    __slots__ = (
        "cancel",
        "future",
        "liov",
        "local",
        "nbytes",
        "one_call",
        "op",
        "peer",
        "pid",
        "remote",
        "riov",
    )

    def __init__(
        self, op: XferOp, pid: int, peer: str, local: XferSide, remote: XferSide, nbytes: int
    ) -> None:
        self.op = op
        self.pid = pid
        self.peer = peer
        self.local = local
        self.remote = remote
        self.liov: U64 | None = None
        self.riov: U64 | None = None
        self.one_call: tuple[int, int, int] | None = None  # (local iov, remote iov, bytes)
        self.nbytes = nbytes
        self.future: concurrent.futures.Future[None] | None = None
        self.cancel = False
        self.path = "loopback:cma"
        self.error = None


def _pick(side: XferSide, idx: npt.NDArray[np.integer[Any]], lens: U64) -> XferSide:
    """The descriptors ``idx`` of a whole side (uniform columns stay broadcast views)."""
    n = int(idx.size)
    if side.uniform_dev >= 0:
        devs: U64 = np.broadcast_to(np.uint64(side.uniform_dev), (n,))
    else:
        devs = side.devs.take(idx)
    if side.single_slot >= 0:
        slots: npt.NDArray[np.int64] = np.broadcast_to(np.int64(side.single_slot), (n,))
    else:
        slots = side.reg_slots.take(idx)
    return attrs.evolve(side, addrs=side.addrs.take(idx), lengths=lens, devs=devs, reg_slots=slots)


class LoopbackBackend(Backend):
    """Reference DRAM backend: same-host copies by cross-memory attach, notifications over a socket.

    ``inline_bytes`` defaults to 4 MiB, about 0.3 ms of copying: a hand-off to the worker thread
    costs 150-250 us on the 2-core VM (64 x 4 KiB took 170-270 us through it and 50-64 us
    inline, 64 x 32 KiB 336 vs 145 us), and UCX's cma puts are synchronous in the caller too.
    ``indexed`` is the reference implementation of :meth:`prep_side` /
    :meth:`prepare_indexed`, run by the core's tests.
    """

    name = "LOOPBACK"
    mem_types = frozenset({MemType.DRAM})
    supports_local = True
    supports_remote = True
    supports_notif = True
    api_version = 2
    param_specs = (
        Param.integer(
            "num_threads", 1, "worker threads for transfers that do not run inline", minimum=1
        ),
        Param.integer(
            "inline_bytes",
            4 << 20,
            "transfers up to this many bytes (and 1024 descriptors) complete inside post",
            minimum=0,
        ),
        Param.boolean(
            "indexed",
            False,
            "keep each prepared list's side and make requests from index arrays (prep_side)",
        ),
    )

    @classmethod
    def probe(cls) -> Availability:
        if not sys.platform.startswith("linux"):
            return Availability(False, "needs Linux cross-memory attach (process_vm_writev)")
        if _ptrace_scope() >= 2:
            return Availability(
                False, "kernel.yama.ptrace_scope >= 2 forbids cross-memory attach between processes"
            )
        try:
            _Libc()
        except (OSError, AttributeError) as exc:
            return Availability(False, f"libc lacks process_vm_writev: {exc}")
        notes = (_PTRACER_NOTE,) if _ptrace_scope() == 1 and not _ptracer_set else ()
        return Availability(True, notes=notes)

    def __init__(self, agent_name: str, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(agent_name, params)
        self._inline = int(self.params["inline_bytes"])
        self._indexed = bool(self.params["indexed"])
        self._libc = _Libc()
        if _ptrace_scope() == 1:
            _allow_ptracer(self._libc)
        self._me = local_identity()
        self._pid = self._me.pid
        self._notifs = NotifSocket(self.name, agent_name)
        self._addr = self._notifs.addr
        self._peers: dict[str, tuple[int, bytes]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            int(self.params["num_threads"]), thread_name_prefix="nixl-loopback"
        )
        self._closed = False
        #: Counters of the indexed hooks (read by tests).
        self.sides_prepped = 0
        self.indexed_made = 0
        self._notifs.start()

    # ------------------------------------------------------------------ memory
    def register(self, mem_type: MemType, rows: U64, metas: Sequence[bytes]) -> list[Any]:
        # Cross-memory attach needs no registration: the handle is the region's address.
        return list(rows[:, 0].tolist())

    def deregister(self, handles: Sequence[Any]) -> None:
        return None

    def public_data(self, handle: Any) -> bytes:
        return struct.pack("<Q", handle)

    def connection_info(self) -> bytes:
        me = self._me.encode()
        return b"".join(
            (_CONN_MAGIC, _LEN.pack(len(me)), me, _LEN.pack(len(self._addr)), self._addr)
        )

    def load_remote_conn(self, peer: str, info: bytes) -> None:
        what = f"LOOPBACK connection info of {peer!r}"
        if info[:4] != _CONN_MAGIC or len(info) < 6:
            raise MetadataError(f"{what}: bad magic or truncated", 0)
        (n,) = _LEN.unpack_from(info, 4)
        ident = HostIdentity.decode(info[6 : 6 + n], what)
        off = 6 + n
        if off + 2 > len(info):
            raise MetadataError(f"{what} ends before its socket address", off)
        (m,) = _LEN.unpack_from(info, off)
        addr = info[off + 2 : off + 2 + m]
        if off + 2 + m != len(info):
            raise MetadataError(f"{what}: socket address length does not match", off)
        self._me.check_peer(ident, peer=peer, backend=self.name, same_pid_ns=True)
        self._peers[peer] = (ident.pid, addr)

    def load_remote(
        self, peer: str, mem_type: MemType, rows: U64, blobs: Sequence[bytes]
    ) -> list[Any]:
        return list(rows[:, 0].tolist())

    def disconnect(self, peer: str) -> None:
        self._peers.pop(peer, None)

    # ------------------------------------------------------------------ transfers
    def prepare(self, op: XferOp, local: XferSide, remote: XferSide, peer: str) -> BackendRequest:
        if peer == self.agent_name:
            pid = self._pid
        else:
            known = self._peers.get(peer)
            if known is None:
                raise UnknownAgentError(peer)
            pid = known[0]
        if local.uniform_len >= 0:
            nbytes = len(local) * local.uniform_len
        else:
            nbytes = int(local.lengths.sum(dtype=np.uint64))
        return _Request(op, pid, peer, local, remote, nbytes)

    def prep_side(self, side: XferSide, peer: str) -> Any:
        """With ``indexed=1``: the whole side is the state (its columns are gathered by index)."""
        if not self._indexed:
            return None
        self.sides_prepped += 1
        return side

    def prepare_indexed(
        self,
        op: XferOp,
        local_state: Any,
        local_idx: npt.NDArray[np.integer[Any]],
        remote_state: Any,
        remote_idx: npt.NDArray[np.integer[Any]],
        peer: str,
    ) -> BackendRequest:
        """Gather both sides by index (numpy) and prepare as usual."""
        assert isinstance(local_state, XferSide) and isinstance(remote_state, XferSide)
        n = int(local_idx.size)
        if local_state.uniform_len >= 0:
            lens: U64 = np.broadcast_to(np.uint64(local_state.uniform_len), (n,))
        else:
            lens = local_state.lengths.take(local_idx)
        self.indexed_made += 1
        return self.prepare(
            op, _pick(local_state, local_idx, lens), _pick(remote_state, remote_idx, lens), peer
        )

    @staticmethod
    def _iovecs(req: _Request) -> tuple[U64, U64]:
        """iovec arrays [base, len] of both sides, built at the first post and kept for reposts."""
        if req.liov is None or req.riov is None:
            n = len(req.local)
            liov = np.empty((n, 2), np.uint64)
            riov = np.empty((n, 2), np.uint64)
            liov[:, 0] = req.local.addrs
            liov[:, 1] = req.local.lengths
            riov[:, 0] = req.remote.addrs
            riov[:, 1] = req.local.lengths
            req.liov, req.riov = liov, riov
            if n <= _IOV_MAX:  # addresses and byte count of the single call, for reposts
                req.one_call = (liov.ctypes.data, riov.ctypes.data, req.nbytes)
        return req.liov, req.riov

    def _copy(self, req: _Request) -> None:
        fn = self._libc.writev if req.op is XferOp.WRITE else self._libc.readv
        all_l, all_r = self._iovecs(req)
        n = all_l.shape[0]
        if n <= _IOV_MAX and req.one_call is not None:  # the common case: one system call
            l_addr, r_addr, want = req.one_call
            if fn(req.pid, l_addr, n, r_addr, n, 0) == want:
                return
        start = 0
        while start < n:
            if req.cancel:
                raise TransferCanceledError("transfer aborted by release()")
            end = min(start + _IOV_MAX, n)
            liov = all_l[start:end]
            riov = all_r[start:end]
            want = int(liov[:, 1].sum(dtype=np.uint64))
            got = fn(req.pid, liov.ctypes.data, end - start, riov.ctypes.data, end - start, 0)
            if got == want:
                start = end
                continue
            if got < 0:
                self._raise(req, ctypes.get_errno(), start, liov)
            # Short transfer: skip the descriptors that completed and retry the rest, so the
            # next call either progresses or reports the errno of the first bad descriptor.
            done = np.cumsum(liov[:, 1], dtype=np.uint64)
            k = int(np.searchsorted(done, np.uint64(got), side="right"))
            partial = got - (int(done[k - 1]) if k else 0)
            if k == 0 and partial == 0 and got == 0:
                self._raise(req, errno.EFAULT, start, liov)
            rest_l = all_l[start + k : end].copy()
            rest_r = all_r[start + k : end].copy()
            rest_l[0, 0] += np.uint64(partial)
            rest_l[0, 1] -= np.uint64(partial)
            rest_r[0, 0] += np.uint64(partial)
            rest_r[0, 1] -= np.uint64(partial)
            all_l = np.concatenate([all_l[: start + k], rest_l, all_l[end:]])
            all_r = np.concatenate([all_r[: start + k], rest_r, all_r[end:]])
            start += k

    def _raise(self, req: _Request, err: int, start: int, liov: U64) -> None:
        where = f"descriptors {start}..{start + liov.shape[0] - 1}"
        if err == errno.ESRCH:
            raise RemoteDisconnectError(
                f"agent {req.peer!r} (pid {req.pid}) is gone", backend=self.name
            )
        if err == errno.EPERM:
            raise TransferError(
                f"not permitted to access agent {req.peer!r} (pid {req.pid}): cross-memory attach "
                "needs the same user and kernel.yama.ptrace_scope <= 1",
                backend=self.name,
            )
        if err == errno.EFAULT:
            raise TransferError(
                f"bad address in {where} of a {req.op.value} with {req.peer!r}: memory unmapped "
                "or freed while registered",
                backend=self.name,
            )
        raise TransferError(
            f"{req.op.value} with {req.peer!r} failed at {where}: {os.strerror(err)}",
            backend=self.name,
        )

    def _run(self, req: _Request, notif: bytes | None) -> None:
        self._copy(req)
        if notif is not None:
            self.send_notif(req.peer, notif)

    def post(self, req: BackendRequest, notif: bytes | None) -> XferStatus:
        assert isinstance(req, _Request)
        req.cancel = False
        req.error = None
        if req.nbytes <= self._inline and len(req.local) <= _IOV_MAX:
            req.future = None
            try:
                self._run(req, notif)
            except TransferError as exc:
                req.error = exc
                return XferStatus.ERROR
            return XferStatus.DONE
        req.future = self._pool.submit(self._run, req, notif)
        return XferStatus.IN_PROGRESS

    def poll(self, req: BackendRequest) -> XferStatus:
        assert isinstance(req, _Request)
        fut = req.future
        if fut is None:
            return XferStatus.ERROR if req.error else XferStatus.DONE
        if not fut.done():
            # Give the GIL to the worker: it needs it to finish the future, and a caller polling
            # in a tight loop would otherwise hold it for a whole switch interval (5 ms).
            time.sleep(0)
            return XferStatus.IN_PROGRESS if not fut.done() else self.poll(req)
        exc = fut.exception()
        if exc is not None:
            req.error = exc
            return XferStatus.ERROR
        return XferStatus.DONE

    def block(self, req: BackendRequest, timeout: float) -> None:
        assert isinstance(req, _Request)
        fut = req.future
        if fut is not None:  # sleeps (GIL released) until the worker finishes the copy
            concurrent.futures.wait((fut,), timeout)

    def release(self, req: BackendRequest) -> None:
        assert isinstance(req, _Request)
        fut = req.future
        if fut is None or fut.done():
            return
        req.cancel = True
        if fut.cancel():
            return
        # Running: it stops after its current batch of at most 1024 descriptors.
        try:
            fut.exception(timeout=5.0)
        except concurrent.futures.TimeoutError:
            raise RepostActiveError("LOOPBACK transfer did not stop within 5 s") from None

    # ------------------------------------------------------------------ notifications
    def send_notif(self, peer: str, msg: bytes) -> None:
        if peer == self.agent_name:
            self._notifs.send(peer, b"", msg)
            return
        known = self._peers.get(peer)
        if known is None:
            raise UnknownAgentError(peer)
        self._notifs.send(peer, known[1], msg)

    def get_notifs(self) -> list[tuple[str, bytes]]:
        return self._notifs.take()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._notifs.close()
