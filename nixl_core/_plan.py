"""Planning a request: checking descriptors against a side, gathering columns, merging runs.

Everything here is vectorized numpy over whole columns; nothing loops per descriptor. The
:class:`Planner` does the work of :class:`~nixl_core.agent.Agent`'s ``prep``, ``make``,
``create`` and ``resolve``; backends receive the result as :class:`~nixl_core.backend.XferSide`
objects.

Columns whose values are all equal (a KV cache's block length, its one GPU, its one
registration) are kept as their single value and a read-only stride-0 view, so that ``make``
gathers only the address column in the common case.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from nixl_core.backend import Backend, XferOp, XferSide
from nixl_core.errors import (
    InvalidDescriptorError,
    InvalidParamError,
    LengthMismatchError,
    NixlError,
    NotFoundError,
    PluginError,
    TransferError,
    UnregisteredDescriptorError,
    foreign_error,
)
from nixl_core.memory import MemType, Regions
from nixl_core.xfer import PreppedList, XferRequest

if TYPE_CHECKING:
    from nixl_core.agent import Agent
    from nixl_core.descriptors import DescList

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
Index = npt.NDArray[np.integer[Any]]
_T = TypeVar("_T")

#: Names that mean "the initiator's own memory" (NIXL's NIXL_INIT_AGENT).
INIT_ALIASES = ("", "NIXL_INIT_AGENT")

#: Bounds of a list: (min addr, max addr, max len, min dev, max dev).
Bounds = tuple[int, int, int, int, int]


def check_indices(idx: Any, n: int, what: str) -> Index:
    """Checked index array, in a dtype ``take`` accepts without a copy where it can.

    Raises:
        InvalidParamError: not 1-D, empty, or not integers.
        InvalidDescriptorError: an index out of range (names its position).
    """
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


def const(n: int, value: int, dtype: type[np.generic]) -> npt.NDArray[Any]:
    """A read-only length-``n`` column holding one value, without allocating ``n`` elements."""
    # A stride-0 view of one element (what np.broadcast_to makes, at a third of its cost).
    col: npt.NDArray[Any] = np.ndarray((n,), dtype, np.array([value], dtype), 0, (0,))
    col.flags.writeable = False
    return col


def uniform(col: npt.NDArray[Any]) -> int:
    """The single value of a column, or -1 when it holds several."""
    if col.size == 0:
        return -1
    lo, hi = int(col.min()), int(col.max())
    return lo if lo == hi else -1


def columns(arr: U64) -> tuple[U64, U64, U64]:
    """The (addr, len, dev) columns of an (N, 3) array, contiguous."""
    # One transposing copy (a single allocation) gives three contiguous columns.
    t = np.ascontiguousarray(arr.T)
    return t[0], t[1], t[2]


def bounds(cols: tuple[U64, U64, U64]) -> tuple[list[int], list[int]]:
    """(min, max) of (addr, len, dev) over a list's columns: two reductions, not six."""
    t = cols[0].base
    if isinstance(t, np.ndarray) and t.shape == (3, cols[0].size):  # columns()' (3, N) block
        return t.min(axis=1).tolist(), t.max(axis=1).tolist()
    return [int(c.min()) for c in cols], [int(c.max()) for c in cols]


def worth_merging(n: int, joins: int) -> bool:
    """The merge rule: merge when some neighbours join, unless a long list has only a
    handful of accidental neighbours (not worth the gathers a merge costs)."""
    return joins > 0 and not (n > 4096 and joins * 64 < n)


def index_runs(li: Index, ri: Index) -> bool:
    """Whether merging could change a request made with these indices.

    Only neighbours whose indices are consecutive in both lists are counted (they are the ones
    that join in lists laid out in address order).
    """
    n = li.size
    if n < 2:
        return False
    step = li[1:] - li[:-1] == 1
    if not step.any():
        return False
    if ri is not li:
        step &= ri[1:] - ri[:-1] == 1
    return worth_merging(n, int(np.count_nonzero(step)))


