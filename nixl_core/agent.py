"""The agent: backends, registration, metadata, transfers, notifications.

An :class:`Agent` is NIXL's ``nixlAgent`` with Python names. It owns its backends (one per type),
the table of registered memory (per memory type, sorted numpy columns), the metadata of the remote
agents it loaded, and the requests it made. Every descriptor is checked — vectorized — to lie
inside one registration of the same memory type and device before any backend sees it.

Typical use (initiator side)::

    agent = Agent("decode-0", AgentConfig(backends=("UCX",)))
    agent.register(kv_cache_tensor)
    peer = agent.add_remote(peer_metadata_bytes)
    local = agent.prep("", DescList.strided("VRAM", base, blk, n, blk, dev=0))
    remote = agent.prep(peer, remote_descs)
    req = agent.make("READ", local, idx, remote, idx, notif=b"req-17")
    req.post(); req.wait(timeout=5.0); req.release()
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from nixl_core._malloc import tune_malloc
from nixl_core._plugins import INSTALL_HINTS, default_backend, get_plugin_manager
from nixl_core.backend import Backend, BackendRequest, XferOp, XferSide
from nixl_core.descriptors import DescList, RegDescList, as_descs, as_reg_descs
from nixl_core.errors import (
    BackendUnavailableError,
    DuplicateBackendError,
    InvalidDescriptorError,
    InvalidParamError,
    LengthMismatchError,
    MemTypeError,
    NixlError,
    NotAllowedError,
    NotFoundError,
    NotSupportedError,
    PluginError,
    RegistrationError,
    RemoteDisconnectError,
    StaleHandleError,
    UnknownAgentError,
    foreign_error,
)
from nixl_core.memory import MemType, RegTable
from nixl_core.metadata import AgentMetadata, Section
from nixl_core.params import resolve_params
from nixl_core.xfer import PreppedList, XferRequest, XferTelemetry

__all__ = ["INIT_AGENT", "Agent", "AgentConfig"]

logger = logging.getLogger(__name__)

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

#: Name that means "the initiator's own memory" in :meth:`Agent.prep` (NIXL's NIXL_INIT_AGENT).
INIT_AGENT = ""
_INIT_ALIASES = ("", "NIXL_INIT_AGENT")
_generations = itertools.count(1)


@attrs.define
class AgentConfig:
    """Agent configuration.

    Attributes:
        backends: backends to create at start. None: the core's default
            (:func:`~nixl_core.default_backend`: UCX when its plugin is available here, else the
            reference LOOPBACK backend). Unavailable backends named here raise.
        backend_params: per-backend parameters, e.g. ``{"UCX": {"num_workers": 2}}``; they
            rank below explicit ``create_backend`` params and above environment variables
            (:mod:`nixl_core.params`).
        num_threads: when > 0, the ``num_threads`` of every backend that has one (NIXL's
            meaning), below ``backend_params``.
        enable_prog_thread: when not None, the ``progress_thread`` of every backend that has
            one, below ``backend_params``; None leaves each backend's own default.
    """

    backends: Sequence[str] | None = None
    backend_params: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    num_threads: int = 0
    enable_prog_thread: bool | None = None


class _Section:
    """Registered regions of one agent (local) or one remote agent, per memory type.

    Each region has a slot; per backend, ``handles[b][slot]`` is the backend's handle and
    ``has[b][slot]`` says whether the backend holds it (a numpy bool array for vectorized
    coverage checks).
    """

    def __init__(self) -> None:
        self.tables: dict[MemType, RegTable] = {}
        self.handles: dict[str, dict[int, Any]] = {}
        self.has: dict[str, npt.NDArray[np.bool_]] = {}
        self.blobs: dict[str, dict[int, bytes]] = {}
        self.metas: dict[int, bytes] = {}
        self.next_slot = 0
        # Bumped whenever registrations leave the section: backend states cached on prepared
        # lists (Backend.prep_side) from an older epoch are rebuilt.
        self.epoch = 0

    def table(self, mem_type: MemType) -> RegTable:
        t = self.tables.get(mem_type)
        if t is None:
            t = self.tables[mem_type] = RegTable(mem_type)
        return t

    def new_slots(self, n: int) -> I64:
        slots = np.arange(self.next_slot, self.next_slot + n, dtype=np.int64)
        self.next_slot += n
        return slots

    def mark(self, backend: str, slots: I64, value: bool) -> None:
        arr = self.has.get(backend)
        if arr is None or arr.size < self.next_slot:
            grown = np.zeros(max(self.next_slot, 16), dtype=bool)
            if arr is not None:
                grown[: arr.size] = arr
            arr = self.has[backend] = grown
        arr[slots] = value

    def held(self, slots: I64) -> npt.NDArray[np.bool_]:
        """Per slot: does any backend still hold it."""
        out = np.zeros(slots.size, bool)
        for arr in self.has.values():
            inside = slots < arr.size
            out[inside] |= arr[slots[inside]]
        return out

    def covers(self, backend: str, slots: I64 | None, single: int = -1) -> bool:
        arr = self.has.get(backend)
        if arr is None:
            return False
        if single >= 0:
            return single < arr.size and bool(arr[single])
        if slots is None:
            return False
        if slots.size and int(slots.max()) >= arr.size:
            return False
        return bool(arr[slots].all()) if slots.size else True


class _Remote:
    """What an agent knows of one remote agent."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.generation = next(_generations)
        self.conns: dict[str, bytes] = {}
        self.unreachable: dict[str, str] = {}
        self.section = _Section()


def _as_index(idx: Any, n: int, what: str) -> npt.NDArray[np.integer[Any]]:
    """Checked index array, in a dtype ``take`` accepts without a copy where it can."""
    a = np.asarray(idx)
    if a.ndim != 1:
        raise InvalidParamError(f"{what} indices must be 1-D, got shape {a.shape}")
    if a.size == 0:
        raise InvalidParamError(f"{what} indices are empty")
    if a.dtype.kind not in "iu":
        raise InvalidParamError(f"{what} indices must be integers, got dtype {a.dtype}")
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= n:
        bad = int(np.argmax((a < 0) | (a >= n)))
        raise InvalidDescriptorError(
            f"{what} index {int(a[bad])} (position {bad}) is out of range for a prepared list of "
            f"{n} descriptors",
            index=bad,
        )
    if np.can_cast(a.dtype, np.intp):
        return a  # int8..int64, uint8..uint32: take() uses them as they are
    return a.astype(np.intp)


