"""POSIX backend: DRAM <-> FILE through every engine, path and fd registration, failures."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from nixl_posix._aio import aio_unavailable_reason
from nixl_posix._uring import uring_unavailable_reason
from nixl_posix.backend import FileIOError, PosixBackend, parse_path_meta
from nixl_posix.params import PARAMS

from nixl_core import Agent, DescList, XferStatus, list_backends
from nixl_core.errors import (
    InvalidDescriptorError,
    InvalidParamError,
    NotSupportedError,
    RegistrationError,
)
from nixl_core.params import env_var

ENGINES = ["auto", "uring", "aio", "threads"]


@pytest.fixture(params=ENGINES)
def agent(request: pytest.FixtureRequest) -> Iterator[Agent]:
    if request.param == "uring" and (why := uring_unavailable_reason()) is not None:
        pytest.skip(f"io_uring unavailable here: {why}")
    if request.param == "aio" and (why := aio_unavailable_reason()) is not None:
        pytest.skip(f"Linux AIO unavailable here: {why}")
    a = Agent(
        f"posix-{request.param}",
        backends=["POSIX"],
        backend_params={"POSIX": {"engine": request.param}},
    )
    yield a
    a.close()


def _file_descs(offsets: np.ndarray, blk: int, dev: int) -> DescList:
    n = offsets.size
    return DescList.from_array(
        np.stack(
            [offsets.astype(np.uint64), np.full(n, blk, np.uint64), np.full(n, dev, np.uint64)],
            axis=1,
        ),
        "FILE",
    )


def _run(agent: Agent, op: str, mem: DescList, files: DescList) -> XferStatus:
    with agent.create(op, mem, files, agent.name) as req:
        req.post()
        return req.wait(30)


def _pattern(nbytes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def test_listed_with_its_engine() -> None:
    info = {b.name: b for b in list_backends()}["POSIX"]
    assert (
        info.available
        and set(info.mem_types) == {"DRAM", "VRAM", "FILE"}
        and info.plugin == "posix"
    )
    assert parse_path_meta(b"rw,direct:/x") == (frozenset({"rw", "direct"}), "/x")
    assert parse_path_meta(b"/just/a/path") is None
    assert parse_path_meta(b"ro,rw:/x") is None


def test_scattered_write_then_read_path_mode(agent: Agent, tmp_path: Path) -> None:
    """4096 blocks written at permuted offsets land there; reading them back restores the buffer."""
    n, blk = 4096, 4096
    src, back = _pattern(n * blk), np.zeros(n * blk, np.uint8)
    agent.register(src)
    agent.register(back)
    path = tmp_path / "kv.bin"
    agent.register([(0, 0, 11, f"rw,create:{path}")], "FILE")
    perm = np.random.default_rng(3).permutation(n)
    files = _file_descs(perm * blk, blk, 11)
    assert (
        _run(agent, "WRITE", DescList.strided("DRAM", src.ctypes.data, blk, n, blk), files)
        is XferStatus.DONE
    )
    on_disk = np.fromfile(path, np.uint8).reshape(n, blk)
    np.testing.assert_array_equal(on_disk[perm], src.reshape(n, blk))
    assert (
        _run(agent, "READ", DescList.strided("DRAM", back.ctypes.data, blk, n, blk), files)
        is XferStatus.DONE
    )
    np.testing.assert_array_equal(back, src)


def test_fd_mode_large_descriptor_split_and_telemetry(agent: Agent, tmp_path: Path) -> None:
    """One 40 MiB descriptor (split into 8 MiB I/Os) through a caller-owned fd."""
    nbytes = 40 << 20
    src = _pattern(nbytes, 5)
    agent.register(src)
    fd = os.open(tmp_path / "big.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        agent.register([(0, 0, fd)], "FILE")
        with agent.create(
            "WRITE",
            DescList.from_tuples([(src.ctypes.data, nbytes, 0)], "DRAM"),
            DescList.from_tuples([(4096, nbytes, fd)], "FILE"),
            agent.name,
        ) as req:
            req.post()
            assert req.wait(30) is XferStatus.DONE
            t = req.telemetry
            assert t.total_bytes == nbytes and t.backend == "POSIX" and t.path.startswith("posix:")
        got = np.fromfile(tmp_path / "big.bin", np.uint8)
        assert got.size == nbytes + 4096 and not got[:4096].any()
        np.testing.assert_array_equal(got[4096:], src)
    finally:
        os.close(fd)


def test_offsets_beyond_4gib_in_a_sparse_file(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "sparse.bin"
    agent.register([(0, 0, 3, f"rw,create:{path}")], "FILE")
    src, back = _pattern(3 * 4096, 9), np.zeros(3 * 4096, np.uint8)
    agent.register(src)
    agent.register(back)
    offs = np.array([(5 << 30) + 12345, (4 << 30) - 2048, 6 << 30], np.uint64)
    files = _file_descs(offs, 4096, 3)
    assert (
        _run(agent, "WRITE", DescList.strided("DRAM", src.ctypes.data, 4096, 3, 4096), files)
        is XferStatus.DONE
    )
    assert os.stat(path).st_size == (6 << 30) + 4096
    assert (
        _run(agent, "READ", DescList.strided("DRAM", back.ctypes.data, 4096, 3, 4096), files)
        is XferStatus.DONE
    )
    np.testing.assert_array_equal(back, src)


def test_short_read_at_eof_names_file_and_offset(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 6000)
    agent.register([(0, 0, 4, f"ro:{path}")], "FILE")
    dst = np.zeros(8192, np.uint8)
    agent.register(dst)
    mem = DescList.from_tuples(
        [(dst.ctypes.data + 4096, 4096, 0), (dst.ctypes.data, 4096, 0)],
        "DRAM",  # no merging
    )
    with pytest.raises(FileIOError, match=rf"short read at EOF: {path} at offset 4096") as ei:
        _run(agent, "READ", mem, _file_descs(np.array([0, 4096]), 4096, 4))
    assert ei.value.offset == 4096 and ei.value.index == 1 and ei.value.path == str(path)


def test_one_io_requests_run_inside_post(tmp_path: Path) -> None:
    """engine=auto: a one-descriptor buffered request is one system call inside post (DONE when
    post returns, the engine never sees it); uncached data and EOF fall back to the engine."""
    path = tmp_path / "one.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    agent = Agent("posix-one", backends=["POSIX"])
    try:
        agent.register([(0, 0, fd)], "FILE")
        src, back = _pattern(8192, 4), np.zeros(8192, np.uint8)
        agent.register(src)
        agent.register(back)
        blk = DescList.from_tuples([(src.ctypes.data, 8192, 0)], "DRAM")
        with agent.create("WRITE", blk, _file_descs(np.array([12288]), 8192, fd), agent.name) as w:
            assert w.post() is XferStatus.DONE
            assert w.backend_request.id == 0  # type: ignore[attr-defined]
            assert w.telemetry.path == "posix:one-call"
        assert path.read_bytes()[12288:] == src.tobytes() and os.stat(path).st_size == 20480
        into = DescList.from_tuples([(back.ctypes.data, 8192, 0)], "DRAM")
        with agent.create("READ", into, _file_descs(np.array([12288]), 8192, fd), agent.name) as r:
            assert r.post() is XferStatus.DONE
            if r.backend_request.single[3].nowait:  # type: ignore[attr-defined]  # RWF_NOWAIT works
                assert r.backend_request.id == 0  # type: ignore[attr-defined]
            np.testing.assert_array_equal(back, src)
            back[:] = 0
            os.fsync(fd)  # not cached any more: the read goes to the engine, same bytes
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            r.post()
            assert r.wait(30) is XferStatus.DONE
            np.testing.assert_array_equal(back, src)
        past = _file_descs(np.array([16384]), 8192, fd)  # 4096 bytes before EOF
        with pytest.raises(FileIOError, match=rf"short read at EOF: {path} at offset 16384") as ei:
            _run(agent, "READ", into, past)
        assert ei.value.index == 0 and ei.value.offset == 16384
    finally:
        agent.close()
        os.close(fd)


def test_write_to_read_only_file_is_an_error(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "ro.bin"
    path.write_bytes(bytes(8192))
    agent.register([(0, 0, 4, f"ro:{path}")], "FILE")
    src = _pattern(4096)
    agent.register(src)
    with pytest.raises(FileIOError, match="not open for writing") as ei:
        _run(
            agent,
            "WRITE",
            DescList.from_tuples([(src.ctypes.data, 4096, 0)], "DRAM"),
            _file_descs(np.array([4096]), 4096, 4),
        )
    assert ei.value.path == str(path) and ei.value.offset == 4096
    assert path.read_bytes() == bytes(8192)  # nothing written anywhere


def test_registration_errors_name_the_region(agent: Agent, tmp_path: Path) -> None:
    with pytest.raises(RegistrationError, match=r"dev 987654 is not an open file descriptor"):
        agent.register([(0, 0, 987654)], "FILE")
    with pytest.raises(RegistrationError, match=r"cannot open .*missing/none.bin"):
        agent.register([(0, 0, 1, f"ro:{tmp_path}/missing/none.bin")], "FILE")
    if os.geteuid() != 0:
        locked = tmp_path / "locked.bin"
        locked.write_bytes(b"")
        locked.chmod(0)
        with pytest.raises(RegistrationError, match="Permission denied"):
            agent.register([(0, 0, 2, f"rw:{locked}")], "FILE")


def test_misaligned_o_direct_is_refused_before_any_io(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "direct.bin"
    try:
        agent.register([(0, 0, 6, f"rw,direct,create:{path}")], "FILE")
    except RegistrationError as exc:
        pytest.skip(f"O_DIRECT not supported on {tmp_path}: {exc}")
    raw = np.zeros(3 * 4096, np.uint8)
    base = (raw.ctypes.data + 4095) & ~4095
    agent.register(raw)
    aligned = DescList.from_tuples([(base, 4096, 0)], "DRAM")
    assert _run(agent, "WRITE", aligned, _file_descs(np.array([8192]), 4096, 6)) is XferStatus.DONE
    with pytest.raises(
        InvalidDescriptorError, match=rf"misaligned O_DIRECT write: .*{path} at offset 100"
    ):
        agent.create("WRITE", aligned, _file_descs(np.array([100]), 4096, 6), agent.name)
    with pytest.raises(InvalidDescriptorError, match="buffer 0x"):
        agent.create(
            "WRITE",
            DescList.from_tuples([(base + 8, 4096, 0)], "DRAM"),
            _file_descs(np.array([0]), 4096, 6),
            agent.name,
        )


def test_concurrent_requests_on_one_file(agent: Agent, tmp_path: Path) -> None:
    """Four threads write disjoint quarters of one file at once, with their own requests."""
    n, blk = 1024, 4096
    src = _pattern(4 * n * blk, 2)
    agent.register(src)
    path = tmp_path / "shared.bin"
    agent.register([(0, 0, 8, f"rw,create:{path}")], "FILE")
    errors: list[BaseException] = []

    def worker(q: int) -> None:
        try:
            base = q * n * blk
            mem = DescList.strided("DRAM", src.ctypes.data + base, blk, n, blk)
            offs = base + np.random.default_rng(q).permutation(n) * blk
            files = _file_descs(offs, blk, 8)
            for _ in range(3):
                assert _run(agent, "WRITE", mem, files) is XferStatus.DONE
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(q,)) for q in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    disk = np.fromfile(path, np.uint8).reshape(4, n, blk)
    for q in range(4):
        perm = np.random.default_rng(q).permutation(n)
        np.testing.assert_array_equal(disk[q][perm], src.reshape(4, n, blk)[q])


def test_release_while_running_and_repost(agent: Agent, tmp_path: Path) -> None:
    """release() of a running request returns once its I/O stopped; a request is reposted."""
    n, blk = 8192, 4096
    src = _pattern(n * blk, 4)
    agent.register(src)
    agent.register([(0, 0, 9, f"rw,create:{tmp_path / 'rel.bin'}")], "FILE")
    mem = DescList.strided("DRAM", src.ctypes.data, blk, n, blk)
    files = _file_descs(np.random.default_rng(0).permutation(n) * blk, blk, 9)
    req = agent.create("WRITE", mem, files, agent.name)
    req.post()
    req.release()  # aborts or finds it done; must not hang or leave I/O running
    req2 = agent.create("WRITE", mem, files, agent.name)
    for _ in range(2):
        req2.post()
        assert req2.wait(30) is XferStatus.DONE
    req2.release()


def test_only_loopback_dram_to_file(agent: Agent, tmp_path: Path) -> None:
    a, b = np.zeros(4096, np.uint8), np.zeros(4096, np.uint8)
    agent.register(a)
    agent.register(b)
    with pytest.raises(NotSupportedError, match=r"DRAM or VRAM \(local\) <-> FILE"):
        agent.create(
            "WRITE",
            DescList.from_tuples([(a.ctypes.data, 4096, 0)], "DRAM"),
            DescList.from_tuples([(b.ctypes.data, 4096, 0)], "DRAM"),
            agent.name,
        )


def test_query_mem(agent: Agent, tmp_path: Path) -> None:
    there = tmp_path / "q.bin"
    there.write_bytes(b"abc")
    got = agent.query_mem(
        [(0, 0, 0, str(there)), (0, 0, 0, f"ro:{tmp_path}/nope")], "POSIX", "FILE"
    )
    assert got[0] is not None and got[0]["size"] == 3 and got[1] is None


def test_explicit_param_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """NIXL_POSIX_<PARAM> fills a parameter nobody gave; an explicit value wins over it (even
    one equal to the default), and so does the agent's config."""
    monkeypatch.setenv("NIXL_POSIX_ENGINE", "threads")
    monkeypatch.setenv("NIXL_POSIX_NUM_THREADS", "2")
    with Agent("posix-env", backends=[]) as a:
        b = a.create_backend("POSIX", {"num_threads": 4})
        assert isinstance(b, PosixBackend)
        assert b.params["num_threads"] == 4 and b.params.source("num_threads") == "explicit"
        assert b.params.source("engine") == "env NIXL_POSIX_ENGINE" and b.engine_name == "threads"
    with Agent("posix-cfg", backends=["POSIX"], backend_params={"POSIX": {"engine": "auto"}}) as a:
        b = a.backend("POSIX")
        assert b.params["engine"] == "auto" and b.params.source("engine") == "config"
        assert b.params["num_threads"] == 2


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"engine": "fast"}, "engine='fast'.*one of auto, uring, aio, threads"),
        ({"ring_entries": 0}, "ring_entries=0"),
        ({"ring_entries": 1 << 16}, "ring_entries=65536.*in 1..32768"),
        ({"num_threads": "two"}, "num_threads='two'"),
        ({"max_io_size": 10}, "max_io_size=10"),
        ({"max_io_size": 4 << 30}, "max_io_size=4294967296"),
        ({"inline_max_bytes": -1}, "inline_max_bytes=-1"),
        ({"engin": "threads"}, "unknown POSIX param 'engin'.*did you mean 'engine'"),
    ],
)
def test_bad_param_raises_naming_it(params: dict[str, object], named: str) -> None:
    """A bad value or an unknown name raises InvalidParamError naming the parameter."""
    with pytest.raises(InvalidParamError, match=named) as ei:
        PosixBackend("x", params)
    assert ei.value.param == next(iter(params))


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad NIXL_POSIX_<PARAM> fails agent creation naming the variable and the value."""
    monkeypatch.setenv("NIXL_POSIX_RING_ENTRIES", "lots")
    with pytest.raises(InvalidParamError, match=r"ring_entries='lots'.*NIXL_POSIX_RING_ENTRIES"):
        Agent("posix-bad-env", backends=["POSIX"])


def test_staging_must_hold_two_ios() -> None:
    """staging_bytes below 2 x max_io_size raises naming both parameters and their values."""
    with pytest.raises(
        InvalidParamError, match=r"staging_bytes=8388608 .* 2 x max_io_size=8388608"
    ) as ei:
        PosixBackend("x", {"staging_bytes": 8 << 20})
    assert ei.value.param == "staging_bytes"


def test_readme_params_table_matches_the_declarations() -> None:
    """The README's params table lists every declared parameter with its default and env var."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = {}
    for line in readme.split("## Params", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1].split()[0].strip("`"), cells[2].strip("`"))
    assert rows == {p.name: (p.display, env_var("POSIX", p.name)) for p in PARAMS}


