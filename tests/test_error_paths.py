"""Error paths keep their state: what a backend reports or raises leaves the agent consistent.

A scripted backend plays the failures: each test sets what its next call does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from nixl_core import (
    Agent,
    Backend,
    BackendRequest,
    DescList,
    MemType,
    PluginError,
    RegistrationError,
    RemoteDisconnectError,
    StaleHandleError,
    TransferCanceledError,
    TransferError,
    XferStatus,
)
from nixl_core._plugins import get_plugin_manager


class _Req(BackendRequest):
    def __init__(self) -> None:
        self.path = "scripted"
        self.error = None


class Scripted(Backend):
    """A backend whose next answers the test decides (``then`` / ``raise_*`` attributes)."""

    name = "SCRIPTED"
    mem_types = frozenset({MemType.DRAM})
    supports_local = True
    supports_remote = True
    supports_notif = True

    def __init__(self, agent_name: str, params: Any = None) -> None:
        super().__init__(agent_name, params)
        self.then: tuple[XferStatus, BaseException | None] = (XferStatus.DONE, None)
        self.raise_on: dict[str, BaseException] = {}
        self.short_handles = False
        self.deregistered: list[Any] = []

    def _maybe_raise(self, what: str) -> None:
        exc = self.raise_on.pop(what, None)
        if exc is not None:
            raise exc

    def register(self, mem_type: MemType, rows: Any, metas: Sequence[bytes]) -> list[Any]:
        self._maybe_raise("register")
        handles = [("h", int(a)) for a in rows[:, 0]]
        return handles[:-1] if self.short_handles else handles

    def deregister(self, handles: Sequence[Any]) -> None:
        self.deregistered.extend(handles)

    def public_data(self, handle: Any) -> bytes:
        return b"k"

    def connection_info(self) -> bytes:
        return b"c"

    def load_remote_conn(self, peer: str, info: bytes) -> None:
        pass

    def load_remote(self, peer: str, mem_type: MemType, rows: Any, blobs: Any) -> list[Any]:
        return [("r", int(a)) for a in rows[:, 0]]

    def prepare(self, op: Any, local: Any, remote: Any, peer: str) -> BackendRequest:
        self._maybe_raise("prepare")
        return _Req()

    def post(self, req: BackendRequest, notif: bytes | None) -> XferStatus:
        self._maybe_raise("post")
        return XferStatus.IN_PROGRESS

    def poll(self, req: BackendRequest) -> XferStatus:
        self._maybe_raise("poll")
        st, err = self.then
        req.error = err
        return st

    def release(self, req: BackendRequest) -> None:
        self._maybe_raise("release")


@pytest.fixture
def pair() -> Iterator[tuple[Agent, Agent, Scripted, np.ndarray, np.ndarray]]:
    """Two agents on the scripted backend, b loaded into a, one buffer registered on each."""
    get_plugin_manager().registry.add(Scripted)
    a, b = Agent("a", backends=["SCRIPTED"]), Agent("b", backends=["SCRIPTED"])
    src, dst = np.zeros(4096, np.uint8), np.zeros(4096, np.uint8)
    a.register(src)
    b.register(dst)
    a.add_remote(b.metadata())
    sa = a.backend("SCRIPTED")
    assert isinstance(sa, Scripted)
    yield a, b, sa, src, dst
    a.close()
    b.close()


def _req(a: Agent, src: np.ndarray, dst: np.ndarray) -> Any:
    return a.create("WRITE", [(src.ctypes.data, 4096, 0)], [(dst.ctypes.data, 4096, 0)], "b",
                    mem_types=("DRAM", "DRAM"))  # fmt: skip


def test_repost_finding_a_failed_run_raises_its_error(pair: Any) -> None:
    """Reposting a request whose run failed unseen raises that failure (never a silent repost);
    the request is in ERROR with it, and the next post is the explicit reset."""
    a, _b, sb, src, dst = pair
    req = _req(a, src, dst)
    assert req.post() is XferStatus.IN_PROGRESS
    boom = TransferError("disk on fire")
    sb.then = (XferStatus.ERROR, boom)
    with pytest.raises(TransferError, match="disk on fire"):
        req.post()
    assert req.status is XferStatus.ERROR and req.error is boom
    with pytest.raises(TransferError, match="disk on fire"):
        req.check()
    sb.then = (XferStatus.DONE, None)
    assert req.post() is XferStatus.IN_PROGRESS and req.error is None
    assert req.wait(1.0) is XferStatus.DONE


def test_release_keeps_the_error_of_a_failed_run(pair: Any) -> None:
    """A request that failed while in flight and is then released is ERROR with its exception."""
    a, _b, sb, src, dst = pair
    req = _req(a, src, dst)
    req.post()
    sb.then = (XferStatus.ERROR, TransferError("lost"))
    req.release()
    assert req.status is XferStatus.ERROR
    assert isinstance(req.error, TransferError) and "lost" in str(req.error)


def test_release_in_flight_is_canceled_with_a_reason(pair: Any) -> None:
    """Released while still running: ERROR with a TransferCanceledError, never error=None."""
    a, _b, sb, src, dst = pair
    req = _req(a, src, dst)
    req.post()
    sb.then = (XferStatus.IN_PROGRESS, None)
    req.release()
    assert req.status is XferStatus.ERROR and isinstance(req.error, TransferCanceledError)


def test_disconnect_seen_by_release_runs_the_failure_path(pair: Any) -> None:
    """The failure path (dropping a disconnected peer) runs whichever call sees the error."""
    a, _b, sb, src, dst = pair
    req = _req(a, src, dst)
    req.post()
    sb.then = (XferStatus.ERROR, RemoteDisconnectError("peer b died"))
    req.release()
    assert "b" not in a.remote_agents


def test_error_without_a_reason_is_named(pair: Any) -> None:
    """A backend that says ERROR but sets no error still yields a TransferError with a message."""
    a, _b, sb, src, dst = pair
    req = _req(a, src, dst)
    req.post()
    sb.then = (XferStatus.ERROR, None)
    with pytest.raises(TransferError, match="without a reason"):
        req.wait(1.0)
    assert req.error is not None


@pytest.mark.parametrize("call", ["post", "poll", "prepare"])
def test_foreign_exceptions_become_transfer_errors(pair: Any, call: str) -> None:
    """A native error or bug escaping post/poll/prepare is a TransferError naming the backend,
    chained to the original; the request (when there is one) is in ERROR."""
    a, _b, sb, src, dst = pair
    sb.raise_on[call] = RuntimeError("cuda driver said no")
    match = r"backend SCRIPTED failed to .*cuda driver said no"
    if call == "prepare":
        with pytest.raises(TransferError, match=match) as err:
            _req(a, src, dst)
        assert isinstance(err.value.__cause__, RuntimeError)
        return
    req = _req(a, src, dst)
    if call == "poll":
        assert req.post() is XferStatus.IN_PROGRESS
    with pytest.raises(TransferError, match=match) as err:
        req.post() if call == "post" else req.wait(1.0)
    assert isinstance(err.value.__cause__, RuntimeError)
    assert req.status is XferStatus.ERROR and req.error is err.value


def test_failing_release_still_releases(pair: Any) -> None:
    """A backend that raises in release: the request is released anyway, and the error is typed."""
    a, _b, sb, src, dst = pair
    req = _req(a, src, dst)
    sb.raise_on["release"] = ValueError("bad handle")
    with pytest.raises(TransferError, match="bad handle"):
        req.release()
    assert req.released


def test_register_foreign_error_rolls_back(pair: Any) -> None:
    """A non-nixl exception from a backend's register is a RegistrationError naming the backend
    and the region, and leaves no phantom row: the same memory registers fine afterwards."""
    a, _b, sb, _src, _dst = pair
    buf = np.zeros(8192, np.uint8)
    sb.raise_on["register"] = RuntimeError("cuMemHostRegister failed")
    with pytest.raises(RegistrationError, match=r"SCRIPTED failed to register DRAM region 0") as e:
        a.register(buf)
    assert isinstance(e.value.__cause__, RuntimeError)
    a.register(buf)
    assert len(a.registered("DRAM")) == 2


def test_register_interrupt_rolls_back(pair: Any) -> None:
    """An interrupt inside a backend's register propagates and undoes the registration."""
    a, _b, sb, _src, _dst = pair
    buf = np.zeros(8192, np.uint8)
    sb.raise_on["register"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        a.register(buf)
    a.register(buf)


def test_wrong_handle_count_is_refused_and_released(pair: Any) -> None:
    """A backend returning the wrong number of handles: PluginError, its handles are given back,
    and nothing stays registered."""
    a, _b, sb, _src, _dst = pair
    bufs = DescList.from_tuples([(0x10000, 64, 0), (0x20000, 64, 0)], "DRAM")
    sb.short_handles = True
    with pytest.raises(PluginError, match="returned 1 handles for 2 regions"):
        a.register(bufs)
    assert sb.deregistered == [("h", 0x10000)]
    sb.short_handles = False
    a.register(bufs)


def test_one_failing_backend_leaves_the_others_registered(caplog: pytest.LogCaptureFixture) -> None:
    """With two backends, one failing: the other keeps the memory (a warning names the failure)
    and transfers through it work."""
    get_plugin_manager().registry.add(Scripted)
    with Agent("a", backends=["SCRIPTED", "LOOPBACK"]) as a:
        sb = a.backend("SCRIPTED")
        assert isinstance(sb, Scripted)
        src = np.arange(4096, dtype=np.uint8)
        dst = np.zeros(4096, np.uint8)
        sb.raise_on["register"] = OSError("no pinning today")
        with caplog.at_level(logging.WARNING):
            a.register(src)
        assert "SCRIPTED failed to register" in caplog.text
        a.register(dst, backends=["LOOPBACK"])
        with a.create("WRITE", src, dst, "a") as req:
            assert req.backend_name == "LOOPBACK"
            req.post()
            assert req.wait(5.0) is XferStatus.DONE
        np.testing.assert_array_equal(src, dst)


def test_in_flight_requests_to_a_dropped_peer_end_in_typed_errors(pair: Any) -> None:
    """Requests still in flight when their peer goes end in ERROR with the reason: canceled by
    remove_remote(), disconnected when the peer restarted or invalidated itself; their lists
    and requests are stale afterwards."""
    a, b, sb, src, dst = pair
    sb.then = (XferStatus.IN_PROGRESS, None)
    req = _req(a, src, dst)
    req.post()
    a.remove_remote("b")
    assert isinstance(req.error, TransferCanceledError) and "remove_remote" in str(req.error)
    with pytest.raises(StaleHandleError, match="removed by remove_remote"):
        req.post()
    req.release()

    a.add_remote(b.metadata())
    req = _req(a, src, dst)
    req.post()
    restarted = Agent("b", backends=["SCRIPTED"])
    try:
        restarted.register(dst)
        a.add_remote(restarted.metadata())  # same name, new incarnation
        assert isinstance(req.error, RemoteDisconnectError) and "restarted" in str(req.error)
        with pytest.raises(StaleHandleError, match="restarted"):
            req.post()
        req.release()
        req = _req(a, src, dst)
        req.post()
        a._invalidate_remote("b", b.incarnation, "invalidated its metadata")  # not loaded: no-op
        assert req.error is None
        a._invalidate_remote("b", restarted.incarnation, "invalidated its metadata")
        assert isinstance(req.error, RemoteDisconnectError)
        assert "b" not in a.remote_agents
        req.release()
    finally:
        restarted.close()