class Cols:
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

    @classmethod
    def gather(
        cls, local: PreppedList, li: Index, remote: PreppedList, ri: Index, lens: U64 | None
    ) -> Cols:
        """The columns of a ``make``: prepared lists gathered by index (uniform ones not)."""
        n = int(li.size)
        l_addr, l_dev, l_slot = _take(local, li, n)
        r_addr, r_dev, r_slot = _take(remote, ri, n)
        ulen = local.uniform_len if lens is None else -1
        return cls(
            (l_addr, r_addr),
            const(n, ulen, np.uint64) if lens is None else lens,
            (l_dev, r_dev),
            (l_slot, r_slot),
            ulen,
            (local.uniform_dev, remote.uniform_dev),
            (local.single_slot, remote.single_slot),
        )

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
        if not worth_merging(n, n_joins):
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
        self.l_dev = const(m, self.l_udev, np.uint64) if self.l_udev >= 0 else self.l_dev[starts]
        self.r_dev = const(m, self.r_udev, np.uint64) if self.r_udev >= 0 else self.r_dev[starts]
        self.l_slot = const(m, self.l_uslot, np.int64) if self.l_uslot >= 0 else self.l_slot[starts]
        self.r_slot = const(m, self.r_uslot, np.int64) if self.r_uslot >= 0 else self.r_slot[starts]

    def total_bytes(self) -> int:
        """Bytes the request moves."""
        n = int(self.lens.shape[0])
        return n * self.ulen if self.ulen >= 0 else int(self.lens.sum(dtype=np.uint64))

    def sides(
        self,
        l_mem: MemType,
        r_mem: MemType,
        l_handles: Mapping[int, Any],
        r_handles: Mapping[int, Any],
    ) -> tuple[XferSide, XferSide]:
        """The two sides as the backend receives them."""
        return (
            XferSide(
                l_mem, self.l_addr, self.lens, self.l_dev, self.l_slot, l_handles,
                self.ulen, self.l_udev, self.l_uslot,
            ),
            XferSide(
                r_mem, self.r_addr, self.lens, self.r_dev, self.r_slot, r_handles,
                self.ulen, self.r_udev, self.r_uslot,
            ),
        )  # fmt: skip


def _take(p: PreppedList, idx: Index, n: int) -> tuple[U64, U64, I64]:
    """Gather (addrs, devs, slots) of a prepared list; uniform columns become broadcast views."""
    addrs = p.addrs.take(idx)
    devs = const(n, p.uniform_dev, np.uint64) if p.uniform_dev >= 0 else p.devs.take(idx)
    slots = const(n, p.single_slot, np.int64) if p.single_slot >= 0 else p.reg_slots.take(idx)
    return addrs, devs, slots


def whole_side(p: PreppedList, handles: Mapping[int, Any]) -> XferSide:
    """A whole prepared list as one side (unmerged), with one backend's handles."""
    n = len(p)
    return XferSide(
        p.mem_type,
        p.addrs,
        const(n, p.uniform_len, np.uint64) if p.uniform_len >= 0 else p.lens,
        const(n, p.uniform_dev, np.uint64) if p.uniform_dev >= 0 else p.devs,
        p.reg_slots if p.single_slot < 0 else const(n, p.single_slot, np.int64),
        handles,
        p.uniform_len,
        p.uniform_dev,
        p.single_slot,
    )


def list_bounds(arr: U64) -> tuple[U64, Bounds | None, int, int]:
    """(contiguous address column, bounds, uniform length, uniform device) of an (N, 3) array."""
    addrs = np.ascontiguousarray(arr[:, 0])
    if not addrs.size:
        return addrs, None, -1, -1
    lens, devs = arr[:, 1], arr[:, 2]
    lmin, lmax, dmin, dmax = int(lens.min()), int(lens.max()), int(devs.min()), int(devs.max())
    b = (int(addrs.min()), int(addrs.max()), lmax, dmin, dmax)
    return addrs, b, lmin if lmin == lmax else -1, dmin if dmin == dmax else -1


def locate(
    regions: Regions,
    mem_type: MemType,
    cols: tuple[U64, U64, U64],
    bounds: Bounds | None,
    what: str,
    whose: str,
) -> tuple[I64 | None, int]:
    """Slots of the registrations covering each descriptor (vectorized).

    Returns:
        (slot per descriptor, or None when every descriptor lies in the one registration
        ``single``; that common slot, or -1).

    Raises:
        InvalidDescriptorError: a descriptor outside every registration (names its index).
    """
    table = regions.tables.get(mem_type)
    if table is None or len(table) == 0:
        raise UnregisteredDescriptorError(
            f"{what} 0 cannot be inside a registration: {whose} has no "
            f"{mem_type.value} memory registered",
            index=0,
        )
    single = table.span(*bounds) if bounds is not None else -1
    if single >= 0:
        return None, single
    slots = table.lookup(*cols, what=what)
    single = (uniform(slots) if len(table) > 1 else int(slots[0])) if slots.size else -1
    return slots, single


