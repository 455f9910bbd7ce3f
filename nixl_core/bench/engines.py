"""The two implementations behind one interface, and the timing loop they share.

:class:`OursEngine` drives ``nixl_core.Agent``; :class:`NixlEngine` drives the real NIXL's Python
API (``nixl._api``). Both receive the same (N, 3) uint64 descriptor arrays, built by
:func:`nixl_core.bench.workload.descs_array`, and :func:`run_row` times them identically:

- **Prep**: building the request from the descriptor arrays — ours ``create()`` (one-shot) or
  ``make()`` (``--prepared``: from lists prepared once per row, with index arrays); NIXL
  ``get_xfer_descs`` + ``initialize_xfer``, or ``make_prepped_xfer``. One build per row, reposted
  every iteration (nixlbench's default), or one per iteration with ``--recreate-xfer``.
- **Post**: the post call (ours ``XferRequest.post``; NIXL ``transfer``).
- **Tx**: from the post's return to completion observed (ours ``XferRequest.wait``; NIXL a
  ``check_xfer_state`` loop, as nixlbench polls ``getXferStatus``).
- **Total**: wall time of the timed loop, builds included; B/W and Avg Lat. derive from it.

Every post carries a notification (``--target-seg`` DRAM/VRAM), so the target process receives
one per iteration, as in nixlbench; FILE transfers are loopback and carry none.

This module imports neither implementation at import time: each engine imports its library in its
constructor, inside the process that runs it.
"""

from __future__ import annotations

import abc
import contextlib
import os
import time
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from nixl_core.bench.workload import SideLayout, descs_array

__all__ = [
    "DdEngine",
    "Engine",
    "NixlEngine",
    "OursEngine",
    "RowSpec",
    "RowTimes",
    "make_engine",
    "run_row",
]

U64 = npt.NDArray[np.uint64]


@attrs.frozen
class RowSpec:
    """What the initiator runs for one row.

    Attributes:
        row: row number (names the notification, so late ones of a row are not counted twice).
        op: "READ" or "WRITE".
        local, remote: the initiator's and the target's slots.
        local_mem, remote_mem: memory types ("DRAM", "VRAM", "FILE").
        local_base, remote_base: buffer addresses (file offset 0 for FILE).
        local_dev, remote_dev: device ids (GPU index; the file's id for FILE).
        peer: the target agent's name (the initiator's own for FILE).
        iters, warmup: timed and untimed iterations.
        prepared: prep the two lists once, then make() per request.
        recreate: build a new request every iteration.
        notif: notification bytes for every post, or None.
        timeout: seconds one iteration may take before the row fails.
    """

    row: int
    op: str
    local: SideLayout
    remote: SideLayout
    local_mem: str
    remote_mem: str
    local_base: int
    remote_base: int
    local_dev: int
    remote_dev: int
    peer: str
    iters: int
    warmup: int
    prepared: bool
    recreate: bool
    notif: bytes | None
    timeout: float


@attrs.frozen
class RowTimes:
    """Raw timings of one row (microseconds) as measured in the initiator process."""

    prep_us: list[float]
    post_us: list[float]
    tx_us: list[float]
    total_s: float
    path: str
    desc_count: int | None


class Engine(abc.ABC):
    """One agent of one implementation in one process."""

    impl: str = ""

    @abc.abstractmethod
    def register_memory(self, mem: str, addr: int, nbytes: int, dev: int) -> None:
        """Register one DRAM/VRAM buffer."""

    @abc.abstractmethod
    def register_file(self, path: str, file_id: int, direct: bool) -> int:
        """Register a file (whole, unbounded) for FILE transfers; returns the descriptors' dev."""

    @abc.abstractmethod
    def metadata(self) -> bytes:
        """This agent's metadata, for the peer."""

    @abc.abstractmethod
    def add_remote(self, md: bytes) -> str:
        """Load the peer's metadata; returns its name."""

    @abc.abstractmethod
    def drain_notifs(self) -> list[bytes]:
        """Notifications received since the last call."""

    @abc.abstractmethod
    def prep_lists(self, spec: RowSpec) -> Any:
        """Prepared lists of every slot of both sides (``--prepared``)."""

    @abc.abstractmethod
    def release_lists(self, lists: Any) -> None:
        """Free what :meth:`prep_lists` returned."""

    @abc.abstractmethod
    def build(self, spec: RowSpec, local: U64, remote: U64, lists: Any) -> Any:
        """Make a request (timed as Prep)."""

    @abc.abstractmethod
    def post(self, req: Any) -> bool:
        """Post; True when it completed inside the call."""

    @abc.abstractmethod
    def wait(self, req: Any, timeout: float) -> None:
        """Return when the request is done; raise on error or after ``timeout`` seconds."""

    @abc.abstractmethod
    def release(self, req: Any) -> None:
        """Free a request."""

    @abc.abstractmethod
    def path(self, req: Any) -> str:
        """The backend/transport that carried the request."""

    def desc_count(self, req: Any) -> int | None:
        """Descriptors the backend received (after merging); None when the library does not say."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Release the agent."""


