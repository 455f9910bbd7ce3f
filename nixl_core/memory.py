"""Memory types, the registration table, and the bookkeeping of registered regions.

A :class:`RegTable` holds the registered regions of one memory type as sorted numpy columns, so that
checking that every transfer descriptor lies inside one registration is one vectorized binary search
(``np.searchsorted``), never a Python loop per descriptor. :class:`Regions` is what an agent knows
of one side (its own registrations, or a remote agent's loaded ones): the tables plus, per backend,
the handles, public blobs and coverage. :func:`register_regions` / :func:`deregister_regions` call
the backends and keep those books consistent whatever a backend raises.
"""

from __future__ import annotations

import bisect
import enum
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from nixl_core.errors import (
    MemTypeError,
    NixlError,
    PluginError,
    RegistrationError,
    UnregisteredDescriptorError,
    foreign_error,
)

if TYPE_CHECKING:
    from nixl_core.backend import Backend
    from nixl_core.descriptors import DescList

__all__ = [
    "UNBOUNDED",
    "MemType",
    "RegTable",
    "Regions",
    "deregister_regions",
    "register_regions",
]

logger = logging.getLogger(__name__)

#: Registered length used for storage regions registered with len 0 ("the whole file").
UNBOUNDED = np.uint64(0xFFFF_FFFF_FFFF_FFFF)

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


