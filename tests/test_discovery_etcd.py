"""The metadata service over a real etcd: discovery by name, labels, leases, restarts, keys.

etcd is the real server (Debian's etcd-server), started by the ``nixl_etcd`` fixture on a free
loopback port; peers that must die are separate processes (``md_peer.py``) killed with SIGKILL.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nixl_core import (
    Agent,
    AgentConfig,
    DescList,
    MetadataError,
    MetadataTimeoutError,
    StaleHandleError,
    UnregisteredDescriptorError,
)
from nixl_core.__main__ import main as cli_main

PEER = Path(__file__).with_name("md_peer.py")
TTL = 2.0
BLK = 4096

MakeMd = Callable[..., Agent]


@pytest.fixture
def make(nixl_etcd: Any) -> Iterator[MakeMd]:
    """Agents on LOOPBACK that use the test's etcd namespace; closed at teardown."""
    made: list[Agent] = []

    def factory(name: str, **kw: Any) -> Agent:
        kw.setdefault("md_ttl", TTL)
        cfg = AgentConfig(
            backends=["LOOPBACK"],
            md_store=f"etcd://{nixl_etcd.endpoint}",
            md_namespace=nixl_etcd.namespace,
            **kw,
        )
        agent = Agent(name, cfg)
        made.append(agent)
        return agent

    yield factory
    for a in made:
        a.close()


def _until(cond: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``cond()`` held (polled every 10 ms); fails after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - t0


def _blocks(buf: np.ndarray, n: int) -> DescList:
    return DescList.strided("DRAM", buf.ctypes.data, BLK, n, BLK)


def test_fetch_by_name_loads_and_moves_data(make: MakeMd) -> None:
    """A peer found by name in etcd is loaded; a WRITE into its memory arrives."""
    b, a = make("b"), make("a")
    dst = np.zeros(4 * BLK, np.uint8)
    b.register(dst)
    b.publish_metadata().wait(5)
    src = np.arange(4 * BLK, dtype=np.uint8)
    a.register(src)
    assert a.fetch_metadata("b", wait=True) == "b" or a.check_remote("b")
    assert a.check_remote("b")
    req = a.create("WRITE", _blocks(src, 4), _blocks(dst, 4), "b")
    req.post()
    req.wait(5)
    assert np.array_equal(src, dst)
    req.release()


def test_fetch_waits_for_a_just_published_peer(make: MakeMd) -> None:
    """A fetch started before the peer publishes completes when it does (a watch, not a poll)."""
    a, b = make("a"), make("b")
    op = a.fetch_metadata("b", timeout=10)
    time.sleep(0.2)
    assert not op.done()
    t0 = time.monotonic()
    b.publish_metadata()
    op.wait(10)
    assert time.monotonic() - t0 < 2.0
    assert a.check_remote("b")


def test_missing_peer_is_a_typed_error_not_a_hang(make: MakeMd) -> None:
    """A fetch of an agent nobody publishes ends in MetadataTimeoutError, seen by check_remote
    once, within its timeout."""
    a = make("a")
    a.fetch_metadata("nobody", timeout=0.5)
    t0 = time.monotonic()

    def poll() -> None:
        while not a.check_remote("nobody"):
            time.sleep(0.01)

    with pytest.raises(MetadataTimeoutError, match="nobody"):
        poll()
    assert time.monotonic() - t0 < 3.0
    assert a.check_remote("nobody") is False  # the failure is reported once
    with pytest.raises(MetadataTimeoutError):
        a.fetch_metadata("nobody", timeout=0.2, wait=True)


def test_labels_extend_the_peer_additively(make: MakeMd) -> None:
    """Partial metadata under two labels: the first gives one region, the second adds the
    other; a region not published yet raises NotFoundError naming the agent."""
    b, a = make("b"), make("a")
    r1, r2 = np.zeros(BLK, np.uint8), np.zeros(BLK, np.uint8)
    b.register(r1)
    b.register(r2)
    d1, d2 = _blocks(r1, 1), _blocks(r2, 1)
    b.publish_metadata(d1, label="part1").wait(5)
    a.fetch_metadata("b", label="part1", wait=True)
    a.prep("b", d1)
    with pytest.raises(UnregisteredDescriptorError, match="agent 'b'"):
        a.prep("b", d2)
    assert not a.check_remote("b", d2)
    b.publish_metadata(d2, label="part2", conn_info=False).wait(5)
    a.fetch_metadata("b", label="part2", wait=True)
    a.prep("b", d2)
    a.fetch_metadata("b", label="part1", wait=True)  # again: nothing is duplicated
    table = a._remotes["b"].regions.tables
    assert sum(len(t) for t in table.values()) == 2
    with pytest.raises(Exception, match="label"):
        b.publish_metadata(d1)  # partial metadata to a store needs a label


def test_republished_metadata_reaches_watchers(make: MakeMd) -> None:
    """A peer that registers more memory and publishes again is reloaded without a fetch."""
    b, a = make("b"), make("a")
    r1, r2 = np.zeros(BLK, np.uint8), np.zeros(BLK, np.uint8)
    b.register(r1)
    b.publish_metadata().wait(5)
    a.fetch_metadata("b", wait=True)
    assert not a.check_remote("b", _blocks(r2, 1))
    b.register(r2)
    b.publish_metadata().wait(5)
    _until(lambda: a.check_remote("b", _blocks(r2, 1)), 5)


def test_invalidate_and_close_drop_the_peer_at_once(make: MakeMd) -> None:
    """invalidate_metadata() deletes every key and watchers drop the agent; a fresh publish is
    found again; close() revokes the lease, so peers drop it without waiting for the TTL."""
    b, a = make("b", md_ttl=30.0), make("a")
    b.publish_metadata().wait(5)
    a.fetch_metadata("b", wait=True)
    b.invalidate_metadata().wait(5)
    assert _until(lambda: not a.check_remote("b"), 5) < 2.0
    b.publish_metadata().wait(5)
    _until(lambda: a.check_remote("b"), 5)
    b.close()
    assert _until(lambda: not a.check_remote("b"), 5) < 2.0


def test_hmac_keys_must_match(make: MakeMd) -> None:
    """With a key, values are tagged: the same key loads, another key or none is refused."""
    b = make("b", md_key="secret-1")
    b.publish_metadata().wait(5)
    assert make("a1", md_key="secret-1").fetch_metadata("b", wait=True)
    with pytest.raises(MetadataError, match="HMAC"):
        make("a2", md_key="other").fetch_metadata("b", wait=True)
    with pytest.raises(MetadataError, match="tag"):
        make("a3").fetch_metadata("b", wait=True)


class _Peer:
    def __init__(self, name: str, etcd: Any, seed: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), name, etcd.endpoint, etcd.namespace, str(TTL), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            pytest.fail(f"peer exited early: {err}")
        hello = json.loads(line)
        self.addr, self.incarnation = int(hello["addr"]), bytes.fromhex(hello["incarnation"])
        self.pattern = np.random.default_rng(seed).integers(0, 256, 1 << 16, dtype=np.uint8)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)  # reaps it and closes the pipes


