"""Agent metadata: what one agent exports so that another can reach its registered memory.

An :class:`AgentMetadata` holds the agent's name, one connection-info blob per backend
(``conns``, may be empty for partial metadata) and one :class:`Section` per (backend, memory type)
with the registered regions as an (N, 3) uint64 ``[addr, len, dev]`` array plus one public blob
per region (e.g. a packed UCX rkey).

:meth:`AgentMetadata.encode` and :meth:`AgentMetadata.decode` use the versioned binary format
below. All integers are little-endian; ``off`` is the byte offset from the start of the blob.

Header (fixed, 20 bytes):

======  ======  =====================================================================
off     size    field
======  ======  =====================================================================
0       8       magic ``b"NIXLPYMD"``
8       2       u16 format version (:data:`FORMAT_VERSION` = 2)
10      2       u16 flags, must be 0 in version 2
12      8       u64 total length of the blob in bytes, including header and CRC
======  ======  =====================================================================

Body (variable; ``str`` = u32 byte length L, then L bytes of UTF-8, 1 <= L <= 1024):

============  =====================================================================
size          field
============  =====================================================================
4 + L         agent name (``str``)
16            incarnation id: new for every start of the agent (:func:`new_incarnation`)
4             u32 C: number of connection entries
per entry:    backend name (``str``), then u32 B + B bytes of connection info
4             u32 S: number of sections
per section:  backend name (``str``)
  1           u8 memory type code (:attr:`MemType.code`: DRAM 0, VRAM 1, BLK 2, OBJ 3, FILE 4)
  4           u32 N: number of descriptors
  24 * N      N rows of 3 u64 ``[addr, len, dev]`` (one ``ndarray.tobytes()``)
  4 * N       N u32 blob lengths ``l[0..N-1]``
  sum(l)      the N blobs, concatenated
============  =====================================================================

Trailer: 4 bytes, u32 CRC-32 (:func:`zlib.crc32`) of every byte before it.

The second half of the module is what an agent does with metadata: :func:`export_metadata`
builds an agent's blob from its registrations, :func:`load_connections` / :func:`load_section`
load a peer's into a :class:`RemoteAgent` (additively), and :func:`unload_remote` forgets it.

Decoding is strict and never evaluates anything: it checks, in order, the magic, the version,
the declared total length against the blob's size (truncated / trailing bytes), the CRC, the
flags, and then every count and length against the bytes that remain before reading or
allocating anything. Any problem raises :class:`~nixl_core.errors.MetadataError` naming the
field and its byte offset; no other exception escapes :meth:`AgentMetadata.decode` for any
input bytes. Connection backend names must be unique, and so must (backend, memory type) pairs
of sections; the agent name and backend names must be non-empty.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import numpy.typing as npt

from nixl_core.errors import (
    MemTypeError,
    MetadataError,
    NixlError,
    NotAllowedError,
    NotFoundError,
    PluginError,
    RegistrationError,
    foreign_error,
)
from nixl_core.memory import MemType, Regions

if TYPE_CHECKING:
    from nixl_core.backend import Backend
    from nixl_core.descriptors import DescList

__all__ = [
    "FORMAT_VERSION",
    "INCARNATION_BYTES",
    "MAGIC",
    "MAX_NAME_BYTES",
    "AgentMetadata",
    "RemoteAgent",
    "Section",
    "export_metadata",
    "incarnation_time",
    "load_connections",
    "load_metadata",
    "load_section",
    "new_incarnation",
    "unload_remote",
]

logger = logging.getLogger(__name__)

#: Binary format version written by :meth:`AgentMetadata.encode`; the only one decode accepts.
#: Version 2 added the incarnation id.
FORMAT_VERSION: int = 2
#: First 8 bytes of every encoded metadata blob.
MAGIC = b"NIXLPYMD"
#: Longest agent or backend name, in UTF-8 bytes.
MAX_NAME_BYTES = 1024
#: Size of an incarnation id.
INCARNATION_BYTES = 16

U64 = npt.NDArray[np.uint64]
BytesLike = bytes | bytearray | memoryview

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<8sHHQ")
_HEADER_SIZE = _HEADER.size  # 20
_CRC_SIZE = 4
_U32_MAX = 0xFFFF_FFFF
#: Smallest possible blob: header, a name length, two zero counts, CRC (no name bytes: an empty
#: name then gets its own error message).
_MIN_SIZE = _HEADER_SIZE + 4 + INCARNATION_BYTES + 4 + 4 + _CRC_SIZE
#: Smallest encodings of one connection entry / one section (empty names, no data).
_MIN_CONN = 4 + 4
_MIN_SECTION = 4 + 1 + 4
#: Bytes per descriptor beyond its blob: one [addr, len, dev] row and one u32 blob length.
_PER_DESC = 24 + 4

_EMPTY_DESCS: U64 = np.empty((0, 3), np.uint64)
_EMPTY_DESCS.flags.writeable = False


# --------------------------------------------------------------------------- validation helpers
def _check_name(value: object, what: str) -> str:
    """Return ``value`` if it is a non-empty str of at most MAX_NAME_BYTES UTF-8 bytes."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise MetadataError(f"{what} {value!r} cannot be encoded as UTF-8: {exc.reason}") from None
    if size == 0:
        raise MetadataError(f"{what} is empty")
    if size > MAX_NAME_BYTES:
        raise MetadataError(f"{what} is {size} UTF-8 bytes long; the limit is {MAX_NAME_BYTES}")
    return value