def covering(
    regions: Regions,
    mem_type: MemType,
    backends: Sequence[Backend],
    slots: I64 | None,
    single: int,
    reach: str,
) -> tuple[str, ...]:
    """The backends that hold every descriptor's registration and can reach the side.

    Args:
        reach: "init" (the initiator's own memory), "self" (a loopback target) or "remote".
    """
    found: list[str] = []
    for b in backends:
        if mem_type not in b.mem_types:
            continue
        if reach == "self" and not b.supports_local:
            continue
        if reach == "remote" and not b.supports_remote:
            continue
        if regions.covers(b.name, slots, single):
            found.append(b.name)
    return tuple(found)


class Side(NamedTuple):
    """The memory a peer name designates: whose regions, their generation, how reached."""

    regions: Regions
    generation: int
    reach: str  # "init": the initiator's own; "self": a loopback target; "remote": a peer's
    whose: str

    def handles(self, backend: str) -> Mapping[int, Any]:
        """slot -> this backend's handle, for this side."""
        return self.regions.handle_map(backend, self.reach == "self")


def _backend_call(backend: Backend, what: str, fn: Callable[..., _T], *args: Any) -> _T:
    """Call into a backend for a transfer; a foreign exception becomes a TransferError."""
    try:
        return fn(*args)
    except NixlError:
        raise
    except Exception as exc:
        raise foreign_error(exc, backend.name, f"{what} a transfer", TransferError) from exc


