"""NVLINK's own tests: the metadata codec, probe, params and the pointer mapping (everywhere),
and on a GPU the copy kernel's alignment paths, chunking, DRAM <-> VRAM, cross-process
transfers, refusals with reasons, make() on the host (small batches) and on the GPU,
stream-ordered posting, completion events and device-side memory views."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from nixl_nvlink._wire import (
    KIND_DEVICE,
    KIND_HOST,
    KIND_VMM,
    ConnInfo,
    RegionBlob,
    decode_conn,
    decode_region,
    encode_conn,
    encode_region,
)
from nixl_nvlink.backend import NvlinkBackend

from nixl_core.agent import Agent
from nixl_core.backend import XferStatus
from nixl_core.descriptors import DescList
from nixl_core.errors import (
    InvalidDescriptorError,
    InvalidParamError,
    MetadataError,
    NotPostedError,
    NotSupportedError,
)
from nixl_core.host import HostIdentity, local_identity
from nixl_core.params import env_var, resolve_params
from nixl_core.testing import BackendFixtures, PeerProcess

SRC_SEED, PEER_SEED, OTHER_SEED = 101, 202, 303


# ---------------------------------------------------------------------------------- everywhere
def test_entry_point_registers_nvlink(nixl_fresh_plugins: Any) -> None:
    """The installed entry point adds the NVLINK backend to the registry."""
    cls = nixl_fresh_plugins.registry.get("NVLINK")
    assert cls.name == "NVLINK"
    assert cls.supports_remote and cls.supports_notif and cls.supports_local


def test_probe_never_raises_and_says_why(nixl_fresh_plugins: Any) -> None:
    """probe() returns an Availability; when unavailable, its reason is not empty."""
    avail = nixl_fresh_plugins.registry.get("NVLINK").probe()
    assert avail.available or avail.reason


def test_conn_info_round_trip_and_strictness() -> None:
    """Connection info (host identity + socket address) decodes to what was encoded; every
    truncation and extra byte is refused; offsets inside the identity count from the start."""
    ident = HostIdentity(b"boot-id-1", "host-a", 1234, 4026531836, 4026531840)
    info = ConnInfo(ident, b"\0nixl-nvlink-x")
    raw = encode_conn(info)
    assert decode_conn(raw) == info
    for cut in range(len(raw)):
        with pytest.raises(MetadataError):
            decode_conn(raw[:cut])
    with pytest.raises(MetadataError, match="trailing"):
        decode_conn(raw + b"\0")
    with pytest.raises(MetadataError, match="magic"):
        decode_conn(b"XXXX" + raw[4:])
    with pytest.raises(MetadataError, match="upgrade the older side"):
        decode_conn(b"NVC1" + raw[4:])
    with pytest.raises(MetadataError, match="host identity") as bad:
        decode_conn(raw[:6] + b"XXXX" + raw[10:])
    assert bad.value.offset == 6
    assert decode_conn(encode_conn(ConnInfo(local_identity(), b"a"))).ident == local_identity()


def test_params_are_declared_and_resolved_by_the_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVLINK's params resolve through the core: "false" is False (it used to read as true),
    explicit beats the environment, bad values name the param and what is accepted."""
    specs = NvlinkBackend.param_specs
    assert resolve_params("NVLINK", specs, env={})["device_gather"] is True
    for off in ("false", "0", "no", "off"):
        got = resolve_params("NVLINK", specs, explicit={"device_gather": off}, env={})
        assert got["device_gather"] is False, off
    env = {env_var("NVLINK", "device_gather"): "false", env_var("NVLINK", "chunk_bytes"): "4096"}
    got = resolve_params("NVLINK", specs, explicit={"chunk_bytes": 1024}, env=env)
    assert got["device_gather"] is False and got.source("device_gather").startswith("env ")
    assert got["chunk_bytes"] == 1024 and got.source("chunk_bytes") == "explicit"
    for name, bad in (
        ("chunk_bytes", 1000),
        ("chunk_bytes", 256),
        ("blocks_per_sm", 0),
        ("blocks_per_sm", 33),
        ("host_gather_max", -1),
        ("device_gather", "maybe"),
    ):
        with pytest.raises(InvalidParamError, match=name) as exc:
            resolve_params("NVLINK", specs, explicit={name: bad}, env={})
        assert exc.value.param == name
    monkeypatch.setenv(env_var("NVLINK", "host_gather_max"), "0")
    assert resolve_params("NVLINK", specs)["host_gather_max"] == 0


