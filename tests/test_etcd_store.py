"""EtcdStore against a real etcd (the ``nixl_etcd`` fixture; skipped without an etcd binary)."""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from nixl_core import MetadataStoreError, NotAllowedError
from nixl_core.discovery.store import MetadataStore, StoreEvent, label_key, store_from_env
from nixl_core.errors import BackendUnavailableError, InvalidParamError
from nixl_core.testing.etcd import EtcdFixture, EtcdServer, etcd_binary

if os.environ.get("NIXL_REQUIRE_ETCD") == "1":
    import etcd3gw
else:
    etcd3gw = pytest.importorskip("etcd3gw")
from nixl_core.discovery.etcd import EtcdStore, parse_endpoints


def until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``pred`` until true; the seconds it took. Fails after ``timeout``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.01)
    return time.monotonic() - t0


def raw(env: EtcdFixture) -> etcd3gw.Etcd3Client:
    """An etcd3gw client going behind the store's back."""
    host, port = env.endpoint.rsplit(":", 1)
    return etcd3gw.Etcd3Client(host=host, port=int(port), api_path="/v3/", timeout=5)


def lease_ttl(env: EtcdFixture, lease: int) -> int:
    """Seconds left on ``lease``, -1 if it is gone (etcd3gw's Lease.ttl() fails on 0)."""
    resp = raw(env).post(raw(env).get_url("/kv/lease/timetolive"), json={"ID": lease})
    return int(resp.get("TTL", 0))


def events_of(store: EtcdStore, agent: str) -> tuple[queue.Queue[StoreEvent], Callable[[], None]]:
    q: queue.Queue[StoreEvent] = queue.Queue()
    return q, store.watch(agent, q.put)


def take(q: queue.Queue[StoreEvent], n: int, timeout: float) -> list[StoreEvent]:
    deadline = time.monotonic() + timeout
    out = []
    for _ in range(n):
        out.append(q.get(timeout=max(0.0, deadline - time.monotonic())))
    return out


def store_threads(prefix: str = "nixl-etcd") -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port held bound but not listening: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# -- basics ------------------------------------------------------------------------------------


def test_publish_get_round_trip(nixl_etcd: EtcdFixture) -> None:
    """A published value reads back, binary and under a non-ASCII agent name."""
    store = nixl_etcd.store()
    assert isinstance(store, MetadataStore)
    assert (store.kind, store.expires, store.pushes) == ("etcd", True, True)
    blob = bytes(range(256)) * 4
    store.publish("agent-ä", "metadata", blob)
    assert store.get("agent-ä", "metadata") == blob
    assert store.get("agent-ä", "missing") is None
    assert store.get("nobody", "metadata") is None
    store.publish("agent-ä", "metadata", b"v2")
    assert store.get("agent-ä", "metadata") == b"v2"


def test_announcement_key(nixl_etcd: EtcdFixture) -> None:
    """The first publish also writes ``<ns>/<agent>/``: b"" until label "" is published."""
    store = nixl_etcd.store()
    ns = nixl_etcd.namespace
    store.publish("a", "metadata", b"m")
    client = raw(nixl_etcd)
    ann = label_key(ns, "a", "").encode()
    assert client.get(ann) == [b""]
    (_, meta), *_ = client.get(ann, metadata=True)
    assert int(meta["lease"]) == store.lease_id
    store.publish("a", "", b"hello")
    assert store.get("a", "") == b"hello"
    store.publish("b", "", b"only")  # label "" first: the announcement is that value
    assert client.get(label_key(ns, "b", "").encode()) == [b"only"]


def test_wait_returns_a_key_published_later(nixl_etcd: EtcdFixture) -> None:
    """wait() for a key another thread publishes 0.3 s later returns it promptly."""
    store = nixl_etcd.store()
    other = nixl_etcd.store()
    timer = threading.Timer(0.3, other.publish, ("late", "metadata", b"here"))
    t0 = time.monotonic()
    timer.start()
    try:
        assert store.wait("late", "metadata", 10.0) == b"here"
    finally:
        timer.join()
    assert 0.25 < time.monotonic() - t0 < 3.0
    assert store.wait("late", "metadata", 0.0) == b"here"  # present: no wait at all


def test_wait_on_missing_key_times_out(nixl_etcd: EtcdFixture) -> None:
    """wait() on a key nobody publishes returns None after about the timeout, leaving no
    thread and no socket behind."""
    store = nixl_etcd.store()
    store.get("x", "y")  # the session's pooled connection exists before counting
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    t0 = time.monotonic()
    assert store.wait("ghost", "metadata", 0.5) is None
    took = time.monotonic() - t0
    assert 0.45 <= took < 2.0
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) == fds
    assert store.wait("ghost", "metadata", 0.0) is None