class Planner:
    """Builds an agent's prepared lists and requests (``prep``, ``resolve``, ``make``, ``create``).

    It reads the agent's books (its regions, remote agents and backends) and hands backends
    their sides; the :class:`~nixl_core.agent.Agent` methods of the same names are its façade
    and carry the documentation.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._choices: dict[tuple[Any, ...], str] = {}  # nixl_select_backend's answers

    def side(self, peer: str) -> Side:
        """The side a peer name designates ("" = the initiator, own name = loopback)."""
        a = self.agent
        if peer in INIT_ALIASES:
            return Side(a._regions, 0, "init", "this agent")
        if peer == a.name:
            return Side(a._regions, 0, "self", "this agent")
        remote = a._remote(peer)
        return Side(remote.regions, remote.generation, "remote", f"agent {peer!r}")

    def _locate(
        self,
        side: Side,
        mem_type: MemType,
        cols: tuple[U64, U64, U64],
        bounds: Bounds | None,
        backends: Sequence[str] | None,
        what: str,
    ) -> tuple[I64 | None, tuple[str, ...], int]:
        """(slots or None, covering backends, single slot) of a list on one side."""
        a = self.agent
        try:
            slots, single = locate(side.regions, mem_type, cols, bounds, what, side.whose)
        except UnregisteredDescriptorError as exc:
            if side.reach != "remote":
                raise
            raise UnregisteredDescriptorError(
                f"{exc} of {side.whose}: its loaded metadata does not include it (not published "
                "yet? fetch the label that holds it, or load its full metadata again)",
                index=exc.index,
            ) from None
        names = [n.upper() for n in backends] if backends else list(a._backends)
        missing = [n for n in names if n not in a._backends]
        if missing:
            raise NotFoundError(f"agent {a.name!r} has no backend {missing[0]!r}")
        found = covering(
            side.regions, mem_type, [a._backends[n] for n in names], slots, single, side.reach
        )
        if not found:
            raise NotFoundError(
                f"no backend of agent {a.name!r} ({', '.join(names) or 'none'}) covers every "
                f"{mem_type.value} {what} of {side.whose}"
            )
        return slots, found, single

    def prep(self, peer: str, d: DescList, backends: Sequence[str] | None) -> PreppedList:
        """A prepared list (see :meth:`Agent.prep`)."""
        arr = d.array
        # Only the address column is copied (make gathers it); lengths and devices are read in
        # place, their bounds computed once for both the registration check and uniformity.
        addrs, bounds, ulen, udev = list_bounds(arr)
        side = self.side(peer)
        slots, found, single = self._locate(
            side, d.mem_type, (addrs, arr[:, 1], arr[:, 2]), bounds, backends, "descriptor"
        )
        return PreppedList(
            self.agent,
            "" if side.reach == "init" else peer,
            d.mem_type,
            arr,
            addrs,
            slots if single < 0 else None,
            found,
            side.generation,
            uniform_len=ulen,
            uniform_dev=udev,
            single_slot=single,
        )

    def resolve(self, peer: str, d: DescList, backend: Backend) -> XferSide:
        """One backend's view of descriptors (see :meth:`Agent.resolve`)."""
        p = self.prep(peer, d, [backend.name])
        return whole_side(p, self.side(peer).handles(backend.name))

    def choose(
        self,
        op: XferOp,
        local_mem: MemType,
        remote_mem: MemType,
        peer: str,
        candidates: Sequence[str],
    ) -> Backend:
        """The backend for a transfer: the first candidate, or what ``nixl_select_backend``
        answered for this (op, memory types, peer, candidates) — asked once, then cached."""
        a = self.agent
        if not candidates:
            raise NotFoundError(
                f"no backend can carry {local_mem.value} -> {remote_mem.value} to {peer!r}: the "
                "two prepared lists have no backend in common"
            )
        mgr = a._mgr
        if not mgr.custom_select:
            return a._backends[candidates[0]]
        key = (op, local_mem, remote_mem, peer, tuple(candidates))
        choice = self._choices.get(key)
        if choice is None:
            answer = mgr.pm.hook.nixl_select_backend(
                agent=a,
                op=op,
                local_mem=local_mem,
                remote_mem=remote_mem,
                peer=peer,
                candidates=list(candidates),
            )
            if not isinstance(answer, str) or answer.upper() not in candidates:
                raise PluginError(
                    f"nixl_select_backend chose {answer!r}, not one of {', '.join(candidates)}"
                )
            choice = self._choices[key] = answer.upper()
        return a._backends[choice]

    def make(
        self,
        op: XferOp,
        local: PreppedList,
        local_idx: Any,
        remote: PreppedList,
        remote_idx: Any,
        notif: bytes | str | None,
        merge: bool,
        backends: Sequence[str] | None,
    ) -> XferRequest:
        """A request from prepared lists and index arrays (see :meth:`Agent.make`)."""
        a = self.agent
        if local.agent is not a or remote.agent is not a:
            raise InvalidParamError("prepared lists belong to another agent")
        if local.peer != "":
            raise InvalidParamError(
                f"local list was prepared for {local.peer!r}; prepare it with peer '' (the initiator)"
            )
        if remote.peer == "":
            raise InvalidParamError(
                "remote list was prepared for the initiator ('') — prepare it with the remote agent's "
                "name (or this agent's own name for loopback)"
            )
        if local.released or remote.released:
            raise InvalidParamError("prepared list was released")
        li = check_indices(local_idx, len(local), "local")
        if remote_idx is local_idx and len(remote) == len(local):
            ri = li  # one index array for both sides: checked once
        else:
            ri = check_indices(remote_idx, len(remote), "remote")
        n = li.size
        if n != ri.size:
            raise LengthMismatchError(f"{n} local indices but {ri.size} remote indices")
        a._check_generation(remote.peer, remote.generation)
        lens = None  # gathered only when lengths differ
        if local.uniform_len < 0 or local.uniform_len != remote.uniform_len:
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
        backend = self.choose(op, local.mem_type, remote.mem_type, remote.peer, cands)
        if backend.takes_indices:
            ls = self._side_state(local, backend)
            rs = self._side_state(remote, backend) if ls is not None else None
            if rs is not None and not (merge and index_runs(li, ri)):
                total = n * local.uniform_len if lens is None else int(lens.sum(dtype=np.uint64))
                breq = _backend_call(
                    backend, "prepare", backend.prepare_indexed, op, ls, li, rs, ri, remote.peer
                )
                return a._request(
                    op, backend, breq, remote.peer, remote.generation, notif, n, total
                )
        cols = Cols.gather(local, li, remote, ri, lens)
        return self._build(
            op, backend, remote.peer, remote.generation, local.mem_type, remote.mem_type, cols,
            notif, merge,
        )  # fmt: skip

    def _side_state(self, p: PreppedList, backend: Backend) -> Any:
        """The backend's :meth:`~Backend.prep_side` state of a prepared list, cached on it."""
        side = self.side(p.peer)
        ent = p._bstate.get(backend.name)
        if ent is not None:
            if ent[0] is backend and ent[1] == side.regions.epoch:
                return ent[2]
            p._drop_states()  # registrations changed since: rebuild
        whole = whole_side(p, side.handles(backend.name))
        state = _backend_call(backend, "prepare", backend.prep_side, whole, p.peer)
        p._bstate[backend.name] = (backend, side.regions.epoch, state)
        return state

    def create(
        self,
        op: XferOp,
        ld: DescList,
        rd: DescList,
        peer: str,
        notif: bytes | str | None,
        merge: bool,
        backends: Sequence[str] | None,
    ) -> XferRequest:
        """A one-shot request (see :meth:`Agent.create`)."""
        if peer in INIT_ALIASES:
            raise InvalidParamError("peer must be a remote agent's name or this agent's own name")
        if len(ld) != len(rd):
            raise LengthMismatchError(
                f"{len(ld)} local descriptors but {len(rd)} remote descriptors"
            )
        if len(ld) == 0:
            raise InvalidParamError("descriptor lists are empty")
        lc = columns(ld.array)
        rc = columns(rd.array)
        ne = lc[1] != rc[1]
        if ne.any():
            k = int(np.argmax(ne))
            raise LengthMismatchError(
                f"descriptor {k}: local length {int(lc[1][k])} != remote length {int(rc[1][k])}",
                index=k,
            )
        # Bounds of both lists (lengths are shared): they decide the registration check when a
        # list lies inside one region, and which columns are uniform.
        (la_min, lmin, ld_min), (la_max, lmax, ld_max) = bounds(lc)
        (ra_min, _, rd_min), (ra_max, _, rd_max) = bounds(rc)
        lb = (la_min, la_max, lmax, ld_min, ld_max)
        rb = (ra_min, ra_max, lmax, rd_min, rd_max)
        rside = self.side(peer)
        l_slots, l_found, l_single = self._locate(
            self.side(""), ld.mem_type, lc, lb, backends, "local descriptor"
        )
        r_slots, r_found, r_single = self._locate(
            rside, rd.mem_type, rc, rb, backends, "remote descriptor"
        )
        backend = self.choose(
            op, ld.mem_type, rd.mem_type, peer, [b for b in l_found if b in r_found]
        )
        n = lc[0].size
        l_udev = lb[3] if lb[3] == lb[4] else -1
        r_udev = rb[3] if rb[3] == rb[4] else -1
        cols = Cols(
            (lc[0], rc[0]),
            lc[1],
            (const(n, l_udev, np.uint64) if l_udev >= 0 else lc[2],
             const(n, r_udev, np.uint64) if r_udev >= 0 else rc[2]),
            (l_slots if l_slots is not None else const(n, l_single, np.int64),
             r_slots if r_slots is not None else const(n, r_single, np.int64)),
            ulen=lmin if lmin == lmax else -1,
            udevs=(l_udev, r_udev),
            uslots=(l_single, r_single),
        )  # fmt: skip
        return self._build(
            op, backend, peer, rside.generation, ld.mem_type, rd.mem_type, cols, notif, merge
        )

    def _build(
        self,
        op: XferOp,
        backend: Backend,
        peer: str,
        gen: int,
        l_mem: MemType,
        r_mem: MemType,
        cols: Cols,
        notif: bytes | str | None,
        merge: bool,
    ) -> XferRequest:
        if merge:
            cols.merge()
        lside, rside = cols.sides(
            l_mem,
            r_mem,
            self.agent._regions.handle_map(backend.name, False),
            self.side(peer).handles(backend.name),
        )
        breq = _backend_call(backend, "prepare", backend.prepare, op, lside, rside, peer)
        return self.agent._request(
            op, backend, breq, peer, gen, notif, int(cols.lens.shape[0]), cols.total_bytes()
        )
