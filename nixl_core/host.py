"""Host identity: one rule for "is that agent on this host?", shared by same-host backends.

Backends that reach peers only on the same host (LOOPBACK's cross-memory attach, NVLINK's CUDA
IPC) put :meth:`HostIdentity.encode` into their connection info and call
:meth:`HostIdentity.check_peer` when they load a peer's. The rule:

- **same host**: the kernel boot ids (``/proc/sys/kernel/random/boot_id``) are equal. Containers
  of one host share the boot id; two machines (or two boots) never do. Where the boot id cannot
  be read, the host names must be equal instead.
- **same network namespace** (always required): these backends talk over abstract Unix
  sockets, which exist per network namespace.
- **same pid namespace** (when the backend asks for it): cross-memory attach addresses the peer
  by pid.

A peer that fails a check is refused with :class:`~nixl_core.errors.NotSupportedError` saying
which, and that UCX reaches it.

Wire format (little-endian): ``b"NXH1" | u32 pid | u64 pid-ns inode | u64 net-ns inode |
u16 n | boot id (n bytes) | u16 m | host name (m bytes, UTF-8)``.
"""

from __future__ import annotations

import functools
import os
import socket
import struct

import attrs

from nixl_core.errors import MetadataError, NotSupportedError

__all__ = ["HostIdentity", "local_identity"]

_MAGIC = b"NXH1"
_FIXED = struct.Struct("<4sIQQ")
_LEN = struct.Struct("<H")


def _read_boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()
    except OSError:
        return b""


def _ns_inode(kind: str) -> int:
    try:
        return os.stat(f"/proc/self/ns/{kind}").st_ino
    except OSError:
        return 0


@attrs.frozen
class HostIdentity:
    """Who and where a process is, as far as same-host transports care.

    Attributes:
        boot_id: the kernel's boot id, b"" when unreadable.
        hostname: the host name.
        pid: the process id (in its own pid namespace).
        pid_ns: inode of the process's pid namespace, 0 when unknown.
        net_ns: inode of its network namespace, 0 when unknown.
    """

    boot_id: bytes
    hostname: str
    pid: int
    pid_ns: int
    net_ns: int

    def encode(self) -> bytes:
        """The wire form (module docstring)."""
        host = self.hostname.encode()
        return b"".join(
            (
                _FIXED.pack(_MAGIC, self.pid, self.pid_ns, self.net_ns),
                _LEN.pack(len(self.boot_id)),
                self.boot_id,
                _LEN.pack(len(host)),
                host,
            )
        )

    @classmethod
    def decode(cls, buf: bytes, what: str = "host identity") -> HostIdentity:
        """Parse :meth:`encode`'s output, strictly (the whole buffer).

        Raises:
            MetadataError: bad magic, truncated, trailing bytes or a non-UTF-8 host name
                (names the byte offset).
        """
        if len(buf) < _FIXED.size or buf[:4] != _MAGIC:
            raise MetadataError(f"{what}: not a host identity (bad magic or truncated)", 0)
        _, pid, pid_ns, net_ns = _FIXED.unpack_from(buf, 0)
        off = _FIXED.size
        fields: list[bytes] = []
        for name in ("boot id", "host name"):
            if off + _LEN.size > len(buf):
                raise MetadataError(f"{what} ends inside the length of its {name}", off)
            (n,) = _LEN.unpack_from(buf, off)
            off += _LEN.size
            if off + n > len(buf):
                raise MetadataError(f"{what}: its {name} runs past the end", off)
            fields.append(buf[off : off + n])
            off += n
        if off != len(buf):
            raise MetadataError(f"{what} has {len(buf) - off} trailing bytes", off)
        try:
            hostname = fields[1].decode()
        except UnicodeDecodeError:
            raise MetadataError(f"{what}: its host name is not UTF-8", off) from None
        return cls(fields[0], hostname, pid, pid_ns, net_ns)

    def same_host(self, other: HostIdentity) -> bool:
        """Whether ``other`` runs on this host (equal boot ids; host names when one is unknown)."""
        if self.boot_id and other.boot_id:
            return self.boot_id == other.boot_id
        return self.hostname == other.hostname

    def check_peer(
        self, other: HostIdentity, *, peer: str, backend: str, same_pid_ns: bool = False
    ) -> None:
        """Refuse a peer this backend cannot reach from here.

        Args:
            other: the peer's identity (from its connection info).
            peer: the peer agent's name (for the message).
            backend: the backend's name (for the message).
            same_pid_ns: the backend addresses the peer by pid (cross-memory attach).

        Raises:
            NotSupportedError: another host, network namespace or (when asked) pid namespace.
        """
        if not self.same_host(other):
            raise NotSupportedError(
                f"agent {peer!r} runs on another host ({other.hostname!r}; this is "
                f"{self.hostname!r}): {backend} reaches agents of this host only; use UCX"
            )
        if self.net_ns and other.net_ns and self.net_ns != other.net_ns:
            raise NotSupportedError(
                f"agent {peer!r} is in another network namespace: {backend}'s same-host sockets "
                "cannot reach it; use UCX"
            )
        if same_pid_ns and self.pid_ns != other.pid_ns:
            raise NotSupportedError(
                f"agent {peer!r} is in another pid namespace: {backend} cannot attach to its "
                "process; use UCX"
            )


@functools.cache
def _stable() -> tuple[bytes, str, int, int]:
    return _read_boot_id(), socket.gethostname(), _ns_inode("pid"), _ns_inode("net")


def local_identity() -> HostIdentity:
    """This process's identity (the pid is read each call: a forked child has its own)."""
    boot, host, pid_ns, net_ns = _stable()
    return HostIdentity(boot, host, os.getpid(), pid_ns, net_ns)