def test_readme_params_table_matches_the_declarations() -> None:
    """The README's params table is the declarations: name, default, env var, accepted values
    and meaning of every param, and no other row."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("\n| param | default | env var | accepts | meaning |\n", 1)[1]
    rows = {}
    for line in table.split("\n\n", 1)[0].splitlines()[1:]:  # past the |---| line
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    want = {
        p.name: [
            f"`{p.name}`",
            f"`{p.display}`",
            f"`{env_var('NVLINK', p.name)}`",
            p.accepted,
            p.doc,
        ]
        for p in NvlinkBackend.param_specs
    }
    assert {k: rows.get(k) for k in want} == want
    assert not set(rows) - set(want), "README params table has rows for no declared param"


def test_region_blob_round_trip_and_strictness() -> None:
    """Device and host blobs decode to what was encoded; bad length, kind and offset are refused."""
    dev = RegionBlob(KIND_DEVICE, b"u" * 16, 0x7F0000000000, 1 << 30, 4096, b"h" * 64)
    raw = encode_region(dev)
    assert decode_region(raw) == dev
    host = encode_region(RegionBlob(KIND_HOST))
    assert decode_region(host).is_host
    for cut in range(len(raw)):
        with pytest.raises(MetadataError):
            decode_region(raw[:cut])
    with pytest.raises(MetadataError):
        decode_region(raw + b"\0")
    with pytest.raises(MetadataError):
        decode_region(raw[:4] + b"\x07" + raw[5:])
    bad = RegionBlob(KIND_DEVICE, b"u" * 16, 0, 4096, 4096, b"h" * 64)
    with pytest.raises(MetadataError, match="outside"):
        decode_region(encode_region(bad), 3)


def test_vmm_region_blob_round_trip_and_strictness() -> None:
    """A VMM blob (span of two chunks) decodes to what was encoded; truncations, extra bytes,
    another version, gaps between chunks and an offset outside the span are refused."""
    chunks = ((0, 2 << 20, 7), (2 << 20, 20 << 20, 9))
    vmm = RegionBlob(KIND_VMM, b"u" * 16, 0x7F0000000000, 22 << 20, 4096, b"", chunks)
    raw = encode_region(vmm)
    assert decode_region(raw) == vmm
    for cut in range(len(raw)):
        with pytest.raises(MetadataError):
            decode_region(raw[:cut])
    with pytest.raises(MetadataError):
        decode_region(raw + b"\0")
    with pytest.raises(MetadataError, match="version"):
        decode_region(raw[:5] + b"\x02" + raw[6:])
    gap = RegionBlob(
        KIND_VMM, b"u" * 16, 0, 22 << 20, 0, b"", ((0, 2 << 20, 1), (4 << 20, 18 << 20, 2))
    )
    with pytest.raises(MetadataError, match="contiguous"):
        decode_region(encode_region(gap))
    far = RegionBlob(KIND_VMM, b"u" * 16, 0, 22 << 20, 22 << 20, b"", chunks)
    with pytest.raises(MetadataError, match="offset"):
        decode_region(encode_region(far))


def test_side_pointers_map_each_registration_without_a_loop() -> None:
    """A side's descriptors become device pointers by one offset per registration (vectorized);
    the GPUs holding them and host memory are reported; a peer's DRAM is refused by name."""
    from nixl_nvlink._regions import LocalReg, RemoteReg
    from nixl_nvlink._tables import pointers

    from nixl_core.backend import XferSide
    from nixl_core.memory import MemType

    regs = {
        3: RemoteReg("p", False, 1, 0x1000, b"k"),
        7: LocalReg(0x9000, -1, True, -0x100, False, b""),
        9: RemoteReg("p", False, 2, 0, b""),
    }
    slots = np.array([7, 3, 9, 3, 7], np.int64)
    addrs = np.array([0x9000, 0x20, 0x40, 0x60, 0x9010], np.uint64)
    n = len(addrs)
    side = XferSide(
        MemType.VRAM, addrs, np.full(n, 8, np.uint64), np.zeros(n, np.uint64), slots, regs
    )
    ptrs, devs, host = pointers(side, "remote")
    np.testing.assert_array_equal(ptrs, [0x8F00, 0x1020, 0x40, 0x1060, 0x8F10])
    assert devs == {1, 2} and host
    one = attrs.evolve(side, reg_slots=np.full(n, 3, np.int64), single_slot=3)
    ptrs, devs, host = pointers(one, "remote")
    np.testing.assert_array_equal(ptrs, addrs + np.uint64(0x1000))
    assert devs == {1} and not host
    regs[3] = RemoteReg("peer-x", True, -1, 0, b"")
    with pytest.raises(NotSupportedError, match="'peer-x''s DRAM"):
        pointers(side, "remote")


