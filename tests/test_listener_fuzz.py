"""Fuzzing the metadata listener of a running agent.

More than 10,000 malformed, truncated, oversized and slow-loris inputs go to an agent listening
on the side channel (with and without an HMAC key), over many connections, while a good peer
keeps fetching. The agent must keep serving the good peer, keep its memory bounded (the
listener's buffered bytes within its budget, the process's RSS within 100 MB), load nothing,
and come back to a handful of connections, no buffered bytes and no extra threads afterwards.

The corpus is deterministic: a seeded :class:`random.Random` and derandomized hypothesis. Every
input is checked here first (:func:`_expect`) to be one the listener must refuse or cut, and
each connection that carries one must be closed by the listener on its own (or, for a truncated
frame, after the client's half-close) within a few seconds.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import random
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixl_core import Agent, DescList
from nixl_core.discovery.sealed import (
    CHANNEL_CONTEXT,
    TAG_SIZE,
    Kind,
    named_payload,
    open_frame,
    parse_named,
    seal,
)
from nixl_core.discovery.side_channel import DEFAULT_MAX_FRAME, Channel, Listener
from nixl_core.errors import MetadataError
from nixl_core.metadata import AgentMetadata, Section

pytestmark = pytest.mark.timeout(180)

LOCAL = "127.0.0.1"
KEY = b"fuzz-key"
OTHER_KEY = b"not-the-key"
LEN = struct.Struct("<Q")
HEAD = struct.Struct("<4sBBHI")
MD_HEAD = struct.Struct("<8sHHQ")
#: Stalled frames are cut after this (the agent's default is 10 s; set on its listener).
FRAME_TIMEOUT = 0.5
#: The listener's buffer budget during the attack (its default is 4 x 64 MiB).
BUDGET = 8 << 20
N_BAD = 10_000
WORKERS = 4
SEED = 20240611
PAGE = os.sysconf("SC_PAGE_SIZE")

Expect = Literal["cut", "refused", "truncated", "valid"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


# ---------------------------------------------------------------------------- frames by hand
def _tag(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, CHANNEL_CONTEXT + body, hashlib.sha256).digest()


def _raw_frame(
    kind: int,
    payload: bytes,
    key: bytes | None,
    *,
    magic: bytes = b"NXS1",
    flags: int | None = None,
    reserved: int = 0,
    plen: int | None = None,
) -> bytes:
    """A frame with any header fields, tagged (over whatever header it has) when ``key``."""
    fl = (1 if key else 0) if flags is None else flags
    n = len(payload) if plen is None else plen
    body = HEAD.pack(magic, kind, fl, reserved, n) + payload
    return body + _tag(key, body) if key else body


def _wire(frame: bytes) -> bytes:
    return LEN.pack(len(frame)) + frame


def _refix_md(blob: bytes) -> bytes:
    """A metadata blob with its total length and CRC made consistent again (so the decoder's
    structural checks, not the CRC, are what refuse it)."""
    if len(blob) < MD_HEAD.size + 4:
        return blob
    magic, version, flags, _ = MD_HEAD.unpack_from(blob)
    data = MD_HEAD.pack(magic, version, flags, len(blob)) + blob[MD_HEAD.size : -4]
    return data + struct.pack("<I", zlib.crc32(data))


def _expect(wire: bytes, key: bytes | None, max_frame: int) -> Expect:
    """What the listener must do with one connection's bytes (then EOF from the client)."""
    if len(wire) < LEN.size:
        return "truncated"
    (n,) = LEN.unpack_from(wire)
    if n == 0 or n > max_frame:
        return "cut"
    if len(wire) - LEN.size < n:
        return "truncated"
    raw = wire[LEN.size : LEN.size + n]
    try:
        frame = open_frame(raw, key)
        if frame.kind is Kind.LOAD:
            AgentMetadata.decode(frame.payload)
        elif frame.kind is Kind.INVL:
            parse_named(frame.payload)
        elif frame.kind is not Kind.SEND:
            return "refused"  # not a side-channel command
    except MetadataError:
        return "refused"
    return "valid"


