"""Tests for nixl_core.metadata: the agent metadata model and its strict binary format."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nixl_core.errors import MetadataError
from nixl_core.memory import MemType
from nixl_core.metadata import (
    FORMAT_VERSION,
    MAGIC,
    MAX_NAME_BYTES,
    AgentMetadata,
    Section,
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HEADER = struct.Struct("<8sHHQ")


# --------------------------------------------------------------------------- raw-format helpers
def u8(v: int) -> bytes:
    return struct.pack("<B", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def s(raw: bytes) -> bytes:
    """A length-prefixed name as the format writes it."""
    return u32(len(raw)) + raw


def frame(
    body: bytes, *, version: int = FORMAT_VERSION, flags: int = 0, magic: bytes = MAGIC
) -> bytes:
    """Wrap a raw body in a header with the right total length and a valid CRC."""
    head = HEADER.pack(magic, version, flags, HEADER.size + len(body) + 4)
    data = head + body
    return data + u32(zlib.crc32(data))


#: The incarnation id hand-built bodies carry (all zeros: "unknown").
INC = bytes(16)


def body(
    name: bytes = b"agent",
    conns: list[tuple[bytes, bytes]] | None = None,
    sections: list[bytes] | None = None,
) -> bytes:
    """A raw body from raw parts; each section is given fully pre-encoded."""
    conns = conns or []
    sections = sections or []
    out = s(name) + INC + u32(len(conns))
    for backend, info in conns:
        out += s(backend) + s(info)
    return out + u32(len(sections)) + b"".join(sections)


def raw_section(backend: bytes, code: int, rows: list[list[int]], blobs: list[bytes]) -> bytes:
    """One pre-encoded section."""
    arr = np.array(rows, dtype="<u8").reshape(-1, 3)
    lens = np.array([len(b) for b in blobs], dtype="<u4")
    return s(backend) + u8(code) + u32(len(rows)) + arr.tobytes() + lens.tobytes() + b"".join(blobs)


def sample() -> AgentMetadata:
    """A small metadata object with two conns and three sections (one empty)."""
    return AgentMetadata(
        name="agent-ü",
        conns=(("UCX", b"\x01\x02ucx-addr"), ("GDS", b"")),
        sections=(
            Section("UCX", MemType.DRAM, [[0x1000, 64, 0], [0x2000, 128, 0]], [b"rk0", b"rkey-1"]),
            Section("UCX", MemType.VRAM, [[0xDEAD0000, 4096, 1]], [b""]),
            Section("GDS", MemType.FILE, np.empty((0, 3), np.uint64), []),
        ),
    )


def decode_error(blob: bytes) -> MetadataError:
    """Decode ``blob``, which must fail with MetadataError, and return the error."""
    with pytest.raises(MetadataError) as info:
        AgentMetadata.decode(blob)
    return info.value


# --------------------------------------------------------------------------- round trips
def test_round_trip_empty_metadata() -> None:
    """Metadata with only a name encodes and decodes back to an equal object."""
    md = AgentMetadata("a")
    out = AgentMetadata.decode(md.encode())
    assert out == md
    assert out.conns == ()
    assert out.sections == ()


def test_round_trip_partial_metadata_without_conns() -> None:
    """Metadata with sections but no connection info (partial metadata) round-trips."""
    md = AgentMetadata("peer", (), sample().sections)
    assert AgentMetadata.decode(md.encode()) == md


def test_round_trip_conns_without_sections() -> None:
    """Metadata with connection info but no sections round-trips."""
    md = AgentMetadata("peer", (("UCX", b"addr"), ("POSIX", b"\x00" * 3)))
    assert AgentMetadata.decode(md.encode()) == md


def test_round_trip_full_metadata() -> None:
    """Full metadata (conns, several sections, unicode names, empty blobs) round-trips exactly."""
    md = sample()
    out = AgentMetadata.decode(md.encode())
    assert out == md
    assert out.conns == md.conns
    for a, b in zip(out.sections, md.sections, strict=True):
        assert a.backend == b.backend
        assert a.mem_type is b.mem_type
        assert a.blobs == b.blobs
        assert np.array_equal(a.descs, b.descs)


def test_round_trip_100k_descriptors() -> None:
    """A section of 100k descriptors with 100k small blobs round-trips exactly."""
    n = 100_000
    rng = np.random.default_rng(7)
    descs = rng.integers(0, 2**64 - 1, size=(n, 3), dtype=np.uint64, endpoint=True)
    pool = rng.bytes(24 * n)
    ends = np.cumsum(rng.integers(0, 24, size=n)).tolist()
    blobs = [pool[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    md = AgentMetadata("big", (("UCX", b"w" * 64),), (Section("UCX", MemType.VRAM, descs, blobs),))
    blob = md.encode()
    out = AgentMetadata.decode(blob)
    assert out == md
    assert len(blob) == HEADER.size + 4 + 3 + 16 + 4 + 4 + 3 + 4 + 64 + 4 + 4 + 3 + 1 + 4 + (
        28 * n + sum(map(len, blobs)) + 4
    )


def test_decode_accepts_bytearray_and_memoryview() -> None:
    """decode() takes bytes, bytearray and memoryview, including a non-byte-format view."""
    blob = sample().encode()
    assert AgentMetadata.decode(bytearray(blob)) == sample()
    assert AgentMetadata.decode(memoryview(blob)) == sample()
    assert AgentMetadata.decode(memoryview(blob)[:]) == sample()


def test_decoded_descs_are_readonly_copies_of_the_buffer() -> None:
    """Decoded descs are read-only C-contiguous (N, 3) uint64 copies independent of the input."""
    buf = bytearray(sample().encode())
    out = AgentMetadata.decode(buf)
    buf[:] = bytes(len(buf))  # the caller reuses its buffer
    del buf
    sec = out.sections[0]
    assert sec.descs.dtype == np.uint64
    assert sec.descs.shape == (2, 3)
    assert sec.descs.flags.c_contiguous
    assert not sec.descs.flags.writeable
    assert sec.descs.tolist() == [[0x1000, 64, 0], [0x2000, 128, 0]]
    assert sec.blobs == (b"rk0", b"rkey-1")
    assert all(type(b) is bytes for b in sec.blobs)
    with pytest.raises(ValueError, match="read-only"):
        sec.descs[0, 0] = 1


def test_encode_matches_documented_layout() -> None:
    """encode() writes exactly the byte layout of the module docstring's table."""
    md = sample()
    expected = frame(
        body(
            "agent-ü".encode(),
            [(b"UCX", b"\x01\x02ucx-addr"), (b"GDS", b"")],
            [
                raw_section(b"UCX", 0, [[0x1000, 64, 0], [0x2000, 128, 0]], [b"rk0", b"rkey-1"]),
                raw_section(b"UCX", 1, [[0xDEAD0000, 4096, 1]], [b""]),
                raw_section(b"GDS", 4, [], []),
            ],
        )
    )
    blob = md.encode()
    assert blob == expected
    assert blob[:8] == MAGIC
    assert struct.unpack_from("<HHQ", blob, 8) == (FORMAT_VERSION, 0, len(blob))
    assert struct.unpack_from("<I", blob, len(blob) - 4)[0] == zlib.crc32(blob[:-4])


