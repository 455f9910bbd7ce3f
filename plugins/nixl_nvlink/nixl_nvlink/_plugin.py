"""Entry point ``nixl.backends: nvlink``: registers the NVLINK backend with nixl-core."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nixl_core import hookimpl

if TYPE_CHECKING:
    from nixl_core._plugins import BackendRegistry


@hookimpl
def nixl_register_backends(registry: BackendRegistry) -> None:
    """Add :class:`nixl_nvlink.backend.NvlinkBackend` (a cheap import: nothing native loads)."""
    from nixl_nvlink.backend import NvlinkBackend

    registry.add(NvlinkBackend)
