"""Agent semantics with the LOOPBACK backend in one process."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixl_core import (
    Agent,
    AgentConfig,
    BackendNotFoundError,
    DescList,
    DuplicateBackendError,
    InvalidDescriptorError,
    InvalidParamError,
    LengthMismatchError,
    MetadataError,
    NotAllowedError,
    NotFoundError,
    NotPostedError,
    RegistrationError,
    RepostActiveError,
    StaleHandleError,
    UnknownAgentError,
    UnregisteredDescriptorError,
    XferStatus,
    _plugins,
    reset_plugin_manager,
)
from nixl_core.metadata import AgentMetadata

MakeAgent = Callable[..., Agent]


def _pair(
    make_agent: MakeAgent, nbytes: int = 1 << 16
) -> tuple[Agent, Agent, np.ndarray, np.ndarray]:
    a, b = make_agent("a"), make_agent("b")
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    a.register(src)
    b.register(dst)
    assert a.add_remote(b.metadata()) == "b"
    assert b.add_remote(a.metadata()) == "a"
    return a, b, src, dst


def _blocks(buf: np.ndarray, blk: int) -> DescList:
    return DescList.strided("DRAM", buf.ctypes.data, blk, buf.nbytes // blk, blk)


def test_empty_and_reserved_names() -> None:
    """An empty agent name raises ValueError (InvalidParamError)."""
    with pytest.raises(ValueError, match="non-empty"):
        Agent("", backends=["LOOPBACK"])
    with pytest.raises(InvalidParamError):
        Agent("NIXL_INIT_AGENT", backends=["LOOPBACK"])


def test_default_backend_without_plugins(
    make_agent: MakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no plugin installed (UCX blocked, as CI installs it) the default backend is LOOPBACK."""
    monkeypatch.setenv("NIXL_DISABLE_PLUGINS", "ucx")
    a = make_agent("x", backends=None)
    assert a.backends == ("LOOPBACK",)