# --------------------------------------------------------------------------- model validation
def test_section_equality_compares_arrays_by_value() -> None:
    """Sections with equal fields but distinct arrays are equal and hash alike; others differ."""
    a = Section("UCX", MemType.DRAM, np.array([[1, 2, 3]], np.uint64), [b"k"])
    b = Section("UCX", "cpu", [[1, 2, 3]], [bytearray(b"k")])
    assert a == b
    assert hash(a) == hash(b)
    assert a != Section("UCX", MemType.DRAM, [[1, 2, 4]], [b"k"])
    assert a != Section("UCX", MemType.DRAM, [[1, 2, 3]], [b"j"])
    assert a != Section("UCX", MemType.VRAM, [[1, 2, 3]], [b"k"])
    assert a != Section("GDS", MemType.DRAM, [[1, 2, 3]], [b"k"])
    assert a != "not a section"
    assert hash(AgentMetadata("x", (), (a,))) == hash(AgentMetadata("x", (), (b,)))


def test_section_copies_writable_input_arrays() -> None:
    """A Section snapshots a writable descs array, so later writes to it do not leak in."""
    arr = np.array([[1, 2, 3]], np.uint64)
    sec = Section("UCX", MemType.DRAM, arr, [b""])
    arr[0, 0] = 99
    assert sec.descs.tolist() == [[1, 2, 3]]
    assert not sec.descs.flags.writeable