def _const(n: int, value: int, dtype: type[np.generic]) -> npt.NDArray[Any]:
    """A read-only length-``n`` column holding one value, without allocating ``n`` elements."""
    # A stride-0 view of one element (what np.broadcast_to makes, at a third of its cost).
    col: npt.NDArray[Any] = np.ndarray((n,), dtype, np.array([value], dtype), 0, (0,))
    col.flags.writeable = False
    return col


def _uniform(col: npt.NDArray[Any]) -> int:
    """The single value of a column, or -1 when it holds several."""
    if col.size == 0:
        return -1
    lo, hi = int(col.min()), int(col.max())
    return lo if lo == hi else -1


def _columns(d: DescList) -> tuple[U64, U64, U64]:
    # One transposing copy (a single allocation) gives three contiguous columns.
    t = np.ascontiguousarray(d.array.T)
    return t[0], t[1], t[2]


def _bounds(cols: tuple[U64, U64, U64]) -> tuple[list[int], list[int]]:
    """(min, max) of (addr, len, dev) over a list's columns: two reductions, not six."""
    t = cols[0].base
    if isinstance(t, np.ndarray) and t.shape == (3, cols[0].size):  # _columns' (3, N) block
        return t.min(axis=1).tolist(), t.max(axis=1).tolist()
    return [int(c.min()) for c in cols], [int(c.max()) for c in cols]


class _Cols:
    """The gathered columns of a request's two sides, before the backend sees them.

    A column whose values are all equal is a read-only broadcast view; its value is kept in
    ``ulen`` / ``l_udev`` / ``r_udev`` / ``l_uslot`` / ``r_uslot`` (-1 when not uniform).
    """

    __slots__ = (
        "l_addr",
        "l_dev",
        "l_slot",
        "l_udev",
        "l_uslot",
        "lens",
        "r_addr",
        "r_dev",
        "r_slot",
        "r_udev",
        "r_uslot",
        "ulen",
    )

    def __init__(
        self,
        addrs: tuple[U64, U64],
        lens: U64,
        devs: tuple[U64, U64],
        slots: tuple[I64, I64],
        ulen: int = -1,
        udevs: tuple[int, int] = (-1, -1),
        uslots: tuple[int, int] = (-1, -1),
    ) -> None:
        self.l_addr, self.r_addr = addrs
        self.lens, self.ulen = lens, ulen
        self.l_dev, self.r_dev = devs
        self.l_slot, self.r_slot = slots
        self.l_udev, self.r_udev = udevs
        self.l_uslot, self.r_uslot = uslots

    def merge(self) -> None:
        """Merge neighbours contiguous on both sides and in the same registrations (vectorized)."""
        n = self.lens.shape[0]
        if n < 2:
            return
        la, ra, ll = self.l_addr, self.r_addr, self.lens
        inc = np.uint64(self.ulen) if self.ulen >= 0 else ll[:-1]
        joins = la[1:] == la[:-1] + inc
        if not joins.any():
            return
        joins &= ra[1:] == ra[:-1] + inc
        if self.l_uslot < 0:
            joins &= self.l_slot[1:] == self.l_slot[:-1]
        if self.r_uslot < 0:
            joins &= self.r_slot[1:] == self.r_slot[:-1]
        n_joins = int(np.count_nonzero(joins))
        # A handful of accidental neighbours in a scattered list is not worth seven gathers.
        if n_joins == 0 or (n > 4096 and n_joins * 64 < n):
            return
        if n_joins == n - 1:  # one run (sorted indices over a contiguous layout)
            starts = np.zeros(1, np.intp)
            total = n * self.ulen if self.ulen >= 0 else int(ll.sum(dtype=np.uint64))
            self.lens = np.array([total], np.uint64)
        else:
            starts = np.flatnonzero(np.concatenate(([True], ~joins)))
            self.lens = np.add.reduceat(ll, starts)
        m = int(starts.size)
        self.ulen = -1
        self.l_addr = la[starts]
        self.r_addr = ra[starts]
        self.l_dev = _const(m, self.l_udev, np.uint64) if self.l_udev >= 0 else self.l_dev[starts]
        self.r_dev = _const(m, self.r_udev, np.uint64) if self.r_udev >= 0 else self.r_dev[starts]
        self.l_slot = (
            _const(m, self.l_uslot, np.int64) if self.l_uslot >= 0 else self.l_slot[starts]
        )
        self.r_slot = (
            _const(m, self.r_uslot, np.int64) if self.r_uslot >= 0 else self.r_slot[starts]
        )

    def total_bytes(self) -> int:
        n = int(self.lens.shape[0])
        return n * self.ulen if self.ulen >= 0 else int(self.lens.sum(dtype=np.uint64))


def _slots_of(slots: I64 | None, n: int, single: int) -> I64:
    """Per-descriptor slots from what ``_resolve`` returned."""
    return slots if slots is not None else _const(n, single, np.int64)


def _index_runs(li: npt.NDArray[np.integer[Any]], ri: npt.NDArray[np.integer[Any]]) -> bool:
    """Whether merging could change a request made with these indices.

    Only neighbours whose indices are consecutive in both lists are counted (they are the ones
    that join in lists laid out in address order). Mirrors :meth:`_Cols.merge`'s rule that a
    handful of joins in a long list is not worth merging.
    """
    n = li.size
    if n < 2:
        return False
    step = li[1:] - li[:-1] == 1
    if not step.any():
        return False
    if ri is not li:
        step &= ri[1:] - ri[:-1] == 1
    joins = int(np.count_nonzero(step))
    return joins > 0 and not (n > 4096 and joins * 64 < n)


def _take(p: PreppedList, idx: npt.NDArray[np.integer[Any]], n: int) -> tuple[U64, U64, I64]:
    """Gather (addrs, devs, slots) of a prepared list; uniform columns become broadcast views."""
    addrs = p.addrs.take(idx)
    devs = _const(n, p.uniform_dev, np.uint64) if p.uniform_dev >= 0 else p.devs.take(idx)
    slots = _const(n, p.single_slot, np.int64) if p.single_slot >= 0 else p.reg_slots.take(idx)
    return addrs, devs, slots


