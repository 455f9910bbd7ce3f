"""Loading the native layer: libucp from the libucx wheel, then the cffi extension.

Nothing here runs at import of :mod:`nixl_ucx`; :func:`load` is called by the backend's
``probe()`` and constructor. Before libucs loads, two environment defaults are applied (only
when the user has not set them, logged once at INFO): ``UCX_LOG_FILE=stderr`` (UCX logs to
stdout otherwise) and ``UCX_MEM_EVENTS=no`` on hosts without an NVIDIA driver: UCM's
memory-event hooks cost ~0.4 s at load and serve only registration caches (CUDA, InfiniBand),
which this wheel cannot use on such hosts.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
from typing import Any

__all__ = ["NativeUnavailableError", "cuda_driver_present", "load"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: tuple[Any, Any] | None = None
_failure: str | None = None

INSTALL_FIX = (
    "reinstall the plugin so its extension is built against the libucx wheel: "
    "`pip install --force-reinstall nixl-ucx` (needs a C compiler: apt-get install gcc)"
)


class NativeUnavailableError(RuntimeError):
    """libucp or the extension cannot be loaded; the message says why and how to fix it."""


def cuda_driver_present() -> bool:
    """Whether an NVIDIA driver seems installed (no CUDA call, no context)."""
    if os.path.exists("/proc/driver/nvidia/version"):
        return True
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/cuda/compat", "/usr/lib"):
        if os.path.exists(os.path.join(d, "libcuda.so.1")):
            return True
    return False


def _configure_env() -> None:
    if "UCX_LOG_FILE" not in os.environ:
        # UCX logs to stdout by default; a library must leave the application's stdout alone.
        os.environ["UCX_LOG_FILE"] = "stderr"
        logger.info("nixl-ucx: set UCX_LOG_FILE=stderr (UCX warnings off the app's stdout)")
    if "UCX_MEM_EVENTS" not in os.environ and not cuda_driver_present():
        os.environ["UCX_MEM_EVENTS"] = "no"
        logger.info(
            "nixl-ucx: set UCX_MEM_EVENTS=no (no NVIDIA driver here; saves ~0.4 s at UCX load)"
        )


def load() -> tuple[Any, Any]:
    """``(ffi, lib)`` of the extension, loading libucp first (once per process).

    Raises:
        NativeUnavailableError: the libucx wheel, libucp or the extension is missing (with the fix).
    """
    global _loaded, _failure
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise NativeUnavailableError(_failure)
        try:
            _loaded = _load()
        except NativeUnavailableError as exc:
            _failure = str(exc)
            raise
        return _loaded


def _load() -> tuple[Any, Any]:
    if importlib.util.find_spec("libucx") is None:
        raise NativeUnavailableError(
            "the libucx wheel (UCX's libucp) is not installed: pip install libucx-cu13 "
            "(or libucx-cu12)"
        )
    _configure_env()
    try:
        import libucx

        libucx.load_library()
    except OSError as exc:
        raise NativeUnavailableError(
            f"libucp from the libucx wheel cannot be loaded: {exc}"
        ) from exc
    if importlib.util.find_spec("nixl_ucx._ucx_ext") is None:
        raise NativeUnavailableError(
            f"the nixl_ucx._ucx_ext extension was not built (headers or compiler missing at "
            f"install time); {INSTALL_FIX}"
        )
    try:
        _ucx_ext = importlib.import_module("nixl_ucx._ucx_ext")
    except ImportError as exc:
        raise NativeUnavailableError(
            f"the nixl_ucx._ucx_ext extension cannot be loaded ({exc}); {INSTALL_FIX}"
        ) from exc
    return _ucx_ext.ffi, _ucx_ext.lib