# --------------------------------------------------------------------------- nixl-py
class OursEngine(Engine):
    """nixl_core.Agent. ``backend`` None = the agent's default (UCX if installed, else LOOPBACK)."""

    impl = "ours"

    def __init__(self, name: str, backend: str | None) -> None:
        from nixl_core import Agent, AgentConfig

        self.agent = Agent(name, AgentConfig(backends=(backend,) if backend else None))
        self.name = name
        self.backend = self.agent.backends[0]

    def register_memory(self, mem: str, addr: int, nbytes: int, dev: int) -> None:
        self.agent.register(np.array([[addr, nbytes, dev]], np.uint64), mem)

    def register_file(self, path: str, file_id: int, direct: bool) -> int:
        from nixl_core import RegDescList

        modes = "rw,direct" if direct else "rw"
        # Path mode: the backend opens the file at registration and closes it at deregistration;
        # len 0 = the whole file; dev is the id our descriptors use for it.
        meta = modes.encode() + b":" + os.fsencode(path)
        reg = RegDescList("FILE", np.array([[0, 0, file_id]], np.uint64), [meta])
        self.agent.register(reg)
        return file_id

    def metadata(self) -> bytes:
        return self.agent.metadata()

    def add_remote(self, md: bytes) -> str:
        return self.agent.add_remote(md)

    def drain_notifs(self) -> list[bytes]:
        return [m for msgs in self.agent.get_notifs().values() for m in msgs]

    def prep_lists(self, spec: RowSpec) -> Any:
        from nixl_core import DescList

        la = descs_array(spec.local_base, spec.local, spec.local_dev, _every(spec.local))
        ra = descs_array(spec.remote_base, spec.remote, spec.remote_dev, _every(spec.remote))
        lp = self.agent.prep("", DescList.from_array(la, spec.local_mem))
        rp = self.agent.prep(spec.peer, DescList.from_array(ra, spec.remote_mem))
        return lp, rp, spec.local.idx.astype(np.int32), spec.remote.idx.astype(np.int32)

    def release_lists(self, lists: Any) -> None:
        lists[0].release()
        lists[1].release()

    def build(self, spec: RowSpec, local: U64, remote: U64, lists: Any) -> Any:
        if lists is not None:
            lp, rp, li, ri = lists
            return self.agent.make(spec.op, lp, li, rp, ri, spec.notif)
        return self.agent.create(
            spec.op,
            local,
            remote,
            spec.peer,
            spec.notif,
            mem_types=(spec.local_mem, spec.remote_mem),
        )

    def post(self, req: Any) -> bool:
        from nixl_core import XferStatus

        return req.post() is XferStatus.DONE

    def wait(self, req: Any, timeout: float) -> None:
        req.wait(timeout)

    def release(self, req: Any) -> None:
        req.release()

    def path(self, req: Any) -> str:
        return str(req.path or req.backend_name.lower())

    def desc_count(self, req: Any) -> int | None:
        return int(req.desc_count)

    def close(self) -> None:
        self.agent.close()


# --------------------------------------------------------------------------- NIXL
NIXL_INSTALL = "pip install --no-deps nixl-cu13==1.5.1 nixl==1.5.1"