class MemType(enum.Enum):
    """NIXL's memory types.

    Descriptor fields mean, per type: DRAM (addr = VA, dev = 0 or region), VRAM (addr = device VA,
    dev = GPU index), BLK (addr = offset, dev = volume id), OBJ (addr = offset, dev = key),
    FILE (addr = file offset, dev = fd). Storage types (BLK, OBJ, FILE) registered with len 0 are
    unbounded.
    """

    DRAM = "DRAM"
    VRAM = "VRAM"
    BLK = "BLK"
    OBJ = "OBJ"
    FILE = "FILE"

    @property
    def is_storage(self) -> bool:
        """True for BLK, OBJ and FILE: len 0 at registration means unbounded."""
        return self in (MemType.BLK, MemType.OBJ, MemType.FILE)

    @property
    def code(self) -> int:
        """Stable small integer used in the binary metadata format."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> MemType:
        """Inverse of :attr:`code`.

        Raises:
            MemTypeError: unknown code.
        """
        try:
            return _FROM_CODE[code]
        except KeyError:
            raise MemTypeError(f"unknown memory type code {code}") from None

    @classmethod
    def parse(cls, value: MemType | str) -> MemType:
        """Accept a MemType or any of NIXL's spellings ("DRAM", "cpu", "VRAM_SEG", "cuda", "BLOCK").

        Raises:
            MemTypeError: the value names no memory type.
        """
        if isinstance(value, MemType):
            return value
        if isinstance(value, str):
            key = value.strip().upper()
            key = key.removesuffix("_SEG")
            found = _ALIASES.get(key)
            if found is not None:
                return found
        raise MemTypeError(
            f"unknown memory type {value!r}; expected one of "
            f"{', '.join(m.value for m in MemType)} (or NIXL's aliases cpu, cuda, BLOCK, *_SEG)"
        )


_CODES = {MemType.DRAM: 0, MemType.VRAM: 1, MemType.BLK: 2, MemType.OBJ: 3, MemType.FILE: 4}
_FROM_CODE = {v: k for k, v in _CODES.items()}
_ALIASES = {m.value: m for m in MemType} | {
    "CPU": MemType.DRAM,
    "CUDA": MemType.VRAM,
    "GPU": MemType.VRAM,
    "BLOCK": MemType.BLK,
}


def _ends(addrs: U64, lens: U64, unbounded: bool) -> U64:
    """Exclusive end of each region, saturating at 2**64-1 (len 0 on storage = unbounded)."""
    room = UNBOUNDED - addrs
    ends: U64 = np.where(lens > room, UNBOUNDED, addrs + np.minimum(lens, room))
    if unbounded:
        ends = np.where(lens == 0, UNBOUNDED, ends)
    return ends


class RegTable:
    """The registered regions of one memory type, sorted by (dev, addr).

    Each region has a caller-chosen integer *slot* (an index into the owner's per-registration
    records). Regions of one device may not overlap.
    """

    __slots__ = (
        "_addr",
        "_dev",
        "_dir",
        "_end",
        "_keys",
        "_len",
        "_single_dev",
        "_slot",
        "mem_type",
    )

    def __init__(self, mem_type: MemType) -> None:
        self.mem_type = mem_type
        self._dev: U64 = np.empty(0, np.uint64)
        self._addr: U64 = np.empty(0, np.uint64)
        self._len: U64 = np.empty(0, np.uint64)
        self._end: U64 = np.empty(0, np.uint64)
        self._slot: I64 = np.empty(0, np.int64)
        self._single_dev = True
        self._dir: _Directory | None = None
        self._keys: list[tuple[int, int]] | None = None  # (dev, addr) per region, for span()

    def __len__(self) -> int:
        return int(self._addr.size)

    @property
    def slots(self) -> I64:
        """Slots of all regions, in table order."""
        return self._slot

    def rows(self) -> U64:
        """All regions as an (N, 3) [addr, len, dev] array, in table order."""
        return np.stack([self._addr, self._len, self._dev], axis=1)

    def _changed(self) -> None:
        self._single_dev = self._dev.size == 0 or bool(self._dev[0] == self._dev[-1])
        self._dir = _Directory.build(self._addr, self._end) if self._single_dev else None
        self._keys = None

    def add(self, rows: U64, slots: I64) -> None:
        """Add regions (an (N, 3) array) with their slots.

        Raises:
            RegistrationError: a region overlaps another (new or existing) one; names its index.
        """
        addrs = np.ascontiguousarray(rows[:, 0])
        lens = np.ascontiguousarray(rows[:, 1])
        devs = np.ascontiguousarray(rows[:, 2])
        if not self.mem_type.is_storage:
            zero = np.flatnonzero(lens == 0)
            if zero.size:
                raise RegistrationError(
                    f"registration {int(zero[0])} has length 0 ({self.mem_type.value} regions need "
                    "a length; only storage types accept 0 = unbounded)",
                    index=int(zero[0]),
                )
        ends = _ends(addrs, lens, self.mem_type.is_storage)
        new_idx = np.arange(addrs.size, dtype=np.int64)
        all_dev = np.concatenate([self._dev, devs])
        all_addr = np.concatenate([self._addr, addrs])
        all_len = np.concatenate([self._len, lens])
        all_end = np.concatenate([self._end, ends])
        origin = np.concatenate([np.full(self._addr.size, -1, np.int64), new_idx])
        order = np.lexsort((all_addr, all_dev))
        sd, sa, se, so = all_dev[order], all_addr[order], all_end[order], origin[order]
        # Sorted by (dev, addr): if no region starts before the end of the one just before it
        # (same device), the ends are increasing too, so no two regions overlap at all.
        if sd.size > 1:
            same_dev = sd[1:] == sd[:-1]
            prev_max_end = se[:-1]
            bad = np.flatnonzero(same_dev & (sa[1:] < prev_max_end))
            if bad.size:
                i = int(bad[0]) + 1
                culprit = int(so[i]) if so[i] >= 0 else int(so[i - 1])
                what = "duplicates" if sa[i] == sa[i - 1] else "overlaps"
                raise RegistrationError(
                    f"registration {culprit} [addr=0x{int(sa[i]):x}, dev={int(sd[i])}] {what} an "
                    f"existing {self.mem_type.value} registration",
                    index=culprit,
                )
        self._dev, self._addr, self._end = sd, sa, se
        self._len = all_len[order]
        self._slot = np.concatenate([self._slot, slots.astype(np.int64)])[order]
        self._changed()

    def find_exact(self, rows: U64) -> I64:
        """Position in the table of each region that matches a row exactly, -1 where none does."""
        if rows.shape[0] == 0 or self._addr.size == 0:
            return np.full(rows.shape[0], -1, np.int64)
        pos = self._locate(np.ascontiguousarray(rows[:, 0]), np.ascontiguousarray(rows[:, 2]))
        ok = pos >= 0
        p = np.where(ok, pos, 0)
        ok &= (self._addr[p] == rows[:, 0]) & (self._len[p] == rows[:, 1])
        return np.where(ok, pos, -1)

    def remove_positions(self, positions: I64) -> None:
        """Drop the regions at these table positions."""
        keep = np.ones(self._addr.size, dtype=bool)
        keep[positions] = False
        self._dev = self._dev[keep]
        self._addr = self._addr[keep]
        self._len = self._len[keep]
        self._end = self._end[keep]
        self._slot = self._slot[keep]
        self._changed()

    def slots_at(self, positions: I64) -> I64:
        """Slots of the regions at these table positions."""
        return self._slot[positions]

    def _locate(self, addrs: U64, devs: U64) -> I64:
        """Position of the last region with (dev, addr) <= the query's, or -1.

        Vectorized: one searchsorted when the table holds a single device; otherwise a
        vectorized binary search inside each query's device segment (log2(regions) numpy steps).
        """
        n_reg = self._addr.size
        if self._single_dev:
            if self._dir is not None:
                pos = self._dir.locate(self._addr, addrs)
            else:
                pos = np.searchsorted(self._addr, addrs, side="right").astype(np.int64) - 1
            # Queries on another device than the table's match nothing.
            return np.where(devs == self._dev[0], pos, -1)
        lo = np.searchsorted(self._dev, devs, side="left").astype(np.int64)
        hi = np.searchsorted(self._dev, devs, side="right").astype(np.int64)
        seg_lo = lo.copy()
        # Binary search for the first region in [lo, hi) whose addr > query.
        while True:
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi) >> 1
            mid_c = np.minimum(mid, n_reg - 1)
            go_right = active & (self._addr[mid_c] <= addrs)
            lo = np.where(go_right, mid + 1, lo)
            hi = np.where(active & ~go_right, mid, hi)
        pos = lo - 1
        return np.where(pos >= seg_lo, pos, -1)

    def span(self, amin: int, amax: int, lmax: int, dmin: int, dmax: int) -> int:
        """Slot of the one registration that surely covers a whole list, else -1.

        Args:
            amin, amax: smallest and largest address of the list.
            lmax: largest length.
            dmin, dmax: smallest and largest device.

        One bisection over the regions, no per-descriptor work: a list whose bounds lie inside
        one region (a KV cache, a staging buffer) is decided in a few microseconds. The bounds
        are sufficient, and exact when lengths are uniform (KV blocks); when this returns -1,
        :meth:`lookup` decides per descriptor.
        """
        n = self._addr.size
        if n == 0 or dmin != dmax:
            return -1
        if n == 1:
            i = 0
        else:
            if self._keys is None:
                self._keys = list(zip(self._dev.tolist(), self._addr.tolist(), strict=True))
            i = bisect.bisect_right(self._keys, (dmin, amin)) - 1
            if i < 0:
                return -1
        end = int(self._end[i])
        if (
            int(self._dev[i]) == dmin
            and int(self._addr[i]) <= amin
            and amax <= end
            and lmax <= end - amax
        ):
            return int(self._slot[i])
        return -1

    def lookup(self, addrs: U64, lens: U64, devs: U64, what: str = "descriptor") -> I64:
        """Slot of the registration covering each descriptor.

        Args:
            addrs, lens, devs: the descriptors' columns (1-D uint64 arrays of one length; strided
                views of an (N, 3) array are fine).
            what: how to name the list in an error message.

        Returns:
            int64 array of slots, one per descriptor.

        Raises:
            UnregisteredDescriptorError: a descriptor lies outside every registration (names the first
                such index) or wraps past 2**64.
        """
        n = addrs.shape[0]
        if n == 0:
            return np.empty(0, np.int64)
        if self._addr.size == 0:
            raise UnregisteredDescriptorError(
                f"{what} 0 [addr=0x{int(addrs[0]):x}, len={int(lens[0])}, dev={int(devs[0])}] is "
                f"not inside any registration: no {self.mem_type.value} memory is registered",
                index=0,
            )
        if self._addr.size == 1:
            # One registration (the common case: a whole KV cache or staging buffer): bounds of
            # the whole list decide, without a per-descriptor gather.
            slot = self.span(
                int(addrs.min()),
                int(addrs.max()),
                int(lens.max()),
                int(devs.min()),
                int(devs.max()),
            )
            if slot >= 0:
                return np.full(n, slot, np.int64)
            pos = np.where(addrs >= self._addr[0], 0, -1).astype(np.int64)
            pos[devs != self._dev[0]] = -1
        else:
            pos = self._locate(addrs, devs)
        p = np.maximum(pos, 0)
        end_p = self._end[p]
        # len <= end - addr, written so that nothing overflows.
        ok = (pos >= 0) & (addrs <= end_p) & (lens <= end_p - addrs)
        if not ok.all():
            bad = int(np.argmin(ok))
            raise UnregisteredDescriptorError(
                f"{what} {bad} [addr=0x{int(addrs[bad]):x}, len={int(lens[bad])}, "
                f"dev={int(devs[bad])}] is not inside any {self.mem_type.value} registration",
                index=bad,
            )
        return self._slot[p]


class _Directory:
    """A bucket directory over one device's sorted region starts.

    ``np.searchsorted`` of random addresses into a sorted table costs a branch misprediction per
    step (about 65 ns per query for 1000 regions here). The directory splits the span of the
    regions into power-of-two buckets and stores, per bucket, the last region starting at or
    before it; a query then needs one shift, one gather and a few vectorized forward steps (as
    many as the most regions starting inside one bucket). Built only when that count is small.
    """

    __slots__ = ("first", "lo", "max_steps", "n_buckets", "shift")

    MAX_BUCKETS = 1 << 16
    MAX_STEPS = 4

    def __init__(self, lo: np.uint64, shift: int, first: I64, max_steps: int) -> None:
        self.lo = lo
        self.shift = np.uint64(shift)
        self.first = first
        self.n_buckets = int(first.size)
        self.max_steps = max_steps

    @classmethod
    def build(cls, starts: U64, ends: U64) -> _Directory | None:
        n = int(starts.size)
        if n < 16:
            return None  # searchsorted over a handful of regions is cheap enough
        lo = starts[0]
        span = int(starts[-1] - lo) + 1
        want = min(cls.MAX_BUCKETS, 1 << max(4, (8 * n - 1).bit_length()))
        shift = max(0, (span - 1).bit_length() - (want - 1).bit_length())
        n_buckets = (span - 1 >> shift) + 1
        bucket_starts = lo + (np.arange(n_buckets, dtype=np.uint64) << np.uint64(shift))
        first = np.searchsorted(starts, bucket_starts, side="right").astype(np.int64) - 1
        # Regions starting strictly inside bucket k: first[k+1] - first[k] (the last bucket's
        # own count is bounded by the same formula against n - 1).
        per_bucket = np.diff(np.append(first, n - 1))
        max_steps = int(per_bucket.max()) if per_bucket.size else 0
        if max_steps > cls.MAX_STEPS:
            return None
        return cls(lo, shift, first, max_steps)

    def locate(self, starts: U64, addrs: U64) -> I64:
        """Index of the last region starting at or before each address, or -1."""
        below = addrs < self.lo
        b = (addrs - self.lo) >> self.shift
        np.minimum(b, np.uint64(self.n_buckets - 1), out=b)
        pos: I64 = self.first[b]
        last = np.int64(starts.size - 1)
        for _ in range(self.max_steps):
            nxt = np.minimum(pos + 1, last)
            adv = (starts[nxt] <= addrs) & (pos < last)
            if not adv.any():
                break
            pos += adv
        pos[below] = -1
        return pos


def _span(rows: U64) -> str:
    """How to name a list of regions in a message: the count and the first region."""
    n = int(rows.shape[0])
    first = f"[addr=0x{int(rows[0, 0]):x}, len={int(rows[0, 1])}, dev={int(rows[0, 2])}]"
    return f"region 0 {first}" if n == 1 else f"regions 0..{n - 1} (region 0 {first})"


class Regions:
    """The registered regions of one agent (its own) or of one remote agent (as loaded).

    Each region has a *slot*; the per-memory-type :class:`RegTable` maps descriptors to slots.
    Per backend (by name), ``handles[b][slot]`` is the backend's handle for the region (what
    ``register`` returned for the agent's own regions, what ``load_remote`` returned for a
    peer's), ``loopback[b][slot]`` what ``load_local`` returned (the target side of a transfer
    to the agent's own memory), ``blobs[b][slot]`` its public data, and ``has[b]`` a boolean
    array over slots for vectorized coverage checks. ``metas[slot]`` is the registration's meta.
    """

    def __init__(self) -> None:
        self.tables: dict[MemType, RegTable] = {}
        self.handles: dict[str, dict[int, Any]] = {}
        self.loopback: dict[str, dict[int, Any]] = {}
        self.has: dict[str, npt.NDArray[np.bool_]] = {}
        self.blobs: dict[str, dict[int, bytes]] = {}
        self.metas: dict[int, bytes] = {}
        self.next_slot = 0
        # Bumped whenever registrations leave: backend states cached on prepared lists
        # (Backend.prep_side) from an older epoch are rebuilt.
        self.epoch = 0

    def table(self, mem_type: MemType) -> RegTable:
        """The table of one memory type (created empty on first use)."""
        t = self.tables.get(mem_type)
        if t is None:
            t = self.tables[mem_type] = RegTable(mem_type)
        return t

    def handle_map(self, backend: str, loopback: bool) -> Mapping[int, Any]:
        """slot -> handle of one backend: registration (or loaded) handles, or loopback ones."""
        return (self.loopback if loopback else self.handles).get(backend, {})

    def new_slots(self, n: int) -> I64:
        """``n`` fresh slots."""
        slots = np.arange(self.next_slot, self.next_slot + n, dtype=np.int64)
        self.next_slot += n
        return slots

    def mark(self, backend: str, slots: I64, value: bool) -> None:
        """Record whether a backend holds these slots."""
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
        """Whether the backend holds every slot (``single`` >= 0: that one slot)."""
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

    def attach(
        self,
        backend: str,
        slots: I64,
        handles: Sequence[Any],
        blobs: Sequence[bytes] | None = None,
        loopback: Sequence[Any] | None = None,
    ) -> None:
        """Record a backend's handles (and public blobs, loopback handles) for these slots."""
        keys = slots.tolist()
        self.handles.setdefault(backend, {}).update(zip(keys, handles, strict=True))
        if blobs is not None:
            self.blobs.setdefault(backend, {}).update(zip(keys, blobs, strict=True))
        if loopback is not None:
            self.loopback.setdefault(backend, {}).update(zip(keys, loopback, strict=True))
        self.mark(backend, slots, True)

    def detach(self, backend: str, slots: Sequence[int]) -> tuple[list[Any], list[Any]]:
        """Forget a backend's hold on these slots; returns (its handles, its loopback handles)."""
        hmap = self.handles.get(backend, {})
        lmap = self.loopback.get(backend, {})
        bmap = self.blobs.get(backend, {})
        handles = [hmap.pop(s) for s in slots if s in hmap]
        loops = [lmap.pop(s) for s in slots if s in lmap]
        for s in slots:
            bmap.pop(s, None)
        self.mark(backend, np.asarray(slots, np.int64), False)
        return handles, loops


