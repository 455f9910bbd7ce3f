"""Metadata exchange services: how agents find each other and keep up with restarts.

- :mod:`~nixl_core.discovery.service`: :class:`MetadataService`, the agent's asynchronous
  publish / fetch / invalidate over the two routes below (``Agent.publish_metadata`` and
  friends are its façade);
- :mod:`~nixl_core.discovery.side_channel`: NIXL's socket side channel (listener + client);
- :mod:`~nixl_core.discovery.store`: the name-addressed store interface and NIXL's key layout,
  with :mod:`~nixl_core.discovery.etcd` (leases, watches) and
  :mod:`~nixl_core.discovery.tcpstore` (PyTorch's TCPStore);
- :mod:`~nixl_core.discovery.sealed`: the frames both routes carry, optionally HMAC-tagged.

None of it moves data: it only carries :class:`~nixl_core.metadata.AgentMetadata` blobs.
"""

from nixl_core.discovery.service import MdOp, MetadataService
from nixl_core.discovery.store import (
    DEFAULT_LABEL,
    DEFAULT_NAMESPACE,
    DEFAULT_TTL,
    AgentEntry,
    MetadataStore,
    StoreEvent,
    store_from_env,
)

__all__ = [
    "DEFAULT_LABEL",
    "DEFAULT_NAMESPACE",
    "DEFAULT_TTL",
    "AgentEntry",
    "MdOp",
    "MetadataService",
    "MetadataStore",
    "StoreEvent",
    "store_from_env",
]
