"""nixl-posix: the POSIX storage backend of nixl-py (DRAM <-> FILE through io_uring).

Importing this package loads nothing native; the backend class is imported by the plugin hook.
"""

from __future__ import annotations

from nixl_posix._version import __version__

__all__ = ["__version__"]