class NixlEngine(Engine):
    """The real NIXL through ``nixl._api`` (its own default config unless told otherwise)."""

    impl = "nixl"

    def __init__(self, name: str, backend: str, progress_thread: bool) -> None:
        # NIXL logs at INFO by default; keep its stderr quiet unless the user asked otherwise.
        os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
        from nixl._api import nixl_agent, nixl_agent_config

        cfg = nixl_agent_config(enable_prog_thread=progress_thread, backends=[backend])
        self.agent = nixl_agent(name, cfg)
        if backend not in self.agent.backends:
            raise RuntimeError(
                f"NIXL could not create its {backend} backend (plugins: "
                f"{', '.join(self.agent.get_plugin_list()) or 'none'})"
            )
        self.name = name
        self.backend = backend
        self._regs: list[Any] = []
        self._fds: list[int] = []

    def register_memory(self, mem: str, addr: int, nbytes: int, dev: int) -> None:
        reg = self.agent.register_memory(np.array([[addr, nbytes, dev]], np.uint64), mem)
        if reg is None:
            raise RuntimeError(f"NIXL register_memory({mem}) returned None")
        self._regs.append(reg)

    def register_file(self, path: str, file_id: int, direct: bool) -> int:
        # NIXL's POSIX plugin takes the fd as dev (fd mode), the path in meta for query_memory.
        flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
        fd = os.open(path, flags)
        self._fds.append(fd)
        reg = self.agent.register_memory([(0, 0, fd, path)], "FILE")
        if reg is None:
            raise RuntimeError("NIXL register_memory(FILE) returned None")
        self._regs.append(reg)
        return fd

    def metadata(self) -> bytes:
        return bytes(self.agent.get_agent_metadata())

    def add_remote(self, md: bytes) -> str:
        name = self.agent.add_remote_agent(md)
        return name.decode() if isinstance(name, bytes) else str(name)

    def drain_notifs(self) -> list[bytes]:
        return [m for msgs in self.agent.get_new_notifs().values() for m in msgs]

    def _descs(self, arr: U64, mem: str) -> Any:
        d = self.agent.get_xfer_descs(arr, mem)
        if d is None:
            raise RuntimeError(f"NIXL get_xfer_descs({mem}) returned None")
        return d

    def prep_lists(self, spec: RowSpec) -> Any:
        la = descs_array(spec.local_base, spec.local, spec.local_dev, _every(spec.local))
        ra = descs_array(spec.remote_base, spec.remote, spec.remote_dev, _every(spec.remote))
        lp = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", self._descs(la, spec.local_mem), spec.local_mem
        )
        rp = self.agent.prep_xfer_dlist(
            spec.peer, self._descs(ra, spec.remote_mem), spec.remote_mem
        )
        return lp, rp, spec.local.idx.astype(np.int32), spec.remote.idx.astype(np.int32)

    def release_lists(self, lists: Any) -> None:
        self.agent.release_dlist_handle(lists[0])
        self.agent.release_dlist_handle(lists[1])

    def build(self, spec: RowSpec, local: U64, remote: U64, lists: Any) -> Any:
        notif = spec.notif or b""
        if lists is not None:
            lp, rp, li, ri = lists
            return self.agent.make_prepped_xfer(spec.op, lp, li, rp, ri, notif)
        return self.agent.initialize_xfer(
            spec.op,
            self._descs(local, spec.local_mem),
            self._descs(remote, spec.remote_mem),
            spec.peer,
            notif,
        )

    def post(self, req: Any) -> bool:
        st = self.agent.transfer(req)
        if st == "ERR":
            raise RuntimeError("NIXL transfer() returned ERR")
        return bool(st == "DONE")

    def wait(self, req: Any, timeout: float) -> None:
        check = self.agent.check_xfer_state
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            st = check(req)
            if st == "DONE":
                return
            if st == "ERR":
                raise RuntimeError("NIXL check_xfer_state() returned ERR")
            n += 1
            if n % 1024 == 0 and time.monotonic() > deadline:
                raise TimeoutError(f"NIXL transfer not done after {timeout:.0f} s")

    def release(self, req: Any) -> None:
        self.agent.release_xfer_handle(req)

    def path(self, req: Any) -> str:
        try:
            return str(self.agent.query_xfer_backend(req)).lower()
        except Exception:  # older releases lack it; the configured backend is the answer
            return self.backend.lower()

    def close(self) -> None:
        for reg in self._regs:
            # Teardown of a benchmark agent is best effort: the process exits next.
            with contextlib.suppress(Exception):
                self.agent.deregister_memory(reg)
        self._regs.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def nixl_version() -> str | None:
    """Installed version of the NIXL distribution, or None."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("nixl", "nixl-cu13", "nixl-cu12"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


class DdEngine(Engine):
    """The dd-like baseline of a FILE row: the same bytes, one sequential pread/pwrite per block.

    Each post moves batch x block bytes between the start of the buffer and the start of the file,
    in block-sized calls from this thread (as ``dd bs=<block> count=<batch>`` would), so the row
    shows what a plain sequential copy of the same amount reaches on the same file system; the
    Python call overhead is about 1 us per block. Registration is just bookkeeping.
    """

    impl = "dd"
    backend = "dd"

    def __init__(self, name: str) -> None:
        self.name = name
        self._buf: memoryview | None = None
        self._fd = -1

    def register_memory(self, mem: str, addr: int, nbytes: int, dev: int) -> None:
        if mem != "DRAM":
            raise RuntimeError(f"the dd baseline copies DRAM, not {mem}")
        import ctypes

        self._buf = memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B")

    def register_file(self, path: str, file_id: int, direct: bool) -> int:
        self._fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
        return file_id

    def metadata(self) -> bytes:
        return b""

    def add_remote(self, md: bytes) -> str:
        raise RuntimeError("the dd baseline has no peers")

    def drain_notifs(self) -> list[bytes]:
        return []

    def prep_lists(self, spec: RowSpec) -> Any:
        return None

    def release_lists(self, lists: Any) -> None:
        pass

    def build(self, spec: RowSpec, local: U64, remote: U64, lists: Any) -> Any:
        block, batch = spec.local.block, int(spec.local.idx.size)
        assert self._buf is not None
        views = [self._buf[i * block : (i + 1) * block] for i in range(batch)]
        return spec.op == "READ", views, block

    def post(self, req: Any) -> bool:
        read, views, block = req
        fd = self._fd
        if read:
            for i, v in enumerate(views):
                if os.preadv(fd, [v], i * block) != block:
                    raise RuntimeError(f"dd baseline: short read at offset {i * block}")
        else:
            for i, v in enumerate(views):
                if os.pwritev(fd, [v], i * block) != block:
                    raise RuntimeError(f"dd baseline: short write at offset {i * block}")
        return True

    def wait(self, req: Any, timeout: float) -> None:
        pass

    def release(self, req: Any) -> None:
        pass

    def path(self, req: Any) -> str:
        return "dd"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._buf = None


def make_engine(impl: str, name: str, cfg: dict[str, Any]) -> Engine:
    """Create the engine of ``impl`` ("ours", "nixl" or "dd") in this process."""
    if impl == "ours":
        return OursEngine(name, cfg.get("backend"))
    if impl == "dd":
        return DdEngine(name)
    if impl == "nixl":
        return NixlEngine(name, cfg["nixl_backend"], bool(cfg.get("nixl_progress_thread", True)))
    raise ValueError(f"unknown implementation {impl!r}")


def _every(side: SideLayout) -> npt.NDArray[np.int64]:
    return np.arange(side.total_slots, dtype=np.int64)


# --------------------------------------------------------------------------- timing
def run_row(engine: Engine, spec: RowSpec) -> RowTimes:
    """Warm up, then time ``spec.iters`` iterations (nixlbench's loop with pipeline depth 1)."""
    local = descs_array(spec.local_base, spec.local, spec.local_dev)
    remote = descs_array(spec.remote_base, spec.remote, spec.remote_dev)
    lists = engine.prep_lists(spec) if spec.prepared else None
    try:
        if spec.warmup:
            _loop(engine, spec, local, remote, lists, spec.warmup)
        return _loop(engine, spec, local, remote, lists, spec.iters)
    finally:
        if lists is not None:
            engine.release_lists(lists)


def _loop(engine: Engine, spec: RowSpec, local: U64, remote: U64, lists: Any, n: int) -> RowTimes:
    clock = time.perf_counter_ns
    prep: list[float] = []
    post = np.empty(n, np.float64)
    tx = np.empty(n, np.float64)
    req: Any = None
    begin = clock()
    try:
        for i in range(n):
            if req is None or spec.recreate:
                if req is not None:
                    engine.release(req)
                    req = None
                t0 = clock()
                req = engine.build(spec, local, remote, lists)
                prep.append((clock() - t0) / 1e3)
            t0 = clock()
            done = engine.post(req)
            t1 = clock()
            if not done:
                engine.wait(req, spec.timeout)
            t2 = clock()
            post[i] = (t1 - t0) / 1e3
            tx[i] = (t2 - t1) / 1e3
        total = (clock() - begin) / 1e9
        return RowTimes(
            prep_us=prep,
            post_us=post.tolist(),
            tx_us=tx.tolist(),
            total_s=total,
            path=engine.path(req),
            desc_count=engine.desc_count(req),
        )
    finally:
        if req is not None:
            engine.release(req)
