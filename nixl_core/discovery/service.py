"""The metadata service an agent uses to publish, fetch and invalidate metadata.

One asynchronous interface over two routes, as in NIXL: a call with ``addr=(host, port)`` goes
over the socket side channel to that peer's listener; a call without goes to the agent's
name-addressed store (etcd or TCPStore, :mod:`nixl_core.discovery.store`). Every call returns an
:class:`MdOp` at once; the work runs on the service's worker threads, and a failure is a typed
exception raised by :meth:`MdOp.wait` and by the agent's ``check_remote`` for that peer — never
a hang: every network step has a timeout.

What it adds to NIXL:

- **Incarnations.** Every blob carries its agent's incarnation id. Metadata of a known name with
  another incarnation is a restarted agent: the old copy is dropped (its prepared lists raise
  :class:`~nixl_core.errors.StaleHandleError`, its in-flight requests end in
  :class:`~nixl_core.errors.RemoteDisconnectError`) and the new one loaded, never merged.
- **Leases and watches.** With etcd, an agent's keys live under a lease kept alive by the
  store, so a killed agent's keys vanish within the TTL. A peer fetched from the store is
  watched: a deletion or expiry of its keys (of the incarnation loaded) drops it; a new
  incarnation's announcement drops the old one; its metadata published again (same
  incarnation: additive, new regions become visible; a new incarnation: replaced) is loaded
  without anyone asking, so a survivor heals when its peer restarts.
- **Authentication.** With a shared key (``AgentConfig.md_key`` or ``NIXL_MD_KEY``) every
  frame and store value is HMAC-SHA256 tagged, and untagged or badly tagged ones are dropped.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from nixl_core.discovery.sealed import (
    Frame,
    Kind,
    key_from,
    named_payload,
    open_frame,
    parse_named,
    seal,
)
from nixl_core.discovery.side_channel import DEFAULT_MAX_FRAME, Channel, Listener, expect
from nixl_core.discovery.store import (
    DEFAULT_LABEL,
    DEFAULT_TTL,
    MetadataStore,
    StoreEvent,
    label_key,
    store_from_env,
)
from nixl_core.errors import (
    InvalidParamError,
    MetadataError,
    MetadataTimeoutError,
    NixlError,
    NotSupportedError,
)
from nixl_core.metadata import AgentMetadata

if TYPE_CHECKING:
    from nixl_core.agent import Agent

__all__ = ["MdOp", "MetadataService"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
Addr = tuple[str, int]


class MdOp:
    """One metadata operation in progress (publish, fetch or invalidate).

    Attributes:
        what: what it does, for messages (``"fetch 'prefill-0' from etcd"``).
    """

    __slots__ = ("_future", "what")

    def __init__(self, what: str, future: cf.Future[Any]) -> None:
        self.what = what
        self._future = future

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "running"
        return f"MdOp({self.what}, {state})"

    def done(self) -> bool:
        """True once it finished, successfully or not."""
        return self._future.done()

    @property
    def error(self) -> BaseException | None:
        """Its exception once it failed, else None."""
        if not self._future.done() or self._future.cancelled():
            return None
        return self._future.exception()

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for it and return its result (a fetch: the peer's name).

        Raises:
            MetadataTimeoutError: still running after ``timeout`` s (it keeps running).
            NixlError: its own failure (typed: MetadataTimeoutError, MetadataError,
                RemoteDisconnectError, MetadataStoreError, ...).
        """
        try:
            return self._future.result(timeout)
        except cf.TimeoutError:
            raise MetadataTimeoutError(f"{self.what} still running after {timeout} s") from None
        except cf.CancelledError:
            raise MetadataTimeoutError(f"{self.what} was cancelled: the agent closed") from None


class _Watched:
    """A peer fetched from the store: its watch and the labels loaded from it."""

    __slots__ = ("cancel", "labels")

    def __init__(self) -> None:
        self.labels: set[str] = set()
        self.cancel: Callable[[], None] | None = None