def test_section_repr_is_short() -> None:
    """A section's repr summarizes counts instead of printing every descriptor and blob."""
    sec = Section("UCX", MemType.DRAM, np.zeros((1000, 3), np.uint64), [b"ab"] * 1000)
    assert repr(sec) == (
        "Section(backend='UCX', mem_type=DRAM, descs=<1000 rows>, blobs=<1000 blobs, 2000 bytes>)"
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"descs": [[1, 2]], "blobs": [b""]}, r"shape \(N, 3\)"),
        ({"descs": [[1.5, 2, 3]], "blobs": [b""]}, "integers"),
        ({"descs": [[-1, 2, 3]], "blobs": [b""]}, "negative"),
        ({"descs": [[1, 2, 3]], "blobs": []}, "1 descriptors but 0 blobs"),
        ({"backend": "", "descs": [], "blobs": []}, "backend name is empty"),
        ({"backend": "x" * 1025, "descs": [], "blobs": []}, "limit is 1024"),
    ],
)
def test_section_rejects_invalid_fields(kwargs: dict[str, object], match: str) -> None:
    """Section construction refuses bad shapes, dtypes, blob counts and names with MetadataError."""
    args: dict[str, object] = {"backend": "UCX", "mem_type": MemType.DRAM} | kwargs
    with pytest.raises(MetadataError, match=match):
        Section(**args)  # type: ignore[arg-type]