def test_wait_ignores_deletes_and_sees_the_put(nixl_etcd: EtcdFixture) -> None:
    """A delete of the awaited key does not end the wait; the next put does."""
    store = nixl_etcd.store()
    client = raw(nixl_etcd)
    key = label_key(nixl_etcd.namespace, "w", "metadata")

    def churn() -> None:
        client.put(key, b"first")
        client.delete(key)
        time.sleep(0.1)
        client.put(key, b"second")

    # the key is put and deleted before wait's read, or after it (wait sees "first")
    timer = threading.Timer(0.2, churn)
    timer.start()
    try:
        assert store.wait("w", "metadata", 10.0) in (b"first", b"second")
    finally:
        timer.join()


# -- leases ------------------------------------------------------------------------------------

_PUBLISHER = """
import sys
from nixl_core.discovery.etcd import EtcdStore
store = EtcdStore(sys.argv[1], namespace=sys.argv[2], ttl=2)
store.publish("crash", "metadata", b"meta-value")
store.publish("crash", "notif", b"notif-value")
print(store.lease_id, flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(60)
def test_lease_expires_after_a_crash(nixl_etcd: EtcdFixture) -> None:
    """A publisher SIGKILLed (no revoke, no more keep-alives): its keys vanish within ttl+1 s
    and a watcher sees delete events carrying the previous values."""
    watcher = nixl_etcd.store()
    q, cancel = events_of(watcher, "crash")
    with subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER, nixl_etcd.endpoint, nixl_etcd.namespace],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        lease = int(proc.stdout.readline())
        puts = take(q, 3, 10.0)
        assert {(e.kind, e.label) for e in puts} == {
            ("put", ""),
            ("put", "metadata"),
            ("put", "notif"),
        }
        assert watcher.get("crash", "metadata") == b"meta-value"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        dels = take(q, 3, 2.0 + 1.0 + 0.5)
        gone = time.monotonic() - killed
        cancel()
    assert gone <= 2.0 + 1.0, gone
    assert {(e.kind, e.label, e.value, e.prev) for e in dels} == {
        ("delete", "", None, b""),
        ("delete", "metadata", None, b"meta-value"),
        ("delete", "notif", None, b"notif-value"),
    }
    assert watcher.get("crash", "metadata") is None
    assert lease_ttl(nixl_etcd, lease) == -1


@pytest.mark.timeout(60)
def test_keepalive_keeps_keys_beyond_three_ttls(nixl_etcd: EtcdFixture) -> None:
    """With ttl=1 the keys are still there after 3.5 s, with nothing deleted meanwhile."""
    store = nixl_etcd.store(ttl=1)
    store.publish("alive", "metadata", b"m")
    q, cancel = events_of(nixl_etcd.store(), "alive")
    with pytest.raises(queue.Empty):
        q.get(timeout=3.5)  # no event at all: no expiry
    cancel()
    assert store.get("alive", "metadata") == b"m"
    assert store.lease_id is not None
    assert lease_ttl(nixl_etcd, store.lease_id) >= 0


@pytest.mark.timeout(60)
def test_lost_lease_is_replaced_and_keys_put_again(
    nixl_etcd: EtcdFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """The lease revoked behind the store's back: within ttl/3 + 1 s the keep-alive grants a
    new one and puts every key again (one warning for the loss)."""
    store = nixl_etcd.store(ttl=2)
    store.publish("phoenix", "metadata", b"m")
    store.publish("phoenix", "notif", b"n")
    old = store.lease_id
    assert old is not None
    q, cancel = events_of(nixl_etcd.store(), "phoenix")
    caplog.set_level(logging.WARNING, logger="nixl_core.discovery.etcd")
    etcd3gw.Lease(old, raw(nixl_etcd)).revoke()
    t0 = time.monotonic()
    dels = take(q, 3, 2.0)
    assert {e.kind for e in dels} == {"delete"}
    puts = take(q, 3, 2.0 / 3 + 1.0)
    took = time.monotonic() - t0
    cancel()
    assert took < 2.0 / 3 + 1.0 + 0.5, took
    assert {(e.kind, e.label, e.value) for e in puts} == {
        ("put", "", b""),
        ("put", "metadata", b"m"),
        ("put", "notif", b"n"),
    }
    assert store.lease_id not in (None, old)
    assert store.get("phoenix", "notif") == b"n"
    lost = [r for r in caplog.records if "lost" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in caplog.records]


def test_publish_after_lease_loss_puts_everything_again(nixl_etcd: EtcdFixture) -> None:
    """A publish that finds its lease gone (before the keep-alive did) replaces it and puts
    every key again, the new one included."""
    store = nixl_etcd.store(ttl=30)  # keep-alive every 10 s: the publish notices first
    store.publish("p", "metadata", b"m")
    old = store.lease_id
    assert old is not None
    etcd3gw.Lease(old, raw(nixl_etcd)).revoke()
    store.publish("p", "notif", b"n")
    assert store.lease_id not in (None, old)
    assert store.get("p", "metadata") == b"m"
    assert store.get("p", "notif") == b"n"
    assert store.get("p", "") == b""


# -- remove, close, watch ----------------------------------------------------------------------


def test_remove_and_close_delete_keys(nixl_etcd: EtcdFixture) -> None:
    """remove() revokes the lease when only that agent is under it, else deletes the agent's
    prefix (also for an agent another store published); close() revokes; both idempotent."""
    a = nixl_etcd.store()
    a.publish("one", "metadata", b"1")
    a.publish("two", "metadata", b"2")
    a.remove("one")  # two shares the lease: prefix delete
    assert a.get("one", "metadata") is None and a.get("one", "") is None
    assert a.get("two", "metadata") == b"2"
    lease = a.lease_id
    a.remove("two")  # the last agent: lease revoked
    assert a.get("two", "metadata") is None
    assert a.lease_id is None
    assert lease is not None and lease_ttl(nixl_etcd, lease) == -1
    a.publish("two", "metadata", b"again")  # a new lease
    assert a.lease_id not in (None, lease)

    b = nixl_etcd.store()
    b.remove("two")  # not b's: prefix delete
    assert a.get("two", "metadata") is None
    b.remove("never-published")

    c = nixl_etcd.store()
    c.publish("three", "metadata", b"3")
    c.close()
    c.close()
    assert a.get("three", "metadata") is None
    with pytest.raises(NotAllowedError, match="closed"):
        c.publish("three", "metadata", b"3")
    with pytest.raises(NotAllowedError):
        c.watch("three", print)


def test_close_stops_threads_promptly(nixl_etcd: EtcdFixture) -> None:
    """close() ends the keep-alive and the watch threads without waiting out their periods."""
    before = set(store_threads())
    store = EtcdStore(nixl_etcd.endpoint, namespace=nixl_etcd.namespace, ttl=30)
    store.publish("t", "metadata", b"m")
    store.watch("t", lambda e: None)
    store.watch("u", lambda e: None)
    assert len(set(store_threads()) - before) == 3
    t0 = time.monotonic()
    store.close()
    assert time.monotonic() - t0 < 1.0
    assert set(store_threads()) <= before


def test_watch_events_cancel_and_callback_errors(
    nixl_etcd: EtcdFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Watch events map to StoreEvent (prev on overwrite and delete); a raising callback is
    logged and the watch goes on; cancel (idempotent) stops callbacks and the thread."""
    pub = nixl_etcd.store()
    watcher = nixl_etcd.store()
    seen: queue.Queue[StoreEvent] = queue.Queue()
    calls = 0

    def callback(ev: StoreEvent) -> None:
        nonlocal calls
        calls += 1
        seen.put(ev)
        if calls == 1:
            raise RuntimeError("boom in callback")

    before = set(store_threads("nixl-etcd-watch"))
    cancel = watcher.watch("w", callback)
    pub.publish("w", "metadata", b"v1")
    pub.publish("w", "metadata", b"v2")
    pub.publish("other", "metadata", b"not this agent")
    pub.remove("w")
    evs = take(seen, 5, 5.0)
    assert [(e.kind, e.agent, e.label, e.value, e.prev) for e in evs[:3]] == [
        ("put", "w", "", b"", None),
        ("put", "w", "metadata", b"v1", None),
        ("put", "w", "metadata", b"v2", b"v1"),
    ]
    assert {(e.kind, e.agent, e.label, e.value, e.prev) for e in evs[3:]} == {
        ("delete", "w", "", None, b""),
        ("delete", "w", "metadata", None, b"v2"),
    }
    assert any("callback raised" in r.getMessage() for r in caplog.records)
    assert len(set(store_threads("nixl-etcd-watch")) - before) == 1
    cancel()
    cancel()
    assert set(store_threads("nixl-etcd-watch")) <= before
    pub.publish("w", "metadata", b"after cancel")
    witness, cancel2 = events_of(watcher, "w")
    pub.publish("w", "notif", b"seen by the witness")
    take(witness, 1, 5.0)
    cancel2()
    assert seen.empty()