def test_duplicate_and_unknown_backend(
    make_agent: MakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One backend per type; a missing plugin of this repository comes with its install
    command, a disabled one says so, and a name nobody ships gets no made-up hint."""
    a = make_agent("a")
    with pytest.raises(DuplicateBackendError):
        a.create_backend("loopback")
    with pytest.raises(BackendNotFoundError, match="unknown backend 'GDS'") as err:
        a.create_backend("GDS")
    assert "install it" not in str(err.value)
    monkeypatch.setattr(_plugins, "_entry_points", list)
    reset_plugin_manager()
    with pytest.raises(BackendNotFoundError, match=r"pip install ./plugins/nixl_ucx"):
        make_agent("b").create_backend("UCX")
    monkeypatch.setenv("NIXL_DISABLE_PLUGINS", "loopback")
    reset_plugin_manager()
    with pytest.raises(BackendNotFoundError, match="disabled by NIXL_PLUGINS / NIXL_DISABLE"):
        make_agent("c")


def test_write_scattered_with_notif(make_agent: MakeAgent) -> None:
    """A scattered WRITE lands byte-exact and its notification arrives keyed by sender."""
    a, b, src, dst = _pair(make_agent)
    lp = a.prep("", _blocks(src, 64))
    rp = a.prep("b", _blocks(dst, 64))
    perm = np.random.default_rng(1).permutation(len(lp))
    with a.make("WRITE", lp, perm, rp, perm, notif=b"done") as req:
        assert req.post() in (XferStatus.DONE, XferStatus.IN_PROGRESS)
        assert req.wait(timeout=10) is XferStatus.DONE
        assert req.path == "loopback:cma"
    assert np.array_equal(src, dst)
    assert b.get_notifs() == {"a": [b"done"]}
    assert b.get_notifs() == {}


def test_read_pulls(make_agent: MakeAgent) -> None:
    """READ copies the peer's bytes into local memory."""
    _a, b, src, dst = _pair(make_agent)
    # b reads from a into dst
    req = b.create("READ", _blocks(dst, 4096), _blocks(src, 4096), "a")
    req.post()
    req.wait(timeout=10)
    assert np.array_equal(src, dst)


def test_merge_contiguous_and_opt_out(make_agent: MakeAgent) -> None:
    """Consecutive indices over contiguous memory merge into one descriptor unless merge=False."""
    a, _b, src, dst = _pair(make_agent)
    lp, rp = a.prep("", _blocks(src, 256)), a.prep("b", _blocks(dst, 256))
    idx = np.arange(len(lp))
    assert a.make("WRITE", lp, idx, rp, idx).desc_count == 1
    assert a.make("WRITE", lp, idx, rp, idx, merge=False).desc_count == len(lp)
    # a gap on the remote side splits the run
    ridx = idx.copy()
    ridx[10:] = (ridx[10:] + 1) % len(rp)
    r = a.make("WRITE", lp, idx[:-1], rp, ridx[:-1])
    assert r.desc_count == 2


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    blk=st.sampled_from([16, 64, 256]),
    idx=st.lists(st.integers(0, 63), min_size=1, max_size=300),
    shift=st.integers(0, 63),
    mixed=st.booleans(),
)
def test_merged_and_unmerged_move_the_same_bytes(
    make_agent: MakeAgent, blk: int, idx: list[int], shift: int, mixed: bool
) -> None:
    """Whatever the index arrays, merging changes the descriptor count, never the bytes moved."""
    a = make_agent(f"m{blk}{len(idx)}{shift}{mixed}")
    src = np.random.default_rng(shift).integers(0, 255, 64 * blk, dtype=np.uint8)
    d1, d2 = np.zeros(64 * blk, np.uint8), np.zeros(64 * blk, np.uint8)
    for buf in (src, d1, d2):
        a.register(buf)
    li = np.asarray(idx)
    ri = (li + shift) % 64
    if mixed:  # lengths that differ per descriptor: the non-uniform path
        lens = np.full(64, blk, np.uint64)
        lens[::3] = blk // 2
        descs = [
            DescList.from_array(
                np.stack(
                    [
                        b.ctypes.data + np.arange(64, dtype=np.uint64) * blk,
                        lens,
                        np.zeros(64, np.uint64),
                    ],
                    axis=1,
                ),
                "DRAM",
            )
            for b in (src, d1, d2)
        ]
        ri = li
    else:
        descs = [_blocks(b, blk) for b in (src, d1, d2)]
    lp = a.prep("", descs[0])
    for dst, merge in ((descs[1], True), (descs[2], False)):
        with a.make("WRITE", lp, li, a.prep(a.name, dst), ri, merge=merge) as r:
            r.post()
            assert r.wait(5) is XferStatus.DONE
            assert r.total_bytes == int(lp.lens[li].sum())
    np.testing.assert_array_equal(d1, d2)


def test_telemetry_and_repost(make_agent: MakeAgent) -> None:
    """Telemetry describes the last completed post; a finished request can be reposted."""
    a, _b, src, dst = _pair(make_agent)
    req = a.create("WRITE", _blocks(src, 1024)[:2], _blocks(dst, 1024)[:2], "b", merge=False)
    with pytest.raises(NotPostedError):
        _ = req.telemetry
    with pytest.raises(NotPostedError):
        req.wait()
    req.post()
    req.wait(timeout=5)
    t = req.telemetry
    assert (t.desc_count, t.total_bytes, t.backend) == (2, 2048, "LOOPBACK")
    assert t.xfer_duration_us >= t.post_duration_us > 0 and t.start_time_us > 0
    dst[:] = 0
    req.post()
    req.wait(timeout=5)
    assert np.array_equal(src[:2048], dst[:2048])


def test_repost_active_and_release_aborts(make_agent: MakeAgent) -> None:
    """Posting a running request raises RepostActiveError; release aborts it and is idempotent."""
    a, b = make_agent("a"), make_agent("b")
    src = np.ones(64 << 20, np.uint8)
    dst = np.zeros(64 << 20, np.uint8)
    a.register(src)
    b.register(dst)
    a.add_remote(b.metadata())
    req = a.create("WRITE", _blocks(src, 4096), _blocks(dst, 4096), "b", merge=False)
    assert req.post() is XferStatus.IN_PROGRESS
    with pytest.raises(RepostActiveError):
        req.post()
    req.release()
    req.release()
    assert req.released