def test_constructors_reject_wrong_types() -> None:
    """Non-str names, non-bytes blobs and non-Section sections raise TypeError."""
    with pytest.raises(TypeError, match="str"):
        AgentMetadata(b"name")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes-like"):
        Section("UCX", MemType.DRAM, [[1, 2, 3]], ["text"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="bytes-like"):
        AgentMetadata("a", (("UCX", "text"),))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Section"):
        AgentMetadata("a", (), ("nope",))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes-like"):
        AgentMetadata.decode("NIXLPYMD")  # type: ignore[arg-type]


def test_agent_metadata_rejects_invalid_fields() -> None:
    """AgentMetadata refuses empty/long names and duplicate conns or sections."""
    with pytest.raises(MetadataError, match="agent name is empty"):
        AgentMetadata("")
    with pytest.raises(MetadataError, match="limit is 1024"):
        AgentMetadata("é" * 513)
    with pytest.raises(MetadataError, match="UTF-8"):
        AgentMetadata("\ud800")
    with pytest.raises(MetadataError, match="duplicate connection entry for backend 'UCX'"):
        AgentMetadata("a", (("UCX", b"1"), ("UCX", b"2")))
    with pytest.raises(MetadataError, match="connection backend name is empty"):
        AgentMetadata("a", (("", b"1"),))
    sec = Section("UCX", MemType.DRAM, [], [])
    with pytest.raises(MetadataError, match="duplicate section for backend 'UCX'"):
        AgentMetadata("a", (), (sec, sec))
    assert AgentMetadata("a", {"UCX": b"1"}).conns == (("UCX", b"1"),)
    assert len(AgentMetadata("é" * 512).name.encode()) == MAX_NAME_BYTES


# --------------------------------------------------------------------------- corruption cases
def test_wrong_magic() -> None:
    """A blob that does not start with the magic is refused as bad magic at byte 0."""
    err = decode_error(frame(body(), magic=b"NIXLPYXX"))
    assert "bad magic" in str(err)
    assert err.offset == 0
    assert "bad magic" in str(decode_error(b"{'pickle': 1}"))


def test_empty_input() -> None:
    """An empty blob is refused as empty."""
    assert "empty metadata" in str(decode_error(b""))


def test_unknown_version_names_both_versions() -> None:
    """An unknown version is refused with a message naming it and the supported version."""
    err = decode_error(frame(body(), version=1))
    assert "unsupported metadata format version 1" in str(err)
    assert f"version {FORMAT_VERSION}" in str(err)
    assert err.offset == 8


def test_nonzero_flags() -> None:
    """Nonzero flags (with a valid CRC) are refused at byte 10."""
    err = decode_error(frame(body(), flags=0x0004))
    assert "unknown flags 0x0004" in str(err)
    assert err.offset == 10


def test_bad_crc() -> None:
    """A corrupted body byte is caught by the CRC check, which names both CRC values."""
    blob = bytearray(sample().encode())
    blob[40] ^= 0x10
    err = decode_error(bytes(blob))
    assert "CRC mismatch" in str(err)
    assert err.offset == len(blob) - 4
    blob = bytearray(sample().encode())
    blob[-1] ^= 0xFF  # the CRC itself
    assert "CRC mismatch" in str(decode_error(bytes(blob)))


@pytest.mark.parametrize("cut", [1, 4, 9, 19, 20, 21, 60])
def test_truncated_input(cut: int) -> None:
    """A blob cut short anywhere is refused as truncated."""
    blob = sample().encode()
    err = decode_error(blob[: len(blob) - cut])
    assert "truncated" in str(err)


def test_trailing_bytes_after_the_blob() -> None:
    """Bytes appended after the declared end are refused as trailing bytes."""
    blob = sample().encode()
    err = decode_error(blob + b"\x00\x00")
    assert "2 trailing bytes" in str(err)
    assert err.offset == len(blob)


def test_trailing_bytes_inside_the_body() -> None:
    """Bytes between the last section and the CRC (with a valid CRC) are refused."""
    raw = body() + b"junk"
    err = decode_error(frame(raw))
    assert "4 trailing bytes after the last section" in str(err)
    assert err.offset == HEADER.size + len(raw) - 4


def test_total_length_field_too_small() -> None:
    """A total length field smaller than any valid blob is refused, naming the field."""
    blob = bytearray(frame(body()))
    struct.pack_into("<Q", blob, 12, 3)
    err = decode_error(bytes(blob))
    assert "total length field 3" in str(err)
    assert err.offset == 12


def test_invalid_utf8_in_agent_name() -> None:
    """An agent name that is not UTF-8 is refused at the offending byte."""
    err = decode_error(frame(body(name=b"ab\xffcd")))
    assert "agent name is not valid UTF-8" in str(err)
    assert err.offset == HEADER.size + 4 + 2


def test_invalid_utf8_in_backend_names() -> None:
    """Connection and section backend names that are not UTF-8 are refused, naming which."""
    err = decode_error(frame(body(conns=[(b"U\xc3", b"")])))
    assert "connection 0 backend name is not valid UTF-8" in str(err)
    err = decode_error(frame(body(sections=[raw_section(b"\xc0\x80", 0, [], [])])))
    assert "section 0 backend name is not valid UTF-8" in str(err)


def test_empty_agent_name() -> None:
    """An empty agent name is refused at its length field."""
    err = decode_error(frame(body(name=b"")))
    assert "agent name is empty" in str(err)
    assert err.offset == HEADER.size


def test_empty_backend_name() -> None:
    """An empty connection backend name is refused."""
    assert "connection 0 backend name is empty" in str(
        decode_error(frame(body(conns=[(b"", b"")])))
    )


def test_name_longer_than_limit() -> None:
    """A name longer than 1024 bytes is refused before it is read."""
    err = decode_error(frame(body(name=b"n" * 1025)))
    assert "agent name length 1025 exceeds the 1024-byte limit" in str(err)
    assert AgentMetadata.decode(frame(body(name=b"n" * 1024))).name == "n" * 1024


def test_unknown_mem_type_code() -> None:
    """An unknown memory type code is refused at its byte, naming the code."""
    raw = body(sections=[raw_section(b"UCX", 9, [[1, 2, 3]], [b"k"])])
    err = decode_error(frame(raw))
    assert "section 0 ('UCX'): unknown memory type code 9" in str(err)
    assert err.offset == HEADER.size + 4 + 5 + 16 + 4 + 4 + 4 + 3


def test_oversized_conn_count() -> None:
    """A connection count that cannot fit in the remaining bytes is refused before allocating."""
    raw = s(b"agent") + INC + u32(0xFFFF_FFFF) + u32(0)
    err = decode_error(frame(raw))
    assert "connection count 4294967295 cannot fit" in str(err)
    assert err.offset == HEADER.size + 9 + 16


def test_oversized_section_count() -> None:
    """A section count that cannot fit in the remaining bytes is refused before allocating."""
    raw = s(b"agent") + INC + u32(0) + u32(1_000_000)
    err = decode_error(frame(raw))
    assert "section count 1000000 cannot fit" in str(err)


def test_oversized_descriptor_count() -> None:
    """A descriptor count that cannot fit in the remaining bytes is refused before allocating."""
    sec = s(b"UCX") + u8(0) + u32(0x4000_0000) + bytes(28)
    err = decode_error(frame(body(sections=[sec])))
    assert "descriptor count 1073741824 cannot fit" in str(err)
    assert err.offset == HEADER.size + 9 + 16 + 4 + 4 + 7 + 1


def test_oversized_blob_lengths() -> None:
    """Blob lengths that add up past the remaining bytes are refused as truncated blobs."""
    sec = s(b"UCX") + u8(0) + u32(2) + bytes(48) + u32(0xFFFF_FFFF) + u32(0xFFFF_FFFF)
    err = decode_error(frame(body(sections=[sec])))
    assert "blobs (2 blobs whose lengths sum to 8589934590)" in str(err)
    assert "truncated" in str(err)


def test_oversized_conn_info_length() -> None:
    """A connection info length past the remaining bytes is refused as truncated."""
    raw = s(b"agent") + INC + u32(1) + s(b"UCX") + u32(1000) + b"abc" + u32(0)
    err = decode_error(frame(raw))
    assert "connection 0 ('UCX') info needs 1000 bytes" in str(err)


def test_duplicate_conn_backend() -> None:
    """Two connection entries for one backend are refused, naming the backend."""
    err = decode_error(frame(body(conns=[(b"UCX", b"1"), (b"UCX", b"2")])))
    assert "connection 1: duplicate backend name 'UCX'" in str(err)


def test_duplicate_section() -> None:
    """Two sections for one (backend, memory type) pair are refused."""
    sec = raw_section(b"UCX", 0, [], [])
    err = decode_error(frame(body(sections=[sec, sec])))
    assert "section 1: duplicate section for backend 'UCX' and memory type DRAM" in str(err)


def test_released_memoryview_raises_metadata_error() -> None:
    """A released memoryview is refused with MetadataError, not ValueError from the buffer."""
    view = memoryview(sample().encode())
    view.release()
    assert "cannot read the metadata buffer" in str(decode_error(view))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- property tests
names = st.text(min_size=1, max_size=12)


@st.composite
def sections(draw: st.DrawFn) -> Section:
    """A Section with a random array and random blobs."""
    n = draw(st.integers(0, 6))
    descs = draw(
        hnp.arrays(np.uint64, (n, 3), elements=st.integers(0, 2**64 - 1), fill=st.nothing())
    )
    blobs = draw(st.lists(st.binary(max_size=12), min_size=n, max_size=n))
    return Section(draw(names), draw(st.sampled_from(list(MemType))), descs, blobs)


metadatas = st.builds(
    AgentMetadata,
    name=names,
    conns=st.lists(
        st.tuples(names, st.binary(max_size=16)), max_size=3, unique_by=lambda c: c[0]
    ).map(tuple),
    sections=st.lists(sections(), max_size=3, unique_by=lambda x: (x.backend, x.mem_type)).map(
        tuple
    ),
)


@FUZZ
@given(metadatas)
def test_property_round_trip(md: AgentMetadata) -> None:
    """Any valid metadata decodes back to an equal object, and re-encodes to the same bytes."""
    blob = md.encode()
    out = AgentMetadata.decode(blob)
    assert out == md
    assert out.encode() == blob


def _decode_or_metadata_error(blob: bytes) -> AgentMetadata | None:
    try:
        return AgentMetadata.decode(blob)
    except MetadataError as exc:
        message = str(exc)
    assert message  # every refusal explains itself
    return None


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=128),
        st.binary(max_size=128).map(lambda b: MAGIC + b),
        st.binary(max_size=128).map(lambda b: MAGIC + u32(1) + b),
    )
)
def test_fuzz_arbitrary_bytes_only_raise_metadata_error(blob: bytes) -> None:
    """Arbitrary bytes either decode or raise MetadataError, never another exception."""
    _decode_or_metadata_error(blob)


