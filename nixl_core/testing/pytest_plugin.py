"""The nixl-core pytest plugin (entry point ``pytest11: nixl_core``).

pytest loads it in every run of anyone who installs nixl-core, so it stays small and inert:

- it declares the ``nixl_gpu`` and ``nixl_multi_gpu`` markers (so ``--strict-markers`` accepts
  them); they are prefixed so that another project's own ``gpu`` markers mean what that
  project says, untouched by this plugin;
- it skips tests marked ``nixl_gpu`` (``nixl_multi_gpu``) when fewer than one (two) CUDA devices are
  visible. Devices are counted only when such a test was collected, through cupy or torch if
  one of them is importable (neither is ever required), else from the NVIDIA driver's
  ``/proc`` entries; nothing here creates a CUDA context or raises;
- it provides fixtures, all prefixed ``nixl_``: ``nixl_cuda_device_count``,
  ``nixl_fresh_plugins`` (a plugin manager rediscovered for one test), ``nixl_etcd_server``
  (one real etcd for the session, :class:`nixl_core.testing.etcd.EtcdServer`) and ``nixl_etcd``
  (that server with a namespace of the test's own, cleaned at teardown:
  :class:`nixl_core.testing.etcd.EtcdFixture`). The etcd fixtures skip when there is no
  ``etcd`` binary on PATH (or etcd3gw is not installed, for ``nixl_etcd``), and fail instead
  when ``NIXL_REQUIRE_ETCD=1`` (CI). etcd is started only when a test asks for it.

The conformance suites do not need it: their fixtures are methods of
:class:`nixl_core.testing.BackendFixtures`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

_MARKERS = {
    "nixl_gpu": (1, "nixl_gpu: needs a CUDA GPU (skipped when none is visible)"),
    "nixl_multi_gpu": (2, "nixl_multi_gpu: needs two CUDA GPUs (skipped when fewer are visible)"),
}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def cuda_device_count() -> int:
    """Visible CUDA devices (0 when none can be found); never raises."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _importable("cupy"):
            try:
                import cupy

                return int(cupy.cuda.runtime.getDeviceCount())
            except Exception:  # no driver or no device: cupy raises its own error types
                return 0
        if _importable("torch"):
            try:
                import torch

                return int(torch.cuda.device_count())
            except Exception:  # a broken torch install must not break the test run
                return 0
    try:
        count = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
    if visible is not None:
        count = min(count, len([v for v in visible.split(",") if v.strip()]))
    return count


def pytest_configure(config: pytest.Config) -> None:
    for _, line in _MARKERS.values():
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs: list[tuple[pytest.Item, str, int]] = []
    for item in items:
        for marker, (count, _) in _MARKERS.items():
            if item.get_closest_marker(marker) is not None:
                needs.append((item, marker, count))
    if not needs:
        return  # count devices only when a test asks for one
    have = cuda_device_count()
    for item, marker, count in needs:
        if have < count:
            item.add_marker(
                pytest.mark.skip(reason=f"{marker}: needs {count} CUDA device(s), {have} visible")
            )


@pytest.fixture(scope="session")
def nixl_cuda_device_count() -> int:
    """Number of visible CUDA devices (0 without cupy/torch/driver)."""
    return cuda_device_count()


def _etcd_missing(reason: str) -> None:
    if os.environ.get("NIXL_REQUIRE_ETCD") == "1":
        pytest.fail(f"{reason}, and NIXL_REQUIRE_ETCD=1", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def nixl_etcd_server() -> Iterator[Any]:
    """One real etcd server for the session (an ``EtcdServer``), stopped at the end."""
    from nixl_core.testing.etcd import EtcdServer, etcd_binary

    if etcd_binary() is None:
        _etcd_missing("no etcd binary on PATH (Debian: apt-get install etcd-server)")
    with EtcdServer() as server:
        yield server


@pytest.fixture
def nixl_etcd(nixl_etcd_server: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The session's etcd with a namespace of this test's own (an ``EtcdFixture``); the
    stores it made are closed and the namespace's keys deleted at teardown."""
    import uuid

    from nixl_core.testing.etcd import EtcdFixture

    if not _importable("etcd3gw"):
        _etcd_missing("etcd3gw is not installed (pip install 'nixl-core[etcd]')")
    if not nixl_etcd_server.running:  # a test stopped the shared server: bring it back
        nixl_etcd_server.start()
    fixture = EtcdFixture(nixl_etcd_server, f"/nixl-test/{uuid.uuid4().hex[:12]}/")
    try:
        yield fixture
    finally:
        fixture.close()


@pytest.fixture
def nixl_fresh_plugins() -> Iterator[Any]:
    """A plugin manager rediscovered for this test, forgotten again afterwards."""
    from nixl_core._plugins import get_plugin_manager, reset_plugin_manager

    reset_plugin_manager()
    try:
        yield get_plugin_manager()
    finally:
        reset_plugin_manager()