def test_notif_override_at_post(make_agent: MakeAgent) -> None:
    """A notif given at post replaces the creation-time one; None sends none."""
    a, b, src, dst = _pair(make_agent)
    req = a.create("WRITE", _blocks(src, 4096)[:1], _blocks(dst, 4096)[:1], "b", notif=b"first")
    req.post()
    req.wait(5)
    req.post(notif="second")
    req.wait(5)
    req.post(notif=None)
    req.wait(5)
    assert b.get_notifs() == {"a": [b"first", b"second"]}


def test_descriptor_outside_registration_names_index(make_agent: MakeAgent) -> None:
    """A descriptor outside every registration raises with its index."""
    a, _b, _src, dst = _pair(make_agent)
    bad = np.array(_blocks(dst, 4096).array)
    bad[3, 0] += np.uint64(dst.nbytes)
    with pytest.raises(InvalidDescriptorError) as ei:
        a.prep("b", bad, "DRAM")
    assert ei.value.index == 3
    with pytest.raises(InvalidDescriptorError):
        a.prep("", DescList.from_tuples([(dst.ctypes.data, 8, 0)], "DRAM"))


def test_mismatches(make_agent: MakeAgent) -> None:
    """Count and length mismatches raise LengthMismatchError; bad op raises InvalidParamError."""
    a, _b, src, dst = _pair(make_agent)
    ld, rd = _blocks(src, 4096), _blocks(dst, 4096)
    with pytest.raises(LengthMismatchError):
        a.create("WRITE", ld, rd[:-1], "b")
    with pytest.raises(LengthMismatchError) as ei:
        a.create("WRITE", ld, _blocks(dst, 8192).concat(_blocks(dst, 8192))[: len(ld)], "b")
    assert ei.value.index == 0
    lp, rp = a.prep("", ld), a.prep("b", rd)
    with pytest.raises(LengthMismatchError):
        a.make("WRITE", lp, [0, 1], rp, [0])
    with pytest.raises(InvalidDescriptorError):
        a.make("WRITE", lp, [0, 99], rp, [0, 1])
    with pytest.raises(InvalidParamError, match="RD"):
        a.make("RD", lp, [0], rp, [0])
    with pytest.raises(InvalidParamError):
        a.make("WRITE", rp, [0], lp, [0])


def test_unknown_remote(make_agent: MakeAgent) -> None:
    """Unknown remote agents raise UnknownAgentError."""
    a = make_agent("a")
    a.register(np.zeros(64, np.uint8))
    with pytest.raises(UnknownAgentError, match="nobody"):
        a.prep("nobody", DescList.from_tuples([(1, 1, 0)], "DRAM"))
    with pytest.raises(UnknownAgentError):
        a.remove_remote("nobody")
    assert not a.check_remote("nobody")


def test_registration_rules(make_agent: MakeAgent) -> None:
    """Duplicates and overlaps raise; deregister needs exact matches; memory can be re-registered."""
    a = make_agent("a")
    buf = np.zeros(4096, np.uint8)
    reg = a.register(buf)
    with pytest.raises(RegistrationError):
        a.register(buf)
    with pytest.raises(RegistrationError):
        a.register(buf[100:200])
    with pytest.raises(RegistrationError) as ei:
        a.deregister(DescList.from_tuples([(buf.ctypes.data, 10, 0)], "DRAM"))
    assert ei.value.index == 0
    a.deregister(reg)
    assert len(a.registered("DRAM")) == 0
    a.register(buf[100:200])
    with pytest.raises(RegistrationError):
        a.deregister(reg)


def test_metadata_additive_and_partial(make_agent: MakeAgent) -> None:
    """Partial loads extend the remote section; reloading the same blob does not duplicate."""
    a, b = make_agent("a"), make_agent("b")
    x, y = np.zeros(4096, np.uint8), np.zeros(4096, np.uint8)
    rx, ry = b.register(x), b.register(y)
    a.register(np.zeros(4096, np.uint8))
    a.add_remote(b.partial_metadata())  # connection info only
    with pytest.raises(InvalidDescriptorError):
        a.prep("b", rx)
    a.add_remote(b.partial_metadata(rx))
    a.prep("b", rx)
    assert not a.check_remote("b", ry)
    a.add_remote(b.partial_metadata(ry, include_conn_info=True))
    a.add_remote(b.metadata())  # idempotent
    assert a.check_remote("b", ry) and a.check_remote("b", rx)
    with pytest.raises(NotFoundError):
        b.partial_metadata(DescList.from_tuples([(1, 1, 0)], "DRAM"))


