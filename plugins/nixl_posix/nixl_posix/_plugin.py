"""Entry point ``nixl.backends: posix``: registers the POSIX backend with nixl-core."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nixl_core import hookimpl

if TYPE_CHECKING:
    from nixl_core._plugins import BackendRegistry


@hookimpl
def nixl_register_backends(registry: BackendRegistry) -> None:
    """Add :class:`nixl_posix.backend.PosixBackend`."""
    from nixl_posix.backend import PosixBackend

    registry.add(PosixBackend)