# ---------------------------------------------------------------------------- the corpus
@functools.lru_cache(maxsize=2)
def _hypothesis_blobs(valid: bytes, n: int) -> tuple[bytes, ...]:
    """Corrupt metadata blobs from derandomized hypothesis: mutations of a valid blob (edits,
    truncation, insertion; with and without a consistent CRC) and arbitrary bytes."""
    out: list[bytes] = []
    edits = st.lists(
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), min_size=1, max_size=4
    )

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        edits,
        st.integers(0, len(valid)),
        st.binary(max_size=8),
        st.booleans(),
        st.binary(max_size=200),
        st.integers(0, 3),
    )
    def gen(
        ed: list[tuple[int, int]], cut: int, ins: bytes, refix: bool, junk: bytes, mode: int
    ) -> None:
        if mode == 0:
            out.append(MD_HEAD.pack(b"NIXLPYMD", 2, 0, len(junk) + 24) + junk)
            return
        blob = bytearray(valid)
        for pos, byte in ed:
            blob[pos] = byte
        if mode == 2:
            blob = blob[:cut]
        elif mode == 3:
            blob[cut:cut] = ins
        out.append(_refix_md(bytes(blob)) if refix else bytes(blob))

    gen()
    return tuple(out)


def _corpus(key: bytes | None, evil_md: bytes, max_frame: int) -> list[tuple[bytes, Expect]]:
    """At least N_BAD inputs, each for one connection, with what the listener must do."""
    r = random.Random(SEED + (1 if key else 0))
    valid_frames = [
        seal(Kind.LOAD, evil_md, key),
        seal(Kind.SEND, b"", key),
        seal(Kind.INVL, named_payload(bytes(range(16, 32)), "evil"), key),
    ]
    items: list[bytes] = []

    def flip(frame: bytes) -> bytes:
        b = bytearray(frame)
        for _ in range(r.randint(1, 3)):
            b[r.randrange(len(b))] ^= 1 << r.randrange(8)
        return bytes(b)

    # random bytes
    items += [r.randbytes(r.randint(1, 300)) for _ in range(1200)]
    # a valid length prefix, then garbage (as long as it says, or shorter)
    for i in range(1200):
        n = r.randint(1, 4096)
        items.append(LEN.pack(n) + r.randbytes(n if i % 3 else r.randint(0, n - 1)))
    # sealed frames with flipped bits
    items += [_wire(flip(r.choice(valid_frames))) for _ in range(2800)]
    # wrong magic / kind / flags / reserved / payload length, tagged over the wrong header
    payloads = [evil_md, b"", named_payload(bytes(16), "evil")]
    for i in range(1200):
        p = r.choice(payloads)
        which = i % 5
        if which == 0:
            f = _raw_frame(1, p, key, magic=r.randbytes(4))
        elif which == 1:
            f = _raw_frame(r.choice([0, *range(4, 256)]), p, key)
        elif which == 2:
            f = _raw_frame(r.randint(1, 3), p, key, flags=r.randint(2, 255))
        elif which == 3:
            f = _raw_frame(r.randint(1, 3), p, key, reserved=r.randint(1, 0xFFFF))
        else:
            f = _raw_frame(r.randint(1, 3), p, key, plen=r.randint(0, 0xFFFF_FFFF))
        items.append(_wire(f))
    # truncated frames (anywhere, the length prefix included), then close
    for _ in range(1000):
        w = _wire(r.choice(valid_frames))
        items.append(w[: r.randrange(len(w))])
    # lengths out of range: 0, max_frame + 1, 2**64 - 1, anything above max_frame
    for i in range(600):
        n = [0, max_frame + 1, 2**64 - 1, r.randint(max_frame + 1, 2**64 - 1)][i % 4]
        items.append(LEN.pack(n) + r.randbytes(r.randint(0, 64)))
    # LOAD frames (correctly sealed) around corrupt metadata blobs
    blobs = list(_hypothesis_blobs(evil_md, 300))
    for _ in range(1700):
        b = bytearray(evil_md)
        for _ in range(r.randint(1, 6)):
            b[r.randrange(len(b))] = r.randrange(256)
        raw = bytes(b[: r.randint(1, len(b))] if r.random() < 0.3 else b)
        blobs.append(_refix_md(raw) if r.random() < 0.5 else raw)
    items += [_wire(seal(Kind.LOAD, blob, key)) for blob in blobs]
    # bad tags: random, another key's, truncated, missing, or one where none is expected
    for i in range(1000):
        body = r.choice(valid_frames)[:-TAG_SIZE] if key else r.choice(valid_frames)
        tagged = bytearray(body)
        tagged[5] |= 1
        which = i % 4
        if which == 0:
            f = bytes(tagged) + r.randbytes(TAG_SIZE)
        elif which == 1:
            f = bytes(tagged) + _tag(OTHER_KEY, bytes(tagged))
        elif which == 2:
            f = bytes(tagged) + _tag(key or OTHER_KEY, bytes(tagged))[: r.randint(0, 31)]
        else:
            plain = bytearray(body)
            plain[5] &= ~1
            f = bytes(plain) if key else bytes(tagged) + _tag(OTHER_KEY, bytes(tagged))
        items.append(_wire(f))

    out: list[tuple[bytes, Expect]] = []
    for w in items:
        e = _expect(w, key, max_frame)
        if e != "valid":  # a mutation that happens to be a valid command is not sent
            out.append((w, e))
    r.shuffle(out)
    assert len(out) >= N_BAD, len(out)
    return out