def test_own_metadata_and_corrupt(make_agent: MakeAgent) -> None:
    """An agent refuses its own metadata and corrupted blobs."""
    a = make_agent("a")
    md = a.metadata()
    with pytest.raises(InvalidParamError):
        a.add_remote(md)
    b = make_agent("b")
    with pytest.raises(MetadataError):
        b.add_remote(md[:-3])
    with pytest.raises(MetadataError):
        b.add_remote(md[:20] + bytes([md[20] ^ 0xFF]) + md[21:])


def test_changed_blob_not_allowed(make_agent: MakeAgent) -> None:
    """Different connection info from the same incarnation is refused until it is removed."""
    a, b = make_agent("a"), make_agent("b")
    a.add_remote(b.metadata())
    md = AgentMetadata.decode(b.metadata())
    changed = AgentMetadata(
        md.name, [(n, info + b"x") for n, info in md.conns], incarnation=md.incarnation
    )
    with pytest.raises(NotAllowedError, match="different"):
        a.add_remote(changed.encode())
    a.remove_remote("b")
    a.add_remote(b.metadata())


def test_restarted_peer_is_replaced_not_merged(make_agent: MakeAgent) -> None:
    """Metadata of a new incarnation under a known name replaces the old peer: its lists go
    stale, the new one's memory is reachable, none of the old regions stay loaded."""
    a = make_agent("a")
    b1 = make_agent("b")
    old = np.zeros(8192, np.uint8)
    b1.register(old)
    a.add_remote(b1.metadata())
    src = np.arange(4096, dtype=np.uint8)
    a.register(src)
    lp = a.prep("", _blocks(src, 4096))
    stale = a.prep("b", _blocks(old, 4096))
    b1.close()
    b2 = Agent("b", backends=["LOOPBACK"])
    try:
        assert b2.incarnation != b1.incarnation
        new = np.zeros(4096, np.uint8)
        b2.register(new)
        a.add_remote(b2.metadata())
        with pytest.raises(StaleHandleError, match="restarted"):
            a.make("WRITE", lp, [0], stale, [0])
        with pytest.raises(UnregisteredDescriptorError, match="agent 'b'"):
            a.prep("b", _blocks(old, 4096))
        req = a.make("WRITE", lp, [0], a.prep("b", _blocks(new, 4096)), [0])
        req.post()
        req.wait(5)
        assert np.array_equal(new, src)
        req.release()
    finally:
        b2.close()


def test_peer_reregistered_region_names_the_agent(make_agent: MakeAgent) -> None:
    """Metadata whose region overlaps a different one loaded before names the peer and the fix."""
    a, b = make_agent("a"), make_agent("b")
    buf = np.zeros(8192, np.uint8)
    old = b.register([(buf.ctypes.data, 4096, 0)], "DRAM")
    a.add_remote(b.metadata())
    b.deregister(old)
    b.register([(buf.ctypes.data, 8192, 0)], "DRAM")
    with pytest.raises(NotAllowedError, match=r"agent 'b' .* region 0 .*len=8192.*remove_remote"):
        a.add_remote(b.metadata())
    a.remove_remote("b")
    a.add_remote(b.metadata())
    assert len(a.prep("b", DescList.from_tuples([(buf.ctypes.data + 4096, 4096, 0)], "DRAM"))) == 1


def test_generation_refuses_stale_handles(make_agent: MakeAgent) -> None:
    """After remove + re-add, older prepared lists and requests are refused."""
    a, b, src, dst = _pair(make_agent)
    lp, rp = a.prep("", _blocks(src, 4096)), a.prep("b", _blocks(dst, 4096))
    req = a.make("WRITE", lp, [0], rp, [0])
    a.remove_remote("b")
    with pytest.raises(UnknownAgentError):
        req.post()
    a.add_remote(b.metadata())
    with pytest.raises(StaleHandleError):
        a.make("WRITE", lp, [0], rp, [0])
    with pytest.raises(StaleHandleError):
        req.post()
    rp2 = a.prep("b", _blocks(dst, 4096))
    r2 = a.make("WRITE", lp, [0], rp2, [0])
    r2.post()
    assert r2.wait(5) is XferStatus.DONE


