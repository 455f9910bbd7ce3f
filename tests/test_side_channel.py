"""The metadata side channel over a real listener: fetch / publish / invalidate between agents,
the listener's bind address and log line, the client's connection cache across a peer restart,
HMAC authentication, and partial metadata sent over the channel."""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable

import numpy as np
import pytest

from nixl_core import Agent, DescList
from nixl_core.discovery.sealed import Kind, named_payload, seal
from nixl_core.discovery.side_channel import Listener
from nixl_core.errors import (
    MetadataError,
    NotFoundError,
    RemoteDisconnectError,
    StaleHandleError,
    UnregisteredDescriptorError,
)

pytestmark = pytest.mark.timeout(60)

MakeAgent = Callable[..., Agent]
LOCAL = "127.0.0.1"


def _addr(agent: Agent) -> tuple[str, int]:
    port = agent.listen_port
    assert port is not None
    return (LOCAL, port)


def _listener(agent: Agent) -> Listener:
    lst = agent.md.listener
    assert lst is not None
    return lst


def _until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` s pass; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def _drain_inbox(agent: Agent) -> None:
    """Wait until the loads and invalidations the listener handed on so far are applied (the
    service applies them in order on one thread)."""
    agent.md._inbox.submit(lambda: None).result(timeout=5)


def _blocks(buf: np.ndarray, blk: int) -> DescList:
    return DescList.strided("DRAM", buf.ctypes.data, blk, buf.nbytes // blk, blk)


def _region_count(agent: Agent, peer: str) -> int:
    return sum(len(t) for t in agent._remotes[peer].regions.tables.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def _send_raw(addr: tuple[str, int], frame: bytes) -> None:
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(struct.pack("<Q", len(frame)) + frame)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        assert s.recv(1) == b""  # the listener closes once it handled (or refused) it


# ---------------------------------------------------------------------------- basic commands
def test_fetch_loads_and_a_write_lands(make_agent: MakeAgent) -> None:
    """A fetch over the side channel loads the peer; a LOOPBACK WRITE then reaches its buffer.
    The fetching agent needs no listener of its own."""
    b = make_agent("b", listen=True)
    a = make_agent("a")
    assert a.listen_port is None
    dst = np.zeros(1 << 14, np.uint8)
    b.register(dst)
    src = np.random.default_rng(7).integers(0, 255, dst.nbytes, dtype=np.uint8)
    a.register(src)

    op = a.fetch_metadata("b", addr=_addr(b))
    assert op.wait(timeout=5) == "b"
    assert a.check_remote("b")
    assert a.check_remote("b", _blocks(dst, 4096))
    assert a.md.listener is None  # fetching did not start one

    req = a.create("WRITE", _blocks(src, 4096), _blocks(dst, 4096), "b")
    req.post()
    req.wait(timeout=5)
    req.release()
    assert np.array_equal(src, dst)


def test_fetch_without_name_and_wait(make_agent: MakeAgent) -> None:
    """name=None takes whoever answers; wait=True blocks until it is loaded."""
    b = make_agent("b", listen=True)
    a = make_agent("a")
    a.fetch_metadata(None, addr=_addr(b), wait=True)
    assert a.remote_agents == ("b",)


def test_publish_then_invalidate(make_agent: MakeAgent) -> None:
    """publish(addr=) makes the listener's agent know the sender; invalidate(addr=) makes it drop
    it; an INVL naming another incarnation is ignored."""
    b = make_agent("b", listen=True)
    a = make_agent("a")
    a.register(np.zeros(4096, np.uint8))
    a.publish_metadata(addr=_addr(b)).wait(timeout=5)
    assert _until(lambda: b.check_remote("a"))
    assert b._remotes["a"].incarnation == a.incarnation

    other = bytes(16) if a.incarnation != bytes(16) else b"\x01" * 16
    _send_raw(_addr(b), seal(Kind.INVL, named_payload(other, "a"), None))
    assert _until(lambda: _listener(b).stats["frames"] >= 2)
    _drain_inbox(b)
    assert b.check_remote("a")

    a.invalidate_metadata(addr=_addr(b)).wait(timeout=5)
    assert _until(lambda: not b.check_remote("a"))
    assert b.remote_agents == ()


def test_fetch_wrong_name_is_a_metadata_error(make_agent: MakeAgent) -> None:
    """Asking a listener for another agent than the one it serves names both, via wait() and
    via check_remote(); nothing is loaded."""
    b = make_agent("b", listen=True)
    a = make_agent("a")
    op = a.fetch_metadata("wrong", addr=_addr(b))
    with pytest.raises(MetadataError, match=r"'wrong'.*'b'"):
        op.wait(timeout=5)
    with pytest.raises(MetadataError, match=r"'wrong'.*'b'"):
        a.check_remote("wrong")
    assert not a.check_remote("wrong")  # raised once
    assert a.remote_agents == ()


def test_fetch_from_nothing_listening(make_agent: MakeAgent) -> None:
    """Nothing on the port: a typed RemoteDisconnectError, quickly."""
    a = make_agent("a")
    port = _free_port()
    t0 = time.monotonic()
    op = a.fetch_metadata("b", addr=(LOCAL, port), timeout=2)
    with pytest.raises(RemoteDisconnectError, match=str(port)):
        op.wait(timeout=10)
    assert time.monotonic() - t0 < 5
    with pytest.raises(RemoteDisconnectError):
        a.check_remote("b")


# ---------------------------------------------------------------------------- bind and log
def test_listener_binds_loopback_by_default(make_agent: MakeAgent) -> None:
    b = make_agent("b", listen=True)
    lst = _listener(b)
    assert lst.host == LOCAL
    assert lst._srv.getsockname()[0] == LOCAL


def test_port_zero_logs_the_port(make_agent: MakeAgent, caplog: pytest.LogCaptureFixture) -> None:
    """NIXL's line, exactly, at INFO, with the port picked."""
    caplog.set_level(logging.INFO, logger="nixl_core.discovery.side_channel")
    b = make_agent("b", listen=True)
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "nixl_core.discovery.side_channel" and r.levelno == logging.INFO
    ]
    assert lines == [f"MD listener is listening on port {b.listen_port}"]


def test_explicit_any_host(make_agent: MakeAgent) -> None:
    """0.0.0.0 is bound when asked, and the listener answers on loopback."""
    b = make_agent("b", listen=True, listen_host="0.0.0.0")
    lst = _listener(b)
    assert lst.host == "0.0.0.0"
    assert lst._srv.getsockname()[0] == "0.0.0.0"
    a = make_agent("a")
    a.fetch_metadata("b", addr=_addr(b)).wait(timeout=5)
    assert a.check_remote("b")


def test_explicit_port(make_agent: MakeAgent, caplog: pytest.LogCaptureFixture) -> None:
    """A given port is used; the INFO line is only for a port the listener picked."""
    caplog.set_level(logging.INFO, logger="nixl_core.discovery.side_channel")
    port = _free_port()
    b = make_agent("b", listen=True, listen_port=port)
    assert b.listen_port == port
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "port" in r.message]


# ---------------------------------------------------------------------------- connection cache
def test_connection_cache_and_peer_restart(make_agent: MakeAgent) -> None:
    """Fetches reuse one connection; when the peer restarts on the same port the next fetch
    re-opens it, loads the new incarnation, and lists of the old one go stale."""
    port = _free_port()
    b1 = Agent("b", backends=["LOOPBACK"], listen=True, listen_port=port)
    b1.register(np.zeros(4096, np.uint8))
    a = make_agent("a")
    try:
        a.fetch_metadata("b", addr=(LOCAL, port)).wait(timeout=5)
        a.fetch_metadata("b", addr=(LOCAL, port)).wait(timeout=5)
        assert a.md._channel.opened == 1
        assert a._remotes["b"].incarnation == b1.incarnation
        old = a.prep("b", b1.registered("DRAM"))
        old_inc = b1.incarnation
    finally:
        b1.close()

    b2 = make_agent("b", listen=True, listen_port=port)
    b2.register(np.zeros(4096, np.uint8))
    assert b2.incarnation != old_inc
    a.fetch_metadata("b", addr=(LOCAL, port)).wait(timeout=5)
    assert a.md._channel.opened == 2
    assert a._remotes["b"].incarnation == b2.incarnation
    local = a.prep("", a.register(np.zeros(4096, np.uint8)))
    with pytest.raises(StaleHandleError):
        a.make("WRITE", local, [0], old, [0])
    assert a.check_remote("b", b2.registered("DRAM"))


# ---------------------------------------------------------------------------- HMAC
def test_same_key_works(make_agent: MakeAgent) -> None:
    b = make_agent("b", listen=True, md_key=b"sesame")
    a = make_agent("a", md_key="sesame")  # str and bytes are the same key
    a.fetch_metadata("b", addr=_addr(b)).wait(timeout=5)
    assert a.check_remote("b")
    a.publish_metadata(addr=_addr(b)).wait(timeout=5)
    assert _until(lambda: b.check_remote("a"))
    a.invalidate_metadata(addr=_addr(b)).wait(timeout=5)
    assert _until(lambda: not b.check_remote("a"))


@pytest.mark.parametrize(
    ("recv_key", "send_key"),
    [(b"sesame", None), (b"sesame", b"other"), (None, b"sesame")],
    ids=["sender-untagged", "wrong-key", "receiver-keyless"],
)
def test_mismatched_keys_drop_frames(
    make_agent: MakeAgent, recv_key: bytes | None, send_key: bytes | None
) -> None:
    """A LOAD that does not authenticate is dropped (counted as refused); a fetch fails with a
    typed error within its timeout, never hangs."""
    b = make_agent("b", listen=True, md_key=recv_key)
    a = make_agent("a", md_key=send_key)
    lst = _listener(b)
    before = lst.stats["refused"]
    a.publish_metadata(addr=_addr(b)).wait(timeout=5)
    assert _until(lambda: lst.stats["refused"] > before)
    _drain_inbox(b)
    assert b.remote_agents == ()

    t0 = time.monotonic()
    op = a.fetch_metadata("b", addr=_addr(b), timeout=2)
    with pytest.raises((MetadataError, RemoteDisconnectError)):
        op.wait(timeout=10)
    assert time.monotonic() - t0 < 6
    assert a.remote_agents == ()
    assert lst.stats["frames"] == 0


def test_md_key_from_environment(make_agent: MakeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    """NIXL_MD_KEY is the key when md_key is not given."""
    monkeypatch.setenv("NIXL_MD_KEY", "from-env")
    b = make_agent("b", listen=True)
    assert b.md.key == b"from-env"
    a = make_agent("a")
    a.fetch_metadata("b", addr=_addr(b)).wait(timeout=5)
    assert a.check_remote("b")
    monkeypatch.delenv("NIXL_MD_KEY")
    keyless = make_agent("keyless")
    assert keyless.md.key is None
    with pytest.raises((MetadataError, RemoteDisconnectError)):
        keyless.fetch_metadata("b", addr=_addr(b), timeout=2).wait(timeout=10)
    assert keyless.remote_agents == ()


# ---------------------------------------------------------------------------- partial metadata
def test_partial_metadata_over_the_channel(make_agent: MakeAgent) -> None:
    """A subset published over the side channel can be prepped; the rest raises a NotFoundError
    naming the agent; a second partial publish extends it without duplicating."""
    a = make_agent("a", listen=True)
    b = make_agent("b")
    buf1, buf2 = np.zeros(4096, np.uint8), np.zeros(8192, np.uint8)
    r1, r2 = b.register(buf1), b.register(buf2)

    b.publish_metadata(r1, conn_info=True, addr=_addr(a)).wait(timeout=5)
    assert _until(lambda: a.check_remote("b"))
    assert a.check_remote("b", _blocks(buf1, 1024))
    a.prep("b", _blocks(buf1, 1024))
    with pytest.raises(UnregisteredDescriptorError, match="'b'") as info:
        a.prep("b", _blocks(buf2, 1024))
    assert isinstance(info.value, NotFoundError)
    assert _region_count(a, "b") == 1

    b.publish_metadata(r2, conn_info=True, addr=_addr(a)).wait(timeout=5)
    assert _until(lambda: a.check_remote("b", _blocks(buf2, 1024)))
    b.publish_metadata(r1, conn_info=True, addr=_addr(a)).wait(timeout=5)  # again: no duplicate
    b.publish_metadata(addr=_addr(a)).wait(timeout=5)  # full: the same two regions
    assert _until(lambda: _listener(a).stats["frames"] >= 4)
    _drain_inbox(a)
    assert _region_count(a, "b") == 2
    assert a.remote_agents == ("b",)