class Agent:
    """A NIXL agent.

    Args:
        name: unique, non-empty agent name.
        config: an :class:`AgentConfig`; keyword arguments override its fields.

    Raises:
        InvalidParamError: empty name.
        BackendNotFoundError / BackendUnavailableError: a configured backend is missing/unusable.
    """

    def __init__(self, name: str, config: AgentConfig | None = None, **overrides: Any) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidParamError("agent name must be a non-empty string")
        if name in _INIT_ALIASES[1:]:
            raise InvalidParamError(f"agent name {name!r} is reserved")
        self.name = name
        self.config = attrs.evolve(config or AgentConfig(), **overrides)
        tune_malloc()
        self._mgr = get_plugin_manager()
        self._backends: dict[str, Backend] = {}
        self._local = _Section()
        self._remotes: dict[str, _Remote] = {}
        self._requests: weakref.WeakSet[XferRequest] = weakref.WeakSet()
        self._lock = threading.RLock()
        self._closed = False
        names = self.config.backends
        if names is None:
            chosen, why = default_backend()
            logger.debug("agent %s: default backend %s (%s)", name, chosen, why)
            names = [chosen]
        try:
            for b in names:
                self.create_backend(b)
        except BaseException:
            self.close()
            raise
        self._mgr.pm.hook.nixl_agent_started(agent=self)

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, backends={list(self._backends)})"

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ================================================================ backends
    @property
    def backends(self) -> tuple[str, ...]:
        """Names of the created backends, in creation (= preference) order."""
        return tuple(self._backends)

    def backend(self, name: str) -> Backend:
        """A created backend by name (case-insensitive).

        Raises:
            NotFoundError: this agent did not create it.
        """
        b = self._backends.get(name.upper())
        if b is None:
            raise NotFoundError(
                f"agent {self.name!r} has no backend {name!r} "
                f"(created: {', '.join(self._backends) or 'none'})"
            )
        return b

    def create_backend(self, name: str, params: Mapping[str, Any] | None = None) -> Backend:
        """Create a backend from the installed plugins.

        Args:
            name: backend type, e.g. "UCX", "POSIX", "LOOPBACK".
            params: backend parameters; they win over the config's, the environment's
                (``NIXL_<BACKEND>_<PARAM>``) and the defaults (:mod:`nixl_core.params`).

        Raises:
            BackendNotFoundError: no installed plugin provides it (message has an install hint).
            BackendUnavailableError: installed but cannot run here (probe's reason).
            DuplicateBackendError: the agent already has one of this type.
            InvalidParamError: an unknown parameter (with close matches) or a bad value.
        """
        cls = self._mgr.registry.get(name)
        key = cls.name.upper()
        if key in self._backends:
            raise DuplicateBackendError(f"agent {self.name!r} already has a {cls.name} backend")
        avail = cls.probe()
        if not avail.available:
            raise BackendUnavailableError(
                f"backend {cls.name} is not available here: {avail.reason}"
            )
        config: dict[str, Any] = {}
        for k, v in self.config.backend_params.items():
            if k.upper() == key:
                config.update(v)
        wide: dict[str, Any] = {}
        if self.config.num_threads > 0:
            wide["num_threads"] = self.config.num_threads
        if self.config.enable_prog_thread is not None:
            wide["progress_thread"] = self.config.enable_prog_thread
        resolved = resolve_params(cls.name, cls.param_specs, params, config, wide)
        try:
            backend = cls(self.name, resolved)
        except NixlError:
            raise
        except Exception as exc:
            raise foreign_error(exc, cls.name, "start") from exc
        self._backends[key] = backend
        return backend

    def _pick(self, names: Sequence[str] | None) -> list[Backend]:
        if not names:
            return list(self._backends.values())
        return [self.backend(n) for n in names]

    # ================================================================ memory
    def register(
        self,
        descs: Any,
        mem_type: MemType | str | None = None,
        *,
        backends: Sequence[str] | None = None,
        metas: Sequence[bytes | str] | None = None,
    ) -> RegDescList:
        """Register memory with every capable backend (or the ones named).

        Args:
            descs: tensors, an (N, 3) array, (addr, len, dev[, meta]) tuples or a RegDescList.
            mem_type: needed for arrays and tuples.
            backends: restrict to these backends.
            metas: one bytes field per region (e.g. a FILE path).

        Returns:
            The registration list; pass it to :meth:`deregister`.

        Raises:
            RegistrationError: a region duplicates or overlaps a registered one (names its index).
            NotFoundError: no created backend can register this memory type.
            MemTypeError: a named backend does not support the memory type.
        """
        reg = as_reg_descs(descs, mem_type, metas)
        mt = reg.mem_type
        if len(reg) == 0:
            raise InvalidParamError("registration list is empty")
        if backends:
            targets = self._pick(backends)
            for b in targets:
                if mt not in b.mem_types:
                    raise MemTypeError(f"backend {b.name} cannot register {mt.value} memory")
        else:
            targets = [b for b in self._backends.values() if mt in b.mem_types]
            if not targets:
                hint = {MemType.FILE: INSTALL_HINTS["POSIX"], MemType.VRAM: INSTALL_HINTS["UCX"]}
                extra = f"; install a backend for it, e.g. `{hint[mt]}`" if mt in hint else ""
                raise NotFoundError(
                    f"no backend of agent {self.name!r} ({', '.join(self._backends) or 'none'}) "
                    f"can register {mt.value} memory{extra}"
                )
        rows = reg.array
        with self._lock:
            sec = self._local
            table = sec.table(mt)
            slots = sec.new_slots(len(reg))
            table.add(rows, slots)  # raises on duplicates/overlaps before any backend is touched
            errors: dict[str, NixlError] = {}
            for b in targets:
                try:
                    handles = b.register(mt, rows, reg.metas)
                except NixlError as exc:
                    errors[b.name] = exc
                    logger.warning(
                        "backend %s failed to register %d regions: %s", b.name, len(reg), exc
                    )
                    continue
                self._attach(sec, b, slots, handles)
            if len(errors) == len(targets):
                table.remove_positions(table.find_exact(rows))
                if len(errors) == 1:
                    raise next(iter(errors.values()))
                raise PluginError(
                    "registration failed on every backend: "
                    + "; ".join(f"{k}: {v}" for k, v in errors.items())
                )
            for s, m in zip(slots.tolist(), reg.metas, strict=True):
                sec.metas[s] = m
        return reg

    def _attach(self, sec: _Section, b: Backend, slots: I64, handles: Sequence[Any]) -> None:
        if len(handles) != slots.size:
            raise PluginError(
                f"backend {b.name} returned {len(handles)} handles for {slots.size} regions"
            )
        hmap = sec.handles.setdefault(b.name, {})
        hmap.update(zip(slots.tolist(), handles, strict=True))
        if b.supports_remote:
            blobs = sec.blobs.setdefault(b.name, {})
            blobs.update(
                (s, b.public_data(h)) for s, h in zip(slots.tolist(), handles, strict=True)
            )
        if b.supports_local:
            loaded = sec.handles.setdefault(f"{b.name}@self", {})
            loaded.update(
                (s, b.load_local(h)) for s, h in zip(slots.tolist(), handles, strict=True)
            )
        sec.mark(b.name, slots, True)

    def deregister(self, descs: Any, *, backends: Sequence[str] | None = None) -> None:
        """Deregister exactly what was registered (each descriptor must match a registration).

        Raises:
            RegistrationError: a descriptor matches no registration (names its index).
        """
        reg = descs if isinstance(descs, DescList) else as_reg_descs(descs)
        with self._lock:
            sec = self._local
            table = sec.tables.get(reg.mem_type)
            pos = (
                table.find_exact(reg.array)
                if table is not None
                else np.full(len(reg), -1, np.int64)
            )
            missing = np.flatnonzero(pos < 0)
            if missing.size:
                i = int(missing[0])
                a, ln, d = reg[i]
                raise RegistrationError(
                    f"descriptor {i} [addr=0x{a:x}, len={ln}, dev={d}] matches no "
                    f"{reg.mem_type.value} registration of agent {self.name!r}",
                    index=i,
                )
            assert table is not None
            slots = table.slots_at(pos)
            sec.epoch += 1
            targets = self._pick(backends) if backends else list(self._backends.values())
            for b in targets:
                hmap = sec.handles.get(b.name)
                if not hmap:
                    continue
                mine = [s for s in slots.tolist() if s in hmap]
                if not mine:
                    continue
                loaded = sec.handles.get(f"{b.name}@self", {})
                for s in mine:
                    if s in loaded:
                        b.unload_local(loaded.pop(s))
                    sec.blobs.get(b.name, {}).pop(s, None)
                b.deregister([hmap.pop(s) for s in mine])
                sec.mark(b.name, np.asarray(mine, np.int64), False)
            still = sec.held(slots)
            if not still.all():
                table.remove_positions(pos[~still])
                for s in slots[~still].tolist():
                    sec.metas.pop(s, None)

    def registered(self, mem_type: MemType | str) -> RegDescList:
        """The regions registered for a memory type (table order)."""
        mt = MemType.parse(mem_type)
        t = self._local.tables.get(mt)
        if t is None or len(t) == 0:
            return RegDescList(mt)
        metas = [self._local.metas.get(s, b"") for s in t.slots.tolist()]
        return RegDescList(mt, t.rows(), metas)

    def query_mem(
        self, descs: Any, backend: str, mem_type: MemType | str | None = None
    ) -> list[dict[str, Any] | None]:
        """Ask one backend about regions (storage: size/mode/mtime of a path, or None)."""
        reg = as_reg_descs(descs, mem_type)
        return self.backend(backend).query_mem(reg.mem_type, reg.array, reg.metas)

    # ================================================================ metadata
    def _remote_backends(self) -> list[Backend]:
        return [b for b in self._backends.values() if b.supports_remote]

    def metadata(self) -> bytes:
        """This agent's full metadata: name, connection info, every registration's public blob.

        Raises:
            NotSupportedError: no backend of this agent supports remote agents.
        """
        return self._export(None, True, None)

    def partial_metadata(
        self,
        descs: Any = None,
        include_conn_info: bool = False,
        backends: Sequence[str] | None = None,
    ) -> bytes:
        """Metadata for a subset: connection info only (``descs`` empty) or the given regions.

        Raises:
            NotFoundError: a descriptor is not exactly a registration (names its index).
        """
        if descs is None or (isinstance(descs, (list, tuple)) and len(descs) == 0):
            return self._export(None, True, backends, regions=False)
        return self._export(as_reg_descs(descs), include_conn_info, backends)

    def _export(
        self,
        subset: RegDescList | None,
        conn_info: bool,
        backends: Sequence[str] | None,
        regions: bool = True,
    ) -> bytes:
        rb = [b for b in self._pick(backends) if b.supports_remote]
        if not rb:
            raise NotSupportedError(
                f"agent {self.name!r} has no backend that supports remote agents "
                f"({', '.join(self._backends) or 'none'})"
            )
        with self._lock:
            conns = tuple((b.name, b.connection_info()) for b in rb) if conn_info else ()
            sections: list[Section] = []
            if regions:
                sections = self._sections(rb, subset)
        return AgentMetadata(self.name, conns, tuple(sections)).encode()

    def _sections(self, rb: list[Backend], subset: RegDescList | None) -> list[Section]:
        sec = self._local
        out: list[Section] = []
        if subset is not None:
            table = sec.tables.get(subset.mem_type)
            pos = table.find_exact(subset.array) if table else np.full(len(subset), -1, np.int64)
            miss = np.flatnonzero(pos < 0)
            if miss.size:
                raise NotFoundError(
                    f"descriptor {int(miss[0])} of the partial metadata request is not a "
                    f"registration of agent {self.name!r}"
                )
            assert table is not None
            items = [(subset.mem_type, table.slots_at(pos), subset.array)]
        else:
            items = [(mt, t.slots, t.rows()) for mt, t in sec.tables.items() if len(t)]
        for mt, slots, rows in items:
            for b in rb:
                has = sec.has.get(b.name)
                if has is None:
                    continue
                sel = has[slots]
                if not sel.any():
                    continue
                blobs = sec.blobs[b.name]
                chosen = slots[sel].tolist()
                out.append(
                    Section(
                        b.name, mt, np.ascontiguousarray(rows[sel]), tuple(blobs[s] for s in chosen)
                    )
                )
        return out

    def add_remote(self, metadata: bytes) -> str:
        """Load a remote agent's (full or partial) metadata; loads are additive.

        Returns:
            The remote agent's name.

        Raises:
            MetadataError: truncated, corrupt or unknown-version metadata.
            InvalidParamError: the metadata is this agent's own.
            NotAllowedError: changed connection info or blob for something already loaded, or a
                region overlapping a different one loaded before (the peer re-registered).
            PluginError: no backend in common with the remote agent.
        """
        md = AgentMetadata.decode(metadata)
        if md.name == self.name:
            raise InvalidParamError(f"metadata of agent {md.name!r} is this agent's own")
        with self._lock:
            remote = self._remotes.get(md.name)
            new = remote is None
            if remote is None:
                remote = _Remote(md.name)
            self._load_conns(remote, md)
            if new:
                if not remote.conns:
                    why = "; ".join(f"{k}: {v}" for k, v in remote.unreachable.items())
                    raise PluginError(
                        f"agent {md.name!r} shares no usable backend with agent {self.name!r} "
                        f"(its: {', '.join(n for n, _ in md.conns) or 'none'}; ours: "
                        f"{', '.join(self._backends) or 'none'}){'; ' + why if why else ''}"
                    )
                self._remotes[md.name] = remote
            for section in md.sections:
                self._load_section(remote, section)
        return md.name

    def _load_conns(self, remote: _Remote, md: AgentMetadata) -> None:
        for bname, info in md.conns:
            b = self._backends.get(bname.upper())
            if b is None or not b.supports_remote:
                continue
            known = remote.conns.get(b.name)
            if known is not None:
                if known != info:
                    raise NotAllowedError(
                        f"agent {md.name!r} sent different {b.name} connection info than before; "
                        "remove_remote() it first"
                    )
                continue
            try:
                b.load_remote_conn(md.name, info)
            except NixlError as exc:
                logger.info("backend %s cannot reach %s: %s", b.name, md.name, exc)
                remote.unreachable[b.name] = str(exc)
                continue
            remote.conns[b.name] = info
            remote.unreachable.pop(b.name, None)

    def _load_section(self, remote: _Remote, section: Section) -> None:
        bname = section.backend.upper()
        b = self._backends.get(bname)
        if b is None or bname not in remote.conns:
            return  # a backend we lack or cannot reach: nothing to load
        sec = remote.section
        table = sec.table(section.mem_type)
        rows = section.descs
        pos = table.find_exact(rows)
        known = pos >= 0
        blobs_known = sec.blobs.setdefault(bname, {})
        load_idx: list[int] = []
        existing_slots = table.slots_at(pos[known]) if known.any() else np.empty(0, np.int64)
        for i, s in zip(np.flatnonzero(known).tolist(), existing_slots.tolist(), strict=True):
            old = blobs_known.get(s)
            if old is None:
                load_idx.append(i)
            elif old != section.blobs[i]:
                raise NotAllowedError(
                    f"agent {remote.name!r} sent a different {bname} blob for its region {i} "
                    f"[addr=0x{int(rows[i, 0]):x}]; remove_remote() it first"
                )
        new_idx = np.flatnonzero(~known)
        new_slots = sec.new_slots(int(new_idx.size))
        if new_idx.size:
            try:
                table.add(np.ascontiguousarray(rows[new_idx]), new_slots)
            except RegistrationError as exc:
                i = int(new_idx[exc.index]) if exc.index is not None else 0
                raise NotAllowedError(
                    f"agent {remote.name!r} sent its {section.mem_type.value} region {i} "
                    f"[addr=0x{int(rows[i, 0]):x}, len={int(rows[i, 1])}, dev={int(rows[i, 2])}] "
                    "that overlaps a different region loaded from its earlier metadata (it "
                    "re-registered that memory); remove_remote() it and add its metadata again"
                ) from exc
        all_idx = np.concatenate([np.asarray(load_idx, np.int64), new_idx]).astype(np.int64)
        if all_idx.size == 0:
            return
        slot_of = np.empty(rows.shape[0], np.int64)
        slot_of[np.flatnonzero(known)] = existing_slots
        slot_of[new_idx] = new_slots
        target_slots = slot_of[all_idx]
        try:
            handles = b.load_remote(
                remote.name,
                section.mem_type,
                np.ascontiguousarray(rows[all_idx]),
                [section.blobs[i] for i in all_idx.tolist()],
            )
        except BaseException:
            if new_idx.size:
                table.remove_positions(table.find_exact(np.ascontiguousarray(rows[new_idx])))
            raise
        hmap = sec.handles.setdefault(bname, {})
        hmap.update(zip(target_slots.tolist(), handles, strict=True))
        blobs_known.update(
            (s, section.blobs[i])
            for s, i in zip(target_slots.tolist(), all_idx.tolist(), strict=True)
        )
        sec.mark(bname, target_slots, True)

    def remove_remote(self, name: str) -> None:
        """Forget a remote agent: unload its regions and disconnect every backend from it.

        Prepared lists and requests made against it are refused afterwards (even after a re-add).

        Raises:
            UnknownAgentError: no metadata is loaded for it.
        """
        with self._lock:
            remote = self._remotes.pop(name, None)
            if remote is None:
                raise UnknownAgentError(name)
            for bname in remote.conns:
                b = self._backends[bname]
                handles = list(remote.section.handles.get(bname, {}).values())
                try:
                    if handles:
                        b.unload_remote(name, handles)
                finally:
                    b.disconnect(name)

    @property
    def remote_agents(self) -> tuple[str, ...]:
        """Names of the remote agents whose metadata is loaded."""
        return tuple(self._remotes)

    def check_remote(
        self, name: str, descs: Any = None, mem_type: MemType | str | None = None
    ) -> bool:
        """True if metadata for ``name`` is loaded (and, given descs, some backend covers them)."""
        if name not in self._remotes:
            return False
        if descs is None:
            return True
        try:
            self.prep(name, descs, mem_type)
        except NixlError:
            return False
        return True

    def make_connection(self, name: str, backends: Sequence[str] | None = None) -> None:
        """Connect eagerly to a remote agent on every common backend (optional: connects are lazy).

        Raises:
            UnknownAgentError: no metadata is loaded for it.
        """
        remote = self._remote(name)
        for b in self._pick(backends):
            if b.name in remote.conns:
                b.connect(name)

    def _remote(self, name: str) -> _Remote:
        remote = self._remotes.get(name)
        if remote is None:
            raise UnknownAgentError(name)
        return remote

    def _check_generation(self, peer: str, generation: int) -> None:
        if peer == self.name:
            return
        remote = self._remotes.get(peer)
        if remote is None:
            raise UnknownAgentError(
                peer, f"remote agent {peer!r} was removed; its requests are void"
            )
        if remote.generation != generation:
            raise StaleHandleError(
                f"made against older metadata of agent {peer!r} (generation {generation}, now "
                f"{remote.generation}); prepare it again"
            )

    # ================================================================ transfers
    def _side(self, peer: str) -> tuple[_Section, int, str]:
        """(section, generation, handle key suffix) of the memory a peer name designates."""
        if peer in _INIT_ALIASES:
            return self._local, 0, ""
        if peer == self.name:
            return self._local, 0, "@self"
        remote = self._remote(peer)
        return remote.section, remote.generation, ""

    def _resolve(
        self,
        peer: str,
        mem_type: MemType,
        cols: tuple[U64, U64, U64],
        backends: Sequence[str] | None,
        what: str,
        bounds: tuple[int, int, int, int, int] | None = None,
    ) -> tuple[I64 | None, tuple[str, ...], int, int]:
        """Check descriptors against a side's registrations and find the backends covering them.

        Args:
            bounds: (min addr, max addr, max len, min dev, max dev) of the list, when known.

        Returns:
            (slot per descriptor, or None when all lie in the one registration ``single``;
            covering backends; generation; the common slot or -1).
        """
        sec, gen, _ = self._side(peer)
        table = sec.tables.get(mem_type)
        whose = "this agent" if sec is self._local else f"agent {peer!r}"
        if table is None or len(table) == 0:
            raise InvalidDescriptorError(
                f"{what} 0 cannot be inside a registration: {whose} has no "
                f"{mem_type.value} memory registered",
                index=0,
            )
        slots: I64 | None = None
        single = table.span(*bounds) if bounds is not None else -1
        if single < 0:
            slots = table.lookup(*cols, what=what)
            single = (_uniform(slots) if len(table) > 1 else int(slots[0])) if slots.size else -1
        names = [n.upper() for n in backends] if backends else list(self._backends)
        remote_side = peer not in _INIT_ALIASES
        found: list[str] = []
        for n in names:
            b = self._backends.get(n)
            if b is None:
                raise NotFoundError(f"agent {self.name!r} has no backend {n!r}")
            if mem_type not in b.mem_types:
                continue
            if remote_side and peer == self.name and not b.supports_local:
                continue
            if remote_side and peer != self.name and not b.supports_remote:
                continue
            if sec.covers(b.name, slots, single):
                found.append(b.name)
        if not found:
            raise NotFoundError(
                f"no backend of agent {self.name!r} ({', '.join(names) or 'none'}) covers every "
                f"{mem_type.value} {what} of {whose}"
            )
        return slots, tuple(found), gen, single

    def resolve(
        self, peer: str, descs: Any, mem_type: MemType | str | None = None, *, backend: str
    ) -> XferSide:
        """Descriptors resolved to one backend's registration handles, for backend helpers.

        A backend's own API that works on user descriptors (e.g. NVLINK's ``mem_view``) calls
        this instead of keeping its own registration lookup: the descriptors are checked like a
        transfer's (vectorized), and the result is the side a transfer would hand the backend.

        Args:
            peer: "" for this agent's own registrations, a remote agent's name for its loaded
                regions, or this agent's own name for the loopback view of its own memory.
            descs: a DescList, (N, 3) array, tuples or tensors.
            mem_type: needed for arrays and tuples.
            backend: the backend whose handles are wanted.

        Raises:
            InvalidDescriptorError: a descriptor lies outside every registration (names it).
            UnknownAgentError: no metadata for ``peer``.
            NotFoundError: the backend does not hold every descriptor's registration.
        """
        b = self.backend(backend)
        p = self.prep(peer, descs, mem_type, backends=[b.name])
        sec, _, suffix = self._side(p.peer)
        n = len(p)
        return XferSide(
            p.mem_type,
            p.addrs,
            _const(n, p.uniform_len, np.uint64) if p.uniform_len >= 0 else p.lens,
            _const(n, p.uniform_dev, np.uint64) if p.uniform_dev >= 0 else p.devs,
            _slots_of(p._slots, n, p.single_slot),
            sec.handles[b.name + suffix],
            p.uniform_len,
            p.uniform_dev,
            p.single_slot,
        )

    def prep(
        self,
        peer: str,
        descs: Any,
        mem_type: MemType | str | None = None,
        *,
        backends: Sequence[str] | None = None,
    ) -> PreppedList:
        """Check descriptors once against a side's registrations, for later :meth:`make` calls.

        Args:
            peer: "" (or "NIXL_INIT_AGENT") for the initiator's own memory, a remote agent's name,
                or this agent's own name for loopback (storage, same-agent copies).
            descs: a DescList, (N, 3) array, tuples or tensors.
            mem_type: needed for arrays and tuples.
            backends: restrict to these backends.

        Raises:
            InvalidDescriptorError: a descriptor lies outside every registration (names its index).
            UnknownAgentError: no metadata for ``peer``.
            NotFoundError: no backend covers every descriptor.
        """
        d = as_descs(descs, mem_type)
        arr = d.array
        # Only the address column is copied (make gathers it); lengths and devices are read in
        # place, their bounds computed once for both the registration check and uniformity.
        addrs = np.ascontiguousarray(arr[:, 0])
        lens, devs = arr[:, 1], arr[:, 2]
        bounds = None
        ulen = udev = -1
        if addrs.size:
            lmin, lmax, dmin, dmax = (
                int(lens.min()),
                int(lens.max()),
                int(devs.min()),
                int(devs.max()),
            )
            bounds = (int(addrs.min()), int(addrs.max()), lmax, dmin, dmax)
            ulen = lmin if lmin == lmax else -1
            udev = dmin if dmin == dmax else -1
        slots, found, gen, single = self._resolve(
            peer, d.mem_type, (addrs, lens, devs), backends, "descriptor", bounds
        )
        key = INIT_AGENT if peer in _INIT_ALIASES else peer
        return PreppedList(
            self,
            key,
            d.mem_type,
            arr,
            addrs,
            slots if single < 0 else None,
            found,
            gen,
            uniform_len=ulen,
            uniform_dev=udev,
            single_slot=single,
        )

    def _choose(
        self,
        op: XferOp,
        local_mem: MemType,
        remote_mem: MemType,
        peer: str,
        candidates: Sequence[str],
    ) -> Backend:
        if not candidates:
            raise NotFoundError(
                f"no backend can carry {local_mem.value} -> {remote_mem.value} to {peer!r}: the "
                "two prepared lists have no backend in common"
            )
        if not self._mgr.custom_select:
            return self._backends[candidates[0]]
        choice = self._mgr.pm.hook.nixl_select_backend(
            agent=self,
            op=op,
            local_mem=local_mem,
            remote_mem=remote_mem,
            peer=peer,
            candidates=list(candidates),
        )
        if choice is None or choice.upper() not in candidates:
            raise PluginError(
                f"nixl_select_backend chose {choice!r}, not one of {', '.join(candidates)}"
            )
        return self._backends[choice.upper()]

    def make(
        self,
        op: XferOp | str,
        local: PreppedList,
        local_idx: Any,
        remote: PreppedList,
        remote_idx: Any,
        notif: bytes | str | None = None,
        *,
        merge: bool = True,
        backends: Sequence[str] | None = None,
    ) -> XferRequest:
        """Make a request from prepared lists and index arrays (NIXL's make_prepped_xfer).

        Neighbouring descriptors that are contiguous on both sides (and in the same
        registrations) are merged with vectorized arithmetic unless ``merge=False``.

        Raises:
            InvalidParamError: wrong op, empty or out-of-range indices, lists of another agent.
            LengthMismatchError: index counts differ, or paired descriptors differ in length.
            StaleHandleError: the remote list was prepared against replaced metadata.
        """
        xop = XferOp.parse(op)
        if local.agent is not self or remote.agent is not self:
            raise InvalidParamError("prepared lists belong to another agent")
        if local.peer != INIT_AGENT:
            raise InvalidParamError(
                f"local list was prepared for {local.peer!r}; prepare it with peer '' (the initiator)"
            )
        if remote.peer == INIT_AGENT:
            raise InvalidParamError(
                "remote list was prepared for the initiator ('') — prepare it with the remote agent's "
                "name (or this agent's own name for loopback)"
            )
        if local.released or remote.released:
            raise InvalidParamError("prepared list was released")
        li = _as_index(local_idx, len(local), "local")
        if remote_idx is local_idx and len(remote) == len(local):
            ri = li  # one index array for both sides: checked once
        else:
            ri = _as_index(remote_idx, len(remote), "remote")
        n = li.size
        if n != ri.size:
            raise LengthMismatchError(f"{n} local indices but {ri.size} remote indices")
        self._check_generation(remote.peer, remote.generation)
        ulen = -1
        lens: U64 | None = None  # gathered only when lengths differ
        if local.uniform_len >= 0 and local.uniform_len == remote.uniform_len:
            ulen = local.uniform_len
        else:
            lens = local.lens.take(li)
            ne = lens != remote.lens.take(ri)
            if ne.any():
                k = int(np.argmax(ne))
                raise LengthMismatchError(
                    f"pair {k}: local descriptor {int(li[k])} has length {int(lens[k])} but remote "
                    f"descriptor {int(ri[k])} has length {int(remote.lens[ri[k]])}",
                    index=k,
                )
        cands = [b for b in local.backends if b in remote.backends]
        if backends:
            wanted = {x.upper() for x in backends}
            cands = [b for b in cands if b in wanted]
        backend = self._choose(xop, local.mem_type, remote.mem_type, remote.peer, cands)
        if backend.takes_indices:
            ls = self._side_state(local, backend)
            rs = self._side_state(remote, backend) if ls is not None else None
            if rs is not None and not (merge and _index_runs(li, ri)):
                total = n * ulen if lens is None else int(lens.sum(dtype=np.uint64))
                breq = backend.prepare_indexed(xop, ls, li, rs, ri, remote.peer)
                return self._request(
                    xop, backend, breq, remote.peer, remote.generation, notif, n, total
                )
        l_addr, l_dev, l_slot = _take(local, li, n)
        r_addr, r_dev, r_slot = _take(remote, ri, n)
        cols = _Cols(
            (l_addr, r_addr),
            _const(n, ulen, np.uint64) if lens is None else lens,
            (l_dev, r_dev),
            (l_slot, r_slot),
            ulen,
            (local.uniform_dev, remote.uniform_dev),
            (local.single_slot, remote.single_slot),
        )
        return self._build(
            xop,
            backend,
            remote.peer,
            remote.generation,
            local.mem_type,
            remote.mem_type,
            cols,
            notif,
            merge,
        )

    def _side_state(self, p: PreppedList, backend: Backend) -> Any:
        """The backend's :meth:`~Backend.prep_side` state of a prepared list, cached on it."""
        sec, _, suffix = self._side(p.peer)
        ent = p._bstate.get(backend.name)
        if ent is not None:
            if ent[0] is backend and ent[1] == sec.epoch:
                return ent[2]
            p._drop_states()  # registrations changed since: rebuild
        n = len(p)
        side = XferSide(
            p.mem_type,
            p.addrs,
            _const(n, p.uniform_len, np.uint64) if p.uniform_len >= 0 else p.lens,
            _const(n, p.uniform_dev, np.uint64) if p.uniform_dev >= 0 else p.devs,
            _slots_of(p._slots, n, p.single_slot),
            sec.handles[backend.name + suffix],
            p.uniform_len,
            p.uniform_dev,
            p.single_slot,
        )
        state = backend.prep_side(side, p.peer)
        p._bstate[backend.name] = (backend, sec.epoch, state)
        return state

    def create(
        self,
        op: XferOp | str,
        local: Any,
        remote: Any,
        peer: str,
        notif: bytes | str | None = None,
        *,
        mem_types: tuple[MemType | str | None, MemType | str | None] = (None, None),
        merge: bool = True,
        backends: Sequence[str] | None = None,
    ) -> XferRequest:
        """One-shot request: check both lists and pick a backend (NIXL's initialize_xfer).

        Args:
            op: "READ" or "WRITE".
            local: the initiator's descriptors.
            remote: the peer's descriptors (peer = own name for loopback).
            peer: remote agent name, or this agent's own name.
            notif: notification delivered to the peer after the data is visible.
            mem_types: memory types for array/tuple inputs (local, remote).
            merge: merge contiguous neighbours.
            backends: restrict the choice.

        Raises:
            LengthMismatchError, InvalidDescriptorError, UnknownAgentError, NotFoundError.
        """
        xop = XferOp.parse(op)
        if peer in _INIT_ALIASES:
            raise InvalidParamError("peer must be a remote agent's name or this agent's own name")
        ld = as_descs(local, mem_types[0])
        rd = as_descs(remote, mem_types[1])
        if len(ld) != len(rd):
            raise LengthMismatchError(
                f"{len(ld)} local descriptors but {len(rd)} remote descriptors"
            )
        if len(ld) == 0:
            raise InvalidParamError("descriptor lists are empty")
        lc = _columns(ld)
        rc = _columns(rd)
        ne = lc[1] != rc[1]
        if ne.any():
            k = int(np.argmax(ne))
            raise LengthMismatchError(
                f"descriptor {k}: local length {int(lc[1][k])} != remote length {int(rc[1][k])}",
                index=k,
            )
        # Bounds of both lists (lengths are shared): they decide the registration check when a
        # list lies inside one region, and which columns are uniform.
        (la_min, lmin, ld_min), (la_max, lmax, ld_max) = _bounds(lc)
        (ra_min, _, rd_min), (ra_max, _, rd_max) = _bounds(rc)
        lb = (la_min, la_max, lmax, ld_min, ld_max)
        rb = (ra_min, ra_max, lmax, rd_min, rd_max)
        l_slots, l_found, _, l_single = self._resolve(
            INIT_AGENT, ld.mem_type, lc, backends, "local descriptor", lb
        )
        r_slots, r_found, gen, r_single = self._resolve(
            peer, rd.mem_type, rc, backends, "remote descriptor", rb
        )
        cands = [b for b in l_found if b in r_found]
        backend = self._choose(xop, ld.mem_type, rd.mem_type, peer, cands)
        n = lc[0].size
        l_udev = lb[3] if lb[3] == lb[4] else -1
        r_udev = rb[3] if rb[3] == rb[4] else -1
        cols = _Cols(
            (lc[0], rc[0]),
            lc[1],
            (_const(n, l_udev, np.uint64) if l_udev >= 0 else lc[2],
             _const(n, r_udev, np.uint64) if r_udev >= 0 else rc[2]),
            (_slots_of(l_slots, n, l_single), _slots_of(r_slots, n, r_single)),
            ulen=lmin if lmin == lmax else -1,
            udevs=(l_udev, r_udev),
            uslots=(l_single, r_single),
        )  # fmt: skip
        return self._build(xop, backend, peer, gen, ld.mem_type, rd.mem_type, cols, notif, merge)

    def _build(
        self,
        op: XferOp,
        backend: Backend,
        peer: str,
        gen: int,
        l_mem: MemType,
        r_mem: MemType,
        cols: _Cols,
        notif: bytes | str | None,
        merge: bool,
    ) -> XferRequest:
        if merge:
            cols.merge()
        r_sec, _, suffix = self._side(peer)
        lside = XferSide(
            l_mem,
            cols.l_addr,
            cols.lens,
            cols.l_dev,
            cols.l_slot,
            self._local.handles[backend.name],
            cols.ulen,
            cols.l_udev,
            cols.l_uslot,
        )
        rside = XferSide(
            r_mem,
            cols.r_addr,
            cols.lens,
            cols.r_dev,
            cols.r_slot,
            r_sec.handles[backend.name + suffix],
            cols.ulen,
            cols.r_udev,
            cols.r_uslot,
        )
        breq = backend.prepare(op, lside, rside, peer)
        return self._request(
            op, backend, breq, peer, gen, notif, int(cols.lens.shape[0]), cols.total_bytes()
        )

    def _request(
        self,
        op: XferOp,
        backend: Backend,
        breq: BackendRequest,
        peer: str,
        gen: int,
        notif: bytes | str | None,
        desc_count: int,
        total_bytes: int,
    ) -> XferRequest:
        req = XferRequest(
            self,
            backend,
            breq,
            op,
            peer,
            notif.encode() if isinstance(notif, str) else notif,
            desc_count,
            total_bytes,
            gen,
            self._on_error,
        )
        self._requests.add(req)
        return req

    def _on_error(self, req: XferRequest, exc: BaseException) -> None:
        # A peer that died is invalidated (NIXL's REMOTE_DISCONNECT handling), once per generation.
        if isinstance(exc, RemoteDisconnectError) and req.peer != self.name:
            remote = self._remotes.get(req.peer)
            if remote is not None and remote.generation == req._gen:
                logger.warning("remote agent %s disconnected; removing its metadata", req.peer)
                try:
                    self.remove_remote(req.peer)
                except NixlError as err:  # teardown of a dead peer is best effort
                    logger.debug("removing %s after disconnect: %s", req.peer, err)

    def _forget(self, req: XferRequest) -> None:
        self._requests.discard(req)

    # thin wrappers in NIXL's spirit -------------------------------------------------
    def post(self, req: XferRequest, notif: Any = ..., *, stream: Any = None) -> Any:
        """Post a request (see :meth:`XferRequest.post`)."""
        return req.post(stream=stream) if notif is ... else req.post(notif, stream=stream)

    def check(self, req: XferRequest) -> Any:
        """Check a request (see :meth:`XferRequest.check`)."""
        return req.check()

    def release(self, req: XferRequest | PreppedList) -> None:
        """Release a request (aborting it if running) or a prepared list."""
        req.release()

    def telemetry(self, req: XferRequest) -> XferTelemetry:
        """Telemetry of a request's last completed post."""
        return req.telemetry

    # ================================================================ notifications
    def get_notifs(self, backends: Sequence[str] | None = None) -> dict[str, list[bytes]]:
        """Notifications received since the last call, keyed by sender; each handed over once."""
        out: dict[str, list[bytes]] = {}
        for b in self._pick(backends):
            if not b.supports_notif:
                continue
            for sender, msg in b.get_notifs():
                out.setdefault(sender, []).append(msg)
        return out

    def send_notif(
        self, peer: str, msg: bytes | str, backends: Sequence[str] | None = None
    ) -> None:
        """Send a standalone notification (to a remote agent, or to this agent itself).

        Raises:
            UnknownAgentError: no metadata for ``peer``.
            NotFoundError: no notification-capable backend reaches it.
        """
        data = msg.encode() if isinstance(msg, str) else bytes(msg)
        if peer == self.name:
            cands = [b for b in self._pick(backends) if b.supports_notif and b.supports_local]
        else:
            remote = self._remote(peer)
            cands = [b for b in self._pick(backends) if b.supports_notif and b.name in remote.conns]
        if not cands:
            raise NotFoundError(
                f"no notification-capable backend of agent {self.name!r} reaches {peer!r}"
            )
        cands[0].send_notif(peer, data)

    # ================================================================ teardown
    def close(self) -> None:
        """Release requests, deregister all memory, forget remotes, close backends (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if hasattr(self, "_mgr") and self._backends:
            self._mgr.pm.hook.nixl_agent_closing(agent=self)
        for req in list(self._requests):
            try:
                req.release()
            except NixlError as exc:
                logger.warning("could not release %r at close: %s", req, exc)
        for name in list(self._remotes):
            try:
                self.remove_remote(name)
            except NixlError as exc:
                logger.warning("removing remote %s at close: %s", name, exc)
        for mt, table in list(self._local.tables.items()):
            if len(table):
                try:
                    self.deregister(self.registered(mt))
                except NixlError as exc:
                    logger.warning("deregistering %s memory at close: %s", mt.value, exc)
        for b in self._backends.values():
            try:
                b.close()
            except Exception as exc:  # a broken backend must not stop the others from closing
                logger.warning("closing backend %s: %s", b.name, exc)