# ---------------------------------------------------------------------------- attackers
class _Failures:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        with self._lock:
            self.items.append(msg)


def _wait_closed(sock: socket.socket, timeout: float) -> bool:
    """Read until the peer closes (EOF or reset); False if it is still open after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def _attack(
    addr: tuple[str, int],
    items: list[tuple[bytes, Expect]],
    key: bytes | None,
    fails: _Failures,
    sent: list[int],
) -> None:
    """One worker: each input on its own connection; harmless valid frames on a kept one."""
    keep = socket.create_connection(addr, timeout=5)
    noise = 0
    try:
        for i, (wire, expect) in enumerate(items):
            with socket.create_connection(addr, timeout=5) as s:
                try:
                    s.sendall(wire)
                    if expect == "truncated":
                        s.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # cut already (an oversized length is refused before the rest)
                if not _wait_closed(s, 5.0):
                    fails.add(f"input {i} ({expect}, {len(wire)} bytes) left open: {wire[:40]!r}")
            if i % 25 == 0:  # the listener keeps a connection that sends valid frames open
                inv = seal(Kind.INVL, named_payload(os.urandom(16), f"ghost-{i}"), key)
                keep.sendall(_wire(inv))
                noise += 1
        sent.append(noise)
    except Exception as exc:
        fails.add(f"attacker died: {exc!r}")
    finally:
        keep.close()


def _slow_loris(
    addr: tuple[str, int],
    key: bytes | None,
    waves: int,
    per_wave: int,
    fails: _Failures,
    counted: list[int],
) -> None:
    """Waves of connections that send nothing, part of a length prefix, part of a frame, or
    most of a large frame, then stall; each must be cut within a few frame timeouts."""
    frame = _wire(seal(Kind.SEND, b"", key))
    big = LEN.pack(1 << 20) + bytes((1 << 20) - 1)
    n = 0
    try:
        for w in range(waves):
            socks: list[socket.socket] = []
            try:
                for i in range(per_wave):
                    s = socket.create_connection(addr, timeout=5)
                    socks.append(s)
                    kind = (i + w) % 5
                    with_data = [b"", frame[: 1 + i % 7], frame[: 9 + i % 10], big, frame[:-1]]
                    if with_data[kind]:
                        s.sendall(with_data[kind])
                    n += 1
                t0 = time.monotonic()
                for s in socks:
                    if not _wait_closed(s, max(0.1, t0 + 5.0 - time.monotonic())):
                        fails.add(f"slow-loris wave {w}: a stalled connection was not cut")
                        break
            finally:
                for s in socks:
                    s.close()
        counted.append(n)
    except Exception as exc:
        fails.add(f"slow-loris died: {exc!r}")


def _reply_flood(addr: tuple[str, int], key: bytes | None, nbytes: int) -> socket.socket:
    """A peer that pipelines ``nbytes`` of SEND frames (or as many as get through in 10 s)
    and never reads a reply; returns its socket."""
    one = _wire(seal(Kind.SEND, b"", key))
    chunk = one * (65536 // len(one))
    s = socket.socket()
    # A small receive buffer: the replies it does not read back up at the listener at once.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect(addr)
    s.setblocking(False)
    pushed = 0
    deadline = time.monotonic() + 10
    while pushed < nbytes and time.monotonic() < deadline:
        try:
            pushed += s.send(chunk)
        except BlockingIOError:
            select.select([], [s], [], 0.05)
        except (BrokenPipeError, ConnectionResetError):
            break  # cut already
    return s


class _Monitor:
    """Samples the listener's buffered bytes and connections, and the process's RSS."""

    def __init__(self, lst: Listener) -> None:
        self.lst = lst
        self.max_buffered = 0
        self.max_conns = 0
        self.rss0 = _rss()
        self.max_rss = self.rss0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="fuzz-monitor")

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.max_buffered = max(self.max_buffered, self.lst.buffered)
            self.max_conns = max(self.max_conns, self.lst.connections)
            self.max_rss = max(self.max_rss, _rss())

    @property
    def rss_growth(self) -> int:
        return self.max_rss - self.rss0

    def __enter__(self) -> _Monitor:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


class _GoodPeer:
    """Fetches the served agent over and over, through the agent's cached connection and
    through a connection of its own each time (a peer that connects for the first time)."""

    def __init__(self, agent: Agent, addr: tuple[str, int], key: bytes | None) -> None:
        self.agent, self.addr, self.key = agent, addr, key
        self.fetched = 0
        self.fresh = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="fuzz-good-peer")

    def once(self) -> None:
        self.agent.fetch_metadata("b", addr=self.addr).wait(timeout=5)
        self.fetched += 1
        ch = Channel(self.key, timeout=5)
        try:
            rep = ch.request(self.addr, seal(Kind.SEND, b"", self.key))
        finally:
            ch.close()
        assert rep.kind is Kind.LOAD
        assert AgentMetadata.decode(rep.payload).name == "b"
        self.fresh += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.once()
            except Exception as exc:
                self.errors.append(repr(exc))
            self._stop.wait(0.05)

    def __enter__(self) -> _GoodPeer:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(timeout=30)


def _until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _new_threads(before: set[threading.Thread]) -> list[str]:
    """Threads started since ``before`` and still running, less the metadata services' pool
    workers (a pool may add one when a task is submitted while its last one is finishing;
    each pool has a fixed maximum)."""
    pools = ("nixl-md-good_", "nixl-md-out-good_", "nixl-md-in-good_", "nixl-md-b_")
    pools += ("nixl-md-out-b_", "nixl-md-in-b_")
    return [
        t.name
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not t.name.startswith(pools)
    ]


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing logged an error or a traceback: every bad input was refused as a bad input
    (an unexpected exception type in a decoder shows up here)."""
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info is not None]
    assert not bad, [r.getMessage() for r in bad[:5]]