def test_many_small_descriptors_from_prepped_lists(agent: Agent, tmp_path: Path) -> None:
    """65536 descriptors of 512 B, prepared once and made with index arrays."""
    n, blk = 65536, 512
    src, back = _pattern(n * blk, 6), np.zeros(n * blk, np.uint8)
    agent.register(src)
    agent.register(back)
    agent.register([(0, 0, 12, f"rw,create:{tmp_path / 'small.bin'}")], "FILE")
    lp = agent.prep("", DescList.strided("DRAM", src.ctypes.data, blk, n, blk))
    bp = agent.prep("", DescList.strided("DRAM", back.ctypes.data, blk, n, blk))
    fp = agent.prep(agent.name, _file_descs(np.arange(n) * blk, blk, 12))
    perm = np.random.default_rng(8).permutation(n)
    for op, mine in (("WRITE", lp), ("READ", bp)):
        with agent.make(op, mine, perm, fp, np.arange(n), merge=False) as req:
            req.post()
            assert req.wait(30) is XferStatus.DONE
    np.testing.assert_array_equal(back.reshape(n, blk)[perm], src.reshape(n, blk)[perm])


def test_uring_entries_the_kernel_did_not_take_are_handed_in_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """io_uring_enter may consume fewer entries than asked (memory pressure): the rest are handed
    in later, and the request completes instead of waiting forever for completions."""
    if (why := uring_unavailable_reason()) is not None:
        pytest.skip(f"io_uring unavailable here: {why}")
    from nixl_posix import _uring

    real = _uring.Ring._enter
    calls = {"short": 0}

    def stingy(self: _uring.Ring, to_submit: int, min_complete: int, flags: int) -> int:
        if to_submit > 1 and calls["short"] < 4:
            calls["short"] += 1
            return real(self, to_submit // 2, min_complete, flags)
        return real(self, to_submit, min_complete, flags)

    monkeypatch.setattr(_uring.Ring, "_enter", stingy)
    n, blk = 256, 4096
    src, back = _pattern(n * blk, 9), np.zeros(n * blk, np.uint8)
    with Agent("stingy", backends=["POSIX"], backend_params={"POSIX": {"engine": "uring"}}) as a:
        a.register(src)
        a.register(back)
        a.register([(0, 0, 7, f"rw,create:{tmp_path / 's.bin'}")], "FILE")
        files = _file_descs(np.arange(n)[::-1] * blk, blk, 7)
        for op, buf in (("WRITE", src), ("READ", back)):
            mem = DescList.strided("DRAM", buf.ctypes.data, blk, n, blk)
            assert _run(a, op, mem, files) is XferStatus.DONE
    assert calls["short"] == 4
    np.testing.assert_array_equal(back, src)
