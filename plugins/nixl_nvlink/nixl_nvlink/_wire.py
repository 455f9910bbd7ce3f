"""What NVLINK puts into agent metadata, and its strict decoders (no pickle, lengths checked).

Connection info (one per agent)::

    b"NVC2" | u16 n | host identity (n bytes) | u16 m | notification socket address (m bytes)

The host identity is :meth:`nixl_core.host.HostIdentity.encode` (boot id, host name, pid, pid and
network namespaces): the core's one same-host rule decides whether a peer is reachable. The
socket address is the peer's abstract Unix datagram socket; its VMM fd server listens at the
same address plus ``b"-fd"``. Version 1 (``b"NVC1"``) carried the pid, boot id and host name
itself; it is refused, naming the upgrade.

Region blob (one per registered region)::

    device memory: b"NVR1" | u8 1 | 16s GPU uuid | u64 allocation base | u64 allocation size
                   | u64 region offset in the allocation | 64s cudaIpcMemHandle
    host memory:   b"NVR1" | u8 2          (pinned DRAM cannot be mapped into another process)
    VMM memory:    b"NVR1" | u8 3 | u8 version (1) | 16s GPU uuid | u64 span base | u64 span size
                   | u64 region offset in the span | u16 n | n x (u64 chunk offset in the span,
                   u64 chunk size, u64 allocation id)

A VMM span is the run of cuMemCreate allocations (chunks) mapped back to back that holds the
region (PyTorch's expandable segments map many into one range). Chunks are contiguous from
offset 0 and cover the span; the importer fetches each one's POSIX fd by its allocation id from
the exporter's fd socket.

Every decoder raises :class:`nixl_core.errors.MetadataError` naming the byte offset of the first
bad field.
"""

from __future__ import annotations

import struct

import attrs

from nixl_core.errors import MetadataError
from nixl_core.host import HostIdentity

__all__ = [
    "IPC_HANDLE_BYTES",
    "KIND_DEVICE",
    "KIND_HOST",
    "KIND_VMM",
    "ConnInfo",
    "RegionBlob",
    "decode_conn",
    "decode_region",
    "encode_conn",
    "encode_region",
]

CONN_MAGIC = b"NVC2"
REG_MAGIC = b"NVR1"
IPC_HANDLE_BYTES = 64
KIND_DEVICE = 1
KIND_HOST = 2
KIND_VMM = 3
VMM_VERSION = 1
_DEVICE = struct.Struct("<4sB16sQQQ64s")
_HOST = struct.Struct("<4sB")
_VMM = struct.Struct("<4sBB16sQQQH")
_CHUNK = struct.Struct("<QQQ")
_LEN = struct.Struct("<H")


@attrs.frozen
class ConnInfo:
    """A peer's connection info: who and where it is, and its notification socket.

    Attributes:
        ident: the peer process's host identity (host, pid, namespaces).
        sock_addr: its notification socket's abstract address (the fd server adds ``b"-fd"``).
    """

    ident: HostIdentity
    sock_addr: bytes


@attrs.frozen
class RegionBlob:
    """A peer region's public data. ``ipc_handle`` is empty for host (DRAM) and VMM regions;
    ``chunks`` ((offset in the span, size, allocation id), ...) is set for VMM regions only,
    whose ``alloc_base`` / ``alloc_size`` are the span's."""

    kind: int
    uuid: bytes = b""
    alloc_base: int = 0
    alloc_size: int = 0
    offset: int = 0
    ipc_handle: bytes = b""
    chunks: tuple[tuple[int, int, int], ...] = ()

    @property
    def is_host(self) -> bool:
        """Whether this is a host (DRAM) region, which NVLINK cannot reach in another process."""
        return self.kind == KIND_HOST


def encode_conn(info: ConnInfo) -> bytes:
    """Connection info bytes (see the module docstring)."""
    ident = info.ident.encode()
    return b"".join(
        (
            CONN_MAGIC,
            _LEN.pack(len(ident)),
            ident,
            _LEN.pack(len(info.sock_addr)),
            info.sock_addr,
        )
    )


def _field(buf: bytes, off: int, what: str) -> tuple[bytes, int]:
    if off + _LEN.size > len(buf):
        raise MetadataError(f"NVLINK connection info ends inside the length of {what}", off)
    (n,) = _LEN.unpack_from(buf, off)
    off += _LEN.size
    if off + n > len(buf):
        raise MetadataError(f"NVLINK connection info: {what} runs past the end", off)
    return buf[off : off + n], off + n