def _to_bytes(value: object, what: str) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes-like, got {type(value).__name__}")


def _to_mem_type(value: MemType | str) -> MemType:
    return MemType.parse(value)


def _to_descs(value: Any) -> U64:
    """Convert to a read-only C-contiguous (N, 3) uint64 array (copies unless already one)."""
    arr = np.asarray(value)
    if arr.size == 0 and arr.ndim in (1, 2) and (arr.ndim == 1 or arr.shape[1] == 3):
        return _EMPTY_DESCS
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise MetadataError(
            f"section descs must have shape (N, 3) [addr, len, dev], got {arr.shape}"
        )
    if arr.dtype.kind not in "iu":
        raise MetadataError(f"section descs must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and bool((arr < 0).any()):
        raise MetadataError("section descs hold a negative value")
    if arr.dtype == np.uint64 and arr.flags.c_contiguous and not arr.flags.writeable:
        return arr  # already an immutable snapshot
    out: U64 = np.array(arr, dtype=np.uint64, order="C", copy=True)
    out.flags.writeable = False
    return out


def _to_blobs(value: Iterable[BytesLike]) -> tuple[bytes, ...]:
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        raise TypeError("section blobs must be a sequence of bytes objects, one per descriptor")
    return tuple([b if type(b) is bytes else _to_bytes(b, "section blob") for b in value])


def _to_conns(
    value: Mapping[str, BytesLike] | Iterable[tuple[str, BytesLike]],
) -> tuple[tuple[str, bytes], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    out: list[tuple[str, bytes]] = []
    for item in items:
        backend, info = item
        out.append((backend, _to_bytes(info, f"connection info of {backend!r}")))
    return tuple(out)


def _to_sections(value: Iterable[Section]) -> tuple[Section, ...]:
    return tuple(value)


def _validate_conns(_inst: object, _attr: object, conns: tuple[tuple[str, bytes], ...]) -> None:
    seen: set[str] = set()
    for backend, _info in conns:
        _check_name(backend, "connection backend name")
        if backend in seen:
            raise MetadataError(f"duplicate connection entry for backend {backend!r}")
        seen.add(backend)


def _validate_incarnation(_inst: object, _attr: object, value: bytes) -> None:
    if type(value) is not bytes:
        raise TypeError(f"incarnation must be bytes, got {type(value).__name__}")
    if len(value) != INCARNATION_BYTES:
        raise MetadataError(f"incarnation must be {INCARNATION_BYTES} bytes, got {len(value)}")


def new_incarnation() -> bytes:
    """A fresh incarnation id: a UUIDv7 (48-bit Unix milliseconds, then 74 random bits), so
    ids sort by start time and :func:`incarnation_time` can show when an agent started."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | rand & ((1 << 80) - 1)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return value.to_bytes(INCARNATION_BYTES, "big")


def incarnation_time(incarnation: bytes) -> float | None:
    """The Unix time (s) an incarnation id from :func:`new_incarnation` was made, else None."""
    if len(incarnation) != INCARNATION_BYTES or incarnation[6] >> 4 != 7:
        return None
    return int.from_bytes(incarnation[:6], "big") / 1000.0


def _validate_sections(_inst: object, _attr: object, sections: tuple[Section, ...]) -> None:
    seen: set[tuple[str, MemType]] = set()
    for sec in sections:
        if not isinstance(sec, Section):
            raise TypeError(f"sections must hold Section objects, got {type(sec).__name__}")
        key = (sec.backend, sec.mem_type)
        if key in seen:
            raise MetadataError(
                f"duplicate section for backend {sec.backend!r} and memory type "
                f"{sec.mem_type.value}"
            )
        seen.add(key)


# --------------------------------------------------------------------------- model
@attrs.frozen(eq=False, repr=False)
class Section:
    """One backend's registrations of one memory type.

    Attributes:
        backend: backend name, e.g. ``"UCX"`` (non-empty, at most 1024 UTF-8 bytes).
        mem_type: memory type of every region (a :class:`MemType` or one of its spellings).
        descs: (N, 3) uint64 ``[addr, len, dev]`` rows, read-only and C-contiguous. Any integer
            array-like is accepted and copied, unless it already is a read-only C-contiguous
            uint64 array.
        blobs: N public blobs (e.g. packed UCX rkeys), one per descriptor.

    Raises:
        MetadataError: empty or too long backend name, bad descs shape/dtype, or a blob count
            that differs from the descriptor count.
        TypeError: a field of the wrong type.
    """

    backend: str = attrs.field(validator=lambda _i, _a, v: _check_name(v, "section backend name"))
    mem_type: MemType = attrs.field(converter=_to_mem_type)
    descs: U64 = attrs.field(converter=_to_descs)
    blobs: tuple[bytes, ...] = attrs.field(converter=_to_blobs)

    def __attrs_post_init__(self) -> None:
        """Check that there is exactly one blob per descriptor."""
        if len(self.blobs) != self.descs.shape[0]:
            raise MetadataError(
                f"section {self.backend!r}/{self.mem_type.value} has {self.descs.shape[0]} "
                f"descriptors but {len(self.blobs)} blobs (need one blob per descriptor)"
            )

    def __len__(self) -> int:
        """Number of descriptors."""
        return int(self.descs.shape[0])

    def __eq__(self, other: object) -> bool:
        """Field-wise equality; ``descs`` is compared with :func:`numpy.array_equal`."""
        if not isinstance(other, Section):
            return NotImplemented
        return (
            self.backend == other.backend
            and self.mem_type is other.mem_type
            and self.blobs == other.blobs
            and np.array_equal(self.descs, other.descs)
        )

    def __hash__(self) -> int:
        """Hash consistent with :meth:`__eq__`."""
        return hash((self.backend, self.mem_type, self.descs.tobytes(), self.blobs))

    def __repr__(self) -> str:
        """Short form: name, memory type, descriptor count and blob byte total."""
        size = sum(map(len, self.blobs))
        return (
            f"Section(backend={self.backend!r}, mem_type={self.mem_type.value}, "
            f"descs=<{len(self)} rows>, blobs=<{len(self.blobs)} blobs, {size} bytes>)"
        )

    @classmethod
    def _trusted(
        cls, backend: str, mem_type: MemType, descs: U64, blobs: tuple[bytes, ...]
    ) -> Section:
        """Build from values the decoder has already validated, skipping converters."""
        obj = cls.__new__(cls)
        object.__setattr__(obj, "backend", backend)
        object.__setattr__(obj, "mem_type", mem_type)
        object.__setattr__(obj, "descs", descs)
        object.__setattr__(obj, "blobs", blobs)
        return obj


@attrs.frozen
class AgentMetadata:
    """Everything a peer needs to reach an agent: name, connection info and registrations.

    Attributes:
        name: agent name (non-empty, at most 1024 UTF-8 bytes).
        conns: ``(backend name, connection info)`` pairs with unique backend names; may be empty
            (partial metadata without connection info). A mapping is accepted too.
        sections: registrations, one :class:`Section` per (backend, memory type); may be empty.
        incarnation: 16 bytes that are new for every start of the agent: a peer that sees the
            same name with another incarnation knows the agent restarted (its old state is
            replaced, never merged). All zeros when unknown.

    Raises:
        MetadataError: empty or too long name, duplicate connection backend or section, an
            incarnation that is not 16 bytes.
        TypeError: a field of the wrong type.
    """

    name: str = attrs.field(validator=lambda _i, _a, v: _check_name(v, "agent name"))
    conns: tuple[tuple[str, bytes], ...] = attrs.field(
        default=(), converter=_to_conns, validator=_validate_conns
    )
    sections: tuple[Section, ...] = attrs.field(
        default=(), converter=_to_sections, validator=_validate_sections
    )
    incarnation: bytes = attrs.field(
        default=bytes(INCARNATION_BYTES), kw_only=True, validator=_validate_incarnation
    )

    def encode(self) -> bytes:
        """Serialize to the binary format described in the module docstring.

        Returns:
            The encoded metadata, CRC included.

        Raises:
            MetadataError: a count or a blob is too large for the format's u32 fields.
        """
        parts: list[bytes] = [_str(self.name), self.incarnation]
        parts.append(_u32(len(self.conns), "connection count"))
        for backend, info in self.conns:
            parts += (_str(backend), _u32(len(info), f"connection info of {backend!r}"), info)
        parts.append(_u32(len(self.sections), "section count"))
        for sec in self.sections:
            n = len(sec)
            what = f"section {sec.backend!r}/{sec.mem_type.value}"
            parts += (_str(sec.backend), _U8.pack(sec.mem_type.code), _u32(n, f"{what} count"))
            parts.append(np.ascontiguousarray(sec.descs, dtype="<u8").tobytes())
            lens = np.fromiter(map(len, sec.blobs), dtype=np.uint64, count=n)
            if n and int(lens.max()) > _U32_MAX:
                raise MetadataError(f"{what}: a blob is larger than 4 GiB")
            parts.append(lens.astype("<u4").tobytes())
            parts.append(b"".join(sec.blobs))
        total = _HEADER_SIZE + sum(map(len, parts)) + _CRC_SIZE
        parts.insert(0, _HEADER.pack(MAGIC, FORMAT_VERSION, 0, total))
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        parts.append(_U32.pack(crc))
        return b"".join(parts)

    @classmethod
    def decode(cls, blob: bytes | bytearray | memoryview) -> AgentMetadata:
        """Parse metadata written by :meth:`encode`, strictly.

        The result owns its data: nothing refers to ``blob`` afterwards.

        Args:
            blob: the encoded metadata.

        Returns:
            The decoded metadata; its ``descs`` arrays are read-only (N, 3) uint64 copies.

        Raises:
            MetadataError: the blob is not valid metadata (message names the field and offset).
            TypeError: ``blob`` is not bytes, bytearray or memoryview.
        """
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError(f"metadata must be bytes-like, got {type(blob).__name__}")
        try:
            data = blob if type(blob) is bytes else bytes(blob)
        except (ValueError, TypeError) as exc:  # e.g. a released memoryview
            raise MetadataError(f"cannot read the metadata buffer: {exc}") from None
        try:
            return _Reader(data).read()
        except MetadataError:
            raise
        except (struct.error, UnicodeDecodeError, ValueError, MemTypeError, TypeError) as exc:
            # Unreachable by design (every read is bounds-checked first); kept as a safety net.
            raise MetadataError(f"malformed metadata: {exc}") from None


# --------------------------------------------------------------------------- encode helpers
def _u32(value: int, what: str) -> bytes:
    if value > _U32_MAX:
        raise MetadataError(f"{what} {value} does not fit the format's u32 field")
    return _U32.pack(value)


def _str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _U32.pack(len(raw)) + raw


# --------------------------------------------------------------------------- decoder
class _Reader:
    """Bounds-checked cursor over one metadata blob (body ends before the CRC)."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data) - _CRC_SIZE

    def _need(self, n: int, what: str) -> None:
        left = self.end - self.pos
        if n > left:
            raise MetadataError(
                f"truncated metadata: {what} needs {n} bytes but only {max(left, 0)} remain "
                "before the CRC",
                offset=self.pos,
            )

    def u8(self, what: str) -> int:
        self._need(1, what)
        (value,) = _U8.unpack_from(self.data, self.pos)
        self.pos += 1
        return int(value)

    def u32(self, what: str) -> int:
        self._need(4, what)
        (value,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def count(self, what: str, min_item: int) -> int:
        """Read a u32 count and refuse one whose items cannot fit in the remaining bytes."""
        at = self.pos
        n = self.u32(what)
        left = self.end - self.pos
        if n * min_item > left:
            raise MetadataError(
                f"{what} {n} cannot fit in the {left} remaining bytes "
                f"(each entry takes at least {min_item})",
                offset=at,
            )
        return n

    def take(self, n: int, what: str) -> bytes:
        self._need(n, what)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def name(self, what: str) -> str:
        at = self.pos
        size = self.u32(f"{what} length")
        if size == 0:
            raise MetadataError(f"{what} is empty", offset=at)
        if size > MAX_NAME_BYTES:
            raise MetadataError(
                f"{what} length {size} exceeds the {MAX_NAME_BYTES}-byte limit", offset=at
            )
        raw_at = self.pos
        raw = self.take(size, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MetadataError(
                f"{what} is not valid UTF-8 ({exc.reason} at name byte {exc.start})",
                offset=raw_at + exc.start,
            ) from None

    def header(self) -> None:
        data = self.data
        size = len(data)
        if size == 0:
            raise MetadataError("empty metadata: 0 bytes", offset=0)
        if data[: len(MAGIC)] != MAGIC[: min(size, len(MAGIC))]:
            raise MetadataError(
                f"bad magic {bytes(data[:8])!r}: not nixl-py agent metadata (expected {MAGIC!r})",
                offset=0,
            )
        if size < _HEADER_SIZE:
            raise MetadataError(
                f"truncated metadata: {size} bytes, shorter than the {_HEADER_SIZE}-byte header",
                offset=size,
            )
        _magic, version, flags, total = _HEADER.unpack_from(data, 0)
        if version != FORMAT_VERSION:
            raise MetadataError(
                f"unsupported metadata format version {version}: this nixl-py reads version "
                f"{FORMAT_VERSION} only",
                offset=8,
            )
        if total < _MIN_SIZE:
            raise MetadataError(
                f"total length field {total} is smaller than the smallest metadata ({_MIN_SIZE})",
                offset=12,
            )
        if size < total:
            raise MetadataError(
                f"truncated metadata: total length field says {total} bytes, got {size}",
                offset=size,
            )
        if size > total:
            raise MetadataError(
                f"{size - total} trailing bytes after the {total}-byte metadata", offset=total
            )
        (stored,) = _U32.unpack_from(data, self.end)
        actual = zlib.crc32(memoryview(data)[: self.end])
        if stored != actual:
            raise MetadataError(
                f"CRC mismatch: stored 0x{stored:08x}, computed 0x{actual:08x} (corrupt metadata)",
                offset=self.end,
            )
        if flags != 0:
            raise MetadataError(
                f"unknown flags 0x{flags:04x}: format version {FORMAT_VERSION} defines none",
                offset=10,
            )
        self.pos = _HEADER_SIZE

    def conns(self) -> tuple[tuple[str, bytes], ...]:
        out: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for i in range(self.count("connection count", _MIN_CONN)):
            at = self.pos
            backend = self.name(f"connection {i} backend name")
            if backend in seen:
                raise MetadataError(
                    f"connection {i}: duplicate backend name {backend!r}", offset=at
                )
            seen.add(backend)
            size = self.u32(f"connection {i} ({backend!r}) info length")
            out.append((backend, self.take(size, f"connection {i} ({backend!r}) info")))
        return tuple(out)

    def section(self, i: int, seen: set[tuple[str, MemType]]) -> Section:
        at = self.pos
        backend = self.name(f"section {i} backend name")
        code_at = self.pos
        code = self.u8(f"section {i} memory type")
        try:
            mem_type = MemType.from_code(code)
        except MemTypeError:
            raise MetadataError(
                f"section {i} ({backend!r}): unknown memory type code {code}", offset=code_at
            ) from None
        if (backend, mem_type) in seen:
            raise MetadataError(
                f"section {i}: duplicate section for backend {backend!r} and memory type "
                f"{mem_type.value}",
                offset=at,
            )
        seen.add((backend, mem_type))
        what = f"section {i} ({backend!r}/{mem_type.value})"
        n = self.count(f"{what} descriptor count", _PER_DESC)
        if n == 0:
            return Section._trusted(backend, mem_type, _EMPTY_DESCS, ())
        rows_at = self.pos
        self._need(24 * n, f"{what} descriptor rows")
        descs: U64 = (
            np.frombuffer(self.data, dtype="<u8", count=3 * n, offset=rows_at)
            .reshape(n, 3)
            .astype(np.uint64, order="C", copy=True)
        )
        descs.flags.writeable = False
        self.pos += 24 * n
        lens_at = self.pos
        self._need(4 * n, f"{what} blob lengths")
        # offsets[k] = where blob k starts, offsets[n] = where the last one ends (u64 sums of u32
        # lengths cannot overflow: n < 2**32).
        lens = np.frombuffer(self.data, dtype="<u4", count=n, offset=lens_at)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lens, dtype=np.int64, out=offsets[1:])
        self.pos += 4 * n
        total = int(offsets[-1])
        self._need(total, f"{what} blobs ({n} blobs whose lengths sum to {total})")
        offsets += self.pos  # now absolute positions in data
        data = self.data
        blobs = tuple([data[a:b] for a, b in pairwise(offsets.tolist())])
        self.pos += total
        return Section._trusted(backend, mem_type, descs, blobs)

    def read(self) -> AgentMetadata:
        self.header()
        name = self.name("agent name")
        incarnation = self.take(INCARNATION_BYTES, "incarnation id")
        conns = self.conns()
        seen: set[tuple[str, MemType]] = set()
        sections = tuple(
            self.section(i, seen) for i in range(self.count("section count", _MIN_SECTION))
        )
        if self.pos != self.end:
            raise MetadataError(
                f"{self.end - self.pos} trailing bytes after the last section, before the CRC",
                offset=self.pos,
            )
        return AgentMetadata(name, conns, sections, incarnation=incarnation)


# --------------------------------------------------------------------------- agents' metadata
_generations = itertools.count(1)


class RemoteAgent:
    """What an agent knows of one remote agent: its connection info per backend (the ones
    this agent reached), why the others could not reach it, and its loaded regions.

    ``generation`` is new for every load of a name after a removal or a restart of the peer
    (a new ``incarnation``): lists prepared against an older generation are refused
    (:class:`~nixl_core.errors.StaleHandleError`).
    """

    def __init__(self, name: str, incarnation: bytes) -> None:
        self.name = name
        self.incarnation = incarnation
        self.generation = next(_generations)
        self.conns: dict[str, bytes] = {}
        self.unreachable: dict[str, str] = {}
        self.regions = Regions()


def export_metadata(
    name: str,
    incarnation: bytes,
    regions: Regions,
    backends: Sequence[Backend],
    subset: DescList | None,
    conn_info: bool,
    with_regions: bool = True,
) -> bytes:
    """An agent's metadata, encoded: connection info and the public blob of each registration.

    Args:
        name: the agent's name.
        incarnation: its incarnation id.
        regions: its own registrations.
        backends: the remote-capable backends to export.
        subset: only these registrations (each must be one exactly), or None for all.
        conn_info: include connection info.
        with_regions: include registrations at all.

    Raises:
        NotFoundError: a descriptor of ``subset`` is not exactly a registration (names it).
    """
    conns = tuple((b.name, _connection_info(b)) for b in backends) if conn_info else ()
    sections: list[Section] = []
    if with_regions:
        if subset is not None:
            table = regions.tables.get(subset.mem_type)
            pos = table.find_exact(subset.array) if table else np.full(len(subset), -1, np.int64)
            miss = np.flatnonzero(pos < 0)
            if miss.size:
                raise NotFoundError(
                    f"descriptor {int(miss[0])} of the partial metadata request is not a "
                    f"registration of agent {name!r}"
                )
            assert table is not None
            items = [(subset.mem_type, table.slots_at(pos), subset.array)]
        else:
            items = [(mt, t.slots, t.rows()) for mt, t in regions.tables.items() if len(t)]
        for mt, slots, rows in items:
            for b in backends:
                has = regions.has.get(b.name)
                if has is None:
                    continue
                sel = has[slots]
                if not sel.any():
                    continue
                blobs = regions.blobs[b.name]
                chosen = slots[sel].tolist()
                sections.append(
                    Section(
                        b.name, mt, np.ascontiguousarray(rows[sel]), tuple(blobs[s] for s in chosen)
                    )
                )
    return AgentMetadata(name, conns, tuple(sections), incarnation=incarnation).encode()


def _connection_info(b: Backend) -> bytes:
    try:
        return b.connection_info()
    except NixlError:
        raise
    except Exception as exc:
        raise foreign_error(exc, b.name, "give its connection info") from exc


def load_metadata(
    remotes: dict[str, RemoteAgent], md: AgentMetadata, backends: Mapping[str, Backend], agent: str
) -> RemoteAgent:
    """Load a peer's (full or partial) metadata into an agent's remote agents, additively.

    A first load needs at least one backend that can reach the peer; later loads of the same
    incarnation add connection info and regions. (Metadata of another incarnation is the
    caller's to handle first: the agent drops the old peer, then loads the new one afresh.)

    Raises:
        PluginError: a new peer that no backend of this agent can reach (each one's reason).
        NotAllowedError / MetadataError: as :func:`load_connections` and :func:`load_section`.
    """
    remote = remotes.get(md.name)
    new = remote is None
    if remote is None:
        remote = RemoteAgent(md.name, md.incarnation)
    elif remote.incarnation != md.incarnation:
        raise NotAllowedError(
            f"metadata of agent {md.name!r} is from another incarnation than the one loaded; "
            "remove_remote() it first"
        )
    load_connections(remote, md, backends)
    if new:
        if not remote.conns:
            why = "; ".join(f"{k}: {v}" for k, v in remote.unreachable.items())
            raise PluginError(
                f"agent {md.name!r} shares no usable backend with agent {agent!r} "
                f"(its: {', '.join(n for n, _ in md.conns) or 'none'}; ours: "
                f"{', '.join(backends) or 'none'}){'; ' + why if why else ''}"
            )
        remotes[md.name] = remote
    for section in md.sections:
        load_section(remote, section, backends)
    return remote


def load_connections(
    remote: RemoteAgent, md: AgentMetadata, backends: Mapping[str, Backend]
) -> None:
    """Hand each backend the peer's connection info for it; note the ones that cannot reach it.

    Raises:
        NotAllowedError: connection info that differs from what was loaded before.
    """
    for bname, info in md.conns:
        b = backends.get(bname.upper())
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
        except Exception as exc:  # this backend cannot reach it; another may
            if not isinstance(exc, NixlError):
                exc = foreign_error(exc, b.name, f"load the connection info of agent {md.name!r}")
            logger.info("backend %s cannot reach %s: %s", b.name, md.name, exc)
            remote.unreachable[b.name] = str(exc)
            continue
        remote.conns[b.name] = info
        remote.unreachable.pop(b.name, None)


def load_section(remote: RemoteAgent, section: Section, backends: Mapping[str, Backend]) -> None:
    """Load one section of a peer's metadata (additive: known regions are not loaded twice).

    Raises:
        NotAllowedError: a changed blob for a known region, or a region overlapping a
            different one loaded before (the peer re-registered that memory).
        MetadataError: the backend cannot use a blob (names it).
    """
    bname = section.backend.upper()
    b = backends.get(bname)
    if b is None or bname not in remote.conns:
        return  # a backend we lack or cannot reach: nothing to load
    regions = remote.regions
    table = regions.table(section.mem_type)
    rows = section.descs
    pos = table.find_exact(rows)
    known = pos >= 0
    blobs_known = regions.blobs.setdefault(bname, {})
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
    new_slots = regions.new_slots(int(new_idx.size))
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
    blobs = [section.blobs[i] for i in all_idx.tolist()]
    what = f"load {section.mem_type.value} regions of agent {remote.name!r}"
    try:
        handles = b.load_remote(
            remote.name, section.mem_type, np.ascontiguousarray(rows[all_idx]), blobs
        )
        if len(handles) != target_slots.size:
            b.unload_remote(remote.name, handles)
            raise PluginError(
                f"backend {b.name} returned {len(handles)} handles for {target_slots.size} regions"
            )
    except BaseException as exc:
        if new_idx.size:
            table.remove_positions(table.find_exact(np.ascontiguousarray(rows[new_idx])))
        if isinstance(exc, Exception) and not isinstance(exc, NixlError):
            raise foreign_error(exc, b.name, what, MetadataError) from exc
        raise
    regions.attach(bname, target_slots, handles, blobs)


def unload_remote(remote: RemoteAgent, backends: Mapping[str, Backend]) -> None:
    """Unload a peer's regions from every backend that reached it and disconnect them all
    (every backend is disconnected even when another fails; the first failure is raised)."""
    failure: NixlError | None = None
    for bname in remote.conns:
        b = backends[bname]
        handles = list(remote.regions.handles.get(bname, {}).values())
        try:
            try:
                if handles:
                    b.unload_remote(remote.name, handles)
            finally:
                b.disconnect(remote.name)
        except Exception as exc:
            err = (
                exc
                if isinstance(exc, NixlError)
                else foreign_error(exc, b.name, f"unload and disconnect agent {remote.name!r}")
            )
            failure = failure or err
    if failure is not None:
        raise failure
