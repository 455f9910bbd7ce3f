"""The conformance suites every backend must pass.

Each suite is a mixin of test methods; combine it with :class:`~nixl_core.testing.BackendFixtures`
(see that module for the one-class wiring). A suite names the capability flags it needs in
``_nixl_requires``; its tests skip, with the reason, on backends that lack one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest

from nixl_core.agent import Agent, AgentConfig
from nixl_core.backend import XferStatus
from nixl_core.descriptors import DescList
from nixl_core.errors import (
    BackendNotFoundError,
    InvalidDescriptorError,
    InvalidParamError,
    LengthMismatchError,
    MemTypeError,
    MetadataError,
    NotPostedError,
    NotSupportedError,
    RegistrationError,
    RepostActiveError,
    StaleHandleError,
    UnknownAgentError,
)
from nixl_core.metadata import AgentMetadata
from nixl_core.testing._peer import OTHER_SEED, PEER_SEED, SRC_SEED, PeerProcess

__all__ = [
    "BadInputSuite",
    "LocalXferSuite",
    "NotifSuite",
    "RegistrationSuite",
    "RemoteXferSuite",
]

AgentFactory = Callable[..., Agent]
BufferFactory = Callable[..., Any]


class RegistrationSuite:
    """Memory registration: round trips, duplicates, overlaps, input kinds, metadata."""

    _nixl_requires: ClassVar[tuple[str, ...]] = ()
    # Provided by BackendFixtures.
    describe: Callable[[Any], tuple[int, int, int]]
    require: Callable[..., Any]

    def test_register_deregister_round_trip(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """A registered buffer is listed until it is deregistered, and can be registered again."""
        buf = buffer_factory(mem_type, 4096)
        addr, nbytes, dev = self.describe(buf)
        reg = agent.register(buf)
        assert len(reg) == 1
        assert reg[0] == (addr, nbytes, dev)
        assert agent.registered(mem_type)[0] == (addr, nbytes, dev)
        agent.deregister(reg)
        assert len(agent.registered(mem_type)) == 0
        again = agent.register(buf)
        assert len(agent.registered(mem_type)) == 1
        agent.deregister(again)

    def test_register_twice_raises(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """Registering the same region twice raises RegistrationError naming its index."""
        buf = buffer_factory(mem_type, 4096)
        agent.register(buf)
        with pytest.raises(RegistrationError) as info:
            agent.register(buf)
        assert info.value.index == 0
        assert len(agent.registered(mem_type)) == 1

    def test_overlapping_registration_raises(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """A region overlapping a registered one (or another of its own list) raises, all-or-nothing."""
        buf = buffer_factory(mem_type, 8192)
        addr, _, dev = self.describe(buf)
        agent.register(DescList.from_tuples([(addr, 4096, dev)], mem_type))
        with pytest.raises(RegistrationError) as info:
            agent.register(
                DescList.from_tuples([(addr + 4096, 1024, dev), (addr + 2048, 4096, dev)], mem_type)
            )
        assert info.value.index == 1
        with pytest.raises(RegistrationError):
            agent.register(DescList.from_tuples([(addr + 6000, 100, dev)] * 2, mem_type))
        assert len(agent.registered(mem_type)) == 1, "a failed registration left regions behind"

    def test_deregister_unknown_names_index(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """Deregistering a region that was never registered raises naming its index."""
        buf = buffer_factory(mem_type, 4096)
        addr, nbytes, dev = self.describe(buf)
        agent.register(buf)
        bad = DescList.from_tuples([(addr, nbytes, dev), (addr + 1, 10, dev)], mem_type)
        with pytest.raises(RegistrationError, match="descriptor 1") as info:
            agent.deregister(bad)
        assert info.value.index == 1
        assert len(agent.registered(mem_type)) == 1, "a failed deregistration removed regions"

    @pytest.mark.parametrize("kind", ["object", "array", "tuples", "desclist", "strided"])
    def test_register_input_kinds(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str, kind: str
    ) -> None:
        """Tensors, Nx3 arrays, tuples, DescLists and strided lists all register the same regions."""
        buf = buffer_factory(mem_type, 16384)
        addr, nbytes, dev = self.describe(buf)
        if kind == "object":
            reg = agent.register(buf)
            want = [(addr, nbytes, dev)]
        elif kind == "array":
            arr = np.array([[addr, 8192, dev], [addr + 8192, 8192, dev]], dtype=np.uint64)
            reg = agent.register(arr, mem_type)
            want = [(addr, 8192, dev), (addr + 8192, 8192, dev)]
        elif kind == "tuples":
            want = [(addr, 4096, dev), (addr + 4096, 12288, dev)]
            reg = agent.register(want, mem_type)
        elif kind == "desclist":
            want = [(addr, nbytes, dev)]
            reg = agent.register(DescList.from_tuples(want, mem_type))
        else:
            reg = agent.register(DescList.strided(mem_type, addr, 4096, 4, 1024, dev))
            want = [(addr + 4096 * i, 1024, dev) for i in range(4)]
        assert sorted(reg) == want
        assert sorted(agent.registered(mem_type)) == want
        # Every registered region is usable as a transfer's local side.
        lp = agent.prep("", DescList.from_tuples(want, mem_type))
        assert len(lp) == len(want)
        agent.deregister(reg)
        assert len(agent.registered(mem_type)) == 0

    def test_metadata_carries_registrations(
        self, agent_factory: AgentFactory, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """A second agent that loads the metadata can prepare descriptors inside the registration."""
        self.require("supports_remote")
        owner, other = agent_factory(), agent_factory()
        buf = buffer_factory(mem_type, 8192)
        addr, nbytes, dev = self.describe(buf)
        owner.register(buf)
        assert other.add_remote(owner.metadata()) == owner.name
        assert owner.name in other.remote_agents
        rp = other.prep(owner.name, DescList.from_tuples([(addr + 100, 1000, dev)], mem_type))
        assert len(rp) == 1
        with pytest.raises(InvalidDescriptorError):
            other.prep(owner.name, DescList.from_tuples([(addr + nbytes, 1, dev)], mem_type))


class LocalXferSuite:
    """Transfers within one agent (peer = the agent's own name)."""

    _nixl_requires: ClassVar[tuple[str, ...]] = ("supports_local",)
    describe: Callable[[Any], tuple[int, int, int]]
    host: Callable[[Any], np.ndarray]
    pattern: Callable[[int, int], np.ndarray]
    fill: Callable[[Any, int], None]
    blocks: Callable[..., DescList]
    registered_pair: Callable[..., tuple[Any, Any, tuple[int, int], tuple[int, int]]]
    backend_name: str
    xfer_timeout: float

    def _whole(self, buf: Any, mem_type: str) -> DescList:
        return DescList.from_tuples([self.describe(buf)], mem_type)

    @pytest.mark.parametrize("nbytes", [4096, 1 << 20])
    def test_write_and_read(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str, nbytes: int
    ) -> None:
        """WRITE copies a buffer into another of the same agent, and READ copies it back."""
        src = buffer_factory(mem_type, nbytes, SRC_SEED)
        dst = buffer_factory(mem_type, nbytes)
        back = buffer_factory(mem_type, nbytes)
        for b in (src, dst, back):
            agent.register(b)
        for op, local, remote in (("WRITE", src, dst), ("READ", back, dst)):
            with agent.create(
                op, self._whole(local, mem_type), self._whole(remote, mem_type), agent.name
            ) as req:
                req.post()
                assert req.wait(self.xfer_timeout) is XferStatus.DONE
        np.testing.assert_array_equal(self.host(dst), self.pattern(SRC_SEED, nbytes))
        np.testing.assert_array_equal(self.host(back), self.pattern(SRC_SEED, nbytes))

    @pytest.mark.parametrize("op", ["WRITE", "READ"])
    def test_scattered_small_descriptors(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str, op: str
    ) -> None:
        """4096 scattered 64-byte descriptors in a random permutation land where they should."""
        n, blk = 4096, 64
        perm = np.random.default_rng(7).permutation(n)
        _src, dst, (s_addr, s_dev), (d_addr, d_dev) = self.registered_pair(
            agent, buffer_factory, mem_type, n * blk
        )
        seq = np.arange(n) * blk
        if op == "WRITE":  # local src block perm[i] -> remote dst block i
            local = self.blocks(mem_type, s_addr, s_dev, perm * blk, blk)
            remote = self.blocks(mem_type, d_addr, d_dev, seq, blk)
        else:  # READ: remote src block perm[i] -> local dst block i
            local = self.blocks(mem_type, d_addr, d_dev, seq, blk)
            remote = self.blocks(mem_type, s_addr, s_dev, perm * blk, blk)
        with agent.create(op, local, remote, agent.name) as req:
            req.post()
            assert req.wait(self.xfer_timeout) is XferStatus.DONE
        want = self.pattern(SRC_SEED, n * blk).reshape(n, blk)[perm]
        np.testing.assert_array_equal(self.host(dst).reshape(n, blk), want)

    def test_prepped_make_with_indices_and_merge(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """prep + make gathers by index arrays, and contiguous runs merge unless merge=False."""
        n, blk = 64, 256
        src, dst, (s_addr, s_dev), (d_addr, d_dev) = self.registered_pair(
            agent, buffer_factory, mem_type, n * blk
        )
        lp = agent.prep("", DescList.strided(mem_type, s_addr, blk, n, blk, s_dev))
        rp = agent.prep(agent.name, DescList.strided(mem_type, d_addr, blk, n, blk, d_dev))
        assert (len(lp), len(rp)) == (n, n)
        every = np.arange(n)
        merged = agent.make("WRITE", lp, every, rp, every)
        unmerged = agent.make("WRITE", lp, every, rp, every, merge=False)
        assert merged.desc_count == 1
        assert unmerged.desc_count == n
        assert merged.total_bytes == unmerged.total_bytes == n * blk
        for req in (merged, unmerged):
            req.post()
            assert req.wait(self.xfer_timeout) is XferStatus.DONE
            np.testing.assert_array_equal(self.host(dst), self.pattern(SRC_SEED, n * blk))
            self.fill(dst, OTHER_SEED)
            req.release()
        rng = np.random.default_rng(3)
        li, ri = rng.permutation(n)[:32], rng.permutation(n)[:32]
        with agent.make("READ", lp, li, rp, ri) as req:
            req.post()
            assert req.wait(self.xfer_timeout) is XferStatus.DONE
        got = self.host(src).reshape(n, blk)
        want = self.pattern(OTHER_SEED, n * blk).reshape(n, blk)
        np.testing.assert_array_equal(got[li], want[ri])

    def test_prepped_lists_serve_many_makes(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """Lists prepared once serve many makes (any index arrays, reused, both ops, unmerged).

        Backends that keep state with a prepared list (``prep_side`` / ``prepare_indexed``)
        build it on the first make; every later make must still move exactly its indices.
        """
        n, blk = 512, 128
        src, dst, (s_addr, s_dev), (d_addr, d_dev) = self.registered_pair(
            agent, buffer_factory, mem_type, n * blk
        )
        lp = agent.prep("", DescList.strided(mem_type, s_addr, blk, n, blk, s_dev))
        rp = agent.prep(agent.name, DescList.strided(mem_type, d_addr, blk, n, blk, d_dev))
        want_src = self.pattern(SRC_SEED, n * blk).reshape(n, blk)
        rng = np.random.default_rng(11)
        for k, (m, merge) in enumerate(((n, True), (n // 3, True), (n // 2, False), (1, True))):
            li = rng.permutation(n)[:m].astype(np.int32 if k % 2 else np.int64)
            ri = li if k == 2 else rng.permutation(n)[:m]
            self.fill(dst, OTHER_SEED)
            with agent.make("WRITE", lp, li, rp, ri, merge=merge) as req:
                assert req.total_bytes == m * blk
                req.post()
                assert req.wait(self.xfer_timeout) is XferStatus.DONE
            got = self.host(dst).reshape(n, blk)
            want = self.pattern(OTHER_SEED, n * blk).reshape(n, blk)
            want[ri] = want_src[li]
            np.testing.assert_array_equal(got, want, err_msg=f"make {k} ({m} descriptors)")
        # READ back through the same prepared lists, with one index array for both sides.
        self.fill(src, OTHER_SEED)
        every = rng.permutation(n)
        with agent.make("READ", lp, every, rp, every) as req:
            req.post()
            assert req.wait(self.xfer_timeout) is XferStatus.DONE
        np.testing.assert_array_equal(self.host(src), self.host(dst))

    def test_stream_order_refused_by_name(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """Without ``supports_stream``, post(stream=) and completion_event() raise, naming the
        backend, and leave the request as it was (never a silently ignored stream)."""
        if agent.backend(self.backend_name).supports_stream:
            pytest.skip(f"backend {self.backend_name} supports stream order (its own tests)")
        src = buffer_factory(mem_type, 4096, SRC_SEED)
        dst = buffer_factory(mem_type, 4096)
        agent.register(src)
        agent.register(dst)
        with agent.create(
            "WRITE", self._whole(src, mem_type), self._whole(dst, mem_type), agent.name
        ) as req:
            with pytest.raises(NotSupportedError, match=self.backend_name):
                req.post(stream=object())
            assert req.status is XferStatus.PENDING
            with pytest.raises(NotSupportedError, match=self.backend_name):
                req.completion_event()
            req.post()
            assert req.wait(self.xfer_timeout) is XferStatus.DONE
            with pytest.raises(NotSupportedError, match=self.backend_name):
                req.completion_event()

    def test_repost_after_completion(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """A completed request can be posted again and moves the source's current bytes."""
        nbytes = 256 << 10
        src = buffer_factory(mem_type, nbytes, SRC_SEED)
        dst = buffer_factory(mem_type, nbytes)
        agent.register(src)
        agent.register(dst)
        with agent.create(
            "WRITE", self._whole(src, mem_type), self._whole(dst, mem_type), agent.name
        ) as req:
            for seed in (SRC_SEED, OTHER_SEED, SRC_SEED):
                self.fill(src, seed)
                req.post()
                assert req.wait(self.xfer_timeout) is XferStatus.DONE
                assert req.check() is XferStatus.DONE
                np.testing.assert_array_equal(self.host(dst), self.pattern(seed, nbytes))

    def test_post_while_active_raises(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """Posting a request that is still in progress raises RepostActiveError; it then completes."""
        n, blk = 8192, 4096  # 32 MiB in 8192 unmerged descriptors: not done in microseconds
        _src, dst, (s_addr, s_dev), (d_addr, d_dev) = self.registered_pair(
            agent, buffer_factory, mem_type, n * blk
        )
        off = np.arange(n) * blk
        local = self.blocks(mem_type, s_addr, s_dev, off, blk)
        remote = self.blocks(mem_type, d_addr, d_dev, off, blk)
        seen_active = raised = 0
        longest_us = 0.0
        with agent.create("WRITE", local, remote, agent.name, merge=False) as req:
            for _ in range(3):
                if req.post() is XferStatus.DONE:
                    pytest.skip(f"backend {self.backend_name} completes transfers inside post()")
                # Only a request still running right before the repost must refuse it.
                if req.check() is XferStatus.IN_PROGRESS:
                    seen_active += 1
                    try:
                        req.post()
                    except RepostActiveError:
                        raised += 1
                assert req.wait(self.xfer_timeout) is XferStatus.DONE
                longest_us = max(longest_us, req.telemetry.xfer_duration_us)
                np.testing.assert_array_equal(self.host(dst), self.pattern(SRC_SEED, n * blk))
                if raised:
                    return
        if not seen_active:
            pytest.skip(f"backend {self.backend_name} finished 32 MiB before it could be reposted")
        if longest_us < 1000:
            # A GPU copies 32 MiB in tens of microseconds: the request may finish between check()
            # and the repost, which post() then rightly accepts.
            pytest.skip(
                f"backend {self.backend_name} moves 32 MiB in {longest_us:.0f} us, too fast to "
                "repost it while it is still active"
            )
        pytest.fail(
            f"reposting an IN_PROGRESS request never raised RepostActiveError ({seen_active} tries)"
        )

    def test_release_is_idempotent(
        self, agent: Agent, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """release() may be called repeatedly, also on a never-posted request; posting after fails."""
        src = buffer_factory(mem_type, 4096, SRC_SEED)
        dst = buffer_factory(mem_type, 4096)
        agent.register(src)
        agent.register(dst)
        local, remote = self._whole(src, mem_type), self._whole(dst, mem_type)
        never = agent.create("WRITE", local, remote, agent.name)
        never.release()
        never.release()
        req = agent.create("WRITE", local, remote, agent.name)
        req.post()
        req.wait(self.xfer_timeout)
        req.release()
        req.release()
        assert req.released
        with pytest.raises(NotPostedError):
            req.post()

    def test_telemetry(self, agent: Agent, buffer_factory: BufferFactory, mem_type: str) -> None:
        """A completed post reports descriptors, bytes, durations, backend and path."""
        n, blk = 512, 1024
        _src, _dst, (s_addr, s_dev), (d_addr, d_dev) = self.registered_pair(
            agent, buffer_factory, mem_type, n * blk
        )
        off = np.arange(n) * blk
        before = time.time()
        with agent.create(
            "WRITE",
            self.blocks(mem_type, s_addr, s_dev, off, blk),
            self.blocks(mem_type, d_addr, d_dev, off, blk),
            agent.name,
            merge=False,
        ) as req:
            with pytest.raises(NotPostedError):
                _ = req.telemetry
            req.post()
            req.wait(self.xfer_timeout)
            t = req.telemetry
        assert t.desc_count == n
        assert t.total_bytes == n * blk
        assert 0 <= t.post_duration_us <= t.xfer_duration_us
        assert t.backend.upper() == self.backend_name.upper()
        assert isinstance(t.path, str)
        assert t.path
        assert before - 1 <= t.start_time_us / 1e6 <= time.time() + 1


class RemoteXferSuite:
    """Transfers between this process's agent and a peer agent in another process."""

    _nixl_requires: ClassVar[tuple[str, ...]] = ("supports_remote",)
    describe: Callable[[Any], tuple[int, int, int]]
    host: Callable[[Any], np.ndarray]
    pattern: Callable[[int, int], np.ndarray]
    digest: Callable[[Any], str]
    blocks: Callable[..., DescList]
    link: Callable[[Agent, PeerProcess], str]
    xfer_timeout: float

    def _post_wait(self, req: Any) -> None:
        req.post()
        assert req.wait(self.xfer_timeout) is XferStatus.DONE

    @pytest.mark.parametrize("op", ["WRITE", "READ"])
    @pytest.mark.parametrize("nbytes", [4096, 1 << 20])
    def test_whole_buffer_with_peer(
        self,
        agent: Agent,
        peer: PeerProcess,
        buffer_factory: BufferFactory,
        mem_type: str,
        nbytes: int,
        op: str,
    ) -> None:
        """WRITE puts the local bytes into the peer's buffer; READ pulls the peer's bytes back."""
        writing = op == "WRITE"
        buf = buffer_factory(mem_type, nbytes, SRC_SEED if writing else None)
        agent.register(buf)
        pbuf = peer.alloc(nbytes, None if writing else PEER_SEED, mem_type)
        self.link(agent, peer)
        local = DescList.from_tuples([self.describe(buf)], mem_type)
        remote = DescList.from_tuples([pbuf.desc()], mem_type)
        with agent.create(op, local, remote, peer.name) as req:
            self._post_wait(req)
        if writing:  # checked in the peer process, by digest
            assert peer.digest(pbuf) == self.digest(self.pattern(SRC_SEED, nbytes))
        else:
            np.testing.assert_array_equal(self.host(buf), self.pattern(PEER_SEED, nbytes))

    def test_scattered_write_to_peer(
        self, agent: Agent, peer: PeerProcess, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """1024 blocks of 4 KiB written in a random permutation land at the permuted places."""
        n, blk = 1024, 4096
        perm = np.random.default_rng(11).permutation(n)
        src = buffer_factory(mem_type, n * blk, SRC_SEED)
        agent.register(src)
        s_addr, _, s_dev = self.describe(src)
        pbuf = peer.alloc(n * blk, None, mem_type)
        self.link(agent, peer)
        local = self.blocks(mem_type, s_addr, s_dev, np.arange(n) * blk, blk)
        remote = self.blocks(mem_type, pbuf.addr, pbuf.dev, perm * blk, blk)
        with agent.create("WRITE", local, remote, peer.name) as req:
            self._post_wait(req)
        want = np.empty((n, blk), np.uint8)
        want[perm] = self.pattern(SRC_SEED, n * blk).reshape(n, blk)
        assert peer.digest(pbuf) == self.digest(want)

    def test_scattered_read_from_peer(
        self, agent: Agent, peer: PeerProcess, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """1024 blocks of 4 KiB read by prepared lists and a permuted index array arrive intact."""
        n, blk = 1024, 4096
        perm = np.random.default_rng(13).permutation(n)
        dst = buffer_factory(mem_type, n * blk)
        agent.register(dst)
        d_addr, _, d_dev = self.describe(dst)
        pbuf = peer.alloc(n * blk, PEER_SEED, mem_type)
        self.link(agent, peer)
        lp = agent.prep("", DescList.strided(mem_type, d_addr, blk, n, blk, d_dev))
        rp = agent.prep(peer.name, DescList.strided(mem_type, pbuf.addr, blk, n, blk, pbuf.dev))
        with agent.make("READ", lp, perm, rp, np.arange(n)) as req:
            self._post_wait(req)
        got = self.host(dst).reshape(n, blk)
        np.testing.assert_array_equal(got[perm], self.pattern(PEER_SEED, n * blk).reshape(n, blk))

    def test_notif_arrives_after_data(
        self, agent: Agent, peer: PeerProcess, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """A WRITE's notification reaches the peer only once the written bytes are visible there."""
        nbytes, tail = 16 << 20, 4096
        src = buffer_factory(mem_type, nbytes, SRC_SEED)
        agent.register(src)
        pbuf = peer.alloc(nbytes, None, mem_type)
        self.link(agent, peer)
        msg = b"kv-ready\x00" + agent.name.encode()
        local = DescList.from_tuples([self.describe(src)], mem_type)
        remote = DescList.from_tuples([pbuf.desc()], mem_type)
        req = agent.create("WRITE", local, remote, peer.name, notif=msg)
        # The peer starts watching before the post, and snapshots its buffer (the last bytes
        # first, which a still-running copy writes last) as soon as it sees the notification.
        peer.send("wait_notif", agent.name, msg, pbuf.id, tail, self.xfer_timeout)
        try:
            self._post_wait(req)
        finally:
            found, seen_tail, seen = peer.result(self.xfer_timeout + 10)
        want = self.pattern(SRC_SEED, nbytes)
        assert found, "the notification never reached the peer"
        assert seen_tail == self.digest(want[-tail:]), "notification arrived before the data"
        assert seen == self.digest(want), "notification arrived before the data was all visible"
        req.release()

    def test_remove_remote_voids_requests(
        self, agent: Agent, peer: PeerProcess, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """After remove_remote, old requests and prepared lists are refused, and prep fails."""
        src = buffer_factory(mem_type, 8192, SRC_SEED)
        agent.register(src)
        pbuf = peer.alloc(8192, None, mem_type)
        self.link(agent, peer)
        s_addr, _, s_dev = self.describe(src)
        lp = agent.prep("", DescList.strided(mem_type, s_addr, 4096, 2, 4096, s_dev))
        rp = agent.prep(peer.name, DescList.strided(mem_type, pbuf.addr, 4096, 2, 4096, pbuf.dev))
        req = agent.make("WRITE", lp, [0, 1], rp, [0, 1])
        self._post_wait(req)
        agent.remove_remote(peer.name)
        assert peer.name not in agent.remote_agents
        with pytest.raises((UnknownAgentError, StaleHandleError)):
            req.post()
        with pytest.raises((UnknownAgentError, StaleHandleError)):
            agent.make("WRITE", lp, [0], rp, [0])
        with pytest.raises(UnknownAgentError):
            agent.prep(peer.name, DescList.from_tuples([pbuf.desc()], mem_type))
        with pytest.raises(UnknownAgentError):
            agent.remove_remote(peer.name)
        req.release()

    def test_readd_after_remove(
        self, agent: Agent, peer: PeerProcess, buffer_factory: BufferFactory, mem_type: str
    ) -> None:
        """A re-added peer works with new prepared lists; lists and requests from before are stale."""
        n, blk = 4, 4096
        src = buffer_factory(mem_type, n * blk, SRC_SEED)
        agent.register(src)
        s_addr, _, s_dev = self.describe(src)
        pbuf = peer.alloc(n * blk, None, mem_type)
        self.link(agent, peer)
        remote = DescList.strided(mem_type, pbuf.addr, blk, n, blk, pbuf.dev)
        lp = agent.prep("", DescList.strided(mem_type, s_addr, blk, n, blk, s_dev))
        old_rp = agent.prep(peer.name, remote)
        idx = np.arange(n)
        old_req = agent.make("WRITE", lp, idx, old_rp, idx)
        agent.remove_remote(peer.name)
        assert agent.add_remote(peer.metadata()) == peer.name
        with pytest.raises(StaleHandleError):
            agent.make("WRITE", lp, idx, old_rp, idx)
        with pytest.raises(StaleHandleError):
            old_req.post()
        old_req.release()
        rp = agent.prep(peer.name, remote)
        with agent.make("WRITE", lp, idx[::-1], rp, idx) as req:
            self._post_wait(req)
        want = self.pattern(SRC_SEED, n * blk).reshape(n, blk)[::-1]
        assert peer.digest(pbuf) == self.digest(want)


class NotifSuite:
    """Standalone notifications: to self, to a peer process, from a peer process."""

    _nixl_requires: ClassVar[tuple[str, ...]] = ("supports_notif",)
    require: Callable[..., Any]
    link: Callable[[Agent, PeerProcess], str]
    wait_notifs: Callable[..., list[bytes]]
    xfer_timeout: float

    ROUTES: ClassVar[tuple[str, ...]] = ("self", "to_peer", "from_peer")

    def _exchange(
        self, route: str, agent: Agent, request: pytest.FixtureRequest, msgs: list[bytes]
    ) -> tuple[list[bytes], Callable[[], list[bytes]]]:
        """Send ``msgs`` along ``route``; return what arrived and a function reading again."""
        timeout = self.xfer_timeout
        if route == "self":
            self.require("supports_local")
            for m in msgs:
                agent.send_notif(agent.name, m)
            got = self.wait_notifs(agent, agent.name, len(msgs), timeout)
            return got, lambda: agent.get_notifs().get(agent.name, [])
        self.require("supports_remote")
        peer: PeerProcess = request.getfixturevalue("peer")
        self.link(agent, peer)
        if route == "to_peer":
            # The peer drains while we send: a sender may block on a full receive queue.
            peer.send("collect_notifs", agent.name, len(msgs), timeout)
            try:
                for m in msgs:
                    agent.send_notif(peer.name, m)
            finally:
                got = peer.result(timeout + 10)
            return got, lambda: peer.get_notifs().get(agent.name, [])
        peer.send("send_notifs", agent.name, msgs)
        try:
            got = self.wait_notifs(agent, peer.name, len(msgs), timeout)
        finally:
            peer.result(timeout + 10)
        return got, lambda: agent.get_notifs().get(peer.name, [])

    @pytest.mark.parametrize("route", ROUTES)
    def test_delivered_exactly_once(
        self, agent: Agent, request: pytest.FixtureRequest, route: str
    ) -> None:
        """A notification is handed over once: a later get_notifs does not repeat it."""
        got, again = self._exchange(route, agent, request, [b"hello"])
        assert got == [b"hello"]
        time.sleep(0.05)
        assert again() == []

    @pytest.mark.parametrize("route", ROUTES)
    @pytest.mark.parametrize(
        "payload",
        [b"", b"\x00", b"kv\x00block\x00\x0017", bytes(range(256))],
        ids=["empty", "nul", "embedded-nuls", "all-bytes"],
    )
    def test_payload_survives(
        self, agent: Agent, request: pytest.FixtureRequest, route: str, payload: bytes
    ) -> None:
        """Empty payloads and payloads with NUL bytes arrive byte for byte."""
        got, _ = self._exchange(route, agent, request, [payload])
        assert got == [payload]

    @pytest.mark.parametrize("route", ROUTES)
    def test_many_in_order(self, agent: Agent, request: pytest.FixtureRequest, route: str) -> None:
        """200 notifications from one sender arrive complete and in sending order."""
        msgs = [b"notif-%03d" % i for i in range(200)]
        got, _ = self._exchange(route, agent, request, msgs)
        assert got == msgs

    def test_send_to_unknown_agent_raises(self, agent: Agent) -> None:
        """Sending to an agent whose metadata was never loaded raises UnknownAgentError."""
        with pytest.raises(UnknownAgentError):
            agent.send_notif("no-such-agent", b"x")


class BadInputSuite:
    """Bad input raises a typed error naming the offending item, before any backend work."""

    _nixl_requires: ClassVar[tuple[str, ...]] = ()
    describe: Callable[[Any], tuple[int, int, int]]
    require: Callable[..., Any]
    backend_name: str
    mem_types: tuple[str, ...]

    def _registered(
        self, agent: Agent, buffer_factory: BufferFactory, nbytes: int
    ) -> tuple[Any, ...]:
        mem = self.mem_types[0]
        buf = buffer_factory(mem, nbytes)
        agent.register(buf)
        return (mem, *self.describe(buf))

    def test_descriptor_outside_registration(
        self, agent: Agent, buffer_factory: BufferFactory
    ) -> None:
        """A descriptor outside every registration raises InvalidDescriptorError with its index."""
        mem, addr, nbytes, dev = self._registered(agent, buffer_factory, 4096)
        descs = [(addr, 64, dev), (addr + 4032, 64, dev), (addr + 4064, 64, dev)]
        with pytest.raises(InvalidDescriptorError) as info:
            agent.prep("", DescList.from_tuples(descs, mem))
        assert info.value.index == 2
        with pytest.raises(InvalidDescriptorError) as info:
            agent.prep("", DescList.from_tuples([(addr, 8, dev), (addr + nbytes, 1, dev)], mem))
        assert info.value.index == 1
        if getattr(self.require(), "supports_local", False):
            good = DescList.from_tuples([*descs[:2], (addr, 64, dev)], mem)
            with pytest.raises(InvalidDescriptorError) as info:
                agent.create("WRITE", good, DescList.from_tuples(descs, mem), agent.name)
            assert info.value.index == 2

    def test_unknown_remote_agent(self, agent: Agent, buffer_factory: BufferFactory) -> None:
        """Naming an agent whose metadata is not loaded raises UnknownAgentError."""
        mem, addr, _, dev = self._registered(agent, buffer_factory, 4096)
        descs = DescList.from_tuples([(addr, 64, dev)], mem)
        with pytest.raises(UnknownAgentError):
            agent.prep("ghost-agent", descs)
        with pytest.raises(UnknownAgentError):
            agent.create("WRITE", descs, descs, "ghost-agent")
        with pytest.raises(UnknownAgentError):
            agent.remove_remote("ghost-agent")

    def test_count_and_length_mismatch(self, agent: Agent, buffer_factory: BufferFactory) -> None:
        """Lists of different counts, or pairs of different lengths, raise LengthMismatchError."""
        mem, addr, _, dev = self._registered(agent, buffer_factory, 4096)
        two = DescList.from_tuples([(addr, 64, dev), (addr + 64, 64, dev)], mem)
        three = DescList.from_tuples(
            [(addr, 64, dev), (addr + 64, 64, dev), (addr + 128, 64, dev)], mem
        )
        other_len = DescList.from_tuples([(addr + 1024, 64, dev), (addr + 2048, 32, dev)], mem)
        with pytest.raises(LengthMismatchError):
            agent.create("WRITE", two, three, agent.name)
        with pytest.raises(LengthMismatchError) as info:
            agent.create("WRITE", two, other_len, agent.name)
        assert info.value.index == 1
        self.require("supports_local")
        lp = agent.prep("", two)
        rp = agent.prep(agent.name, other_len)
        with pytest.raises(LengthMismatchError):
            agent.make("WRITE", lp, [0, 1], rp, [0])
        with pytest.raises(LengthMismatchError) as info:
            agent.make("WRITE", lp, [0, 1], rp, [0, 1])
        assert info.value.index == 1

    def test_wrong_mem_type_string(self, agent: Agent, buffer_factory: BufferFactory) -> None:
        """An unknown memory type name, or one contradicting the buffer, raises MemTypeError."""
        mem = self.mem_types[0]
        buf = buffer_factory(mem, 4096)
        addr, nbytes, dev = self.describe(buf)
        with pytest.raises(MemTypeError, match="HBM"):
            agent.register([(addr, nbytes, dev)], "HBM")
        with pytest.raises(MemTypeError):
            agent.register(buf, "DRAMM")
        with pytest.raises(MemTypeError):
            DescList.from_tuples([(addr, nbytes, dev)], "NOT_A_TYPE")
        wrong = "VRAM" if mem == "DRAM" else "DRAM"
        with pytest.raises(MemTypeError):
            agent.register(buf, wrong)
        assert len(agent.registered(mem)) == 0

    def _some_metadata(self, agent_factory: AgentFactory) -> bytes:
        bcls = self.require()
        if bcls.supports_remote:
            return agent_factory().metadata()
        return AgentMetadata("ghost-agent", ((bcls.name, b"conn"),), ()).encode()

    @pytest.mark.parametrize("cut", [0, 1, 19, 20, -1, -4])
    def test_truncated_metadata(self, agent_factory: AgentFactory, cut: int) -> None:
        """Metadata cut short anywhere raises MetadataError and loads nothing."""
        md = self._some_metadata(agent_factory)
        agent = agent_factory()
        with pytest.raises(MetadataError):
            agent.add_remote(md[:cut])
        assert agent.remote_agents == ()

    def test_corrupted_metadata(self, agent_factory: AgentFactory) -> None:
        """Metadata with any flipped byte, a bad magic or trailing bytes raises MetadataError."""
        md = self._some_metadata(agent_factory)
        agent = agent_factory()
        for pos in sorted({0, 8, 12, 20, len(md) // 2, len(md) - 5, len(md) - 1}):
            bad = bytearray(md)
            bad[pos] ^= 0x5A
            with pytest.raises(MetadataError):
                agent.add_remote(bytes(bad))
        with pytest.raises(MetadataError):
            agent.add_remote(md + b"\x00")
        with pytest.raises(MetadataError):
            agent.add_remote(b"\x80\x04\x95" + md[3:])  # a pickle header is not metadata
        assert agent.remote_agents == ()

    def test_unknown_op(self, agent: Agent, buffer_factory: BufferFactory) -> None:
        """An unknown transfer op such as "RD" raises InvalidParamError naming it."""
        mem, addr, _, dev = self._registered(agent, buffer_factory, 4096)
        descs = DescList.from_tuples([(addr, 64, dev)], mem)
        with pytest.raises(InvalidParamError, match="RD"):
            agent.create("RD", descs, descs, agent.name)
        self.require("supports_local")
        lp, rp = agent.prep("", descs), agent.prep(agent.name, descs)
        with pytest.raises(InvalidParamError, match="RD"):
            agent.make("RD", lp, [0], rp, [0])

    def test_unknown_backend(self) -> None:
        """An unknown backend name raises BackendNotFoundError; known plugins get an install hint."""
        from nixl_core._plugins import get_plugin_manager

        with pytest.raises(BackendNotFoundError, match="NO_SUCH_BACKEND"):
            Agent("nixl-test-bad-backend", AgentConfig(backends=("NO_SUCH_BACKEND",)))
        if "POSIX" in get_plugin_manager().registry.names():
            pytest.skip("the POSIX plugin is installed: its install hint cannot be shown")
        with pytest.raises(BackendNotFoundError, match="pip install") as info:
            Agent("nixl-test-bad-backend", AgentConfig(backends=("POSIX",)))
        assert info.value.name == "POSIX"

    def test_make_index_out_of_range(self, agent: Agent, buffer_factory: BufferFactory) -> None:
        """A make index outside the prepared list raises InvalidDescriptorError with its position."""
        self.require("supports_local")
        mem, addr, _, dev = self._registered(agent, buffer_factory, 4096)
        descs = DescList.strided(mem, addr, 64, 8, 64, dev)
        lp, rp = agent.prep("", descs), agent.prep(agent.name, descs)
        with pytest.raises(InvalidDescriptorError) as info:
            agent.make("WRITE", lp, [0, 1, 8], rp, [0, 1, 2])
        assert info.value.index == 2
        with pytest.raises(InvalidDescriptorError) as info:
            agent.make("WRITE", lp, [0, 1, 2], rp, [0, -1, 2])
        assert info.value.index == 1
        with pytest.raises(InvalidParamError):
            agent.make("WRITE", lp, [], rp, [])
