"""nixl-core's conformance suites that apply to a storage backend, run against POSIX."""

from __future__ import annotations

from nixl_core.testing import BackendFixtures, RegistrationSuite, StorageSuite


class TestPosixAuto(RegistrationSuite, StorageSuite, BackendFixtures):
    """Registration (DRAM) and DRAM <-> FILE through the default engine (io_uring where allowed)."""

    backend_name = "POSIX"


class TestPosixThreads(StorageSuite, BackendFixtures):
    """DRAM <-> FILE through the thread engine."""

    backend_name = "POSIX"
    params = {"engine": "threads"}  # noqa: RUF012
