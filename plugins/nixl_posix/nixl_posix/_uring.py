"""A minimal io_uring driver: raw syscalls through ctypes, rings as numpy views of the mmaps.

Submission entries are built for a whole batch of descriptors at once (numpy field assignments,
once per prepared request) and copied into the mmapped SQE array as one block, then one
``io_uring_enter`` submits them; completions
are read back the same way. Nothing here loops per descriptor in Python.

Memory ordering: the rings are only touched right before or right after an ``io_uring_enter``
call (a full barrier), never polled concurrently with the kernel, so plain numpy loads and stores
are safe on every architecture.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np
import numpy.typing as npt

__all__ = [
    "OP_NOP",
    "OP_READ",
    "OP_WRITE",
    "SQE_ASYNC",
    "Entries",
    "Ring",
    "UringUnavailableError",
    "uring_unavailable_reason",
]

_SYS_SETUP, _SYS_ENTER = 425, 426  # the same numbers on every Linux architecture since 5.1
_OFF_SQES = 0x10000000
_FEAT_SINGLE_MMAP = 1
_ENTER_GETEVENTS = 1
OP_NOP, OP_READ, OP_WRITE = 0, 22, 23
SQE_ASYNC = 1 << 4

_SQE = np.dtype(
    {
        "names": ["opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags", "user_data"],
        "formats": [
            np.uint8,
            np.uint8,
            np.uint16,
            np.int32,
            np.uint64,
            np.uint64,
            np.uint32,
            np.uint32,
            np.uint64,
        ],
        "offsets": [0, 1, 2, 4, 8, 16, 24, 28, 32],
        "itemsize": 64,
    }
)
_CQE = np.dtype(
    {
        "names": ["user_data", "res"],
        "formats": [np.uint64, np.int32],
        "offsets": [0, 8],
        "itemsize": 16,
    }
)


class _SqOff(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint32)
        for n in ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1")
    ]
    _fields_ += [("user_addr", ctypes.c_uint64)]


class _CqOff(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint32)
        for n in ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1")
    ]
    _fields_ += [("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint32)
        for n in (
            "sq_entries",
            "cq_entries",
            "flags",
            "sq_thread_cpu",
            "sq_thread_idle",
            "features",
            "wq_fd",
        )
    ]
    _fields_ += [("resv", ctypes.c_uint32 * 3), ("sq_off", _SqOff), ("cq_off", _CqOff)]


class Entries:
    """Prepared submission entries: the array and its address (for one memmove per submit)."""

    __slots__ = ("addr", "array", "n")

    def __init__(self, array: npt.NDArray[np.void]) -> None:
        self.array = array
        self.addr = int(array.ctypes.data)
        self.n = int(array.shape[0])


_NO_UD = np.empty(0, np.uint64)
_NO_RES = np.empty(0, np.int32)


class UringUnavailableError(OSError):
    """io_uring cannot be used here (old kernel, disabled by sysctl or a seccomp profile)."""


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _u32(mm: mmap.mmap, off: int) -> npt.NDArray[np.uint32]:
    return np.frombuffer(mm, np.uint32, 1, off)


class Ring:
    """One io_uring instance: batch submission and completion of READ/WRITE entries.

    Not thread-safe: the owner serializes :meth:`submit` and :meth:`reap` (waiting in
    :meth:`wait` may run concurrently with a submission).

    Args:
        entries: submission queue size (a power of two; the kernel rounds up).

    Raises:
        UringUnavailableError: io_uring_setup failed (with the errno's reason).
    """

    def __init__(self, entries: int = 4096) -> None:
        p = _Params()
        fd = _syscall(_SYS_SETUP, ctypes.c_uint(entries), ctypes.byref(p))
        if fd < 0:
            err = ctypes.get_errno()
            raise UringUnavailableError(err, f"io_uring_setup failed: {os.strerror(err)}")
        self.fd = int(fd)
        try:
            sq_size = p.sq_off.array + p.sq_entries * 4
            cq_size = p.cq_off.cqes + p.cq_entries * _CQE.itemsize
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            if p.features & _FEAT_SINGLE_MMAP:
                self._sq_mm = mmap.mmap(self.fd, max(sq_size, cq_size), flags, prot, offset=0)
                self._cq_mm = self._sq_mm
            else:
                self._sq_mm = mmap.mmap(self.fd, sq_size, flags, prot, offset=0)
                self._cq_mm = mmap.mmap(self.fd, cq_size, flags, prot, offset=0x8000000)
            self._sqe_mm = mmap.mmap(self.fd, p.sq_entries * 64, flags, prot, offset=_OFF_SQES)
        except OSError:
            os.close(self.fd)
            raise
        self.sq_entries = int(p.sq_entries)
        self.cq_entries = int(p.cq_entries)
        # Ring indices as ctypes views: a scalar load or store costs a tenth of a numpy one.
        self._sq_tail = ctypes.c_uint32.from_buffer(self._sq_mm, p.sq_off.tail)
        self._sq_mask = int(_u32(self._sq_mm, p.sq_off.ring_mask)[0])
        self._sq_array = np.frombuffer(self._sq_mm, np.uint32, self.sq_entries, p.sq_off.array)
        self._sqe_base = ctypes.addressof(ctypes.c_char.from_buffer(self._sqe_mm))
        self._cq_head = ctypes.c_uint32.from_buffer(self._cq_mm, p.cq_off.head)
        self._cq_tail = ctypes.c_uint32.from_buffer(self._cq_mm, p.cq_off.tail)
        self._cq_mask = int(_u32(self._cq_mm, p.cq_off.ring_mask)[0])
        self._cqes = np.frombuffer(self._cq_mm, _CQE, self.cq_entries, p.cq_off.cqes)
        self._sq_array[:] = np.arange(self.sq_entries, dtype=np.uint32)
        self.in_flight = 0  # entries written to the ring and not reaped yet
        self.unsubmitted = 0  # of those, entries the kernel did not take yet (see flush)

    def capacity(self) -> int:
        """How many entries can be submitted now without overrunning the completion queue."""
        return min(self.sq_entries, self.cq_entries - self.in_flight)

    def entries(
        self,
        opcode: int | npt.NDArray[np.uint8],
        fds: int | npt.NDArray[np.int32],
        offs: npt.NDArray[np.uint64],
        addrs: npt.NDArray[np.uint64],
        lens: npt.NDArray[np.uint64],
        user_data: npt.NDArray[np.uint64],
        flags: int | npt.NDArray[np.uint8] = 0,
    ) -> Entries:
        """Submission entries for a batch, built once and submitted (by :meth:`submit`) many times."""
        e = np.zeros(offs.shape[0], _SQE)
        e["opcode"], e["flags"], e["fd"] = opcode, flags, fds
        e["off"], e["addr"], e["len"], e["user_data"] = offs, addrs, lens, user_data
        return Entries(e)

    def submit(self, entries: Entries, lo: int = 0, hi: int = -1) -> None:
        """Copy entries ``lo:hi`` (at most :meth:`capacity`) into the ring and submit them."""
        hi = entries.n if hi < 0 else hi
        n = hi - lo
        if n <= 0:
            return
        if n > self.capacity():
            raise ValueError(f"{n} entries exceed the ring's capacity {self.capacity()}")
        tail = self._sq_tail.value
        start = tail & self._sq_mask
        k = min(n, self.sq_entries - start)
        src = entries.addr + lo * 64
        ctypes.memmove(self._sqe_base + start * 64, src, k * 64)
        if k < n:  # the batch wraps around the ring's end
            ctypes.memmove(self._sqe_base, src + k * 64, (n - k) * 64)
        self._sq_tail.value = (tail + n) & 0xFFFFFFFF
        self.in_flight += n
        self.unsubmitted += n
        self.flush()

    def flush(self) -> None:
        """Hand the kernel the entries it has not taken yet (it may take fewer under pressure)."""
        if self.unsubmitted:
            self.unsubmitted -= self._enter(self.unsubmitted, 0, 0)

    def nop(self, user_data: int) -> None:
        """Submit one no-op (wakes a thread blocked in :meth:`wait`)."""
        z = np.zeros(1, np.uint64)
        self.submit(self.entries(OP_NOP, -1, z, z, z, np.array([user_data], np.uint64)))

    def wait(self, min_complete: int = 1) -> None:
        """Block (GIL released) until at least ``min_complete`` completions are queued."""
        self._enter(0, min_complete, _ENTER_GETEVENTS)

    def reap(self) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int32]]:
        """Take every queued completion: (user_data, res) arrays."""
        head, tail = self._cq_head.value, self._cq_tail.value
        n = (tail - head) & 0xFFFFFFFF
        if n == 0:
            return _NO_UD, _NO_RES
        start = head & self._cq_mask
        if start + n <= self.cq_entries:
            c = self._cqes[start : start + n].copy()
        else:  # wraps around the ring's end
            c = np.concatenate([self._cqes[start:], self._cqes[: n - (self.cq_entries - start)]])
        self._cq_head.value = tail
        self.in_flight -= n
        return c["user_data"], c["res"]

    def _enter(self, to_submit: int, min_complete: int, flags: int) -> int:
        """io_uring_enter; returns how many entries the kernel took (0 when it is busy)."""
        while True:
            r = _syscall(
                _SYS_ENTER,
                ctypes.c_uint(self.fd),
                ctypes.c_uint(to_submit),
                ctypes.c_uint(min_complete),
                ctypes.c_uint(flags),
                None,
                ctypes.c_size_t(0),
            )
            if r >= 0:
                return int(r)
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                if to_submit:
                    return 0  # the entries stay in the ring; flush() hands them in later
                continue
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")

    def close(self) -> None:
        """Unmap the rings and close the instance (pending I/O is finished by the kernel)."""
        # Views into the maps must go before the maps can be closed.
        for a in ("_sq_array", "_sq_tail", "_cqes", "_cq_head", "_cq_tail"):
            setattr(self, a, None)
        for mm in {id(m): m for m in (self._sq_mm, self._cq_mm, self._sqe_mm)}.values():
            mm.close()
        os.close(self.fd)


def uring_unavailable_reason() -> str | None:
    """Why io_uring cannot be used here, or None when it can."""
    try:
        Ring(1).close()
    except OSError as exc:
        return str(exc)
    return None