def register_regions(
    regions: Regions,
    targets: Sequence[Backend],
    mem_type: MemType,
    rows: U64,
    metas: Sequence[bytes],
    agent: str,
) -> None:
    """Register regions with every target backend, keeping the books consistent on any failure.

    The rows enter the table first (overlaps are refused before any backend is touched). A
    backend that fails is left out, with a warning, while the others keep the regions; when
    every backend fails, the error is raised and the rows leave the table again. An exception
    that is not a :class:`NixlError` becomes a :class:`RegistrationError` naming the backend and
    the regions. An interrupt (any BaseException) undoes everything, then propagates.

    Raises:
        RegistrationError: an overlap, or every backend failed (one backend: its error).
        PluginError: several backends failed (each one's error in the message).
    """
    table = regions.table(mem_type)
    slots = regions.new_slots(int(rows.shape[0]))
    table.add(rows, slots)  # raises on duplicates/overlaps before any backend is touched
    what = f"register {mem_type.value} {_span(rows)} of agent {agent!r}"
    errors: dict[str, NixlError] = {}
    done: list[Backend] = []
    try:
        for b in targets:
            try:
                _register_one(regions, b, mem_type, rows, metas, slots)
            except Exception as exc:
                err = (
                    exc
                    if isinstance(exc, NixlError)
                    else foreign_error(exc, b.name, what, RegistrationError)
                )
                errors[b.name] = err
                logger.warning("backend %s failed to %s: %s", b.name, what, err)
                continue
            done.append(b)
        if not done:
            if len(errors) == 1:
                raise next(iter(errors.values()))
            raise PluginError(
                f"every backend failed to {what}: "
                + "; ".join(f"{k}: {v}" for k, v in errors.items())
            )
    except BaseException:
        for b in done:
            _deregister_one(regions, b, slots.tolist())
        table.remove_positions(table.find_exact(rows))
        raise
    regions.metas.update(zip(slots.tolist(), metas, strict=True))


