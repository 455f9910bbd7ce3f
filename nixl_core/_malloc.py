"""glibc malloc tuning for the descriptor path.

Every prep/make allocates numpy temporaries of N x 8 bytes (800 KB for 100k descriptors). glibc
serves such blocks with mmap and returns them to the kernel on free, so each new temporary costs
one page fault per 4 KiB page; on virtual machines that is most of the time of a 100k-descriptor
make (bench/bench_core.py's build+prep+make, 2-core VM, 2026-12-02: 2.1-2.3 ms tuned against
5.6-7.9 ms untuned, three alternated runs). Raising the mmap and trim thresholds keeps freed
blocks in the heap for reuse. Applied once per process, when the first agent that wants it is
created (``AgentConfig.tune_malloc``: True, False, or None = ``NIXL_MALLOC_TUNE``, default on),
and logged once at INFO with how to turn it off. The cost is that up to ``M_TRIM_THRESHOLD``
bytes of freed heap stay mapped in the process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20

_done = False
_lock = threading.Lock()


def tune_malloc(enabled: bool | None = None) -> bool:
    """Apply the thresholds once per process (glibc only). Returns True if they are in effect.

    Args:
        enabled: True / False; None reads ``NIXL_MALLOC_TUNE`` (off for 0/no/off/false).
    """
    global _done
    with _lock:
        if _done:
            return True
        if enabled is None:
            raw = os.environ.get("NIXL_MALLOC_TUNE", "1").strip().lower()
            enabled = raw not in ("0", "no", "off", "false")
        if not enabled:
            return False
        if not sys.platform.startswith("linux"):
            return False
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018  (present only in glibc)
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)
            ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1) and ok
        except (OSError, AttributeError):
            return False
        if ok:
            logger.info(
                "nixl-core set glibc malloc M_MMAP_THRESHOLD=%d and M_TRIM_THRESHOLD=%d for this "
                "process (faster descriptor paths; up to %d MiB of freed heap stays mapped). "
                "Turn it off with AgentConfig(tune_malloc=False) or NIXL_MALLOC_TUNE=0.",
                MMAP_THRESHOLD,
                TRIM_THRESHOLD,
                TRIM_THRESHOLD >> 20,
            )
        _done = ok
        return ok
