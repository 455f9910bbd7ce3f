"""POSIX backend parameters: the declaration table.

The core resolves them (explicit > ``AgentConfig`` > ``NIXL_POSIX_<PARAM>`` > default, see
:mod:`nixl_core.params`) and checks each value against its bounds; the backend's constructor
checks what spans two parameters (``staging_bytes`` >= 2 x ``max_io_size``).
"""

from __future__ import annotations

from nixl_core.params import Param

__all__ = ["ENGINES", "MAX_IO_ALIGN", "PARAMS"]

#: Values of ``engine``: ``auto`` picks per request, the others force one engine.
ENGINES = ("auto", "uring", "aio", "threads")
#: ``max_io_size`` is rounded down to a multiple of this, so split points stay O_DIRECT-aligned.
MAX_IO_ALIGN = 4096
# Linux moves at most this much in one read or write (MAX_RW_COUNT); an io_uring entry's length
# is 32-bit. A larger I/O would come back short.
_MAX_RW_COUNT = 0x7FFFF000
# io_uring_setup refuses more entries (IORING_MAX_ENTRIES).
_MAX_RING_ENTRIES = 32768

PARAMS: tuple[Param, ...] = (
    Param.choice(
        "engine",
        "auto",
        ENGINES,
        "auto: AIO for buffered writes, io_uring for the rest, threads where neither works; "
        "uring, aio, threads: that one only",
    ),
    Param.integer(
        "ring_entries",
        4096,
        "io_uring submission queue and AIO context size (larger requests are fed in)",
        minimum=1,
        maximum=_MAX_RING_ENTRIES,
    ),
    Param.integer("num_threads", 4, "workers of the thread engine", minimum=1, maximum=1024),
    Param.integer(
        "max_io_size",
        8 << 20,
        f"larger descriptors are split into I/Os of this size (a multiple of {MAX_IO_ALIGN}, rounded down)",
        minimum=MAX_IO_ALIGN,
        maximum=_MAX_RW_COUNT,
    ),
    Param.integer(
        "async_min_size",
        0,
        "above inline_max_bytes, only I/Os this large may go to kernel workers (IOSQE_ASYNC)",
        minimum=0,
    ),
    Param.integer(
        "inline_max_bytes",
        1 << 20,
        "requests up to this size run inside post's system call (page cache)",
        minimum=0,
    ),
    Param.integer(
        "staging_bytes",
        64 << 20,
        "pinned host pool for VRAM requests (two slots, each at least max_io_size)",
        minimum=2 * MAX_IO_ALIGN,
    ),
)
