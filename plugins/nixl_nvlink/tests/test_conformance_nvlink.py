"""The nixl_core conformance suites against NVLINK (they skip with probe()'s reason without a GPU)."""

from __future__ import annotations

from nixl_core.testing import (
    BackendFixtures,
    BadInputSuite,
    LocalXferSuite,
    NotifSuite,
    RegistrationSuite,
    RemoteXferSuite,
)


class TestNvlink(RegistrationSuite, LocalXferSuite, NotifSuite, BadInputSuite, BackendFixtures):
    """Registration, same-agent transfers (VRAM and pinned DRAM through the copy kernel),
    notifications and bad input."""

    backend_name = "NVLINK"
    mem_types = ("DRAM", "VRAM")


class TestNvlinkRemote(RemoteXferSuite, BackendFixtures):
    """Transfers with a peer agent in a second process: VRAM only, since CUDA IPC maps GPU
    memory (a peer's DRAM is refused, see test_nvlink.py)."""

    backend_name = "NVLINK"
    mem_types = ("VRAM",)
