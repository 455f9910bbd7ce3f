"""PyTorch's TCPStore as a metadata store (NIXL 1.4's TCPStore backend, for deployments that
already run one: vLLM, NIXL-EP).

Keys follow NIXL: ``nixl/agents/<label>/<agent>/NULL_AGENT``; the announcement (label "") is
``nixl/agents//<agent>/NULL_AGENT``. A TCPStore has no leases and no watches, so:

- a crashed agent's keys stay until someone deletes them; a cleanly closed agent deletes its
  own (:meth:`TorchTCPStore.close`). Peers learn of a crash through the transport, or through
  the next incarnation's announcement (which the service's watch turns into a drop);
- :meth:`~TorchTCPStore.wait` and :meth:`~TorchTCPStore.watch` poll (``check``/``get`` are one
  round trip each, ~0.2-0.4 ms on loopback).

torch is imported when a store is made, never at module import.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from nixl_core.discovery.store import AgentEntry, StoreEvent
from nixl_core.errors import BackendUnavailableError, InvalidParamError, MetadataStoreError

__all__ = ["TorchTCPStore"]

logger = logging.getLogger(__name__)

_ROOT = "nixl/agents"
#: Answer of a read of a missing key (no sealed value starts like this).
_MISSING = b"\0nixl-py: no such key\0"


def _key(label: str, agent: str) -> str:
    return f"{_ROOT}/{label}/{agent}/NULL_AGENT"


class TorchTCPStore:
    """A :class:`~nixl_core.discovery.store.MetadataStore` over a ``torch.distributed.TCPStore``
    client.

    Args:
        endpoint: ``host:port`` of the TCPStore master.
        timeout: seconds a connect or a request may take.
        poll: seconds between the reads of a watch.

    Raises:
        InvalidParamError: the endpoint cannot be parsed.
        BackendUnavailableError: torch is not installed.
        MetadataStoreError: the master cannot be reached within ``timeout``.
    """

    kind = "tcpstore"
    expires = False
    pushes = False

    def __init__(self, endpoint: str, *, timeout: float = 30.0, poll: float = 0.5) -> None:
        host, sep, port = endpoint.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidParamError(f"TCPStore endpoint {endpoint!r} is not host:port")
        try:
            tcp_store: Any = importlib.import_module("torch.distributed").TCPStore
        except ImportError:
            raise BackendUnavailableError(
                "the TCPStore metadata store needs torch (pip install torch)"
            ) from None
        self.endpoint = f"{host}:{port}"
        self.namespace = _ROOT
        self.poll = poll
        self._lock = threading.Lock()  # one client connection: one request at a time
        try:
            self._store: Any = tcp_store(
                host,
                int(port),
                is_master=False,
                timeout=datetime.timedelta(seconds=timeout),
                wait_for_workers=False,
            )
        except Exception as exc:  # torch's DistNetworkError and friends
            raise MetadataStoreError(
                f"cannot reach the TCPStore at {self.endpoint}: {str(exc).splitlines()[0]}"
            ) from None
        self._published: dict[str, set[str]] = {}  # agent -> labels this store wrote
        self._watches: dict[int, tuple[str, Callable[[StoreEvent], None], dict[str, bytes]]] = {}
        self._next_watch = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            with self._lock:
                return fn(*args)
        except Exception as exc:
            raise MetadataStoreError(
                f"TCPStore {self.endpoint}: {what} failed: {str(exc).splitlines()[0]}"
            ) from None

    def _read(self, agent: str, label: str) -> bytes | None:
        # compare_set with a marker no value holds: one round trip that answers the marker for a
        # missing key and never blocks (check-then-get waits out the store timeout when the key
        # is deleted in between).
        key = _key(label, agent)
        value = bytes(self._call(f"get {key}", self._store.compare_set, key, _MISSING, _MISSING))
        return None if value == _MISSING else value

    # ------------------------------------------------------------------ protocol
    def publish(self, agent: str, label: str, value: bytes) -> None:
        """Store the value (no lease: it stays until removed)."""
        self._call(f"set {_key(label, agent)}", self._store.set, _key(label, agent), value)
        self._published.setdefault(agent, set()).add(label)

    def get(self, agent: str, label: str) -> bytes | None:
        """The value, or None."""
        return self._read(agent, label)

    def wait(self, agent: str, label: str, timeout: float) -> bytes | None:
        """Poll for the value (1 ms, backing off to 50 ms) until ``timeout``."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            value = self._read(agent, label)
            if value is not None:
                return value
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.wait(min(delay, left)):
                return None
            delay = min(delay * 2, 0.05)

    def _labels(self, agent: str | None = None) -> dict[str, set[str]]:
        keys: list[str] = self._call("list keys", self._store.list_keys)
        out: dict[str, set[str]] = {}
        for k in keys:
            parts = k.split("/")
            ours = len(parts) == 5 and k.startswith(_ROOT + "/") and parts[4] == "NULL_AGENT"
            if ours and (agent is None or parts[3] == agent):
                out.setdefault(parts[3], set()).add(parts[2])
        return out

    def remove(self, agent: str) -> None:
        """Delete every key of the agent."""
        labels = self._labels(agent).get(agent, set()) | self._published.pop(agent, set())
        for label in labels:
            self._call(f"delete {_key(label, agent)}", self._store.delete_key, _key(label, agent))

    def watch(self, agent: str, callback: Callable[[StoreEvent], None]) -> Callable[[], None]:
        """Report changes of the agent's keys, read every ``poll`` s."""
        with self._lock:
            wid = self._next_watch
            self._next_watch += 1
        seen = self._snapshot(agent)
        self._watches[wid] = (agent, callback, seen)
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                thread = threading.Thread(
                    target=self._poll_loop, name="nixl-md-tcpstore", daemon=True
                )
                thread.start()
                self._thread = thread  # only once started: close() may join it at any time

        def cancel() -> None:
            self._watches.pop(wid, None)

        return cancel

    def _snapshot(self, agent: str) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for label in self._labels(agent).get(agent, set()):
            value = self._read(agent, label)
            if value is not None:
                out[label] = value
        return out

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll):
            for wid, (agent, callback, seen) in list(self._watches.items()):
                try:
                    now = self._snapshot(agent)
                except MetadataStoreError as exc:
                    logger.debug("TCPStore watch of %s: %s", agent, exc)
                    continue
                events = [
                    StoreEvent("delete", agent, lbl, None, seen[lbl]) for lbl in seen.keys() - now
                ] + [
                    StoreEvent("put", agent, lbl, v, seen.get(lbl))
                    for lbl, v in now.items()
                    if seen.get(lbl) != v
                ]
                seen.clear()
                seen.update(now)
                for ev in events:
                    if wid not in self._watches:
                        break
                    try:
                        callback(ev)
                    except Exception:
                        logger.exception("TCPStore watch callback for %s failed", agent)

    def agents(self) -> list[AgentEntry]:
        """Every agent under ``nixl/agents`` (no TTLs: TCPStore has no leases)."""
        out = []
        for agent, labels in sorted(self._labels().items()):
            values = {lbl: v for lbl in labels if (v := self._read(agent, lbl)) is not None}
            out.append(AgentEntry(agent, values, None))
        return out

    def close(self) -> None:
        """Stop the watches and delete the keys this store published (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._watches.clear()
        for agent in list(self._published):
            try:
                self.remove(agent)
            except MetadataStoreError as exc:
                logger.warning("closing: %s", exc)
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5.0)