# -- endpoints and failures --------------------------------------------------------------------


def test_first_endpoint_dead_second_works(nixl_etcd: EtcdFixture, dead_port: int) -> None:
    """With a refused first endpoint every operation goes to the second, which is remembered."""
    store = nixl_etcd.store(endpoints=f"127.0.0.1:{dead_port},http://{nixl_etcd.endpoint}/")
    store.publish("fo", "metadata", b"m")
    assert store.get("fo", "metadata") == b"m"
    assert store.wait("fo", "metadata", 1.0) == b"m"
    q, cancel = events_of(store, "fo")
    store.publish("fo", "notif", b"n")
    assert take(q, 1, 5.0)[0].value == b"n"
    cancel()
    assert [a.name for a in store.agents()] == ["fo"]
    assert store._current == 1


def test_host_name_endpoint(nixl_etcd: EtcdFixture) -> None:
    """A host name (localhost) works for unary calls and watch streams alike."""
    port = nixl_etcd.server.port
    store = nixl_etcd.store(endpoints=f"http://localhost:{port}")
    q, cancel = events_of(store, "h")
    store.publish("h", "metadata", b"m")
    assert store.wait("h", "metadata", 1.0) == b"m"
    assert [e.label for e in take(q, 2, 5.0)] == ["", "metadata"]
    cancel()


