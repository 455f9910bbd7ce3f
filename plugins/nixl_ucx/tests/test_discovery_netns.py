"""Discovery through etcd across three "hosts": network namespaces E (etcd, router), A and B.

E has a veth to A (198.18.1.1/30 - 198.18.1.2) and one to B (198.18.2.1/30 - 198.18.2.2),
forwards between them, and A and B route everything through E: A and B reach etcd and each
other only through E, over TCP (198.18.0.0/15 is the benchmark range: nothing outside this
machine). etcd runs in E. The two agents (``discovery_host.py``, one process per namespace)
know only the etcd endpoint and each other's names.

The story, with its timings recorded (``-s`` prints them):

1. both publish, fetch each other by name, and A moves data both ways (WRITE and READ of
   scattered blocks), verified by digests;
2. B is SIGKILLed: its keys vanish from etcd when its lease expires (within TTL + 1 s); A,
   polling ``check_remote`` every 10 ms, drops it within TTL + 1 s; A's prepared lists to B
   and a request posted after the kill raise ``StaleHandleError``;
3. B starts again under the same name: A, neither restarted nor asked to fetch, loads the new
   incarnation through its watch, prepares again, and transfers verify;
4. B is SIGKILLed while A posts transfers back to back: the transfer in flight ends in
   ``RemoteDisconnectError`` and A drops B at once.

It needs root, iproute2 and the ``etcd`` binary (and etcd3gw); without them it is skipped with
the reason, unless ``NIXL_REQUIRE_ETCD=1``: then it fails. The namespaces (and with them the
veths) and every process are removed whatever happens.

The test process itself lives outside the three namespaces; what it says to etcd (the health
check when starting it, the key queries) it says from a thread that joined E's namespace
(``setns`` changes the network namespace of the calling thread only).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

HOST = Path(__file__).with_name("discovery_host.py")
NBLK, BLK = 1024, 4096
TTL = 2.0
#: Slack over the TTL for a dead agent's keys to vanish and its peer to drop it.
SLACK = 1.0
E_A, A_E = "198.18.1.1", "198.18.1.2"
E_B, B_E = "198.18.2.1", "198.18.2.2"
SEED_A, SEED_B1, SEED_B2 = 11, 22, 33
CLONE_NEWNET = 0x40000000

_T = TypeVar("_T")


def _missing(reason: str) -> None:
    if os.environ.get("NIXL_REQUIRE_ETCD") == "1":
        pytest.fail(f"{reason}, and NIXL_REQUIRE_ETCD=1", pytrace=False)
    pytest.skip(reason)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _ns_exec(ns: str, *cmd: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True, timeout=30)


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_netns(ns: str, fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(*args)`` on a thread inside namespace ``ns`` and return its result.

    Sockets it opens stay in ``ns`` (a pooled connection keeps working from any thread).
    """
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            out["value"] = fn(*args)
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, name=f"in-netns-{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    value: _T = out["value"]
    return value


def _wait_running(*links: tuple[str, str]) -> None:
    """Wait (bounded) until each veth end has carrier: UCX ignores interfaces not RUNNING."""
    deadline = time.monotonic() + 10
    for ns, dev in links:
        while True:
            flags = subprocess.run(
                ["ip", "-n", ns, "-o", "link", "show", "dev", dev],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
            if "LOWER_UP" in flags and ",UP" in flags:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"veth {dev} in {ns} never came up: {flags}")
            time.sleep(0.02)


