"""etcd as the metadata store: keys under one lease kept alive, changes pushed by watches.

:class:`EtcdStore` talks to etcd's JSON gateway (``/v3/``, etcd >= 3.4) over HTTP. Unary calls
(put, range, txn, lease grant/keep-alive/revoke/time-to-live) go through one
:class:`etcd3gw.Etcd3Client` per endpoint, all sharing one :class:`requests.Session` (persistent
connections; the API path is fixed, never discovered per call; proxies from the environment
are not used). Watches use a stream of their
own: a plain HTTP/1.1 connection per watch, read line by line (the gateway sends one JSON message
per line), because :class:`etcd3gw.watch.Watcher` swallows a broken stream (nothing could
re-create it), has no connect timeout and leaves an executor thread behind per watch.

Keys follow :mod:`nixl_core.discovery.store`: ``<namespace>/<agent>/<label>`` and the
announcement key ``<namespace>/<agent>/``, UTF-8 encoded (etcd3gw would encode a ``str`` key as
Latin-1, so every key is passed to etcd as bytes).

Leases: an :class:`EtcdStore` holds at most one lease, granted on its first publish with the TTL
rounded up to whole seconds (etcd may raise it to its own minimum, 1.5 election timeouts). A
daemon thread refreshes it every ``ttl / 3`` seconds. When a refresh (or a put) finds the lease
gone, the store grants a new one and puts every key it published again, logging one warning per
loss; while etcd is unreachable the refresh is retried on the same period (one warning when it
starts failing, an info line when it recovers).

Every method may block for at most the request timeout per endpoint tried (``wait`` for its own
timeout); network failures raise :class:`~nixl_core.errors.MetadataStoreError` naming the
endpoints and the operation. Methods are thread-safe.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar

from nixl_core.discovery.store import (
    DEFAULT_NAMESPACE,
    DEFAULT_TTL,
    AgentEntry,
    StoreEvent,
    agent_prefix,
    label_key,
)
from nixl_core.errors import (
    BackendUnavailableError,
    InvalidParamError,
    MetadataStoreError,
    NotAllowedError,
)

if TYPE_CHECKING:
    import requests
    from etcd3gw.client import Etcd3Client

__all__ = ["DEFAULT_TIMEOUT", "EtcdStore", "parse_endpoints"]

_log = logging.getLogger(__name__)

#: Seconds one request to one endpoint may take (connect, then the answer).
DEFAULT_TIMEOUT = 3.0

_API = "/v3/"
#: Keys per transaction when everything is put again (etcd's --max-txn-ops defaults to 128).
_TXN_CHUNK = 64
#: Re-creating a broken watch waits this long first, doubling up to _BACKOFF_MAX.
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0
#: A watch stream's socket notices a vanished peer (no FIN, no RST) after about
#: IDLE + INTVL * CNT seconds of silence (TCP keep-alive probes).
_KEEPALIVE_IDLE, _KEEPALIVE_INTVL, _KEEPALIVE_CNT = 10, 5, 3

_T = TypeVar("_T")

_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class Endpoint(NamedTuple):
    """One parsed etcd endpoint.

    Attributes:
        host: the host name or address (an IPv6 address without brackets).
        port: the TCP port.
    """

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoints(spec: str) -> list[Endpoint]:
    """Parse comma-separated ``[http://]host:port`` endpoints.

    ``host`` is an IPv4 address, an IPv6 address in brackets or a host name; the port is
    required; one trailing ``/`` is allowed; spaces around an entry are ignored.

    Raises:
        InvalidParamError: an entry does not parse (the message names it), or ``https://``
            (TLS is not supported).
    """
    out: list[Endpoint] = []
    for raw in spec.split(","):
        out.append(_parse_endpoint(raw.strip(), spec))
    return out


def _parse_endpoint(item: str, spec: str) -> Endpoint:
    def bad(why: str) -> InvalidParamError:
        return InvalidParamError(
            f"etcd endpoint {item!r} (in {spec!r}): {why}; expected [http://]host:port",
            param="endpoints",
            value=spec,
        )

    if not item:
        raise bad("empty entry")
    rest = item
    scheme = _SCHEME.match(rest)
    if scheme is not None:
        if scheme.group(1).lower() != "http":
            raise bad(f"scheme {scheme.group(1)!r} is not supported (only http://)")
        rest = rest[scheme.end() :]
    rest = rest.removesuffix("/")
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise bad("unclosed '['")
        host, after = rest[1:close], rest[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
        if not after.startswith(":"):
            raise bad("no port")
        port_text = after[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise bad("no port")
        if ":" in host:
            raise bad("an IPv6 address goes in brackets")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise bad(f"{host!r} is not an IPv4 address") from None
        elif not _HOSTNAME.fullmatch(host):
            raise bad(f"{host!r} is not a host name")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise bad(f"port {port_text!r} is not a number in 1..65535")
    return Endpoint(host, int(port_text))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    return base64.b64decode(text) if text else b""


def _prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"  # every key from prefix on
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _why(exc: BaseException) -> str:
    """A short reason for a client-library exception (requests' messages run long)."""
    text = str(getattr(exc, "detail_text", None) or exc) or type(exc).__name__
    m = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if m is not None:
        return m.group(0).strip()
    if "timed out" in text.lower():
        return "timed out"
    return text if len(text) <= 200 else text[:200] + "..."


class _LeaseNotFoundError(MetadataStoreError):
    """etcd says the lease of a put/revoke does not exist (revoked or expired)."""


class _StreamError(Exception):
    """A watch stream ended or carried an error: re-create it."""


class _CanceledError(Exception):
    """The watch was canceled while its stream was being opened."""


def _import_etcd3gw() -> tuple[Any, Any, Any]:
    try:
        import etcd3gw
        import requests
        from etcd3gw import exceptions
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the etcd metadata store needs the etcd3gw package ({exc}); "
            "install it with `pip install 'nixl-core[etcd]'`"
        ) from exc
    return etcd3gw, exceptions, requests


class EtcdStore:
    """A :class:`~nixl_core.discovery.store.MetadataStore` in etcd (>= 3.4).

    Args:
        endpoints: comma-separated ``[http://]host:port`` (IPv4, ``[IPv6]``, host names). They
            are tried in order; the first that answers is used until it stops answering.
        namespace: the key namespace (NIXL's default ``/nixl/agents/``).
        ttl: seconds a published agent's keys outlive this store's last keep-alive (rounded up
            to whole seconds for etcd, at least 1).
        timeout: seconds one request to one endpoint may take.

    Raises:
        InvalidParamError: an endpoint does not parse, or ``ttl``/``timeout`` is not positive.
        BackendUnavailableError: etcd3gw is not installed.
    """

    kind: str = "etcd"
    expires: bool = True
    pushes: bool = True

    def __init__(
        self,
        endpoints: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        ttl: float = DEFAULT_TTL,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._endpoints = parse_endpoints(endpoints)
        if not (math.isfinite(ttl) and ttl > 0):
            raise InvalidParamError(f"etcd lease ttl {ttl!r} must be > 0 s", param="ttl", value=ttl)
        if not (math.isfinite(timeout) and timeout > 0):
            raise InvalidParamError(
                f"etcd request timeout {timeout!r} must be > 0 s", param="timeout", value=timeout
            )
        etcd3gw, self._exc, requests_mod = _import_etcd3gw()
        self._etcd3gw = etcd3gw
        self._requests: Any = requests_mod
        self.endpoint = endpoints
        self.namespace = namespace
        self._ttl = float(ttl)
        self._lease_ttl = max(1, math.ceil(ttl))
        self._timeout = float(timeout)
        self._session: requests.Session = requests_mod.Session()
        # etcd is reached directly, as the watch streams reach it: no proxy from the environment
        # and no .netrc lookup (that lookup alone is a sixth of a call's time)
        self._session.trust_env = False
        self._clients: list[Etcd3Client] = [
            etcd3gw.Etcd3Client(
                host=ep.host,
                port=ep.port,
                protocol="http",
                timeout=timeout,
                api_path=_API,
                session=self._session,
            )
            for ep in self._endpoints
        ]
        #: Index of the endpoint that answered last.
        self._current = 0
        #: Guards the small state below (never held across a network call).
        self._lock = threading.Lock()
        #: Serialises what changes the lease or the published keys (held across calls).
        self._pub_lock = threading.Lock()
        self._closed = False
        self._lease_id: int | None = None
        #: agent -> label -> value, everything published under the lease (for re-puts).
        self._published: dict[str, dict[str, bytes]] = {}
        self._watches: set[_Watch] = set()
        self._stop = threading.Event()
        self._keepalive: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"EtcdStore({self.endpoint!r}, namespace={self.namespace!r}, ttl={self._ttl:g})"

    @property
    def ttl(self) -> float:
        """The lease TTL asked for, in seconds (etcd's is this rounded up)."""
        return self._ttl

    @property
    def lease_id(self) -> int | None:
        """The lease this store's keys are under, None before the first publish."""
        with self._lock:
            return self._lease_id

    # -- the MetadataStore protocol ------------------------------------------------------------

    def publish(self, agent: str, label: str, value: bytes) -> None:
        """Put ``value`` under the agent's label, under this store's lease.

        The first publish for an agent also writes the announcement key (in one transaction;
        its value is ``b""`` unless label ``""`` is published). The first publish of all grants
        the lease and starts the keep-alive thread.

        Raises:
            MetadataStoreError: etcd is unreachable or refused the put.
            NotAllowedError: the store is closed.
        """
        value = bytes(value)
        with self._pub_lock:
            self._check_open("publish")
            items: list[tuple[str, str, bytes]] = []
            if agent not in self._published and label != "":
                items.append((agent, "", b""))
            items.append((agent, label, value))
            with self._lock:
                pending = self._lease_id is None and bool(self._published)
            if pending:  # the lease was lost and not replaced yet: replace it, with this key
                self._remember(items)
                self._replace_lease_locked(None, "retry")
                return
            lease = self._lease_locked()
            try:
                self._put_all("publish", items, lease)
            except _LeaseNotFoundError:
                self._remember(items)
                self._replace_lease_locked(lease, "a put found it gone")
                return
            self._remember(items)

    def get(self, agent: str, label: str) -> bytes | None:
        """The value under the agent's label, or None.

        Raises:
            MetadataStoreError: etcd is unreachable.
        """
        value, _ = self._get_rev("get", label_key(self.namespace, agent, label).encode())
        return value

    def wait(self, agent: str, label: str, timeout: float) -> bytes | None:
        """The value under the agent's label, waiting up to ``timeout`` s for it to be put.

        Reads the key; if it is missing, watches it from the revision after that read (so a
        put in between is not missed) until a put arrives or the time is up. The watch runs on
        the calling thread and its connection is closed before returning.

        Returns:
            The value, or None when the timeout passed first.

        Raises:
            MetadataStoreError: etcd is unreachable.
        """
        key = label_key(self.namespace, agent, label).encode()
        deadline = time.monotonic() + max(0.0, timeout)
        backoff = _BACKOFF_MIN
        while True:
            value, revision = self._get_rev("wait", key)
            if value is not None:
                return value
            if time.monotonic() >= deadline:
                return None
            try:
                return self._wait_put(key, revision + 1, deadline)
            except (_StreamError, OSError, http.client.HTTPException, ValueError) as exc:
                _log.debug("wait for %r: watch stream broke (%s); reading again", key, exc)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def remove(self, agent: str) -> None:
        """Delete the agent's keys.

        If this store published the agent and no other agent, its lease is revoked (etcd
        deletes every key under it); otherwise the agent's prefix is deleted. Either way the
        store forgets the agent's keys (they are not put again after a lease loss).

        Raises:
            MetadataStoreError: etcd is unreachable (keys under the lease then still expire, as
                it is no longer kept alive).
        """
        prefix = agent_prefix(self.namespace, agent).encode()
        with self._pub_lock:
            self._check_open("remove")
            mine = self._published.pop(agent, None) is not None
            with self._lock:
                lease = self._lease_id
                if mine and not self._published:
                    self._lease_id = None
                else:
                    lease = None
            if lease is not None:
                self._revoke("remove", lease)
                return
        payload = {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}
        self._post("remove", "/kv/deleterange", payload)

    def watch(self, agent: str, callback: Callable[[StoreEvent], None]) -> Callable[[], None]:
        """Call ``callback`` on a store thread for each change under the agent's prefix.

        The watch starts at the revision after a read made here, so every change made after
        this returns is reported. Events carry the previous value (``prev``), also for deletes
        and lease expiry; ``label`` is ``""`` for the announcement key. An exception from the
        callback is logged and the watch goes on. A broken stream (etcd restarted) is re-created
        from the revision after the last one seen, with backoff, until canceled.

        Returns:
            An idempotent function that cancels the watch; once it returns no callback runs
            (unless called from the callback itself: then none after that callback).

        Raises:
            MetadataStoreError: etcd is unreachable.
            NotAllowedError: the store is closed.
        """
        self._check_open("watch")
        prefix = agent_prefix(self.namespace, agent).encode()
        payload = {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)), "count_only": True}
        resp = self._post("watch", "/kv/range", payload)
        w = _Watch(self, agent, prefix, callback, _revision(resp) + 1)
        with self._lock:
            if self._closed:
                raise NotAllowedError(f"etcd store {self.endpoint} is closed: cannot watch")
            self._watches.add(w)
        w.start()
        return w.cancel

    def agents(self) -> list[AgentEntry]:
        """Every agent under the namespace, sorted by name.

        The agent of a key ``<namespace>/<agent>/<label>`` is the segment after the namespace
        and ``/``, up to the next ``/`` (so an agent name must not contain ``/``); keys not of
        that form are skipped. ``ttl`` is the least time left on the leases of the agent's keys,
        None if none of its keys has a lease.

        Raises:
            MetadataStoreError: etcd is unreachable.
        """
        prefix = (self.namespace + "/").encode()
        payload = {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}
        resp = self._post("agents", "/kv/range", payload)
        values: dict[str, dict[str, bytes]] = {}
        leases: dict[str, set[int]] = {}
        for kv in resp.get("kvs", ()):
            rest = _unb64(kv["key"])[len(prefix) :].decode("utf-8", "replace")
            agent, sep, label = rest.partition("/")
            if not sep:
                continue
            values.setdefault(agent, {})[label] = _unb64(kv.get("value"))
            lease = int(kv.get("lease", 0))
            if lease:
                leases.setdefault(agent, set()).add(lease)
        left: dict[int, float] = {}
        for lease in sorted(set().union(*leases.values()) if leases else ()):
            # etcd3gw's Lease.ttl() fails on TTL 0 (JSON omits a zero): read it here
            ttl = self._post("agents", "/kv/lease/timetolive", {"ID": str(lease)}).get("TTL", 0)
            left[lease] = max(0.0, float(ttl))
        return [
            AgentEntry(
                name=name,
                values=vals,
                ttl=min(left[lid] for lid in leases[name]) if name in leases else None,
            )
            for name, vals in sorted(values.items())
        ]

    def close(self) -> None:
        """Stop the keep-alive and every watch, then revoke the lease (best effort).

        The agent's keys vanish at once (or expire within the TTL if etcd cannot be reached).
        Idempotent; later calls of other methods raise :class:`NotAllowedError`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches = list(self._watches)
            self._watches.clear()
        self._stop.set()
        for w in watches:
            w.cancel()
        ka = self._keepalive
        if ka is not None and ka is not threading.current_thread():
            ka.join(self._timeout * len(self._endpoints) + 1.0)
        with self._pub_lock:
            with self._lock:
                lease, self._lease_id = self._lease_id, None
            self._published.clear()
        if lease is not None:
            try:
                self._revoke("close", lease)
            except MetadataStoreError as exc:
                _log.warning(
                    "etcd store %s: could not revoke lease %x at close (%s); its keys expire "
                    "within %g s",
                    self.endpoint,
                    lease,
                    exc,
                    self._ttl,
                )
        self._session.close()

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls ---------------------------------------------------------------------------------

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise NotAllowedError(f"etcd store {self.endpoint} is closed: cannot {op}")

    def _order(self) -> Iterator[int]:
        start = self._current
        n = len(self._endpoints)
        return ((start + i) % n for i in range(n))

    def _call(self, op: str, fn: Callable[[Etcd3Client], _T]) -> _T:
        """Run ``fn`` on the endpoint that answered last, moving on while they cannot be reached.

        Raises:
            MetadataStoreError: no endpoint could be reached, or one answered with an error.
        """
        exc_mod = self._exc
        failures: list[str] = []
        for idx in self._order():
            ep = self._endpoints[idx]
            try:
                result = fn(self._clients[idx])
            except (exc_mod.ConnectionFailedError, exc_mod.ConnectionTimeoutError) as exc:
                failures.append(f"{ep}: {_why(exc)}")
                continue
            except exc_mod.Etcd3Exception as exc:
                detail = _why(exc)
                cls = _LeaseNotFoundError if "lease not found" in detail else MetadataStoreError
                raise cls(
                    f"etcd at {ep} refused {op}: {detail}", endpoint=str(ep), operation=op
                ) from exc
            except (self._requests.RequestException, ValueError, KeyError, TypeError) as exc:
                raise MetadataStoreError(
                    f"etcd at {ep}: bad answer to {op}: {type(exc).__name__}: {_why(exc)}",
                    endpoint=str(ep),
                    operation=op,
                ) from exc
            self._current = idx
            return result
        raise MetadataStoreError(
            f"etcd unreachable for {op} (timeout {self._timeout:g} s): " + "; ".join(failures),
            endpoint=self.endpoint,
            operation=op,
        )

    def _post(self, op: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ``payload`` to the API ``path`` (see :meth:`_call`); the decoded JSON answer."""
        resp = self._call(op, lambda c: c.post(c.get_url(path), json=payload))
        if not isinstance(resp, dict):
            raise MetadataStoreError(
                f"etcd: bad answer to {op}: {type(resp).__name__}",
                endpoint=self.endpoint,
                operation=op,
            )
        return resp

    def _lease_call(self, op: str, lease: int, what: Literal["refresh", "revoke"]) -> int:
        """etcd3gw's Lease ``what`` (keep-alive, revoke) for ``lease``."""
        result = self._call(op, lambda c: getattr(self._etcd3gw.Lease(lease, c), what)())
        return int(result)

    def _get_rev(self, op: str, key: bytes) -> tuple[bytes | None, int]:
        payload = {"key": _b64(key)}
        resp = self._post(op, "/kv/range", payload)
        kvs = resp.get("kvs")
        value = _unb64(kvs[0].get("value")) if kvs else None
        return value, _revision(resp)

    def _put_all(self, op: str, items: list[tuple[str, str, bytes]], lease: int) -> None:
        """Put ``(agent, label, value)`` items under ``lease``: one put, or transactions."""
        puts = [
            {
                "key": _b64(label_key(self.namespace, agent, label).encode()),
                "value": _b64(value),
                "lease": str(lease),
            }
            for agent, label, value in items
        ]
        if len(puts) == 1:
            self._post(op, "/kv/put", puts[0])
            return
        for i in range(0, len(puts), _TXN_CHUNK):
            txn = {"success": [{"request_put": p} for p in puts[i : i + _TXN_CHUNK]]}
            self._post(op, "/kv/txn", txn)

    def _revoke(self, op: str, lease: int) -> None:
        with contextlib.suppress(_LeaseNotFoundError):  # expired or revoked: its keys are gone
            self._lease_call(op, lease, "revoke")

    def _remember(self, items: list[tuple[str, str, bytes]]) -> None:
        for agent, label, value in items:
            self._published.setdefault(agent, {})[label] = value

    # -- the lease -----------------------------------------------------------------------------

    def _lease_locked(self) -> int:
        """The lease (granted now if there is none); with ``_pub_lock`` held."""
        with self._lock:
            lease = self._lease_id
        if lease is not None:
            return lease
        granted = self._call("grant lease", lambda c: c.lease(self._lease_ttl).id)
        with self._lock:
            self._lease_id = int(granted)
            start = self._keepalive is None
            if start:
                self._keepalive = threading.Thread(
                    target=self._keepalive_loop, name="nixl-etcd-keepalive", daemon=True
                )
        if start:
            assert self._keepalive is not None
            self._keepalive.start()
        return int(granted)

    def _replace_lease_locked(self, old: int | None, why: str) -> None:
        """Grant a new lease and put every published key again; with ``_pub_lock`` held.

        ``old`` is the lease found lost (None: a replacement failed before and is retried).
        Does nothing if the lease changed meanwhile.
        """
        with self._lock:
            if self._closed or self._lease_id != old:
                return
            self._lease_id = None
        items = [(a, lab, v) for a, labels in self._published.items() for lab, v in labels.items()]
        if old is not None:
            _log.warning(
                "etcd store %s: lease %x lost (%s); granting a new one and putting %d key(s) again",
                self.endpoint,
                old,
                why,
                len(items),
            )
        if not items:
            return
        lease = self._lease_locked()
        try:
            self._put_all("re-publish", items, lease)
        except _LeaseNotFoundError:
            with self._lock:
                self._lease_id = None  # lost again already: the keep-alive retries
            raise
        except MetadataStoreError:
            with self._lock:
                self._lease_id = None
            raise
        _log.info(
            "etcd store %s: %d key(s) put again under lease %x", self.endpoint, len(items), lease
        )

    def _keepalive_loop(self) -> None:
        unreachable = False
        while not self._stop.wait(self._ttl / 3):
            with self._lock:
                lease = self._lease_id
                pending = lease is None and bool(self._published)
            try:
                if lease is None:
                    if pending:  # a replacement failed: try again
                        with self._pub_lock:
                            self._replace_lease_locked(None, "retry")
                    continue
                left = self._lease_call("keep-alive", lease, "refresh")
                if unreachable:
                    _log.info("etcd store %s: keep-alive answered again", self.endpoint)
                    unreachable = False
                if left <= 0:
                    with self._pub_lock:
                        self._replace_lease_locked(lease, "keep-alive found it gone")
            except MetadataStoreError as exc:
                if not unreachable:
                    _log.warning(
                        "etcd store %s: keep-alive failed (%s); retrying every %.2g s",
                        self.endpoint,
                        exc,
                        self._ttl / 3,
                    )
                    unreachable = True
            except Exception:  # a bug must not end the keep-alive silently
                _log.exception("etcd store %s: keep-alive error", self.endpoint)

    # -- watch streams -------------------------------------------------------------------------

    def _open_stream(
        self,
        op: str,
        create: dict[str, Any],
        timeout: float,
        attach: Callable[[socket.socket], bool] | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """POST a watch create request; returns the connection and its streaming response.

        ``attach`` is given the socket once connected; False means canceled.

        Raises:
            MetadataStoreError: no endpoint could be reached, or one refused the watch.
            _CanceledError: ``attach`` said so.
        """
        body = json.dumps({"create_request": create}).encode()
        failures: list[str] = []
        for idx in self._order():
            ep = self._endpoints[idx]
            conn = http.client.HTTPConnection(ep.host, ep.port, timeout=timeout)
            try:
                conn.connect()
                if attach is not None and (conn.sock is None or not attach(conn.sock)):
                    conn.close()
                    raise _CanceledError
                conn.request(
                    "POST", _API + "watch", body=body, headers={"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                if resp.status != 200:
                    text = resp.read(1000).decode("utf-8", "replace")
                    conn.close()
                    raise MetadataStoreError(
                        f"etcd at {ep} refused {op}: HTTP {resp.status}: {text}",
                        endpoint=str(ep),
                        operation=op,
                    )
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                failures.append(f"{ep}: {_why(exc)}")
                continue
            self._current = idx
            return conn, resp
        raise MetadataStoreError(
            f"etcd unreachable for {op}: " + "; ".join(failures),
            endpoint=self.endpoint,
            operation=op,
        )

    def _wait_put(self, key: bytes, start: int, deadline: float) -> bytes | None:
        """The value of the first put of ``key`` from revision ``start`` on, None at deadline."""
        create = {"key": _b64(key), "start_revision": start}
        remaining = deadline - time.monotonic()
        conn, resp = self._open_stream("wait", create, min(self._timeout, max(remaining, 0.1)))
        try:
            sock = conn.sock
            assert sock is not None
            for msg in _messages(resp, sock, deadline):
                if msg.get("canceled"):
                    raise _StreamError(msg.get("cancel_reason") or "watch canceled by etcd")
                for ev in msg.get("events", ()):
                    if ev.get("type") != "DELETE":
                        return _unb64(ev["kv"].get("value"))
            raise _StreamError("stream ended")
        except TimeoutError:
            return None
        finally:
            conn.close()

    def _forget_watch(self, w: _Watch) -> None:
        with self._lock:
            self._watches.discard(w)


def _revision(resp: Any) -> int:
    return int(resp["header"]["revision"])


def _messages(
    resp: http.client.HTTPResponse, sock: socket.socket, deadline: float | None
) -> Iterator[dict[str, Any]]:
    """The ``result`` of each line of a watch stream until it ends.

    With a ``deadline`` each read waits at most until then (then TimeoutError); without one,
    reads block (a canceler shuts the socket down).

    Raises:
        _StreamError: the stream carried an error.
        TimeoutError: the deadline passed.
        OSError: the connection failed.
    """
    buf = bytearray()
    while True:
        nl = buf.find(b"\n")
        while nl >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if line.strip():
                msg = json.loads(line)
                if "result" not in msg:
                    raise _StreamError(str(msg.get("error", msg))[:300])
                yield msg["result"]
            nl = buf.find(b"\n")
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
        chunk = resp.read1(65536)
        if not chunk:
            return
        buf += chunk


class _Watch:
    """One agent's prefix watch: a daemon thread reading a stream, re-created when it breaks."""

    def __init__(
        self,
        store: EtcdStore,
        agent: str,
        prefix: bytes,
        callback: Callable[[StoreEvent], None],
        start_revision: int,
    ) -> None:
        self._store = store
        self._agent = agent
        self._prefix = prefix
        self._callback = callback
        self._next = start_revision
        self._canceled = threading.Event()
        self._sock_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"nixl-etcd-watch[{agent}]", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        """Stop the stream and wait (bounded) for the thread to end. Idempotent."""
        self._canceled.set()
        with self._sock_lock:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not threading.current_thread() and self._thread.ident is not None:
            self._thread.join(self._store._timeout + 1.0)
        self._store._forget_watch(self)

    def _attach(self, sock: socket.socket) -> bool:
        with self._sock_lock:
            if self._canceled.is_set():
                return False
            self._sock = sock
            return True

    def _run(self) -> None:
        backoff = _BACKOFF_MIN
        broken: str | None = None
        store = self._store
        while not self._canceled.is_set():
            create = {
                "key": _b64(self._prefix),
                "range_end": _b64(_prefix_end(self._prefix)),
                "start_revision": self._next,
                "prev_kv": True,
            }
            conn: http.client.HTTPConnection | None = None
            try:
                conn, resp = store._open_stream("watch", create, store._timeout, self._attach)
                sock = conn.sock
                assert sock is not None
                sock.settimeout(None)
                _keepalive_socket(sock)
                for msg in _messages(resp, sock, None):
                    if msg.get("created"):
                        if broken is not None:
                            _log.info(
                                "etcd watch of agent %r re-created from revision %d",
                                self._agent,
                                self._next,
                            )
                            broken = None
                        backoff = _BACKOFF_MIN
                        continue
                    if msg.get("canceled"):
                        self._on_canceled(msg)
                        break
                    self._deliver(msg)
                    if self._canceled.is_set():
                        return
                why = "stream ended"
            except _CanceledError:
                return
            except (MetadataStoreError, _StreamError, OSError, http.client.HTTPException) as exc:
                why = str(exc) or type(exc).__name__
            except ValueError as exc:  # a line that is not JSON
                why = f"bad stream data: {exc}"
            finally:
                with self._sock_lock:
                    self._sock = None
                if conn is not None:
                    conn.close()
            if self._canceled.is_set():
                return
            if broken is None:
                _log.warning(
                    "etcd watch of agent %r broke (%s); re-creating it from revision %d",
                    self._agent,
                    why,
                    self._next,
                )
                broken = why
            self._canceled.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _on_canceled(self, msg: dict[str, Any]) -> None:
        compact = int(msg.get("compact_revision", 0))
        if compact > self._next:
            _log.warning(
                "etcd watch of agent %r: revisions %d..%d were compacted away; changes in them "
                "are not reported",
                self._agent,
                self._next,
                compact - 1,
            )
            self._next = compact

    def _deliver(self, msg: dict[str, Any]) -> None:
        last = self._next - 1
        for ev in msg.get("events", ()):
            if self._canceled.is_set():
                return
            kv = ev["kv"]
            last = max(last, int(kv.get("mod_revision", 0)))
            key = _unb64(kv.get("key"))
            label = key[len(self._prefix) :].decode("utf-8", "replace")
            kind: Literal["put", "delete"] = "delete" if ev.get("type") == "DELETE" else "put"
            value = _unb64(kv.get("value")) if kind == "put" else None
            prev = _unb64(ev["prev_kv"].get("value")) if "prev_kv" in ev else None
            try:
                self._callback(StoreEvent(kind, self._agent, label, value, prev))
            except Exception:
                _log.exception("etcd watch of agent %r: the callback raised", self._agent)
        self._next = last + 1


def _keepalive_socket(sock: socket.socket) -> None:
    """Let TCP notice a watch stream's peer vanishing without closing the connection."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPALIVE_INTVL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPALIVE_CNT)
    except OSError:
        pass  # not a TCP socket option this platform has
