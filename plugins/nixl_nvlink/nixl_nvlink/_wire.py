"""What NVLINK puts into agent metadata, and its strict decoders (no pickle, lengths checked).

Connection info (one per agent)::

    b"NVC1" | u32 pid | u16 n | boot id (n) | u16 n | hostname (n) | u16 n | socket address (n)

Region blob (one per registered region)::

    device memory: b"NVR1" | u8 1 | 16s GPU uuid | u64 allocation base | u64 allocation size
                   | u64 region offset in the allocation | 64s cudaIpcMemHandle
    host memory:   b"NVR1" | u8 2          (pinned DRAM cannot be mapped into another process)

Every decoder raises :class:`nixl_core.errors.MetadataError` naming the byte offset of the first
bad field.
"""

from __future__ import annotations

import struct

import attrs

from nixl_core.errors import MetadataError

__all__ = [
    "IPC_HANDLE_BYTES",
    "ConnInfo",
    "RegionBlob",
    "decode_conn",
    "decode_region",
    "encode_conn",
    "encode_region",
]

CONN_MAGIC = b"NVC1"
REG_MAGIC = b"NVR1"
IPC_HANDLE_BYTES = 64
KIND_DEVICE = 1
KIND_HOST = 2
_DEVICE = struct.Struct("<4sB16sQQQ64s")
_HOST = struct.Struct("<4sB")


@attrs.frozen
class ConnInfo:
    """A peer's connection info: who and where it is, and its notification socket."""

    pid: int
    boot_id: bytes
    hostname: str
    sock_addr: bytes


@attrs.frozen
class RegionBlob:
    """A peer region's public data. ``ipc_handle`` is empty for host (DRAM) regions."""

    kind: int
    uuid: bytes = b""
    alloc_base: int = 0
    alloc_size: int = 0
    offset: int = 0
    ipc_handle: bytes = b""

    @property
    def is_host(self) -> bool:
        """Whether this is a host (DRAM) region, which NVLINK cannot reach in another process."""
        return self.kind == KIND_HOST


def encode_conn(info: ConnInfo) -> bytes:
    """Connection info bytes (see the module docstring)."""
    host = info.hostname.encode()
    return b"".join(
        (
            CONN_MAGIC,
            struct.pack("<IH", info.pid, len(info.boot_id)),
            info.boot_id,
            struct.pack("<H", len(host)),
            host,
            struct.pack("<H", len(info.sock_addr)),
            info.sock_addr,
        )
    )


def _field(buf: bytes, off: int, what: str) -> tuple[bytes, int]:
    if off + 2 > len(buf):
        raise MetadataError(f"NVLINK connection info ends inside the length of {what}", off)
    (n,) = struct.unpack_from("<H", buf, off)
    off += 2
    if off + n > len(buf):
        raise MetadataError(f"NVLINK connection info: {what} runs past the end", off)
    return buf[off : off + n], off + n


def decode_conn(buf: bytes) -> ConnInfo:
    """Parse connection info.

    Raises:
        MetadataError: bad magic, truncated, trailing bytes or a non-UTF-8 hostname.
    """
    buf = bytes(buf)
    if buf[:4] != CONN_MAGIC:
        raise MetadataError(f"NVLINK connection info has magic {buf[:4]!r}, not {CONN_MAGIC!r}", 0)
    if len(buf) < 10:
        raise MetadataError("NVLINK connection info is truncated", len(buf))
    (pid,) = struct.unpack_from("<I", buf, 4)
    boot, off = _field(buf, 8, "the boot id")
    host, off = _field(buf, off, "the hostname")
    addr, off = _field(buf, off, "the socket address")
    if off != len(buf):
        raise MetadataError(f"NVLINK connection info has {len(buf) - off} trailing bytes", off)
    try:
        hostname = host.decode()
    except UnicodeDecodeError as exc:
        raise MetadataError("NVLINK connection info: hostname is not UTF-8", 10) from exc
    return ConnInfo(pid, boot, hostname, addr)


def encode_region(blob: RegionBlob) -> bytes:
    """Region blob bytes (see the module docstring)."""
    if blob.kind == KIND_HOST:
        return _HOST.pack(REG_MAGIC, KIND_HOST)
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