@pytest.fixture
def topology() -> Iterator[dict[str, str]]:
    """Namespaces E, A, B; veths E-A and E-B; E forwards; A and B route through E."""
    if shutil.which("ip") is None:
        _missing("iproute2 (`ip`) is not installed: apt-get install iproute2")
    if os.geteuid() != 0:
        _missing("creating network namespaces needs root")
    from nixl_core.testing.etcd import etcd_binary

    if etcd_binary() is None:
        _missing("no etcd binary on PATH (Debian: apt-get install etcd-server)")
    if importlib.util.find_spec("etcd3gw") is None:
        _missing("etcd3gw is not installed (pip install etcd3gw)")
    tag = uuid.uuid4().hex[:6]
    t = {
        "E": f"nxe-{tag}",
        "A": f"nxa-{tag}",
        "B": f"nxb-{tag}",
        "ea": f"nxea{tag}",  # E's end towards A
        "ae": f"nxae{tag}",  # A's end towards E
        "eb": f"nxeb{tag}",
        "be": f"nxbe{tag}",
    }
    made: list[str] = []
    try:
        try:
            for k in "EAB":
                _ip("netns", "add", t[k])
                made.append(t[k])
        except subprocess.CalledProcessError as exc:
            _missing(f"cannot create network namespaces here: {exc.stderr.decode().strip()}")
        for near, far, ns_far in (("ea", "ae", "A"), ("eb", "be", "B")):
            _ip("link", "add", t[near], "netns", t["E"], "type", "veth", "peer", "name", t[far])
            _ip("link", "set", t[far], "netns", t[ns_far])
        for ns, dev, addr in (
            ("E", "ea", f"{E_A}/30"),
            ("E", "eb", f"{E_B}/30"),
            ("A", "ae", f"{A_E}/30"),
            ("B", "be", f"{B_E}/30"),
        ):
            _ip("-n", t[ns], "addr", "add", addr, "dev", t[dev])
            _ip("-n", t[ns], "link", "set", t[dev], "up")
        for ns in "EAB":
            _ip("-n", t[ns], "link", "set", "lo", "up")
        _ns_exec(t["E"], "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _ip("-n", t["A"], "route", "add", "default", "via", E_A)
        _ip("-n", t["B"], "route", "add", "default", "via", E_B)
        _wait_running((t["E"], t["ea"]), (t["E"], t["eb"]), (t["A"], t["ae"]), (t["B"], t["be"]))
        yield t
    finally:
        for ns in made:  # a namespace's veths go with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


class HostProc:
    """One ``discovery_host.py`` in a namespace, with its stdout lines on a queue."""

    def __init__(self, ns: str, argv: list[str]) -> None:
        self.name = argv[0]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(HOST), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump_out, daemon=True),
            threading.Thread(target=self._pump_err, daemon=True),
        ]
        for th in self._threads:
            th.start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def read(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """The next line, which must be ``event``."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"{self.name}: no {event!r} within {timeout} s\n{self.log()}")
        if line is None:
            rc = self.proc.wait(10)
            pytest.fail(f"{self.name} ended (exit {rc}) before {event!r}\n{self.log()}")
        msg: dict[str, Any] = json.loads(line)
        if msg.get("event") != event:
            pytest.fail(f"{self.name}: wanted {event!r}, got {msg}\n{self.log()}")
        return msg

    def send(self, cmd: str, **kw: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()

    def call(self, cmd: str, event: str, timeout: float = 30.0, **kw: object) -> dict[str, Any]:
        self.send(cmd, **kw)
        return self.read(event, timeout)

    def log(self) -> str:
        return "".join(self.stderr[-40:])

    def kill(self) -> float:
        """SIGKILL the agent; returns ``time.monotonic()`` just after the signal."""
        os.kill(self.proc.pid, signal.SIGKILL)
        t = time.monotonic()
        self.proc.wait(10)
        return t

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send("exit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        for th in self._threads:
            th.join(5)


def _pattern(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, NBLK * BLK, dtype=np.uint8)


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes()).hexdigest()


def _expect(seed_init: int, seed_target: int, xseed: int) -> tuple[str, str]:
    """(digest of the target's written half, digest of what the initiator read)."""
    wperm = np.random.default_rng(xseed).permutation(NBLK)
    rperm = np.random.default_rng(xseed + 1).permutation(NBLK)
    written = np.empty((NBLK, BLK), np.uint8)
    written[wperm] = _pattern(seed_init).reshape(NBLK, BLK)
    read = _pattern(seed_target).reshape(NBLK, BLK)[rperm]
    return _digest(written), _digest(read)


def _exchange(a: HostProc, b: HostProc, seed_b: int, xseed: int) -> dict[str, Any]:
    tag = f"x{xseed}"
    b.send("digest", tag=tag)
    done = a.call("xfer", "xfer", tag=tag, seed=xseed)
    got = b.read("digest")
    want_dst, want_read = _expect(SEED_A, seed_b, xseed)
    assert got["dst"] == want_dst, "B: the blocks A wrote differ"
    assert done["read"] == want_read, "A: the blocks read from B differ"
    assert "tcp" in str(done["path"]), f"data went over {done['path']}, not TCP"
    return done


def _wait_gone(store: Any, agent: str, timeout: float) -> float:
    """Poll etcd (every 10 ms) until no key of ``agent`` is left; returns when."""
    deadline = time.monotonic() + timeout
    while True:
        if store.get(agent, "") is None and store.get(agent, "metadata") is None:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"keys of {agent!r} still in etcd {timeout} s after the kill")
        time.sleep(0.01)


def test_discovery_kill_and_restart(topology: dict[str, str]) -> None:
    """Publish/fetch by name through etcd, data both ways, kill -> drop, restart -> heal."""
    from nixl_core.discovery.etcd import EtcdStore
    from nixl_core.testing.etcd import EtcdServer

    t = topology
    ns_e = t["E"]
    server = EtcdServer(host=E_A, cmd_prefix=["ip", "netns", "exec", ns_e])
    hosts: list[HostProc] = []
    store: EtcdStore | None = None
    timings: dict[str, float] = {}
    try:
        in_netns(ns_e, server.start)
        url = f"etcd://{server.endpoint}"
        namespace = "/nixl/agents/"
        store = EtcdStore(server.endpoint, namespace=namespace, ttl=TTL)

        def host(ns: str, name: str, peer: str, dev: str, seed: int) -> HostProc:
            argv = [name, peer, dev, url, str(TTL), str(seed), str(NBLK), str(BLK)]
            h = HostProc(t[ns], argv)
            hosts.append(h)
            return h

        # 1. discovery by name, data both ways
        a = host("A", "A", "B", t["ae"], SEED_A)
        b = host("B", "B", "A", t["be"], SEED_B1)
        a_ready, b_ready = a.read("ready", 60), b.read("ready", 60)
        a.send("fetch")
        b.send("fetch")
        fa, fb = a.read("fetched"), b.read("fetched")
        assert fa["inc"] == b_ready["inc"] and fb["inc"] == a_ready["inc"]
        keys = in_netns(ns_e, lambda: {e.name for e in store.agents()})
        assert {"A", "B"} <= keys, keys
        _exchange(a, b, SEED_B1, 100)

        # 2. SIGKILL B: keys vanish, A drops B, A's lists to B are stale
        a.call("watch_drop", "watching", timeout=TTL + 10)
        killed = b.kill()
        gone = in_netns(ns_e, _wait_gone, store, "B", TTL + 5)
        dropped = a.read("dropped", TTL + 10)
        timings["kill -> B's keys gone from etcd"] = gone - killed
        timings["kill -> A drops B"] = dropped["t_drop"] - killed
        assert timings["kill -> B's keys gone from etcd"] <= TTL + SLACK, timings
        assert timings["kill -> A drops B"] <= TTL + SLACK, timings
        errors = dropped["errors"]
        assert errors["make"] is not None and errors["make"]["type"] == "StaleHandleError", errors
        assert errors["post"] is not None and errors["post"]["type"] == "StaleHandleError", errors

        # 3. B again, same name: A loads the new incarnation by its watch and transfers heal
        a.send("wait_peer", timeout=30)
        restarted = time.monotonic()
        b = host("B", "B", "A", t["be"], SEED_B2)
        b2_ready = b.read("ready", 60)
        assert b2_ready["inc"] != b_ready["inc"]
        seen = a.read("peer", 30)
        assert seen["inc"] == b2_ready["inc"], "A loaded another incarnation than B's new one"
        b.call("fetch", "fetched")
        done = _exchange(a, b, SEED_B2, 200)
        timings["B's publish call (new process: lease, 2 puts)"] = (
            b2_ready["t_published"] - b2_ready["t_publish"]
        )
        timings["B's publish call -> A loads the new incarnation"] = (
            seen["t_seen"] - b2_ready["t_publish"]
        )
        timings["B's restart -> A loads it"] = seen["t_seen"] - restarted
        timings["B's restart -> transfers verified again"] = done["t_done"] - restarted

        # 4. SIGKILL B while A posts transfers: the one in flight fails typed, A drops B
        a.call("xfer_loop", "looping", timeout=20)
        killed = b.kill()
        end = a.read("loop_end", 20)
        timings["kill under traffic -> transfer error"] = end["t_err"] - killed
        assert end["error"]["type"] == "RemoteDisconnectError", end
        assert end["loaded"] is False, "A kept B loaded after a transfer to it disconnected"
        assert timings["kill under traffic -> transfer error"] <= TTL + SLACK, timings
        a.send("exit")
        assert a.proc.wait(20) == 0, a.log()
    finally:
        for h in hosts:
            h.close()
        if store is not None:
            store.close()
        server.close()
        for k, v in timings.items():
            print(f"{k}: {v * 1000:.0f} ms")
