"""The nixl_core conformance suites against UCX: one agent here, its peer in a second process."""

from __future__ import annotations

from typing import Any, ClassVar

from nixl_core.testing import (
    BackendFixtures,
    BadInputSuite,
    LocalXferSuite,
    NotifSuite,
    RegistrationSuite,
    RemoteXferSuite,
)


class TestUcx(
    RegistrationSuite, LocalXferSuite, RemoteXferSuite, NotifSuite, BadInputSuite, BackendFixtures
):
    """Every suite against UCX with its defaults (peer error mode, progress threads); DRAM and
    VRAM (VRAM skips, with the reason, without cupy and a GPU)."""

    backend_name = "UCX"
    mem_types = ("DRAM", "VRAM")


class TestUcxPolled(RemoteXferSuite, NotifSuite, BackendFixtures):
    """The remote and notification suites with no progress thread and error mode none:
    completion and notifications are driven by polling alone (shared-memory AM lanes)."""

    backend_name = "UCX"
    params: ClassVar[dict[str, Any]] = {
        "progress_thread": "false",
        "ucx_error_handling_mode": "none",
    }