def decode_conn(buf: bytes) -> ConnInfo:
    """Parse connection info, strictly (the whole buffer).

    Raises:
        MetadataError: bad magic (another format version says to upgrade), truncated, a bad
            host identity or trailing bytes; the offset is counted from the buffer's start.
    """
    buf = bytes(buf)
    if buf[:4] != CONN_MAGIC:
        older = (
            " (another nixl-nvlink version: upgrade the older side)" if buf[:3] == b"NVC" else ""
        )
        raise MetadataError(
            f"NVLINK connection info has magic {buf[:4]!r}, not {CONN_MAGIC!r}{older}", 0
        )
    raw, off = _field(buf, len(CONN_MAGIC), "the host identity")
    start = off - len(raw)
    try:
        ident = HostIdentity.decode(raw, "NVLINK connection info: the host identity")
    except MetadataError as exc:
        at = None if exc.offset is None else start + exc.offset
        msg = str(exc).removesuffix(f" (at byte {exc.offset})")
        raise MetadataError(msg, at) from None
    addr, off = _field(buf, off, "the socket address")
    if off != len(buf):
        raise MetadataError(f"NVLINK connection info has {len(buf) - off} trailing bytes", off)
    return ConnInfo(ident, addr)


def encode_region(blob: RegionBlob) -> bytes:
    """Region blob bytes (see the module docstring)."""
    if blob.kind == KIND_HOST:
        return _HOST.pack(REG_MAGIC, KIND_HOST)
    if blob.kind == KIND_VMM:
        head = _VMM.pack(
            REG_MAGIC,
            KIND_VMM,
            VMM_VERSION,
            blob.uuid,
            blob.alloc_base,
            blob.alloc_size,
            blob.offset,
            len(blob.chunks),
        )
        return head + b"".join(_CHUNK.pack(*c) for c in blob.chunks)
    return _DEVICE.pack(
        REG_MAGIC,
        KIND_DEVICE,
        blob.uuid,
        blob.alloc_base,
        blob.alloc_size,
        blob.offset,
        blob.ipc_handle,
    )


def decode_region(buf: bytes, index: int = 0) -> RegionBlob:
    """Parse one region blob (``index`` names the region in errors).

    Raises:
        MetadataError: bad magic, unknown kind, wrong length, or an offset outside the allocation.
    """
    buf = bytes(buf)
    if len(buf) < _HOST.size or buf[:4] != REG_MAGIC:
        raise MetadataError(f"NVLINK blob of region {index} has a bad magic {buf[:4]!r}", 0)
    kind = buf[4]
    if kind == KIND_HOST:
        if len(buf) != _HOST.size:
            raise MetadataError(
                f"NVLINK host blob of region {index} has {len(buf)} bytes, not {_HOST.size}",
                _HOST.size,
            )
        return RegionBlob(KIND_HOST)
    if kind == KIND_VMM:
        return _decode_vmm(buf, index)
    if kind != KIND_DEVICE:
        raise MetadataError(f"NVLINK blob of region {index} has unknown kind {kind}", 4)
    if len(buf) != _DEVICE.size:
        raise MetadataError(
            f"NVLINK device blob of region {index} has {len(buf)} bytes, not {_DEVICE.size}",
            min(len(buf), _DEVICE.size),
        )
    _, _, uuid, base, size, offset, handle = _DEVICE.unpack(buf)
    if offset >= size:
        raise MetadataError(
            f"NVLINK blob of region {index}: offset {offset} lies outside its {size}-byte allocation",
            37,
        )
    return RegionBlob(KIND_DEVICE, uuid, base, size, offset, handle)


def _decode_vmm(buf: bytes, index: int) -> RegionBlob:
    if len(buf) < _VMM.size:
        raise MetadataError(
            f"NVLINK VMM blob of region {index} has {len(buf)} bytes, fewer than {_VMM.size}",
            len(buf),
        )
    _, _, version, uuid, base, size, offset, n = _VMM.unpack_from(buf)
    if version != VMM_VERSION:
        raise MetadataError(
            f"NVLINK VMM blob of region {index} has version {version}; this nixl-nvlink reads "
            f"version {VMM_VERSION} (upgrade the older side)",
            5,
        )
    want = _VMM.size + n * _CHUNK.size
    if n == 0 or len(buf) != want:
        raise MetadataError(
            f"NVLINK VMM blob of region {index} has {len(buf)} bytes for {n} chunks, not {want}",
            min(len(buf), want),
        )
    chunks = tuple(_CHUNK.unpack_from(buf, _VMM.size + k * _CHUNK.size) for k in range(n))
    pos = 0
    for k, (off, csize, _) in enumerate(chunks):
        if off != pos or csize == 0:
            raise MetadataError(
                f"NVLINK VMM blob of region {index}: chunk {k} is not contiguous with the ones "
                "before it",
                _VMM.size + k * _CHUNK.size,
            )
        pos += csize
    if pos != size or offset >= size:
        raise MetadataError(
            f"NVLINK VMM blob of region {index}: chunks cover {pos} bytes of a {size}-byte span "
            f"(region offset {offset})",
            38,
        )
    return RegionBlob(KIND_VMM, uuid, base, size, offset, b"", chunks)