def test_ipv6_endpoint() -> None:
    """etcd on [::1]: publish, get, wait and watch through a bracketed IPv6 endpoint."""
    if etcd_binary() is None:
        pytest.skip("no etcd binary on PATH")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with EtcdServer(host="::1") as server:
        assert server.endpoint.startswith("[::1]:")
        with EtcdStore(server.endpoint, namespace="/v6", ttl=2) as store:
            q, cancel = events_of(store, "six")
            store.publish("six", "metadata", b"m")
            assert store.get("six", "metadata") == b"m"
            assert store.wait("six", "missing", 0.2) is None
            assert [e.label for e in take(q, 2, 5.0)] == ["", "metadata"]
            cancel()


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "localhost",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:70000",
        "127.0.0.1:23x",
        "300.1.1.1:2379",
        "::1:2379",
        "[::1]",
        "[::1:2379",
        "[not-v6]:2379",
        "https://127.0.0.1:2379",
        "bad_host!:2379",
        "127.0.0.1:2379,,127.0.0.2:2379",
        "http://127.0.0.1:2379/v3",
    ],
)
def test_bad_endpoint_syntax(spec: str) -> None:
    """A malformed endpoint raises InvalidParamError naming it."""
    with pytest.raises(InvalidParamError, match="etcd endpoint") as info:
        EtcdStore(spec)
    assert info.value.param == "endpoints"


def test_good_endpoint_syntax() -> None:
    """IPv4, bracketed IPv6, host names, http://, a trailing slash, spaces around commas."""
    eps = parse_endpoints(
        "http://127.0.0.1:2379, [::1]:2380 ,etcd-0.etcd.svc:1/,HTTP://[fe80::1]:9"
    )
    assert [(e.host, e.port) for e in eps] == [
        ("127.0.0.1", 2379),
        ("::1", 2380),
        ("etcd-0.etcd.svc", 1),
        ("fe80::1", 9),
    ]
    assert [str(e) for e in eps][1] == "[::1]:2380"
    with pytest.raises(InvalidParamError, match="ttl"):
        EtcdStore("127.0.0.1:1", ttl=0)


def test_unreachable_endpoint_raises_typed_error(dead_port: int) -> None:
    """Refused: every operation raises MetadataStoreError at once, naming endpoint and
    operation."""
    store = EtcdStore(f"127.0.0.1:{dead_port}", namespace="/x", ttl=2, timeout=1.0)
    ops: dict[str, Callable[[], object]] = {
        "publish": lambda: store.publish("a", "metadata", b"m"),
        "get": lambda: store.get("a", "metadata"),
        "wait": lambda: store.wait("a", "metadata", 5.0),
        "watch": lambda: store.watch("a", print),
        "agents": store.agents,
        "remove": lambda: store.remove("a"),
    }
    for op, fn in ops.items():
        t0 = time.monotonic()
        with pytest.raises(MetadataStoreError, match=f"127.0.0.1:{dead_port}") as info:
            fn()
        assert time.monotonic() - t0 < 1.0
        assert info.value.operation in (op, "grant lease"), info.value
        assert "refused" in str(info.value).lower()
    store.close()


