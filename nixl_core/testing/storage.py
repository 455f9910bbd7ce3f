"""StorageSuite: the conformance tests of a backend that moves DRAM to and from FILE segments.

FILE descriptors follow NIXL: ``addr`` = file offset, ``len`` (0 = unbounded in a
registration), ``dev`` = an open fd, or any id when the region's meta is a path-mode string
``<ro|rw>[,direct,sync,noatime,create]:<path>`` (the backend then opens and closes the file).
Transfers are loopback: the agent's own name is the peer, local side DRAM, remote side FILE.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from nixl_core.agent import Agent
from nixl_core.backend import XferStatus
from nixl_core.descriptors import DescList
from nixl_core.errors import InvalidDescriptorError, TransferError
from nixl_core.memory import MemType
from nixl_core.testing._peer import SRC_SEED

__all__ = ["StorageSuite"]

BufferFactory = Callable[..., Any]


def _files(offsets: np.ndarray, blk: int, dev: int) -> DescList:
    n = offsets.size
    rows = np.empty((n, 3), np.uint64)
    rows[:, 0], rows[:, 1], rows[:, 2] = offsets, blk, dev
    return DescList.from_array(rows, "FILE")


class StorageSuite:
    """DRAM <-> FILE: path and fd registration, scattered round trips, bounds, failures."""

    _nixl_requires: ClassVar[tuple[str, ...]] = ("supports_local",)
    # Provided by BackendFixtures.
    backend_class: Callable[[], Any]
    pattern: Callable[[int, int], np.ndarray]
    host: Callable[[Any], np.ndarray]
    describe: Callable[[Any], tuple[int, int, int]]
    xfer_timeout: float

    @pytest.fixture(autouse=True)
    def _needs_file(self) -> None:
        if MemType.FILE not in self.backend_class().mem_types:
            pytest.skip(f"backend {self.backend_class().name} does not register FILE segments")

    def _move(self, agent: Agent, op: str, mem: DescList, files: DescList) -> XferStatus:
        with agent.create(op, mem, files, agent.name) as req:
            req.post()
            return req.wait(self.xfer_timeout)

    def test_path_mode_scattered_round_trip(
        self, agent: Agent, buffer_factory: BufferFactory, tmp_path: Path
    ) -> None:
        """Blocks written at permuted file offsets land there and read back intact."""
        n, blk = 512, 4096
        src = buffer_factory("DRAM", n * blk, SRC_SEED)
        back = buffer_factory("DRAM", n * blk)
        agent.register(src)
        agent.register(back)
        path = tmp_path / "seg.bin"
        agent.register([(0, 0, 21, f"rw,create:{path}")], "FILE")
        perm = np.random.default_rng(17).permutation(n)
        files = _files(perm * blk, blk, 21)
        s_addr, _, _ = self.describe(src)
        b_addr, _, _ = self.describe(back)
        assert self._move(agent, "WRITE", DescList.strided("DRAM", s_addr, blk, n, blk), files) is (
            XferStatus.DONE
        )
        disk = np.fromfile(path, np.uint8).reshape(n, blk)
        np.testing.assert_array_equal(disk[perm], self.pattern(SRC_SEED, n * blk).reshape(n, blk))
        assert self._move(agent, "READ", DescList.strided("DRAM", b_addr, blk, n, blk), files) is (
            XferStatus.DONE
        )
        np.testing.assert_array_equal(self.host(back), self.pattern(SRC_SEED, n * blk))

    def test_fd_mode_and_bounded_region(
        self, agent: Agent, buffer_factory: BufferFactory, tmp_path: Path
    ) -> None:
        """A caller's fd as dev; descriptors past a bounded region or on another fd are refused."""
        src = buffer_factory("DRAM", 8192, SRC_SEED)
        agent.register(src)
        addr, _, _ = self.describe(src)
        fd = os.open(tmp_path / "fd.bin", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            agent.register([(4096, 8192, fd)], "FILE")  # bytes 4096..12287 of the file
            mem = DescList.from_tuples([(addr, 8192, 0)], "DRAM")
            assert self._move(agent, "WRITE", mem, _files(np.array([4096]), 8192, fd)) is (
                XferStatus.DONE
            )
            assert os.pread(fd, 8192, 4096) == self.pattern(SRC_SEED, 8192).tobytes()
            with pytest.raises(InvalidDescriptorError, match="remote descriptor 0"):
                agent.create("WRITE", mem, _files(np.array([8192]), 8192, fd), agent.name)
            with pytest.raises(InvalidDescriptorError, match="remote descriptor 0"):
                agent.create("WRITE", mem, _files(np.array([4096]), 8192, fd + 1000), agent.name)
        finally:
            agent.close()
            os.close(fd)

    def test_path_mode_file_is_closed_at_deregistration(self, agent: Agent, tmp_path: Path) -> None:
        """Deregistering a path-mode region closes the file the backend opened."""
        path = tmp_path / "closed.bin"

        def open_on_path() -> int:
            n = 0
            for fd in os.listdir("/proc/self/fd"):
                try:
                    n += os.readlink(f"/proc/self/fd/{fd}") == str(path)
                except OSError:  # the directory's own fd is gone by now
                    continue
            return n

        reg = agent.register([(0, 0, 5, f"rw,create:{path}")], "FILE")
        assert open_on_path() == 1
        agent.deregister(reg)
        assert open_on_path() == 0

    def test_read_past_end_of_file_fails_cleanly(
        self, agent: Agent, buffer_factory: BufferFactory, tmp_path: Path
    ) -> None:
        """A READ beyond EOF ends the request in ERROR with a TransferError naming the file."""
        path = tmp_path / "eof.bin"
        path.write_bytes(b"\1" * 5000)
        agent.register([(0, 0, 2, f"ro:{path}")], "FILE")
        dst = buffer_factory("DRAM", 4096)
        agent.register(dst)
        addr, _, _ = self.describe(dst)
        with pytest.raises(TransferError, match=str(path)):
            self._move(
                agent,
                "READ",
                DescList.from_tuples([(addr, 4096, 0)], "DRAM"),
                _files(np.array([4096]), 4096, 2),
            )
