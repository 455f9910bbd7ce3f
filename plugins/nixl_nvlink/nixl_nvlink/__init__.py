"""nixl-nvlink: the NVLINK backend of nixl-py (GPU <-> GPU across processes over CUDA IPC).

Importing this package loads nothing native; cupy and cuda-bindings are imported by the
backend's ``probe()`` and constructor.
"""

from __future__ import annotations

from nixl_nvlink._version import __version__

__all__ = ["__version__"]