def test_silent_endpoint_times_out(dead_port: int) -> None:
    """An endpoint that accepts but never answers: the request timeout bounds each call, and
    a dead first endpoint plus a silent second fails within both."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes connects; nobody reads or answers
        port = silent.getsockname()[1]
        store = EtcdStore(f"127.0.0.1:{dead_port},127.0.0.1:{port}", ttl=2, timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(MetadataStoreError, match="timed out") as info:
            store.get("a", "metadata")
        assert time.monotonic() - t0 < 2.0
        assert info.value.operation == "get"
        store.close()


def test_missing_client_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without etcd3gw the store says what to install."""
    monkeypatch.setitem(sys.modules, "etcd3gw", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'nixl-core\[etcd\]'"):
        EtcdStore("127.0.0.1:2379")


def test_store_from_env_selects_etcd(nixl_etcd: EtcdFixture) -> None:
    """NIXL_ETCD_ENDPOINTS selects an EtcdStore on those endpoints and namespace."""
    env = {"NIXL_ETCD_ENDPOINTS": nixl_etcd.endpoint, "NIXL_ETCD_NAMESPACE": nixl_etcd.namespace}
    store = store_from_env(env, ttl=3)
    assert isinstance(store, EtcdStore)
    try:
        assert (store.endpoint, store.namespace, store.ttl) == (
            nixl_etcd.endpoint,
            nixl_etcd.namespace,
            3,
        )
        store.publish("env", "metadata", b"m")
        assert store.get("env", "metadata") == b"m"
    finally:
        store.close()


def test_agents_lists_names_labels_and_ttl(nixl_etcd: EtcdFixture) -> None:
    """agents() groups keys by agent, with the lease's time left (None without a lease)."""
    a = nixl_etcd.store(ttl=5)
    b = nixl_etcd.store(ttl=30)
    a.publish("alpha", "metadata", b"A")
    a.publish("alpha", "notif", b"N")
    b.publish("beta", "", b"ann")
    raw(nixl_etcd).put(label_key(nixl_etcd.namespace, "gamma", "metadata").encode(), b"G")
    raw(nixl_etcd).put((nixl_etcd.namespace + "/no-slash-after").encode(), b"skip")
    entries = a.agents()
    assert [e.name for e in entries] == ["alpha", "beta", "gamma"]
    alpha, beta, gamma = entries
    assert alpha.values == {"": b"", "metadata": b"A", "notif": b"N"}
    assert beta.values == {"": b"ann"}
    assert gamma.values == {"metadata": b"G"}
    assert alpha.ttl is not None and 3 <= alpha.ttl <= 5
    assert beta.ttl is not None and 27 <= beta.ttl <= 30
    assert gamma.ttl is None


def test_concurrent_calls(nixl_etcd: EtcdFixture) -> None:
    """Publishes, gets and waits from several threads at once all succeed."""
    store = nixl_etcd.store()
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(20):
                store.publish(f"c{i}", f"l{j}", f"{i}-{j}".encode())
                assert store.get(f"c{i}", f"l{j}") == f"{i}-{j}".encode()
            assert store.wait(f"c{(i + 1) % 4}", "l19", 10.0) == f"{(i + 1) % 4}-19".encode()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store.agents()) == 4


# -- an etcd restart ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_watch_survives_an_etcd_restart(caplog: pytest.LogCaptureFixture) -> None:
    """etcd stopped and started again (same port, same data): the watch is re-created from the
    revision after the last one seen, so a change made while it was down is reported too."""
    if etcd_binary() is None:
        pytest.skip("no etcd binary on PATH")
    with EtcdServer() as server:
        pub = EtcdStore(server.endpoint, namespace="/r", ttl=10)
        watcher = EtcdStore(server.endpoint, namespace="/r", ttl=10)
        try:
            q, cancel = events_of(watcher, "r")
            pub.publish("r", "metadata", b"before")
            assert [e.value for e in take(q, 2, 5.0)] == [b"", b"before"]
            server.stop()
            with pytest.raises(MetadataStoreError):
                pub.get("r", "metadata")
            server.start()
            pub.publish("r", "metadata", b"after")  # perhaps before the watch is back
            ev = take(q, 1, 5.0)[0]
            assert (ev.kind, ev.label, ev.value, ev.prev) == (
                "put",
                "metadata",
                b"after",
                b"before",
            )
            pub.publish("r", "notif", b"later")
            assert take(q, 1, 5.0)[0].value == b"later"
            assert any("broke" in r.getMessage() for r in caplog.records)
            cancel()
        finally:
            pub.close()
            watcher.close()