tokens = st.one_of(
    st.integers(0, 40).map(u32),
    st.sampled_from([u32(0xFFFF_FFFF), u32(2**31), u8(0), u8(4), u8(5), u8(255)]),
    st.binary(max_size=8),
    st.sampled_from([b"UCX", b"\xff", b"\xc3", "é".encode()]),
)


@FUZZ
@given(st.lists(tokens, max_size=24).map(b"".join))
def test_fuzz_valid_crc_bodies_only_raise_metadata_error(raw: bytes) -> None:
    """Structured random bodies under a valid header and CRC decode or raise MetadataError."""
    _decode_or_metadata_error(frame(raw))


@FUZZ
@given(metadatas, st.data())
def test_fuzz_mutated_body_with_fixed_crc_only_raises_metadata_error(
    md: AgentMetadata, data: st.DataObject
) -> None:
    """A valid body with one byte changed and the CRC recomputed decodes or raises MetadataError."""
    raw = bytearray(md.encode()[HEADER.size : -4])
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    out = _decode_or_metadata_error(frame(bytes(raw)))
    if out is not None:
        assert AgentMetadata.decode(out.encode()) == out


@FUZZ
@given(metadatas)
def test_fuzz_every_truncation_raises_metadata_error(md: AgentMetadata) -> None:
    """Every proper prefix of a valid blob raises MetadataError."""
    blob = md.encode()
    for cut in range(len(blob)):
        with pytest.raises(MetadataError):
            AgentMetadata.decode(blob[:cut])


@FUZZ
@given(metadatas, st.data())
def test_fuzz_single_byte_flips_are_detected(md: AgentMetadata, data: st.DataObject) -> None:
    """Flipping any one byte of a valid blob raises MetadataError or decodes to equal metadata."""
    blob = bytearray(md.encode())
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= data.draw(st.integers(1, 255))
    out = _decode_or_metadata_error(bytes(blob))
    assert out is None or out == md