@pytest.fixture(scope="module")
def evil_md() -> bytes:
    """Valid metadata of an agent that is never loaded anywhere (the mutation seed): fixed
    bytes, so that the corpus is the same on every run."""
    conn = b"NLB2" + bytes(range(60))
    descs = np.array([[0x7F00_0000_1000, 4096, 0], [0x7F00_0010_0000, 1 << 20, 0]], np.uint64)
    section = Section("LOOPBACK", "DRAM", descs, (b"\x01" * 8, b"\x02" * 8))
    md = AgentMetadata("evil", (("LOOPBACK", conn),), (section,), incarnation=bytes(range(16)))
    blob = md.encode()
    assert _expect(_wire(seal(Kind.LOAD, blob, None)), None, DEFAULT_MAX_FRAME) == "valid"
    return blob


@pytest.fixture(params=[None, KEY], ids=["no-key", "md-key"])
def key(request: pytest.FixtureRequest) -> bytes | None:
    value: bytes | None = request.param
    return value


@pytest.fixture
def served(key: bytes | None) -> Iterator[tuple[Agent, Listener, Agent]]:
    """(b: an agent listening with ``key``, its listener, good: a peer b knows)."""
    buf = np.zeros(1 << 16, np.uint8)
    threads = set(threading.enumerate())
    b = Agent("b", backends=["LOOPBACK"], listen=True, md_key=key)
    good = Agent("good", backends=["LOOPBACK"], md_key=key)
    try:
        b.register(buf)
        lst = b.md.listener
        assert lst is not None
        # AgentConfig has no knob for these (see the report); the listener reads them live.
        lst.frame_timeout = FRAME_TIMEOUT
        lst.budget = BUDGET
        good.publish_metadata(addr=(LOCAL, lst.port)).wait(timeout=5)
        assert _until(lambda: b.remote_agents == ("good",), 5)
        for _ in range(3):
            good.fetch_metadata("b", addr=(LOCAL, lst.port)).wait(timeout=5)
        yield b, lst, good
    finally:
        good.close()
        b.close()
    assert not lst._thread.is_alive()
    # Closed agents leave no thread behind (listener, pools).
    assert _until(lambda: set(threading.enumerate()) <= threads, 5), threading.enumerate()


