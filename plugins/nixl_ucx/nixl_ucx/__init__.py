"""nixl-ucx: the UCX backend of nixl-py (one-sided RMA over libucp through a cffi extension).

Importing this package loads nothing native, nor does the backend's ``probe()``: libucp is
loaded by the backend's constructor (see :mod:`nixl_ucx._native`).
"""

from __future__ import annotations

from nixl_ucx._version import __version__

__all__ = ["__version__"]