def test_loopback_same_agent(make_agent: MakeAgent) -> None:
    """A transfer to the agent's own name copies within the process."""
    a = make_agent("a")
    s = np.arange(8192, dtype=np.uint8)
    d = np.zeros(8192, np.uint8)
    a.register(s)
    a.register(d)
    req = a.create("WRITE", _blocks(s, 512), _blocks(d, 512), "a", notif="self")
    req.post()
    req.wait(5)
    assert np.array_equal(s, d)
    assert a.get_notifs() == {"a": [b"self"]}


def test_send_notif_standalone(make_agent: MakeAgent) -> None:
    """Standalone notifications reach the peer once, in order, empty payloads included."""
    a, b, _s, _d = _pair(make_agent)
    for m in (b"x", b"", b"n\0tif"):
        a.send_notif("b", m)
    a.send_notif("a", "me")
    assert b.get_notifs() == {"a": [b"x", b"", b"n\0tif"]}
    assert a.get_notifs() == {"a": [b"me"]}
    with pytest.raises(UnknownAgentError):
        a.send_notif("zz", b"x")


def test_notifs_to_a_receiver_that_does_not_poll(make_agent: MakeAgent) -> None:
    """A sender never blocks on a peer that has not called get_notifs() for a while."""
    a, b, src, dst = _pair(make_agent)
    t0 = time.monotonic()
    for i in range(200):  # the kernel queues about ten datagrams per Unix socket
        with a.create("WRITE", _blocks(src, 4096), _blocks(dst, 4096), "b", f"n{i}") as req:
            assert req.post() is XferStatus.DONE or req.wait(5.0) is XferStatus.DONE
    assert time.monotonic() - t0 < 4.0
    deadline = time.monotonic() + 5.0
    got: list[bytes] = []
    while len(got) < 200 and time.monotonic() < deadline:
        got.extend(b.get_notifs().get("a", []))
    assert got == [f"n{i}".encode() for i in range(200)]


def test_close_deregisters_everything(make_agent: MakeAgent) -> None:
    """close() releases requests, forgets remotes and deregisters memory; it is idempotent."""
    a, _b, src, dst = _pair(make_agent)
    a.create("WRITE", _blocks(src, 4096), _blocks(dst, 4096), "b")
    a.close()
    a.close()
    assert a.remote_agents == () and len(a.registered("DRAM")) == 0


def test_config_params_reach_backend(make_agent: MakeAgent) -> None:
    """Backend params come from defaults, then the config, then explicit params, typed."""
    a = make_agent(
        "a",
        config=AgentConfig(backends=["LOOPBACK"], backend_params={"loopback": {"inline_bytes": 7}}),
    )
    lb = a.backend("LOOPBACK")
    assert lb.params["inline_bytes"] == 7 and lb.params.source("inline_bytes") == "config"
    assert a.backend("loopback").params["num_threads"] == 1
    with pytest.raises(NotFoundError):
        a.backend("UCX")


def test_resolve_gives_a_backend_its_handles(make_agent: MakeAgent) -> None:
    """Agent.resolve checks descriptors like a transfer and hands back the side a backend would
    get: its own handles for "", the loaded ones for a peer, the loopback ones for its own name."""
    a, _b, src, dst = _pair(make_agent)
    mine = a.resolve("", _blocks(src, 64), backend="LOOPBACK")
    assert len(mine) == src.nbytes // 64 and mine.single_slot >= 0
    assert mine.slot_handles[mine.single_slot] == src.ctypes.data  # LOOPBACK's handle: the base
    peer = a.resolve("b", _blocks(dst, 64), backend="loopback")
    assert peer.slot_handles[peer.single_slot] == dst.ctypes.data
    assert np.array_equal(peer.addrs, _blocks(dst, 64).addrs)
    loop = a.resolve("a", _blocks(src, 64), backend="LOOPBACK")
    assert loop.slot_handles[loop.single_slot] == src.ctypes.data
    with pytest.raises(InvalidDescriptorError):
        a.resolve("", [(dst.ctypes.data, 64, 0)], "DRAM", backend="LOOPBACK")
    with pytest.raises(NotFoundError):
        a.resolve("", _blocks(src, 64), backend="UCX")
