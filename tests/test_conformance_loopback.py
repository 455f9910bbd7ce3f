"""The conformance suites of nixl_core.testing, run against the reference LOOPBACK backend."""

from __future__ import annotations

from nixl_core.testing import (
    BackendFixtures,
    BadInputSuite,
    LocalXferSuite,
    NotifSuite,
    RegistrationSuite,
    RemoteXferSuite,
)


class TestLoopback(
    RegistrationSuite, LocalXferSuite, RemoteXferSuite, NotifSuite, BadInputSuite, BackendFixtures
):
    """Every suite against LOOPBACK (DRAM; remote = a second process on this host)."""

    backend_name = "LOOPBACK"


class TestLoopbackIndexed(LocalXferSuite, BackendFixtures):
    """The local-transfer suite with LOOPBACK's reference prep_side / prepare_indexed hooks on."""

    backend_name = "LOOPBACK"
    params = {"indexed": "1"}  # noqa: RUF012  (read-only class data, as in BackendFixtures)
