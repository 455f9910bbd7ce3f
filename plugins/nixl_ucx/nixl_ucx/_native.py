"""Loading the native layer: libucp from the libucx wheel, then the cffi extension.

Nothing here runs at import of :mod:`nixl_ucx`. :func:`check` (the backend's ``probe()``) only
looks for files and import specs: it loads nothing and changes nothing in the process.
:func:`load` (the backend's constructor, before its first UCP context) loads libucs, libucp and
the extension, once per process.

Two UCX defaults are applied for that load, each only when the user has not set it, each logged
once at INFO with how to override it:

- ``UCX_LOG_FILE=stderr``: UCX logs to stdout otherwise, and stdout belongs to the application.
- ``UCX_MEM_EVENTS=no``, on hosts without an NVIDIA driver: UCM's memory-event hooks cost ~0.4 s
  at load and only serve registration caches (CUDA, InfiniBand) this wheel cannot use there.

Both are read once, by libucs's load-time constructor (``ucs_init``), not by the UCP context:
``LOG_FILE`` is a read-only global option that ``ucp_config_modify`` refuses, and ``MEM_EVENTS``
given there would only reach UCT's cached keys, after the hooks were installed at load. So the
environment is the only way in, and it is used as narrowly as possible: the defaults are put in
``os.environ`` for the duration of the load and removed right after, so the process environment
(and what child processes inherit) is left as it was.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["NativeUnavailableError", "check", "cuda_driver_present", "load"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: tuple[Any, Any] | None = None
_failure: str | None = None

INSTALL_FIX = (
    "reinstall the plugin so its extension is built against the libucx wheel: "
    "`pip install --force-reinstall ./plugins/nixl_ucx` from a nixl-py clone (needs a C compiler "
    "and Python's headers: apt-get install gcc python3-dev)"
)
#: What ``libucx.load_library()`` loads from the wheel's lib/ (the ones the extension links).
_WHEEL_LIBS = ("libucs.so", "libucp.so")


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


def _missing() -> str | None:
    """Why the libucx wheel or the extension is missing (None: both present), from files and
    import specs alone."""
    spec = importlib.util.find_spec("libucx")
    if spec is None or not spec.submodule_search_locations:
        return (
            "the libucx wheel (UCX's libucp) is not installed: pip install libucx-cu13 "
            "(or libucx-cu12)"
        )
    # libucx.load_library() falls back to the wheel's copies only when a system UCX is not
    # preferred; with one preferred, only loading it can tell.
    if os.environ.get("RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY", "false").lower() == "false":
        libdir = Path(next(iter(spec.submodule_search_locations))) / "lib"
        absent = [n for n in _WHEEL_LIBS if not (libdir / n).is_file()]
        if absent:
            return (
                f"the libucx wheel lacks {', '.join(absent)} in {libdir}: reinstall it "
                "(pip install --force-reinstall libucx-cu13)"
            )
    if importlib.util.find_spec("nixl_ucx._ucx_ext") is None:
        return (
            f"the nixl_ucx._ucx_ext extension was not built (headers or compiler missing at "
            f"install time); {INSTALL_FIX}"
        )
    return None


def check() -> str | None:
    """Why the native layer cannot load here, or None. Loads nothing, writes nothing."""
    with _lock:
        if _loaded is not None:
            return None
        if _failure is not None:
            return _failure
    return _missing()


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


@contextlib.contextmanager
def _load_defaults() -> Iterator[None]:
    """The UCX defaults the user left unset, in the environment while libucs loads."""
    defaults = [("UCX_LOG_FILE", "stderr", "UCX logs to stdout otherwise", "a file or stdout")]
    if not cuda_driver_present():
        defaults.append(
            (
                "UCX_MEM_EVENTS",
                "no",
                "no NVIDIA driver here: UCM's memory hooks would cost ~0.4 s and serve nothing",
                "yes",
            )
        )
    applied = []
    for key, value, why, other in defaults:
        if key in os.environ:
            continue
        os.environ[key] = value
        applied.append(key)
        logger.info(
            "nixl-ucx: %s=%s for loading UCX (%s); set %s yourself (e.g. to %s) to override",
            key,
            value,
            why,
            key,
            other,
        )
    try:
        yield
    finally:
        for key in applied:
            os.environ.pop(key, None)


def _load() -> tuple[Any, Any]:
    why = _missing()
    if why is not None:
        raise NativeUnavailableError(why)
    # libucs reads the defaults in its constructor: when libucx loads it, or else when the
    # extension's own link to it does.
    with _load_defaults():
        try:
            import libucx

            libucx.load_library()
        except OSError as exc:
            raise NativeUnavailableError(
                f"libucp from the libucx wheel cannot be loaded: {exc}"
            ) from exc
        try:
            _ucx_ext = importlib.import_module("nixl_ucx._ucx_ext")
        except ImportError as exc:
            raise NativeUnavailableError(
                f"the nixl_ucx._ucx_ext extension cannot be loaded ({exc}); {INSTALL_FIX}"
            ) from exc
    return _ucx_ext.ffi, _ucx_ext.lib