# ---------------------------------------------------------------------------- the tests
def test_listener_survives_fuzz(
    key: bytes | None,
    evil_md: bytes,
    served: tuple[Agent, Listener, Agent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's requirement: 10k malformed, truncated, oversized and slow-loris frames
    against a running agent; it keeps serving good peers, memory stays bounded, nothing is
    loaded."""
    caplog.set_level(logging.WARNING)
    b, lst, good = served
    addr = (LOCAL, lst.port)
    assert lst.max_frame == DEFAULT_MAX_FRAME
    corpus = _corpus(key, evil_md, lst.max_frame)
    threads_before = set(threading.enumerate())
    refused0 = lst.stats["refused"]
    fails = _Failures()
    noise: list[int] = []
    lorises: list[int] = []

    t0 = time.monotonic()
    with _Monitor(lst) as mon, _GoodPeer(good, addr, key) as peer:
        workers = [
            threading.Thread(target=_attack, args=(addr, corpus[i::WORKERS], key, fails, noise))
            for i in range(WORKERS)
        ]
        workers.append(
            threading.Thread(target=_slow_loris, args=(addr, key, 6, 100, fails, lorises))
        )
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=120)
            assert not t.is_alive()
        attack_s = time.monotonic() - t0
    # Stalled connections expire; the good peer's cached one stays.
    settled = _until(lambda: lst.connections <= 1 and lst.buffered == 0, 10)
    print(
        f"\n[{'md-key' if key else 'no-key'}] {len(corpus)} bad inputs + {sum(lorises)} "
        f"slow-loris connections in {attack_s:.1f} s; max buffered {mon.max_buffered} B "
        f"(budget {BUDGET}), max connections {mon.max_conns}, RSS growth "
        f"{mon.rss_growth / 1e6:.1f} MB; good fetches {peer.fetched} cached + {peer.fresh} "
        f"fresh; listener stats {lst.stats}"
    )
    assert not fails.items, fails.items[:10]
    assert not peer.errors, peer.errors[:5]
    assert peer.fetched >= 10 and peer.fresh >= 10
    assert settled, (lst.connections, lst.buffered)
    assert 0 < mon.max_buffered <= BUDGET
    assert mon.rss_growth < 100 << 20
    assert lst.stats["refused"] - refused0 >= sum(e == "refused" for _, e in corpus)
    assert _until(lambda: not _new_threads(threads_before), 5), _new_threads(threads_before)
    b.md._inbox.submit(lambda: None).result(timeout=5)  # what the listener handed on is applied
    assert b.remote_agents == ("good",)  # nothing of the attackers was loaded
    for _ in range(3):
        good.fetch_metadata("b", addr=addr).wait(timeout=5)
    assert good.check_remote("b")
    assert lst._thread.is_alive()
    _no_errors_logged(caplog)


def test_peer_that_never_reads_holds_one_reply(
    key: bytes | None, served: tuple[Agent, Listener, Agent], caplog: pytest.LogCaptureFixture
) -> None:
    """Pipelined SENDs whose replies are never read: the listener handles one at a time, so
    at most one reply waits per connection, and the connection is cut once the reply is not
    taken within frame_timeout. Good peers are served meanwhile."""
    caplog.set_level(logging.WARNING)
    b, lst, good = served
    addr = (LOCAL, lst.port)
    # Large replies: the listener's socket buffer fills after a few dozen of them, not after
    # thousands (each costs an export; this is about memory, not CPU).
    many = np.zeros(2000 * 64, np.uint8)
    b.register(DescList.strided("DRAM", many.ctypes.data, 64, 2000, 64))
    reply = len(_wire(seal(Kind.LOAD, b.metadata(), key)))
    assert reply > 64 << 10
    with _Monitor(lst) as mon, _GoodPeer(good, addr, key) as peer:
        socks = [_reply_flood(addr, key, 2 << 20) for _ in range(2)]
        ports = {s.getsockname()[1] for s in socks}

        def flooding() -> set[int]:
            return ports & {c.addr[1] for c in list(lst._conns.values())}

        try:
            assert _until(lambda: flooding() == ports, 5)  # accepted, being served
            # Then dropped (the listener's close may never reach a peer that does not read:
            # the FIN waits behind the replies in the kernel, so look at the listener's side).
            assert _until(lambda: not flooding(), 10), lst.stats
        finally:
            for s in socks:
                s.close()
        assert _until(lambda: peer.fresh >= 3, 10), (peer.fresh, peer.errors)
    assert not peer.errors, peer.errors[:5]
    # Per connection: one 1 MiB read of requests and one reply.
    assert mon.max_buffered <= 2 * ((1 << 20) + reply), mon.max_buffered
    assert mon.rss_growth < 50 << 20, mon.rss_growth
    assert _until(lambda: lst.connections <= 1 and lst.buffered == 0, 5), (
        lst.connections,
        lst.buffered,
    )
    cuts = [r.getMessage() for r in caplog.records if "a reply not taken" in r.getMessage()]
    assert len(cuts) == 2, cuts
    _no_errors_logged(caplog)


def test_connection_limit_evicts_stalled_not_idle(
    key: bytes | None, served: tuple[Agent, Listener, Agent]
) -> None:
    """With every slot taken by stalled connections a new peer still gets in (the stalled one
    pending longest makes room) and the good peer's cached idle connection is kept; silent
    connections expire after frame_timeout like partial frames do."""
    _b, lst, good = served
    addr = (LOCAL, lst.port)
    lst.max_conns = 32
    lst.frame_timeout = 30.0  # expiry is not what frees the slots here
    opened = good.md._channel.opened
    frame = _wire(seal(Kind.SEND, b"", key))
    stalled = [socket.create_connection(addr, timeout=5) for _ in range(2 * lst.max_conns)]
    try:
        for i, s in enumerate(stalled):
            if i % 2:
                s.sendall(frame[: 1 + i % (len(frame) - 1)])
        assert _until(lambda: lst.connections == lst.max_conns, 5)
        peer = _GoodPeer(good, addr, key)
        for _ in range(5):
            peer.once()
        assert good.md._channel.opened == opened  # the cached connection was never cut
        # The last fresh peer's slot is free again once its close is seen.
        assert _until(lambda: lst.connections == lst.max_conns - 1, 5)
    finally:
        for s in stalled:
            s.close()
    assert _until(lambda: lst.connections == 1, 5)

    lst.frame_timeout = FRAME_TIMEOUT
    silent = [socket.create_connection(addr, timeout=5) for _ in range(16)]
    try:
        t0 = time.monotonic()
        assert all(_wait_closed(s, 5) for s in silent)
        assert time.monotonic() - t0 < FRAME_TIMEOUT + 3
    finally:
        for s in silent:
            s.close()
    assert lst.connections == 1
    good.fetch_metadata("b", addr=addr).wait(timeout=5)
    assert good.md._channel.opened == opened


def test_budget_hogs_do_not_lock_out_small_frames(
    key: bytes | None, served: tuple[Agent, Listener, Agent]
) -> None:
    """Large frames that stall use up the buffer budget; a good peer's small requests still
    go through (the connections holding the most are cut for them) and the budget holds."""
    _b, lst, good = served
    addr = (LOCAL, lst.port)
    lst.budget = 4 << 20
    lst.frame_timeout = 30.0  # expiry is not what frees the budget here
    big = LEN.pack(1 << 20) + bytes((1 << 20) - 64)
    hogs: list[socket.socket] = []

    def hog(data: bytes) -> None:
        s = socket.create_connection(addr, timeout=5)
        hogs.append(s)
        s.sendall(data)

    with _Monitor(lst) as mon:
        try:
            for _ in range(3):
                hog(big)
            # Buffered: what the frames hold (their length prefixes are dropped once read).
            assert _until(lambda: lst.buffered == 3 * (len(big) - LEN.size), 5)
            hog(LEN.pack(2 << 20) + bytes(lst.budget - lst.buffered - LEN.size))
            # Not room for a request: 8 bytes left.
            assert _until(lambda: lst.buffered == lst.budget - LEN.size, 5)
            peer = _GoodPeer(good, addr, key)
            for _ in range(5):
                peer.once()
            for _ in range(4):  # more hogs: they evict each other, the budget holds
                hog(big)
            peer.once()
        finally:
            for s in hogs:
                s.close()
    assert mon.max_buffered <= 4 << 20
    assert _until(lambda: lst.connections == 1 and lst.buffered == 0, 5)
