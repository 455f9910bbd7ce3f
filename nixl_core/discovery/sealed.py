"""Sealed frames: what the side channel sends and what a store holds, optionally authenticated.

One frame (all integers little-endian)::

    off  size  field
    0    4     magic b"NXS1"
    4    1     kind (:class:`Kind`)
    5    1     flags: bit 0 = a 32-byte HMAC-SHA256 tag follows the payload; others must be 0
    6    2     reserved, 0
    8    4     u32 payload length P
    12   P     payload
    12+P 32    tag (when flagged): HMAC-SHA256(key, context || bytes 0 .. 12+P)

The ``context`` binds a frame to where it is used: the side channel uses
:data:`CHANNEL_CONTEXT`, a store value its own key path, so a value copied to another agent's
key does not verify. Payloads: LOAD and VALUE hold an agent's encoded metadata
(:class:`~nixl_core.metadata.AgentMetadata`), INVL and ANNOUNCE an incarnation id (16 bytes)
then the agent's UTF-8 name, SEND is empty, NACK holds a UTF-8 reason.

:func:`open_frame` is strict: wrong magic, kind, flags, reserved bytes or length, a missing tag
when a key is configured, a tag when none is, or a tag that does not verify all raise
:class:`~nixl_core.errors.MetadataError` naming what is wrong. Nothing is ever evaluated.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from collections.abc import Mapping

import attrs

from nixl_core.errors import InvalidParamError, MetadataError
from nixl_core.metadata import INCARNATION_BYTES, MAX_NAME_BYTES

__all__ = [
    "CHANNEL_CONTEXT",
    "HEADER_SIZE",
    "TAG_SIZE",
    "Frame",
    "Kind",
    "key_from",
    "named_payload",
    "open_frame",
    "parse_named",
    "seal",
]

MAGIC = b"NXS1"
_HEADER = struct.Struct("<4sBBHI")
#: Bytes before the payload.
HEADER_SIZE = _HEADER.size  # 12
#: Size of the HMAC-SHA256 tag.
TAG_SIZE = 32
#: Context of side-channel frames (store values use their key path).
CHANNEL_CONTEXT = b"nixl-py side channel\0"
_TAGGED = 0x01


class Kind(enum.IntEnum):
    """What a frame carries."""

    LOAD = 1  #: "load my metadata" (full or partial); also the reply to SEND
    SEND = 2  #: "send me yours"
    INVL = 3  #: "forget me" (incarnation + name)
    VALUE = 4  #: a store value: an agent's metadata under one label
    ANNOUNCE = 5  #: a store's announcement key: incarnation + name
    NACK = 6  #: a refusal with its reason (reply to SEND)


@attrs.frozen
class Frame:
    """An opened frame: its kind and payload (already authenticated when a key is set)."""

    kind: Kind
    payload: bytes


def key_from(value: bytes | str | None, env: Mapping[str, str] | None = None) -> bytes | None:
    """The shared HMAC key: ``value`` if given, else ``NIXL_MD_KEY``, else None (no tags).

    A str is used as its UTF-8 bytes.

    Raises:
        InvalidParamError: an empty key.
    """
    if value is None:
        value = (os.environ if env is None else env).get("NIXL_MD_KEY")
        if value is None:
            return None
    key = value.encode() if isinstance(value, str) else bytes(value)
    if not key:
        raise InvalidParamError("the metadata key (md_key / NIXL_MD_KEY) is empty")
    return key


def _tag(key: bytes, context: bytes, body: bytes) -> bytes:
    mac = hmac.new(key, context, hashlib.sha256)
    mac.update(body)
    return mac.digest()


def seal(kind: Kind, payload: bytes, key: bytes | None, context: bytes = CHANNEL_CONTEXT) -> bytes:
    """One frame of ``kind`` around ``payload``; tagged when ``key`` is given."""
    if len(payload) > 0xFFFF_FFFF:
        raise MetadataError(f"a {kind.name} payload of {len(payload)} bytes exceeds 4 GiB")
    body = _HEADER.pack(MAGIC, int(kind), _TAGGED if key else 0, 0, len(payload)) + payload
    return body + _tag(key, context, body) if key else body


def open_frame(data: bytes, key: bytes | None, context: bytes = CHANNEL_CONTEXT) -> Frame:
    """Check and open one frame (see the module docstring for what is refused).

    Raises:
        MetadataError: the frame is malformed or does not authenticate (says why).
    """
    size = len(data)
    if size < HEADER_SIZE:
        raise MetadataError(f"frame of {size} bytes is shorter than its {HEADER_SIZE}-byte header")
    magic, kind, flags, reserved, plen = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise MetadataError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r})", offset=0)
    try:
        k = Kind(kind)
    except ValueError:
        raise MetadataError(f"unknown frame kind {kind}", offset=4) from None
    if flags & ~_TAGGED or reserved:
        raise MetadataError(f"unknown frame flags 0x{flags:02x}/0x{reserved:04x}", offset=5)
    tagged = bool(flags & _TAGGED)
    want = HEADER_SIZE + plen + (TAG_SIZE if tagged else 0)
    if size != want:
        raise MetadataError(
            f"{k.name} frame is {size} bytes but its header says {want}", offset=min(size, want)
        )
    end = HEADER_SIZE + plen
    if key is not None:
        if not tagged:
            raise MetadataError(f"{k.name} frame has no HMAC tag but a metadata key is set")
        if not hmac.compare_digest(data[end:], _tag(key, context, data[:end])):
            raise MetadataError(f"{k.name} frame has a bad HMAC tag (wrong key or altered)")
    elif tagged:
        raise MetadataError(
            f"{k.name} frame carries an HMAC tag but no metadata key is set here "
            "(set md_key / NIXL_MD_KEY to the sender's key)"
        )
    return Frame(k, bytes(data[HEADER_SIZE:end]))


def named_payload(incarnation: bytes, name: str) -> bytes:
    """INVL / ANNOUNCE payload: incarnation id, then the name."""
    return incarnation + name.encode()


def parse_named(payload: bytes) -> tuple[bytes, str]:
    """(incarnation, name) of an INVL / ANNOUNCE payload.

    Raises:
        MetadataError: too short, an empty or too long name, or not UTF-8.
    """
    raw = payload[INCARNATION_BYTES:]
    if len(payload) <= INCARNATION_BYTES or len(raw) > MAX_NAME_BYTES:
        raise MetadataError(f"bad name payload of {len(payload)} bytes")
    try:
        return payload[:INCARNATION_BYTES], raw.decode()
    except UnicodeDecodeError:
        raise MetadataError("name in payload is not UTF-8") from None