def _register_one(
    regions: Regions, b: Backend, mem_type: MemType, rows: U64, metas: Sequence[bytes], slots: I64
) -> None:
    """One backend registers the rows; whatever it returned is released again if the books
    cannot take it (wrong handle count, public data or loopback load failing)."""
    handles = list(b.register(mem_type, rows, metas))
    try:
        if len(handles) != slots.size:
            raise PluginError(
                f"backend {b.name} returned {len(handles)} handles for {slots.size} regions"
            )
        blobs = [b.public_data(h) for h in handles] if b.supports_remote else None
        loops: list[Any] = []
        if b.supports_local:
            try:
                loops.extend(b.load_local(h) for h in handles)
            except BaseException:
                for h in loops:
                    b.unload_local(h)
                raise
    except BaseException:
        b.deregister(handles)
        raise
    regions.attach(b.name, slots, handles, blobs, loops if b.supports_local else None)


def _deregister_one(regions: Regions, b: Backend, slots: Sequence[int]) -> None:
    handles, loops = regions.detach(b.name, slots)
    for h in loops:
        b.unload_local(h)
    if handles:
        b.deregister(handles)


def deregister_regions(
    regions: Regions, backends: Sequence[Backend], reg: DescList, agent: str
) -> None:
    """Deregister exactly what was registered, from the given backends.

    Rows leave the table once no backend holds them any more. A backend that raises is still
    forgotten (its handles are not retried); the first failure is raised at the end, typed.

    Raises:
        RegistrationError: a descriptor matches no registration (names its index), or a backend
            failed to deregister (names it).
    """
    mem_type = reg.mem_type
    rows = reg.array
    table = regions.tables.get(mem_type)
    pos = table.find_exact(rows) if table is not None else np.full(len(reg), -1, np.int64)
    missing = np.flatnonzero(pos < 0)
    if missing.size:
        i = int(missing[0])
        a, ln, d = (int(x) for x in rows[i])
        raise RegistrationError(
            f"descriptor {i} [addr=0x{a:x}, len={ln}, dev={d}] matches no "
            f"{mem_type.value} registration of agent {agent!r}",
            index=i,
        )
    assert table is not None
    slots = table.slots_at(pos)
    regions.epoch += 1
    failure: BaseException | None = None
    for b in backends:
        mine = [s for s in slots.tolist() if s in regions.handles.get(b.name, {})]
        if not mine:
            continue
        try:
            _deregister_one(regions, b, mine)
        except Exception as exc:
            if failure is None:
                failure = (
                    exc
                    if isinstance(exc, NixlError)
                    else foreign_error(
                        exc, b.name, f"deregister {mem_type.value} {_span(rows)}", RegistrationError
                    )
                )
    still = regions.held(slots)
    if not still.all():
        table.remove_positions(pos[~still])
        for s in slots[~still].tolist():
            regions.metas.pop(s, None)
    if failure is not None:
        raise failure
