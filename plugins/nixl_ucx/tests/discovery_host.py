"""One agent of the etcd discovery test, run as a script inside a network namespace.

Usage: ``python discovery_host.py NAME PEER DEVICE ETCD_URL TTL SEED NBLK BLK``.

The agent knows only the etcd endpoint (``md_store=ETCD_URL``) and its peer's name. It
registers one buffer of ``2 * NBLK * BLK`` bytes: the first half holds the pattern of ``SEED``
(what peers read), the second half starts zeroed (where peers write). It publishes its metadata
and prints ``{"event": "ready", ...}``; then it answers JSON-line commands on stdin, one
JSON line on stdout each (errors as ``{"event": "error", ...}``):

- ``fetch``: fetch the peer's metadata from etcd by name (waiting for it to appear);
- ``xfer`` (``tag``): find the peer's buffer in the metadata loaded from etcd, prepare lists
  for both halves, WRITE its own pattern into the peer's second half in a permutation
  (notification ``tag``), READ the peer's first half into its own second half in another
  permutation; print the digest of what it read. The prepared lists and one made, unposted
  WRITE are kept for ``watch_drop``;
- ``digest`` (``tag``): wait for notification ``tag`` from the peer, print the digest of the
  second half;
- ``watch_drop``: print ``watching``, poll ``check_remote(peer)`` every 10 ms until it is False
  and print when (``time.monotonic()``, comparable across namespaces) with what the kept lists
  and request raise now;
- ``wait_peer``: poll ``check_remote(peer)`` every 10 ms until the peer is loaded again (its
  new incarnation, loaded by the metadata service's watch: no fetch here) and print it;
- ``xfer_loop``: post the kept WRITE over and over; print ``looping`` after the first one
  completes, then (the test kills the peer) print the first error, its type and when;
- ``exit``.

UCX is restricted to TCP on DEVICE (the veth end in this namespace).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from typing import Any

import numpy as np

from nixl_core.agent import Agent, AgentConfig
from nixl_core.backend import XferStatus
from nixl_core.descriptors import DescList
from nixl_core.errors import NixlError
from nixl_core.memory import MemType
from nixl_core.xfer import PreppedList, XferRequest

POLL = 0.01


def _emit(**kw: object) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes()).hexdigest()


def _err(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "msg": str(exc)}


class Host:
    """The agent and what it keeps between commands."""

    def __init__(self, argv: list[str]) -> None:
        self.name, self.peer, device, url = argv[:4]
        ttl, seed = float(argv[4]), int(argv[5])
        self.nblk, self.blk = int(argv[6]), int(argv[7])
        self.nbytes = self.nblk * self.blk
        params = {"transports": "tcp", "device_list": device}
        config = AgentConfig(
            backends=("UCX",),
            backend_params={"UCX": params},
            md_store=url,
            md_ttl=ttl,
            md_timeout=20.0,
        )
        self.agent = Agent(self.name, config)
        self.mem = np.zeros(2 * self.nbytes, np.uint8)
        self.mem[: self.nbytes] = np.random.default_rng(seed).integers(
            0, 256, self.nbytes, dtype=np.uint8
        )
        self.agent.register(self.mem)
        self.lists: dict[str, PreppedList] = {}
        self.pending: XferRequest | None = None
        self.t_publish = time.monotonic()
        self.agent.publish_metadata().wait(20)
        self.t_published = time.monotonic()

    def blocks(self, base: int, order: np.ndarray) -> DescList:
        rows = np.empty((order.size, 3), np.uint64)
        rows[:, 0] = np.uint64(base) + order.astype(np.uint64) * np.uint64(self.blk)
        rows[:, 1] = self.blk
        rows[:, 2] = 0
        return DescList.from_array(rows, "DRAM")

    def peer_base(self) -> int:
        """The address of the peer's buffer, as its metadata (loaded from etcd) says."""
        remote = self.agent._remotes[self.peer]
        rows = remote.regions.table(MemType.DRAM).rows()
        if rows.shape[0] != 1 or int(rows[0, 1]) != 2 * self.nbytes:
            raise RuntimeError(f"peer {self.peer!r} published {rows.tolist()}, not one buffer")
        return int(rows[0, 0])

    def peer_incarnation(self) -> str | None:
        inc = self.agent._remote_incarnation(self.peer)
        return inc.hex() if inc is not None else None

    # ------------------------------------------------------------------ commands
    def fetch(self, cmd: dict[str, Any]) -> dict[str, object]:
        t0 = time.monotonic()
        self.agent.fetch_metadata(self.peer, wait=True, timeout=20)
        return {"event": "fetched", "inc": self.peer_incarnation(), "s": time.monotonic() - t0}

    def xfer(self, cmd: dict[str, Any]) -> dict[str, object]:
        a, n = self.agent, self.nblk
        tag = str(cmd["tag"])
        seed = int(cmd["seed"])
        wperm = np.random.default_rng(seed).permutation(n)
        rperm = np.random.default_rng(seed + 1).permutation(n)
        base, pbase = int(self.mem.ctypes.data), self.peer_base()
        seq = np.arange(n)
        own_src = a.prep("", self.blocks(base, seq))
        own_dst = a.prep("", self.blocks(base + self.nbytes, seq))
        peer_dst = a.prep(self.peer, self.blocks(pbase + self.nbytes, wperm))
        peer_src = a.prep(self.peer, self.blocks(pbase, rperm))
        t0 = time.monotonic()
        with a.make("WRITE", own_src, seq, peer_dst, seq, notif=tag.encode()) as req:
            req.post()
            req.wait(20)
            path = req.path
        with a.make("READ", own_dst, seq, peer_src, seq) as req:
            req.post()
            req.wait(20)
        t1 = time.monotonic()
        if self.pending is not None:
            self.pending.release()
        self.lists = {"own_src": own_src, "peer_dst": peer_dst}
        self.pending = a.make("WRITE", own_src, seq, peer_dst, seq)
        read = _digest(self.mem[self.nbytes :])
        return {"event": "xfer", "read": read, "path": path, "t_done": t1, "s": t1 - t0}

    def digest(self, cmd: dict[str, Any]) -> dict[str, object]:
        tag = str(cmd["tag"]).encode()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if tag in self.agent.get_notifs().get(self.peer, []):
                return {"event": "digest", "dst": _digest(self.mem[self.nbytes :])}
            time.sleep(0.001)
        return {"event": "error", "type": "timeout", "msg": f"no notification {tag!r}"}

    def watch_drop(self, cmd: dict[str, Any]) -> dict[str, object]:
        a = self.agent
        _emit(event="watching")
        deadline = time.monotonic() + float(cmd.get("timeout", 20))
        while a.check_remote(self.peer):
            if time.monotonic() > deadline:
                return {"event": "error", "type": "timeout", "msg": "peer never dropped"}
            time.sleep(POLL)
        t_drop = time.monotonic()
        seq = np.arange(self.nblk)
        errors: dict[str, dict[str, str] | None] = {"make": None, "post": None}
        try:
            a.make("WRITE", self.lists["own_src"], seq, self.lists["peer_dst"], seq).release()
        except NixlError as exc:
            errors["make"] = _err(exc)
        assert self.pending is not None
        try:
            self.pending.post()
            self.pending.wait(5)
        except NixlError as exc:
            errors["post"] = _err(exc)
        return {"event": "dropped", "t_drop": t_drop, "errors": errors}

    def wait_peer(self, cmd: dict[str, Any]) -> dict[str, object]:
        deadline = time.monotonic() + float(cmd.get("timeout", 20))
        while not self.agent.check_remote(self.peer):
            if time.monotonic() > deadline:
                return {"event": "error", "type": "timeout", "msg": "peer never came back"}
            time.sleep(POLL)
        return {"event": "peer", "inc": self.peer_incarnation(), "t_seen": time.monotonic()}

    def xfer_loop(self, cmd: dict[str, Any]) -> dict[str, object]:
        req = self.pending
        assert req is not None
        announced = False
        deadline = time.monotonic() + float(cmd.get("timeout", 20))
        posts = 0
        while time.monotonic() < deadline:
            try:
                req.post()
                st = req.wait(5)
            except NixlError as exc:
                t_err = time.monotonic()
                return {
                    "event": "loop_end",
                    "error": _err(exc),
                    "t_err": t_err,
                    "posts": posts,
                    "loaded": self.agent.check_remote(self.peer),
                }
            posts += 1
            if st is XferStatus.DONE and not announced:
                _emit(event="looping")
                announced = True
        return {"event": "error", "type": "timeout", "msg": "transfers never failed"}


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    host = Host(sys.argv[1:])
    _emit(
        event="ready",
        inc=host.agent.incarnation.hex(),
        t_publish=host.t_publish,
        t_published=host.t_published,
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["cmd"]
        if op == "exit":
            break
        try:
            reply = getattr(host, op)(cmd)
        except NixlError as exc:
            reply = {"event": "error", **_err(exc)}
        _emit(**reply)
    host.agent.close()


if __name__ == "__main__":
    main()
