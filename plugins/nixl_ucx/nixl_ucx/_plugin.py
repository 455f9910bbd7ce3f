"""Entry point ``nixl.backends: ucx``: registers the UCX backend with nixl-core."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nixl_core import hookimpl

if TYPE_CHECKING:
    from nixl_core._plugins import BackendRegistry


@hookimpl
def nixl_register_backends(registry: BackendRegistry) -> None:
    """Add :class:`nixl_ucx.backend.UcxBackend` (a cheap import: nothing native loads)."""
    from nixl_ucx.backend import UcxBackend

    registry.add(UcxBackend)
