"""The optional backend hooks: prepared-list state (prep_side / prepare_indexed) and stream order.

LOOPBACK with ``indexed=1`` is the reference implementation of the prepared-list hooks; LOOPBACK
has no stream order, so it shows how a backend without one refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from nixl_core import Agent, DescList, NotPostedError, NotSupportedError, XferStatus
from nixl_core._loopback import LoopbackBackend
from nixl_core.backend import Backend

MakeAgent = Callable[..., Agent]


def _indexed_pair(
    make_agent: MakeAgent, nbytes: int = 1 << 16, blk: int = 256
) -> tuple[Agent, Agent, np.ndarray, np.ndarray, Any, Any]:
    params = {"LOOPBACK": {"indexed": "1"}}
    a, b = make_agent("a", backend_params=params), make_agent("b", backend_params=params)
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    a.register(src)
    b.register(dst)
    a.add_remote(b.metadata())
    b.add_remote(a.metadata())
    n = nbytes // blk
    lp = a.prep("", DescList.strided("DRAM", src.ctypes.data, blk, n, blk))
    rp = a.prep("b", DescList.strided("DRAM", dst.ctypes.data, blk, n, blk))
    return a, b, src, dst, lp, rp


def _loopback(agent: Agent) -> LoopbackBackend:
    b = agent.backend("LOOPBACK")
    assert isinstance(b, LoopbackBackend)
    return b


def test_takes_indices_follows_the_override() -> None:
    """Backend.takes_indices is set for subclasses that override prepare_indexed, only."""
    assert LoopbackBackend.takes_indices
    assert not Backend.takes_indices

    class Plain(LoopbackBackend):
        pass

    assert Plain.takes_indices  # inherited override


def test_state_is_built_once_per_list_and_backend(make_agent: MakeAgent) -> None:
    """prep_side runs once per (list, backend); every make after that reuses the state."""
    a, _b, src, dst, lp, rp = _indexed_pair(make_agent)
    lb = _loopback(a)
    rng = np.random.default_rng(5)
    n = len(lp)
    for _ in range(4):
        li, ri = rng.permutation(n)[:40], rng.permutation(n)[:40]
        dst[:] = 0
        with a.make("WRITE", lp, li, rp, ri) as req:
            assert req.desc_count == 40
            assert req.total_bytes == 40 * 256
            req.post()
            assert req.wait(10) is XferStatus.DONE
        np.testing.assert_array_equal(dst.reshape(n, 256)[ri], src.reshape(n, 256)[li])
    assert lb.sides_prepped == 2
    assert lb.indexed_made == 4


def test_consecutive_indices_take_the_merging_path(make_agent: MakeAgent) -> None:
    """Indices that run consecutively in both lists merge on the host, as without the hooks."""
    a, _b, src, dst, lp, rp = _indexed_pair(make_agent)
    lb = _loopback(a)
    every = np.arange(len(lp))
    req = a.make("WRITE", lp, every, rp, every)
    assert req.desc_count == 1
    assert lb.indexed_made == 0
    unmerged = a.make("WRITE", lp, every, rp, every, merge=False)
    assert unmerged.desc_count == len(lp)
    assert lb.indexed_made == 1
    unmerged.post()
    assert unmerged.wait(10) is XferStatus.DONE
    np.testing.assert_array_equal(dst, src)


def test_states_are_rebuilt_after_deregistration(make_agent: MakeAgent) -> None:
    """A deregistration anywhere in the local section makes cached local states stale."""
    a, _b, _src, _dst, lp, rp = _indexed_pair(make_agent)
    lb = _loopback(a)
    li = np.array([3, 1, 2])
    a.make("WRITE", lp, li, rp, li).release()
    assert lb.sides_prepped == 2
    other = np.zeros(4096, np.uint8)
    a.register(other)
    a.make("WRITE", lp, li, rp, li).release()
    assert lb.sides_prepped == 2  # a new registration leaves existing lists valid
    a.deregister(DescList.from_tuples([(other.ctypes.data, other.nbytes, 0)], "DRAM"))
    a.make("WRITE", lp, li, rp, li).release()
    assert lb.sides_prepped == 3  # the local list's state was rebuilt; the peer's still holds


def test_release_hands_states_back(make_agent: MakeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    """Releasing a prepared list passes its cached state to Backend.release_side."""
    a, _b, _src, _dst, lp, rp = _indexed_pair(make_agent)
    freed: list[Any] = []
    monkeypatch.setattr(_loopback(a), "release_side", freed.append)
    li = np.array([5, 0])
    a.make("READ", lp, li, rp, li).release()
    lp.release()
    assert len(freed) == 1
    lp.release()  # idempotent
    assert len(freed) == 1


def test_without_state_make_takes_the_plain_path(make_agent: MakeAgent) -> None:
    """prep_side returning None (LOOPBACK's default) leaves make exactly as before."""
    a = make_agent("plain")
    src = np.arange(4096, dtype=np.uint8)
    dst = np.zeros(4096, np.uint8)
    a.register(src)
    a.register(dst)
    lp = a.prep("", DescList.strided("DRAM", src.ctypes.data, 64, 64, 64))
    rp = a.prep("plain", DescList.strided("DRAM", dst.ctypes.data, 64, 64, 64))
    idx = np.random.default_rng(1).permutation(64)
    with a.make("WRITE", lp, idx, rp, idx) as req:
        req.post()
        assert req.wait(10) is XferStatus.DONE
    assert _loopback(a).indexed_made == 0
    np.testing.assert_array_equal(dst, src)


def test_stream_post_refused_with_backend_name(make_agent: MakeAgent) -> None:
    """post(stream=) on a backend without stream order raises before anything starts."""
    a = make_agent("s")
    src = np.arange(1024, dtype=np.uint8)
    dst = np.zeros(1024, np.uint8)
    a.register(src)
    a.register(dst)
    d = [(src.ctypes.data, 1024, 0)]
    with a.create("WRITE", d, [(dst.ctypes.data, 1024, 0)], "s", mem_types=("DRAM", "DRAM")) as r:
        with pytest.raises(NotSupportedError, match="LOOPBACK"):
            r.post(stream=0)
        with pytest.raises(NotSupportedError, match="LOOPBACK"):
            a.post(r, stream=0)
        assert r.status is XferStatus.PENDING
        assert r.error is None
        with pytest.raises(NotSupportedError, match="LOOPBACK"):
            r.completion_event()
        assert a.post(r) in (XferStatus.DONE, XferStatus.IN_PROGRESS)
        assert r.wait(10) is XferStatus.DONE
    np.testing.assert_array_equal(dst, src)
    with pytest.raises(NotPostedError):
        _ = r.backend_request


def test_backend_request_is_public(make_agent: MakeAgent) -> None:
    """XferRequest.backend_request is the backend's own request object."""
    a = make_agent("p")
    buf = np.zeros(512, np.uint8)
    a.register(buf)
    d = [(buf.ctypes.data, 256, 0)]
    r = a.create("WRITE", d, [(buf.ctypes.data + 256, 256, 0)], "p", mem_types=("DRAM", "DRAM"))
    assert r.backend_request.path == r.path
    r.release()