class MetadataService:
    """Publishes this agent's metadata and fetches peers' (see the module docstring).

    Args:
        agent: the agent it serves.
        listen: run the side-channel listener.
        host: the listener's address (127.0.0.1 unless given).
        port: the listener's port (0: a free one, logged).
        store: a store, an endpoint URL (``etcd://h:p[,h:p]``, ``tcpstore://h:p``), or None
            for NIXL's environment variables (none set: no store; store calls then raise).
        namespace: etcd key namespace (None: ``NIXL_ETCD_NAMESPACE`` or NIXL's default).
        ttl: lease TTL of this agent's keys, seconds.
        timeout: default seconds a fetch waits for a peer's metadata to appear.
        key: shared HMAC key (None: ``NIXL_MD_KEY``, else no authentication).
        max_frame: largest side-channel frame accepted.
    """

    def __init__(
        self,
        agent: Agent,
        *,
        listen: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        store: MetadataStore | str | None = None,
        namespace: str | None = None,
        ttl: float = DEFAULT_TTL,
        timeout: float = 5.0,
        key: bytes | str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        if ttl <= 0 or timeout <= 0:
            raise InvalidParamError(f"md ttl ({ttl}) and timeout ({timeout}) must be positive")
        self._agent = agent
        self.key = key_from(key)
        self.ttl = ttl
        self.timeout = timeout
        self._namespace = namespace
        self._store_spec = store
        self._store: MetadataStore | None = store if isinstance(store, MetadataStore) else None
        self._store_lock = threading.Lock()
        self._lock = threading.Lock()
        self._closed = False
        name = agent.name
        self._fetches: dict[str, MdOp] = {}  # latest fetch per peer name
        self._watched: dict[str, _Watched] = {}
        self._pool = cf.ThreadPoolExecutor(4, thread_name_prefix=f"nixl-md-{name}")
        self._serial = cf.ThreadPoolExecutor(1, thread_name_prefix=f"nixl-md-out-{name}")
        self._inbox = cf.ThreadPoolExecutor(1, thread_name_prefix=f"nixl-md-in-{name}")
        self._channel = Channel(self.key, max_frame, timeout)
        self._announced = False
        self.listener: Listener | None = None
        if listen:
            self.listener = Listener(
                self._on_frame, host, port, key=self.key, max_frame=max_frame, name=name
            )

    # ------------------------------------------------------------------ plumbing
    @property
    def listen_port(self) -> int | None:
        """The listener's port, or None without one."""
        return self.listener.port if self.listener is not None else None

    @property
    def store(self) -> MetadataStore:
        """The name-addressed store, created on first use.

        Raises:
            InvalidParamError: no store is configured (neither ``md_store`` nor NIXL's
                environment variables), or both NIXL variables are set.
        """
        with self._store_lock:
            if self._store is None:
                self._store = self._open_store()
            return self._store

    def _open_store(self) -> MetadataStore:
        spec = self._store_spec
        if isinstance(spec, str):
            scheme, sep, rest = spec.partition("://")
            if sep and scheme == "etcd":
                env = {"NIXL_ETCD_ENDPOINTS": rest}
            elif sep and scheme == "tcpstore":
                env = {"NIXL_TCPSTORE_ENDPOINT": rest}
            else:
                raise InvalidParamError(
                    f"md_store {spec!r}: expected etcd://host:port[,host:port] or "
                    "tcpstore://host:port"
                )
            found = store_from_env(env, ttl=self.ttl, namespace=self._namespace)
        else:
            found = store_from_env(ttl=self.ttl, namespace=self._namespace)
        if found is None:
            raise InvalidParamError(
                f"agent {self._agent.name!r} has no metadata store: give an address (the peer's "
                "listener) or configure one (AgentConfig.md_store, NIXL_ETCD_ENDPOINTS or "
                "NIXL_TCPSTORE_ENDPOINT)"
            )
        return found

    def _submit(
        self,
        pool: cf.ThreadPoolExecutor,
        what: str,
        fn: Callable[..., _T],
        *args: Any,
        inline: bool = False,
    ) -> MdOp:
        """Run ``fn`` on a worker, or (``inline``: the caller waits anyway) right here."""
        if self._closed:
            raise NotSupportedError(f"cannot {what}: agent {self._agent.name!r} is closed")
        if not inline:
            return MdOp(what, pool.submit(fn, *args))
        fut: cf.Future[Any] = cf.Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:
            fut.set_exception(exc)
        return MdOp(what, fut)

    def _context(self, agent: str, label: str) -> bytes:
        return label_key(self.store.namespace, agent, label).encode()

    # ------------------------------------------------------------------ publish
    def publish(
        self,
        descs: Any = None,
        *,
        label: str | None = None,
        conn_info: bool = True,
        backends: Sequence[str] | None = None,
        addr: Addr | None = None,
    ) -> MdOp:
        """Publish this agent's metadata: full (``descs`` None) or partial.

        The blob is taken now (a snapshot of the registrations); sending it runs on a worker.
        Partial metadata holds ``descs`` (each exactly a registration, possibly empty) and,
        with ``conn_info``, the connection info; to a store it needs a ``label`` (full
        metadata goes under ``metadata``). Over the side channel the label is not used.

        Raises:
            InvalidParamError: partial metadata to a store without a label, or a bad label.
            NotFoundError: a descriptor is not exactly a registration (names it).
        """
        a = self._agent
        if descs is None:
            blob = a.metadata()
            lbl = label or DEFAULT_LABEL
        else:
            if addr is None and not label:
                raise InvalidParamError("partial metadata published to a store needs a label")
            blob = a.partial_metadata(descs, conn_info, backends)
            lbl = label or DEFAULT_LABEL
        _check_label(lbl)
        if addr is not None:
            frame = seal(Kind.LOAD, blob, self.key)
            where = f"{addr[0]}:{addr[1]}"
            return self._submit(
                self._serial, f"send metadata to {where}", self._channel.send, addr, frame
            )
        store = self.store
        what = f"publish {a.name!r}/{lbl} to {store.kind}"
        return self._submit(self._serial, what, self._publish_store, lbl, blob)

    def _publish_store(self, label: str, blob: bytes) -> None:
        a = self._agent
        store = self.store
        if not self._announced:
            value = seal(
                Kind.ANNOUNCE,
                named_payload(a.incarnation, a.name),
                self.key,
                self._context(a.name, ""),
            )
            store.publish(a.name, "", value)
            self._announced = True
        store.publish(a.name, label, seal(Kind.VALUE, blob, self.key, self._context(a.name, label)))

    # ------------------------------------------------------------------ fetch
    def fetch(
        self,
        name: str | None,
        *,
        label: str | None = None,
        addr: Addr | None = None,
        timeout: float | None = None,
        wait: bool = False,
    ) -> MdOp:
        """Fetch a peer's metadata and load it; returns at once unless ``wait``.

        From a store the peer is found by ``name`` (and ``label``, default ``metadata``),
        waiting up to ``timeout`` s for it to be published, then watched (see the module
        docstring). Over the side channel (``addr``) the peer's listener replies with its full
        metadata; ``name``, when given, must be the name it replies with.

        Args:
            name: the peer's name (may be None only with ``addr``).
            label: the label to fetch from a store.
            addr: (host, port) of the peer's listener.
            timeout: seconds (default: the service's ``timeout``).
            wait: block until loaded, raising the failure.

        Raises:
            InvalidParamError: no name for a store fetch, this agent's own name, a bad label.
            (with ``wait``) whatever the operation raises: MetadataTimeoutError,
                MetadataError, RemoteDisconnectError, MetadataStoreError, PluginError.
        """
        t = self.timeout if timeout is None else timeout
        if name is not None and name == self._agent.name:
            raise InvalidParamError(f"agent {name!r} cannot fetch its own metadata")
        if addr is not None:
            where = f"{addr[0]}:{addr[1]}"
            op = self._submit(
                self._pool,
                f"fetch {name or 'metadata'!r} from {where}",
                self._fetch_p2p,
                name,
                addr,
                t,
                inline=wait,
            )
        else:
            if not name:
                raise InvalidParamError("a fetch from a store needs the peer's name")
            lbl = label or DEFAULT_LABEL
            _check_label(lbl)
            store = self.store
            op = self._submit(
                self._pool,
                f"fetch {name!r}/{lbl} from {store.kind}",
                self._fetch_store,
                name,
                lbl,
                t,
                inline=wait,
            )
        if name is not None:
            with self._lock:
                self._fetches[name] = op
        if wait:
            op.wait()
        return op

    def _fetch_p2p(self, name: str | None, addr: Addr, timeout: float) -> str:
        where = f"the metadata listener at {addr[0]}:{addr[1]}"
        reply = self._channel.request(addr, seal(Kind.SEND, b"", self.key), timeout)
        md = AgentMetadata.decode(expect(reply, Kind.LOAD, where))
        if name is not None and md.name != name:
            raise MetadataError(f"asked {where} for agent {name!r}; it is agent {md.name!r}")
        return self._agent._load_metadata(md)

    def _fetch_store(self, name: str, label: str, timeout: float) -> str:
        store = self.store
        value = store.wait(name, label, timeout)
        if value is None:
            raise MetadataTimeoutError(
                f"no metadata of agent {name!r} under label {label!r} in {store.kind} "
                f"{store.endpoint} within {timeout} s"
            )
        md = self._open_value(name, label, value)
        with self._lock:
            watched = self._watched.get(name)
            if watched is None:
                watched = self._watched[name] = _Watched()
            watched.labels.add(label)
            start = watched.cancel is None
        self._agent._load_metadata(md)
        if start:  # before returning: a change made after the fetch must reach the watch
            self._start_watch(name, watched)
        return name

    def _start_watch(self, name: str, watched: _Watched) -> None:
        def on_event(ev: StoreEvent) -> None:
            if not self._closed:
                self._inbox.submit(self._on_store_event, ev)

        if self._closed:
            return
        try:
            cancel = self.store.watch(name, on_event)
        except NixlError as exc:
            if not self._closed:  # (a store closed meanwhile refuses: nothing to report)
                logger.warning("agent %s: cannot watch %s: %s", self._agent.name, name, exc)
            return
        with self._lock:
            kept = self._watched.get(name) is watched and watched.cancel is None
            if kept:
                watched.cancel = cancel
        if not kept:  # forgotten (or closed), or another fetch's watch won
            cancel()

    def _open_value(self, name: str, label: str, value: bytes) -> AgentMetadata:
        frame = open_frame(value, self.key, self._context(name, label))
        if frame.kind is not Kind.VALUE:
            raise MetadataError(f"key {name!r}/{label} holds a {frame.kind.name}, not metadata")
        md = AgentMetadata.decode(frame.payload)
        if md.name != name:
            raise MetadataError(f"key of agent {name!r} holds the metadata of agent {md.name!r}")
        return md

    def _incarnation_of(self, name: str, label: str, value: bytes) -> bytes | None:
        frame = open_frame(value, self.key, self._context(name, label))
        if frame.kind is Kind.ANNOUNCE:
            inc, who = parse_named(frame.payload)
            return inc if who == name else None
        if frame.kind is Kind.VALUE:
            return AgentMetadata.decode(frame.payload).incarnation
        return None

    def _on_store_event(self, ev: StoreEvent) -> None:
        """A watched peer's key changed (runs on the inbox thread)."""
        a = self._agent
        with self._lock:
            watched = self._watched.get(ev.agent)
            labels = set(watched.labels) if watched is not None else set()
        if watched is None:
            return
        loaded = a._remote_incarnation(ev.agent)
        try:
            if ev.kind == "put" and ev.value is not None:
                if ev.label == "":
                    inc = self._incarnation_of(ev.agent, "", ev.value)
                    if loaded is not None and inc is not None and inc != loaded:
                        a._invalidate_remote(
                            ev.agent,
                            loaded,
                            "restarted (a new incarnation announced itself in the store)",
                        )
                elif ev.label in labels:
                    a._load_metadata(self._open_value(ev.agent, ev.label, ev.value))
            elif ev.kind == "delete" and loaded is not None:
                inc = (
                    self._incarnation_of(ev.agent, ev.label, ev.prev)
                    if ev.prev is not None
                    else loaded
                )
                if inc == loaded:
                    store = self.store
                    a._invalidate_remote(
                        ev.agent,
                        loaded,
                        f"is gone: its {store.kind} keys were deleted or "
                        f"expired ({ev.label or 'announcement'} key)",
                    )
        except NixlError as exc:
            logger.warning(
                "agent %s: store event for %s/%s not applied: %s", a.name, ev.agent, ev.label, exc
            )

    # ------------------------------------------------------------------ invalidate
    def invalidate(self, *, addr: Addr | None = None) -> MdOp:
        """Withdraw this agent's metadata: from the store (every label; peers watching drop
        it) or, with ``addr``, tell that peer's listener to forget this agent."""
        a = self._agent
        if addr is not None:
            frame = seal(Kind.INVL, named_payload(a.incarnation, a.name), self.key)
            return self._submit(
                self._serial, f"invalidate at {addr[0]}:{addr[1]}", self._channel.send, addr, frame
            )
        store = self.store
        return self._submit(
            self._serial, f"invalidate {a.name!r} in {store.kind}", self._remove_store
        )

    def _remove_store(self) -> None:
        self.store.remove(self._agent.name)
        self._announced = False

    # ------------------------------------------------------------------ listener side
    def _on_frame(self, frame: Frame, peer: Addr) -> bytes | None:
        """A frame from the listener (runs on its thread; loads go to the inbox)."""
        a = self._agent
        if frame.kind is Kind.SEND:
            try:
                return seal(Kind.LOAD, a.metadata(), self.key)
            except NixlError as exc:
                return seal(Kind.NACK, str(exc).encode(), self.key)
        if frame.kind is Kind.LOAD:
            md = AgentMetadata.decode(frame.payload)
            if md.name == a.name:
                raise MetadataError(f"LOAD of this agent's own metadata from {peer[0]}")
            self._inbox.submit(self._load_logged, md, peer)
            return None
        if frame.kind is Kind.INVL:
            inc, who = parse_named(frame.payload)
            self._inbox.submit(a._invalidate_remote, who, inc, "invalidated its metadata", False)
            return None
        raise MetadataError(f"{frame.kind.name} is not a side-channel command")

    def _load_logged(self, md: AgentMetadata, peer: Addr) -> None:
        try:
            self._agent._load_metadata(md)
        except NixlError as exc:
            logger.warning(
                "agent %s: metadata of %s sent by %s not loaded: %s",
                self._agent.name,
                md.name,
                peer[0],
                exc,
            )

    # ------------------------------------------------------------------ agent hooks
    def raise_failed(self, name: str) -> None:
        """Raise (once) the failure of the latest fetch of ``name``, if it failed."""
        with self._lock:
            op = self._fetches.get(name)
            if op is None or not op.done() or op.error is None:
                return
            del self._fetches[name]
        err = op.error
        assert err is not None
        raise err

    def forget(self, name: str) -> None:
        """Stop watching ``name`` (the agent was told to remove it)."""
        with self._lock:
            watched = self._watched.pop(name, None)
            self._fetches.pop(name, None)
        if watched is not None and watched.cancel is not None:
            watched.cancel()

    def close(self) -> None:
        """Stop the listener, the watches and the workers; close the store (its lease goes, so
        this agent's keys vanish and peers drop it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.listener is not None:
            self.listener.close()
        with self._lock:
            watched = list(self._watched.values())
            self._watched.clear()
        for w in watched:
            if w.cancel is not None:
                w.cancel()
        for pool in (self._pool, self._serial, self._inbox):
            pool.shutdown(wait=False, cancel_futures=True)
        with self._store_lock:
            store = self._store
        if store is not None:
            try:
                store.close()
            except NixlError as exc:
                logger.warning("closing the %s store: %s", store.kind, exc)
        self._channel.close()


def _check_label(label: str) -> None:
    if not label or "/" in label or len(label.encode()) > 256:
        raise InvalidParamError(f"label {label!r} must be 1..256 bytes without '/'")
