"""POSIX VRAM <-> FILE through the pinned staging pool (GPU tests skip on machines without one)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nixl_posix._staging import staging_unavailable_reason
from nixl_posix.backend import FileIOError

from nixl_core import Agent, DescList, XferStatus
from nixl_core.errors import NotSupportedError, TransferError

NO_STAGING = staging_unavailable_reason()


def _agent(name: str, **params: Any) -> Agent:
    return Agent(name, backends=["POSIX"], backend_params={"POSIX": params})


def _descs(mem: str, addrs: np.ndarray, lens: np.ndarray | int, dev: int) -> DescList:
    n = addrs.size
    return DescList.from_array(
        np.stack(
            [
                addrs.astype(np.uint64),
                np.broadcast_to(np.asarray(lens, np.uint64), (n,)),
                np.full(n, dev, np.uint64),
            ],
            axis=1,
        ),
        mem,
    )


@pytest.mark.skipif(NO_STAGING is None, reason="this machine can stage VRAM")
def test_vram_without_gpu_names_the_reason(tmp_path: Path) -> None:
    """On a CPU-only machine a VRAM request fails at creation and says why."""
    fake = np.zeros(8192, np.uint8)  # registration does not touch VRAM; only the request would
    with _agent("nogpu") as a:
        a.register([(fake.ctypes.data, fake.nbytes, 0)], "VRAM")
        a.register([(0, 0, 5, f"rw,create:{tmp_path / 'f.bin'}")], "FILE")
        with pytest.raises(NotSupportedError, match=r"VRAM <-> FILE.*(cupy|CUDA)"):
            a.create(
                "WRITE",
                _descs("VRAM", np.array([fake.ctypes.data]), 4096, 0),
                _descs("FILE", np.array([0]), 4096, 5),
                a.name,
            )


ENGINES = ["auto", "uring", "aio", "threads"]


@pytest.fixture
def cp() -> Any:
    return pytest.importorskip("cupy")


@pytest.fixture(params=ENGINES)
def engine_agent(request: pytest.FixtureRequest) -> Iterator[Agent]:
    a = _agent(f"vram-{request.param}", engine=request.param)
    yield a
    a.close()


@pytest.mark.nixl_gpu
def test_scattered_vram_roundtrip(engine_agent: Agent, cp: Any, tmp_path: Path) -> None:
    """4096 x 4 KiB GPU blocks to permuted file offsets and back into another GPU buffer."""
    a = engine_agent
    n, blk = 4096, 4096
    src = cp.random.randint(0, 256, n * blk, dtype=cp.uint8)
    back = cp.zeros(n * blk, cp.uint8)
    a.register([(src.data.ptr, src.nbytes, 0)], "VRAM")
    a.register([(back.data.ptr, back.nbytes, 0)], "VRAM")
    a.register([(0, 0, 21, f"rw,create:{tmp_path / 'kv.bin'}")], "FILE")
    perm = np.random.default_rng(1).permutation(n).astype(np.uint64)
    blocks = np.arange(n, dtype=np.uint64) * np.uint64(blk)
    files = _descs("FILE", perm * np.uint64(blk), blk, 21)
    with a.create("WRITE", _descs("VRAM", src.data.ptr + blocks, blk, 0), files, a.name) as req:
        assert req.path.endswith("+staged")
        req.post()
        assert req.wait(60) is XferStatus.DONE
    on_disk = np.fromfile(tmp_path / "kv.bin", np.uint8).reshape(n, blk)
    np.testing.assert_array_equal(on_disk[perm.astype(np.intp)], cp.asnumpy(src).reshape(n, blk))
    with a.create("READ", _descs("VRAM", back.data.ptr + blocks, blk, 0), files, a.name) as req:
        req.post()
        assert req.wait(60) is XferStatus.DONE
        req.post()  # reposted: the chunk tables and staging requests are reused
        assert req.wait(60) is XferStatus.DONE
    assert bool((back == src).all())


@pytest.mark.nixl_gpu
def test_many_chunks_odd_lengths(cp: Any, tmp_path: Path) -> None:
    """A 16 KiB pool forces dozens of chunks; odd lengths and offsets take the byte path."""
    n = 300
    lens = np.random.default_rng(2).integers(1, 3000, n).astype(np.uint64)
    starts = np.concatenate([[0], np.cumsum(lens + np.uint64(7))[:-1]]).astype(np.uint64)
    total = int(starts[-1] + lens[-1]) + 8
    src = cp.random.randint(0, 256, total, dtype=cp.uint8)
    back = cp.zeros(total, cp.uint8)
    with _agent("chunks", max_io_size=4096, staging_bytes=16384) as a:
        a.register([(src.data.ptr, total, 0)], "VRAM")
        a.register([(back.data.ptr, total, 0)], "VRAM")
        a.register([(0, 0, 3, f"rw,create:{tmp_path / 'odd.bin'}")], "FILE")
        files = DescList.from_array(
            np.stack([starts + np.uint64(3), lens, np.full(n, 3, np.uint64)], axis=1), "FILE"
        )
        for op, buf in (("WRITE", src), ("READ", back)):
            mem = DescList.from_array(
                np.stack([buf.data.ptr + starts + np.uint64(1), lens, np.zeros(n, np.uint64)], 1),
                "VRAM",
            )
            with a.create(op, mem, files, a.name, merge=False) as req:
                req.post()
                assert req.wait(60) is XferStatus.DONE
    got, want = cp.asnumpy(back), cp.asnumpy(src)
    for s, ln in zip(starts.tolist(), lens.tolist(), strict=True):  # test-side check only
        np.testing.assert_array_equal(got[s + 1 : s + 1 + ln], want[s + 1 : s + 1 + ln])


@pytest.mark.nixl_gpu
def test_vram_o_direct(cp: Any, tmp_path: Path) -> None:
    """O_DIRECT files take VRAM blocks at any GPU address: the staging slots are aligned."""
    n, blk = 256, 64 << 10
    src = cp.random.randint(0, 256, n * blk + 16, dtype=cp.uint8)
    back = cp.zeros_like(src)
    path = tmp_path / "direct.bin"
    with _agent("direct") as a:
        a.register([(src.data.ptr, src.nbytes, 0)], "VRAM")
        a.register([(back.data.ptr, back.nbytes, 0)], "VRAM")
        try:
            a.register([(0, 0, 4, f"rw,direct,create:{path}")], "FILE")
        except Exception as exc:  # tmpfs and some overlay file systems refuse O_DIRECT
            pytest.skip(f"O_DIRECT unsupported on {tmp_path}: {exc}")
        offs = np.arange(n, dtype=np.uint64) * np.uint64(blk)
        files = _descs("FILE", offs[::-1].copy(), blk, 4)
        for op, buf in (("WRITE", src), ("READ", back)):
            with a.create(op, _descs("VRAM", buf.data.ptr + 16 + offs, blk, 0), files, a.name) as r:
                r.post()
                assert r.wait(60) is XferStatus.DONE
    assert bool((back[16:] == src[16:]).all())


@pytest.mark.nixl_gpu
def test_short_read_ends_in_error_naming_the_descriptor(cp: Any, tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(os.urandom(3 * 4096 + 100))
    dst = cp.zeros(8 * 4096, cp.uint8)
    with _agent("short") as a:
        a.register([(dst.data.ptr, dst.nbytes, 0)], "VRAM")
        a.register([(0, 0, 9, f"ro:{path}")], "FILE")
        offs = np.arange(8, dtype=np.uint64) * np.uint64(4096)
        with a.create(
            "READ", _descs("VRAM", dst.data.ptr + offs, 4096, 0), _descs("FILE", offs, 4096, 9),
            a.name, merge=False,
        ) as req:  # fmt: skip
            req.post()
            with pytest.raises(TransferError) as info:
                req.wait(60)
            assert req.status is XferStatus.ERROR
    err = info.value
    assert isinstance(err, FileIOError) and err.index == 3 and err.path == str(path)
    assert "short read at EOF" in str(err)


@pytest.mark.nixl_gpu
def test_release_while_running_then_repost(cp: Any, tmp_path: Path) -> None:
    """Releasing a large staged request stops it safely; a new one on the same buffers works."""
    n, blk = 2048, 256 << 10
    src = cp.random.randint(0, 256, n * blk, dtype=cp.uint8)
    with _agent("rel", staging_bytes=16 << 20) as a:
        a.register([(src.data.ptr, src.nbytes, 0)], "VRAM")
        a.register([(0, 0, 8, f"rw,create:{tmp_path / 'big.bin'}")], "FILE")
        offs = np.arange(n, dtype=np.uint64) * np.uint64(blk)
        mem, files = _descs("VRAM", src.data.ptr + offs, blk, 0), _descs("FILE", offs, blk, 8)
        req = a.create("WRITE", mem, files, a.name, merge=False)
        req.post()
        req.release()  # waits for the chunk in flight; nothing runs after it returns
        with a.create("WRITE", mem, files, a.name, merge=False) as again:
            again.post()
            assert again.wait(120) is XferStatus.DONE
    on_disk = np.fromfile(tmp_path / "big.bin", np.uint8)
    np.testing.assert_array_equal(on_disk, cp.asnumpy(src))


@pytest.mark.nixl_multi_gpu
def test_request_spanning_two_gpus_is_refused(cp: Any, tmp_path: Path) -> None:
    with cp.cuda.Device(0):
        a0 = cp.zeros(4096, cp.uint8)
    with cp.cuda.Device(1):
        a1 = cp.zeros(4096, cp.uint8)
    with _agent("two") as a:
        a.register([(a0.data.ptr, 4096, 0), (a1.data.ptr, 4096, 1)], "VRAM")
        a.register([(0, 0, 2, f"rw,create:{tmp_path / 't.bin'}")], "FILE")
        mem = DescList.from_tuples([(a0.data.ptr, 4096, 0), (a1.data.ptr, 4096, 1)], "VRAM")
        with pytest.raises(NotSupportedError, match=r"spans GPUs \[0, 1\]"):
            a.create("WRITE", mem, _descs("FILE", np.array([0, 4096]), 4096, 2), a.name)