def _read_peer(a: Agent, peer: _Peer, dst: np.ndarray) -> None:
    remote = DescList.strided("DRAM", peer.addr, BLK, 16, BLK)
    req = a.create("READ", _blocks(dst, 16), remote, "peer")
    req.post()
    req.wait(5)
    req.release()
    assert np.array_equal(dst, peer.pattern)


def test_killed_peer_expires_and_its_restart_heals(make: MakeMd, nixl_etcd: Any) -> None:
    """SIGKILL a peer: its keys expire within the TTL and the survivor drops it (stale lists,
    typed errors); restarted under the same name, the survivor loads the new incarnation by
    itself (no fetch, no restart) and transfers work again."""
    a = make("a")
    dst = np.zeros(1 << 16, np.uint8)
    a.register(dst)
    store = nixl_etcd.store()
    p1 = _Peer("peer", nixl_etcd, 1)
    p2: _Peer | None = None
    try:
        a.fetch_metadata("peer", wait=True)
        _read_peer(a, p1, dst)
        local = a.prep("", _blocks(dst, 16))
        stale = a.prep("peer", DescList.strided("DRAM", p1.addr, BLK, 16, BLK))
        p1.kill()
        dropped = _until(lambda: not a.check_remote("peer"), TTL + 5)
        assert dropped <= TTL + 2.0, f"dropped {dropped:.2f} s after SIGKILL (TTL {TTL})"
        assert store.get("peer", "metadata") is None
        with pytest.raises(StaleHandleError, match="deleted or expired"):
            a.make("READ", local, [0], stale, [0])
        p2 = _Peer("peer", nixl_etcd, 2)
        assert p2.incarnation != p1.incarnation
        _until(lambda: a._remote_incarnation("peer") == p2.incarnation, 5)
        dst[:] = 0
        _read_peer(a, p2, dst)
    finally:
        p1.stop()
        if p2 is not None:
            p2.stop()


def test_cli_lists_and_shows_agents(
    make: MakeMd, nixl_etcd: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m nixl_core md list`` shows agents, labels, incarnations and TTLs; ``show``
    each label's contents."""
    b = make("b")
    buf = np.zeros(BLK, np.uint8)
    b.register(buf)
    b.publish_metadata().wait(5)
    b.publish_metadata(_blocks(buf, 1), label="layer0").wait(5)
    base = ["md", "--endpoint", nixl_etcd.endpoint, "--namespace", nixl_etcd.namespace]
    assert cli_main([*base, "list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("b "))
    assert "layer0,metadata" in row
    assert b.incarnation.hex()[:12] in row
    assert row.rstrip().endswith(" s")
    assert cli_main([*base, "show", "b"]) == 0
    out = capsys.readouterr().out
    assert "layer0:" in out and "LOOPBACK/DRAM: 1 regions" in out
    assert cli_main([*base, "show", "nobody"]) == 1