# ---------------------------------------------------------------------------------- on a GPU
class TestNvlinkGpu(BackendFixtures):
    """Behaviour beyond the conformance suites (skips with probe()'s reason without a GPU)."""

    backend_name = "NVLINK"
    xfer_timeout = 30.0

    @staticmethod
    def cp() -> Any:
        import cupy

        return cupy

    def _run(self, agent: Agent, op: str, local: DescList, remote: DescList, peer: str) -> str:
        with agent.create(op, local, remote, peer, merge=False) as req:
            req.post()
            assert req.wait(self.xfer_timeout) is XferStatus.DONE
            return req.path

    def test_unaligned_offsets_and_lengths(self, agent: Agent, buffer_factory: Any) -> None:
        """Pairs aligned mod 16, mod 4 and not at all, with odd lengths, copy exactly."""
        nbytes = 4 << 20
        src = buffer_factory("VRAM", nbytes, SRC_SEED)
        dst = buffer_factory("VRAM", nbytes)
        agent.register(src)
        agent.register(dst)
        s, d = self.describe(src)[0], self.describe(dst)[0]
        rng = np.random.default_rng(5)
        n = 2000
        lens = rng.integers(0, 1500, n)
        src_off = np.arange(n) * 2048 + rng.integers(0, 40, n)
        shift = rng.choice([0, 16, 4, 1, 7, 13], n)  # same residue mod 16 / mod 4 / none
        dst_off = np.arange(n) * 2048 + (src_off % 2048 + shift) % 64
        local = DescList.from_array(np.stack([s + src_off, lens, np.zeros(n, np.int64)], 1), "VRAM")
        remote = DescList.from_array(
            np.stack([d + dst_off, lens, np.zeros(n, np.int64)], 1), "VRAM"
        )
        assert self._run(agent, "WRITE", local, remote, agent.name) == "nvlink:local"
        want = np.zeros(nbytes, np.uint8)
        pat = self.pattern(SRC_SEED, nbytes)
        for so, do, ln in zip(src_off.tolist(), dst_off.tolist(), lens.tolist(), strict=True):
            want[do : do + ln] = pat[so : so + ln]  # reference only: the data path has no loop
        np.testing.assert_array_equal(self.host(dst), want)

    def test_long_descriptors_are_chunked(self, agent: Agent, buffer_factory: Any) -> None:
        """Descriptors far longer than a chunk (and not a multiple of it) copy completely."""
        nbytes = (40 << 20) + 5
        src = buffer_factory("VRAM", nbytes, SRC_SEED)
        dst = buffer_factory("VRAM", nbytes)
        agent.register(src)
        agent.register(dst)
        s, d = self.describe(src)[0], self.describe(dst)[0]
        cut = (24 << 20) + 3
        local = DescList.from_tuples([(s, cut, 0), (s + cut, nbytes - cut, 0)], "VRAM")
        remote = DescList.from_tuples([(d + nbytes - cut, cut, 0), (d, nbytes - cut, 0)], "VRAM")
        self._run(agent, "WRITE", local, remote, agent.name)
        got = self.host(dst)
        pat = self.pattern(SRC_SEED, nbytes)
        np.testing.assert_array_equal(got[nbytes - cut :], pat[:cut])
        np.testing.assert_array_equal(got[: nbytes - cut], pat[cut:])

    @pytest.mark.parametrize("op", ["WRITE", "READ"])
    def test_dram_vram_local(self, agent: Agent, buffer_factory: Any, op: str) -> None:
        """Pinned DRAM <-> VRAM through the same kernel, scattered 32 KiB blocks, both ways."""
        n, blk = 512, 32 << 10
        host = buffer_factory("DRAM", n * blk, SRC_SEED)
        dev = buffer_factory("VRAM", n * blk, PEER_SEED)
        agent.register(host)
        agent.register(dev)
        h, g = self.describe(host)[0], self.describe(dev)[0]
        perm = np.random.default_rng(3).permutation(n)
        local = self.blocks("DRAM", h, 0, np.arange(n) * blk, blk)
        remote = self.blocks("VRAM", g, 0, perm * blk, blk)
        assert self._run(agent, op, local, remote, agent.name) == "nvlink:local+host"
        a = self.pattern(SRC_SEED, n * blk).reshape(n, blk)
        b = self.pattern(PEER_SEED, n * blk).reshape(n, blk)
        if op == "WRITE":
            want = b.copy()
            want[perm] = a
            np.testing.assert_array_equal(self.host(dev).reshape(n, blk), want)
        else:
            np.testing.assert_array_equal(self.host(host).reshape(n, blk), b[perm])

    def test_dram_to_peer_vram_with_notif(
        self, agent: Agent, peer: PeerProcess, buffer_factory: Any
    ) -> None:
        """Local pinned DRAM is written into a peer's VRAM; the notification follows the data."""
        n, blk = 256, 32 << 10
        host = buffer_factory("DRAM", n * blk, SRC_SEED)
        agent.register(host)
        pbuf = peer.alloc(n * blk, None, "VRAM")
        self.link(agent, peer)
        local = self.blocks("DRAM", self.describe(host)[0], 0, np.arange(n) * blk, blk)
        remote = self.blocks("VRAM", pbuf.addr, pbuf.dev, np.arange(n)[::-1] * blk, blk)
        with agent.create("WRITE", local, remote, peer.name, notif=b"done") as req:
            req.post()
            assert req.wait(self.xfer_timeout) is XferStatus.DONE
            assert req.path == "nvlink:ipc+host"
        want = self.pattern(SRC_SEED, n * blk).reshape(n, blk)[::-1]
        assert peer.digest(pbuf) == self.digest(want)
        got: list[bytes] = []
        deadline = time.monotonic() + self.xfer_timeout
        while not got and time.monotonic() < deadline:
            got = peer.get_notifs().get(agent.name, [])
        assert got == [b"done"]

    def test_large_scattered_read_from_peer(
        self, agent: Agent, peer: PeerProcess, buffer_factory: Any
    ) -> None:
        """65536 scattered 4 KiB blocks read from a peer's VRAM with prepared lists arrive intact."""
        n, blk = 65536, 4096
        dst = buffer_factory("VRAM", n * blk)
        agent.register(dst)
        pbuf = peer.alloc(n * blk, PEER_SEED, "VRAM")
        self.link(agent, peer)
        perm = np.random.default_rng(17).permutation(n)
        lp = agent.prep("", DescList.strided("VRAM", self.describe(dst)[0], blk, n, blk, 0))
        rp = agent.prep(peer.name, DescList.strided("VRAM", pbuf.addr, blk, n, blk, pbuf.dev))
        with agent.make("READ", lp, perm, rp, np.arange(n), merge=False) as req:
            assert req.path == "nvlink:ipc"
            for _ in range(3):  # reposts reuse the device-resident table
                req.post()
                assert req.wait(self.xfer_timeout) is XferStatus.DONE
        got = self.host(dst).reshape(n, blk)
        np.testing.assert_array_equal(got[perm], self.pattern(PEER_SEED, n * blk).reshape(n, blk))

    def test_peer_dram_is_refused_with_reason(
        self, agent: Agent, peer: PeerProcess, buffer_factory: Any
    ) -> None:
        """A transfer touching a peer's DRAM is refused, naming CUDA IPC's limit and UCX."""
        buf = buffer_factory("VRAM", 4096)
        agent.register(buf)
        pbuf = peer.alloc(4096, None, "DRAM")
        self.link(agent, peer)
        with pytest.raises(NotSupportedError, match="UCX"):
            agent.create(
                "WRITE",
                DescList.from_tuples([self.describe(buf)], "VRAM"),
                DescList.from_tuples([pbuf.desc()], "DRAM"),
                peer.name,
            )

    def test_other_host_or_netns_is_refused_with_reason(self, agent: Agent) -> None:
        """Connection info from another host or network namespace is refused (the core's
        same-host rule) with a message that says to use UCX; another pid namespace is not."""
        nv = agent.backend("NVLINK")
        info = decode_conn(nv.connection_info())
        far = attrs.evolve(info.ident, boot_id=b"another-boot", hostname="elsewhere")
        with pytest.raises(NotSupportedError, match=r"another host.*UCX"):
            nv.load_remote_conn("far-agent", encode_conn(ConnInfo(far, info.sock_addr)))
        netns = attrs.evolve(info.ident, net_ns=info.ident.net_ns + 1)
        with pytest.raises(NotSupportedError, match=r"network namespace.*UCX"):
            nv.load_remote_conn("ns-agent", encode_conn(ConnInfo(netns, info.sock_addr)))
        pidns = attrs.evolve(info.ident, pid_ns=info.ident.pid_ns + 1)
        nv.load_remote_conn("pidns-agent", encode_conn(ConnInfo(pidns, info.sock_addr)))
        nv.disconnect("pidns-agent")

    def test_stream_order_and_completion_event(self, agent: Agent, buffer_factory: Any) -> None:
        """req.post(stream=s) waits for a slow producer on the caller's stream (no host sync),
        and a consumer stream waiting on req.completion_event() sees the copied bytes."""
        cp = self.cp()
        nbytes = 1 << 20
        src = buffer_factory("VRAM", nbytes)
        dst = buffer_factory("VRAM", nbytes)
        agent.register(src)
        agent.register(dst)
        producer = cp.RawKernel(
            r"""
            extern "C" __global__ void slow_fill(unsigned char* p, unsigned long long n) {
                long long t0 = clock64();
                while (clock64() - t0 < 200000000LL) { }
                for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
                     i += gridDim.x * blockDim.x) p[i] = 7;
            }
            """,
            "slow_fill",
        )
        user = cp.cuda.Stream(non_blocking=True)
        consumer = cp.cuda.Stream(non_blocking=True)
        req = agent.create(
            "WRITE",
            DescList.from_tuples([self.describe(src)], "VRAM"),
            DescList.from_tuples([self.describe(dst)], "VRAM"),
            agent.name,
        )
        with user:
            producer((64,), (256,), (src, np.uint64(nbytes)))
        with pytest.raises(NotPostedError):
            req.completion_event()
        assert req.post(stream=user) is XferStatus.IN_PROGRESS
        consumer.wait_event(req.completion_event())
        with consumer:
            total = int(dst.sum(dtype=cp.uint64))
        assert total == 7 * nbytes
        assert req.wait(self.xfer_timeout) is XferStatus.DONE
        req.release()

    @pytest.mark.parametrize("src_mem", ["VRAM", "DRAM"])
    def test_make_gathers_on_the_gpu(
        self,
        agent_factory: Any,
        buffer_factory: Any,
        monkeypatch: pytest.MonkeyPatch,
        src_mem: str,
    ) -> None:
        """make() from prepared lists gathers the table on the GPU (index upload + gather
        kernel) from columns kept resident since the first make; bytes land by index.
        host_gather_max=0 (from its environment variable) sends every make to the GPU."""
        monkeypatch.setenv(env_var("NVLINK", "host_gather_max"), "0")
        agent = agent_factory()
        assert agent.backend("NVLINK").params.source("host_gather_max").startswith("env ")
        n, blk = 4096, 512
        src = buffer_factory(src_mem, n * blk, SRC_SEED)
        dst = buffer_factory("VRAM", n * blk)
        agent.register(src)
        agent.register(dst)
        (s, _, sdev), (d, _, ddev) = self.describe(src), self.describe(dst)
        lp = agent.prep("", DescList.strided(src_mem, s, blk, n, blk, sdev))
        rp = agent.prep(agent.name, DescList.strided("VRAM", d, blk, n, blk, ddev))
        rng = np.random.default_rng(29)
        want_src = self.pattern(SRC_SEED, n * blk).reshape(n, blk)
        for k in range(3):
            li, ri = rng.permutation(n)[: n - k], rng.permutation(n)[: n - k]
            self.fill(dst, OTHER_SEED)
            with agent.make("WRITE", lp, li, rp, ri) as req:
                assert req.backend_request.keep, "make took the host path"
                req.post()
                assert req.wait(self.xfer_timeout) is XferStatus.DONE
            want = self.pattern(OTHER_SEED, n * blk).reshape(n, blk)
            want[ri] = want_src[li]
            np.testing.assert_array_equal(self.host(dst).reshape(n, blk), want)

    @pytest.mark.parametrize("src_mem", ["VRAM", "DRAM"])
    def test_make_small_batches_gather_on_the_host(
        self, agent: Agent, buffer_factory: Any, src_mem: str
    ) -> None:
        """make() of at most host_gather_max descriptors writes its table into pinned staging
        memory and uploads it with one async copy (no kernel); 20 requests made before any is
        posted (more than the staging ring's slots) each keep their own table."""
        n, blk, batch = 4096, 512, 64
        src = buffer_factory(src_mem, n * blk, SRC_SEED)
        dst = buffer_factory("VRAM", n * blk, OTHER_SEED)
        agent.register(src)
        agent.register(dst)
        (s, _, sdev), (d, _, ddev) = self.describe(src), self.describe(dst)
        lp = agent.prep("", DescList.strided(src_mem, s, blk, n, blk, sdev))
        rp = agent.prep(agent.name, DescList.strided("VRAM", d, blk, n, blk, ddev))
        rng = np.random.default_rng(37)
        targets = rng.permutation(n)[: 20 * batch].reshape(20, batch)
        sources = rng.integers(0, n, (20, batch))
        reqs = []
        for li, ri in zip(sources, targets, strict=True):
            req = agent.make("WRITE", lp, li, rp, ri, merge=False)
            assert req.backend_request.staged and not req.backend_request.keep
            reqs.append(req)
        for req in reqs:
            req.post()
        for req in reqs:
            assert req.wait(self.xfer_timeout) is XferStatus.DONE
            req.release()
        want = self.pattern(OTHER_SEED, n * blk).reshape(n, blk)
        want[targets.ravel()] = self.pattern(SRC_SEED, n * blk).reshape(n, blk)[sources.ravel()]
        np.testing.assert_array_equal(self.host(dst).reshape(n, blk), want)

    def test_make_with_long_descriptors_chunks_on_the_host(
        self, agent: Agent, buffer_factory: Any
    ) -> None:
        """Prepared lists with descriptors longer than chunk_bytes still copy completely."""
        n, blk = 8, (1 << 20) + 16
        src = buffer_factory("VRAM", n * blk, SRC_SEED)
        dst = buffer_factory("VRAM", n * blk)
        agent.register(src)
        agent.register(dst)
        lp = agent.prep("", DescList.strided("VRAM", self.describe(src)[0], blk, n, blk, 0))
        rp = agent.prep(agent.name, DescList.strided("VRAM", self.describe(dst)[0], blk, n, blk, 0))
        perm = np.random.default_rng(31).permutation(n)
        with agent.make("WRITE", lp, perm, rp, np.arange(n)) as req:
            assert not req.backend_request.keep
            req.post()
            assert req.wait(self.xfer_timeout) is XferStatus.DONE
        want = self.pattern(SRC_SEED, n * blk).reshape(n, blk)[perm]
        np.testing.assert_array_equal(self.host(dst).reshape(n, blk), want)

    def test_mem_view_gpu_initiated_gather(
        self, agent: Agent, peer: PeerProcess, buffer_factory: Any
    ) -> None:
        """mem_view() of descriptors the agent resolved gives device pointers into a peer's
        VRAM; the example kernel gathers scattered peer blocks with them, and scatters into
        them, with no transfer request. The agent's checks name a bad descriptor; a peer's
        DRAM and a side resolved for another backend are refused."""
        from nixl_nvlink.device_example import gather_blocks, scatter_blocks

        cp = self.cp()
        n, blk = 1024, 4096
        pbuf = peer.alloc(n * blk, PEER_SEED, "VRAM")
        hbuf = peer.alloc(4096, None, "DRAM")
        self.link(agent, peer)
        nv = agent.backend("NVLINK")
        perm = np.random.default_rng(23).permutation(n)
        blocks = self.blocks("VRAM", pbuf.addr, pbuf.dev, perm * blk, blk)
        view = nv.mem_view(agent.resolve(peer.name, blocks, backend="NVLINK"))
        assert view.dtype == cp.uint64 and view.size == n
        out = cp.zeros(n * blk, cp.uint8)
        gather_blocks(view, blk, out)
        cp.cuda.get_current_stream().synchronize()
        want = self.pattern(PEER_SEED, n * blk).reshape(n, blk)[perm]
        np.testing.assert_array_equal(cp.asnumpy(out).reshape(n, blk), want)
        src = cp.asarray(self.pattern(SRC_SEED, n * blk))
        scatter_blocks(view, blk, src)
        cp.cuda.get_current_stream().synchronize()
        back = np.empty((n, blk), np.uint8)
        back[perm] = self.pattern(SRC_SEED, n * blk).reshape(n, blk)
        assert peer.digest(pbuf) == self.digest(back)
        outside = [(pbuf.addr, 16, pbuf.dev), (pbuf.addr + n * blk, 16, pbuf.dev)]
        with pytest.raises(InvalidDescriptorError, match="descriptor 1"):
            agent.resolve(peer.name, outside, "VRAM", backend="NVLINK")
        with pytest.raises(NotSupportedError, match="DRAM"):
            nv.mem_view(agent.resolve(peer.name, [hbuf.desc()], "DRAM", backend="NVLINK"))
        side = agent.resolve(peer.name, blocks, backend="NVLINK")
        foreign = attrs.evolve(side, slot_handles=dict.fromkeys(side.slot_handles, 0))
        with pytest.raises(InvalidParamError, match="resolved for NVLINK"):
            nv.mem_view(foreign)

    def test_small_transfer_latency(
        self, agent: Agent, peer: PeerProcess, buffer_factory: Any
    ) -> None:
        """A 64 x 4 KiB WRITE to a peer completes, post to done, well under a millisecond."""
        n, blk = 64, 4096
        src = buffer_factory("VRAM", n * blk, SRC_SEED)
        agent.register(src)
        pbuf = peer.alloc(n * blk, None, "VRAM")
        self.link(agent, peer)
        local = self.blocks("VRAM", self.describe(src)[0], 0, np.arange(n) * blk, blk)
        remote = self.blocks("VRAM", pbuf.addr, pbuf.dev, np.arange(n)[::-1] * blk, blk)
        times = []
        with agent.create("WRITE", local, remote, peer.name, merge=False) as req:
            for _ in range(200):
                t0 = time.perf_counter()
                req.post()
                req.wait(self.xfer_timeout)
                times.append(time.perf_counter() - t0)
        p50 = float(np.median(times[20:])) * 1e6
        print(f"NVLINK 64 x 4 KiB post-to-done p50 {p50:.1f} us")
        assert p50 < 1000
