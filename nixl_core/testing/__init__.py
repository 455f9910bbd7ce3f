"""Conformance suites every nixl-py backend must pass, and the fixtures they run on.

Wire them for a backend with one class (see :class:`BackendFixtures`)::

    class TestUcx(RegistrationSuite, LocalXferSuite, RemoteXferSuite, NotifSuite, BadInputSuite,
                  BackendFixtures):
        backend_name = "UCX"

:class:`EtcdServer` runs a real etcd for tests of the etcd metadata store (the ``nixl_etcd``
fixture of the pytest plugin hands tests one, with a namespace each: :class:`EtcdFixture`).

Names are imported lazily, so that the peer process of the remote suites (which imports
``nixl_core.testing._peer``) and the pytest plugin do not pay for pytest-only modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nixl_core.testing._peer import PeerBuffer, PeerError, PeerProcess
    from nixl_core.testing.etcd import EtcdFixture, EtcdServer
    from nixl_core.testing.fixtures import BackendFixtures
    from nixl_core.testing.storage import StorageSuite
    from nixl_core.testing.suites import (
        BadInputSuite,
        LocalXferSuite,
        NotifSuite,
        RegistrationSuite,
        RemoteXferSuite,
    )

__all__ = [
    "BackendFixtures",
    "BadInputSuite",
    "EtcdFixture",
    "EtcdServer",
    "LocalXferSuite",
    "NotifSuite",
    "PeerBuffer",
    "PeerError",
    "PeerProcess",
    "RegistrationSuite",
    "RemoteXferSuite",
    "StorageSuite",
]

_WHERE = {
    "BackendFixtures": "nixl_core.testing.fixtures",
    "BadInputSuite": "nixl_core.testing.suites",
    "EtcdFixture": "nixl_core.testing.etcd",
    "EtcdServer": "nixl_core.testing.etcd",
    "LocalXferSuite": "nixl_core.testing.suites",
    "NotifSuite": "nixl_core.testing.suites",
    "PeerBuffer": "nixl_core.testing._peer",
    "PeerError": "nixl_core.testing._peer",
    "PeerProcess": "nixl_core.testing._peer",
    "RegistrationSuite": "nixl_core.testing.suites",
    "RemoteXferSuite": "nixl_core.testing.suites",
    "StorageSuite": "nixl_core.testing.storage",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
