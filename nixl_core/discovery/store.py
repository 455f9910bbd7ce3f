"""The name-addressed metadata store interface, its key layout, and how one is chosen.

A store holds each agent's published metadata under ``<namespace>/<agent>/<label>`` (NIXL's
layout; the default namespace ``/nixl/agents/`` gives a double slash, as NIXL's keys do) plus the
announcement key ``<namespace>/<agent>/``. Values are sealed frames
(:mod:`nixl_core.discovery.sealed`), opaque to the store.

Implementations: :class:`~nixl_core.discovery.etcd.EtcdStore` (leases with keep-alive, watches)
and :class:`~nixl_core.discovery.tcpstore.TorchTCPStore` (PyTorch's TCPStore: no lease, watches by
polling). :func:`store_from_env` picks one the way NIXL does: ``NIXL_ETCD_ENDPOINTS`` (present,
even empty) selects etcd, else ``NIXL_TCPSTORE_ENDPOINT`` selects TCPStore; both set is an error.

Every method may block on the network; the metadata service calls them on its worker threads,
never on a caller's thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Literal, Protocol, runtime_checkable

import attrs

from nixl_core.errors import InvalidParamError

__all__ = [
    "DEFAULT_LABEL",
    "DEFAULT_NAMESPACE",
    "DEFAULT_TTL",
    "AgentEntry",
    "MetadataStore",
    "StoreEvent",
    "agent_prefix",
    "label_key",
    "store_from_env",
]

#: NIXL's default namespace (``NIXL_ETCD_NAMESPACE``).
DEFAULT_NAMESPACE = "/nixl/agents/"
#: The label of full metadata (NIXL's ``metadata``).
DEFAULT_LABEL = "metadata"
#: Seconds a published agent's keys outlive the agent's last keep-alive.
DEFAULT_TTL = 10.0


def agent_prefix(namespace: str, agent: str) -> str:
    """``<namespace>/<agent>/``: the announcement key and the prefix of every label key."""
    return f"{namespace}/{agent}/"


def label_key(namespace: str, agent: str, label: str) -> str:
    """``<namespace>/<agent>/<label>``."""
    return f"{namespace}/{agent}/{label}"


@attrs.frozen
class StoreEvent:
    """A change to one key of a watched agent.

    Attributes:
        kind: ``"put"`` (created or overwritten) or ``"delete"`` (deleted or expired).
        agent: the agent whose key changed.
        label: the label ("" for the announcement key).
        value: the new value (put) or None.
        prev: the value before the change when the store knows it, else None.
    """

    kind: Literal["put", "delete"]
    agent: str
    label: str
    value: bytes | None
    prev: bytes | None


@attrs.frozen
class AgentEntry:
    """What a store holds for one agent (for ``python -m nixl_core md``).

    Attributes:
        name: the agent's name.
        values: label -> stored value ("" is the announcement key).
        ttl: seconds left on the agent's lease, None when the store has no leases (or the key
            has none: it will never expire).
    """

    name: str
    values: Mapping[str, bytes]
    ttl: float | None


@runtime_checkable
class MetadataStore(Protocol):
    """A name-addressed store of agents' metadata (etcd, TCPStore)."""

    #: Short kind, for messages: "etcd", "tcpstore".
    kind: str
    #: Where it is (as configured), for messages.
    endpoint: str
    #: The key namespace.
    namespace: str
    #: True if a dead agent's keys expire by themselves (leases).
    expires: bool
    #: True if :meth:`watch` reports changes as they happen (not by polling).
    pushes: bool

    def publish(self, agent: str, label: str, value: bytes) -> None:
        """Store ``value`` under the agent's label; the first call also writes the announcement
        key. With leases, every key of the agent is under one lease kept alive until
        :meth:`remove` or :meth:`close`; a lease lost meanwhile (the store was unreachable for
        longer than the TTL) is replaced and everything published is written again.
        """
        ...

    def get(self, agent: str, label: str) -> bytes | None:
        """The value under the agent's label, or None."""
        ...

    def wait(self, agent: str, label: str, timeout: float) -> bytes | None:
        """The value under the agent's label, waiting up to ``timeout`` s for it to appear."""
        ...

    def remove(self, agent: str) -> None:
        """Delete every key of the agent (and give up its lease)."""
        ...

    def watch(self, agent: str, callback: Callable[[StoreEvent], None]) -> Callable[[], None]:
        """Call ``callback`` (on a store thread) for each change under the agent's prefix.

        Returns:
            A function that cancels the watch (idempotent).
        """
        ...

    def agents(self) -> list[AgentEntry]:
        """Every agent under the namespace, with its values and lease time left."""
        ...

    def close(self) -> None:
        """Stop keep-alives and watches and give up the lease (the agent's keys vanish)."""
        ...


def store_from_env(
    env: Mapping[str, str] | None = None,
    *,
    ttl: float = DEFAULT_TTL,
    namespace: str | None = None,
) -> MetadataStore | None:
    """The store NIXL's environment selects, or None when neither variable is set.

    ``NIXL_ETCD_ENDPOINTS`` (comma-separated ``[http://]host:port``; present but empty means
    ``127.0.0.1:2379``) with ``NIXL_ETCD_NAMESPACE``; else ``NIXL_TCPSTORE_ENDPOINT``
    (``host:port``) with ``NIXL_TCPSTORE_TIMEOUT_MS``.

    Raises:
        InvalidParamError: both are set, or an endpoint cannot be parsed (names it).
        BackendUnavailableError: the selected store's client library is not installed (says
            what to install).
    """
    env = os.environ if env is None else env
    etcd = env.get("NIXL_ETCD_ENDPOINTS")
    tcp = env.get("NIXL_TCPSTORE_ENDPOINT")
    if etcd is not None and tcp is not None:
        raise InvalidParamError(
            "NIXL_ETCD_ENDPOINTS and NIXL_TCPSTORE_ENDPOINT are both set; choose one store"
        )
    if etcd is not None:
        from nixl_core.discovery.etcd import EtcdStore

        ns = namespace if namespace is not None else env.get("NIXL_ETCD_NAMESPACE")
        return EtcdStore(etcd or "127.0.0.1:2379", namespace=ns or DEFAULT_NAMESPACE, ttl=ttl)
    if tcp is not None:
        from nixl_core.discovery.tcpstore import TorchTCPStore

        timeout_ms = env.get("NIXL_TCPSTORE_TIMEOUT_MS", "30000")
        try:
            timeout = float(timeout_ms) / 1000.0
        except ValueError:
            raise InvalidParamError(
                f"NIXL_TCPSTORE_TIMEOUT_MS={timeout_ms!r} is not a number of milliseconds"
            ) from None
        return TorchTCPStore(tcp, timeout=timeout)
    return None
