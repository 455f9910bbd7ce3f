"""PyTorch's TCPStore as the metadata store: a real master in the test, agents as clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

torch_dist = pytest.importorskip("torch.distributed")

from nixl_core import (  # noqa: E402  (after the skip: torch is optional)
    Agent,
    AgentConfig,
    DescList,
    InvalidParamError,
    MetadataStoreError,
)
from nixl_core.discovery import StoreEvent, store_from_env  # noqa: E402
from nixl_core.discovery.tcpstore import TorchTCPStore  # noqa: E402


@pytest.fixture
def master() -> Iterator[Any]:
    """A TCPStore master on a free loopback port."""
    m = torch_dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield m
    del m


def _store(master: Any, **kw: Any) -> TorchTCPStore:
    return TorchTCPStore(f"127.0.0.1:{master.port}", timeout=5.0, **kw)


def test_round_trip_wait_remove_and_listing(master: Any) -> None:
    """publish/get, wait for a value published later, a bounded wait, agents(), remove()."""
    s = _store(master)
    s.publish("b", "", b"announce")
    s.publish("b", "metadata", b"md")
    assert s.get("b", "metadata") == b"md"
    assert s.get("b", "other") is None
    threading.Timer(0.2, s.publish, ("c", "metadata", b"late")).start()
    t0 = time.monotonic()
    assert s.wait("c", "metadata", 5.0) == b"late"
    assert time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    assert s.wait("nobody", "metadata", 0.3) is None
    assert time.monotonic() - t0 < 1.5
    listed = {e.name: e for e in s.agents()}
    assert set(listed["b"].values) == {"", "metadata"} and listed["b"].ttl is None
    s.remove("b")
    assert s.get("b", "metadata") is None and s.get("b", "") is None
    s.close()
    assert s.get("c", "metadata") is None  # close deleted what it published


def test_watch_reports_puts_and_deletes(master: Any) -> None:
    """The polling watch reports a change and a deletion with the previous value; cancel stops."""
    writer, reader = _store(master), _store(master, poll=0.05)
    writer.publish("b", "metadata", b"v1")
    events: list[StoreEvent] = []
    cancel = reader.watch("b", events.append)

    def seen(kind: str, value: bytes | None = None) -> StoreEvent:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            found = [e for e in events if e.kind == kind and (value is None or e.value == value)]
            if found:
                return found[0]
            time.sleep(0.01)
        pytest.fail(f"no {kind} event: {events}")

    writer.publish("b", "metadata", b"v2")
    put = seen("put", b"v2")
    assert put.value == b"v2" and put.prev == b"v1" and put.label == "metadata"
    writer.remove("b")
    gone = seen("delete")
    assert gone.prev == b"v2" and gone.value is None
    cancel()
    n = len(events)
    writer.publish("b", "metadata", b"v3")
    time.sleep(0.3)
    assert len(events) == n
    reader.close()
    writer.close()


def test_bad_and_unreachable_endpoints() -> None:
    """Bad syntax is InvalidParamError; nobody listening is MetadataStoreError, bounded."""
    with pytest.raises(InvalidParamError, match="host:port"):
        TorchTCPStore("no-port")
    t0 = time.monotonic()
    with pytest.raises(MetadataStoreError, match=r"127\.0\.0\.1:1"):
        TorchTCPStore("127.0.0.1:1", timeout=0.5)
    assert time.monotonic() - t0 < 10


def test_env_selects_the_tcpstore(master: Any) -> None:
    """NIXL_TCPSTORE_ENDPOINT selects it; with NIXL_ETCD_ENDPOINTS too it is an error."""
    ep = f"127.0.0.1:{master.port}"
    s = store_from_env({"NIXL_TCPSTORE_ENDPOINT": ep})
    assert isinstance(s, TorchTCPStore)
    s.close()
    with pytest.raises(InvalidParamError, match="both"):
        store_from_env({"NIXL_TCPSTORE_ENDPOINT": ep, "NIXL_ETCD_ENDPOINTS": ""})


def test_agents_discover_each_other_through_it(master: Any) -> None:
    """Two agents that know only the TCPStore and a name find each other and move data."""
    cfg = AgentConfig(backends=["LOOPBACK"], md_store=f"tcpstore://127.0.0.1:{master.port}")
    with Agent("b", cfg) as b, Agent("a", cfg) as a:
        dst = np.zeros(4096, np.uint8)
        b.register(dst)
        b.publish_metadata().wait(5)
        src = np.arange(4096, dtype=np.uint8)
        a.register(src)
        a.fetch_metadata("b", wait=True)
        req = a.create(
            "WRITE",
            DescList.strided("DRAM", src.ctypes.data, 4096, 1, 4096),
            DescList.strided("DRAM", dst.ctypes.data, 4096, 1, 4096),
            "b",
        )
        req.post()
        req.wait(5)
        assert np.array_equal(src, dst)
        req.release()
