"""Peer death: a target killed mid-transfer turns every in-flight request to ERROR within 2 s,
nothing hangs, and the agent can be removed and re-added (a fresh process under the same name)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from nixl_core.agent import Agent, AgentConfig
from nixl_core.backend import XferStatus
from nixl_core.descriptors import DescList
from nixl_core.errors import RemoteDisconnectError, TransferError
from nixl_core.testing import PeerProcess
from nixl_core.testing._peer import SRC_SEED, digest, pattern

BLK = 4096
NBLK = 8192  # 32 MiB per request in 8192 scattered descriptors
NREQ = 6


def _blocks(base: int, offsets: np.ndarray) -> DescList:
    rows = np.empty((offsets.size, 3), np.uint64)
    rows[:, 0] = np.uint64(base) + offsets.astype(np.uint64)
    rows[:, 1] = BLK
    rows[:, 2] = 0
    return DescList.from_array(rows, "DRAM")


@pytest.mark.parametrize("params", [{}, {"progress_thread": "false"}], ids=["thread", "polled"])
def test_kill_target_mid_transfer(params: dict[str, str]) -> None:
    """SIGKILL of the target: all in-flight requests are ERROR (RemoteDisconnectError) in < 2 s;
    the remote is removed, then re-added and a transfer to its new process verifies.

    ``params`` are the initiator's (with progress threads, or driven by polling alone); the
    target keeps the defaults, since a passive target without a progress thread would never
    answer the wire-up of the notification's lane.
    """
    nbytes = BLK * NBLK
    src = pattern(SRC_SEED, nbytes)
    peer = PeerProcess("UCX")
    agent = Agent("nixl-death-init", AgentConfig(backends=("UCX",), backend_params={"UCX": params}))
    try:
        agent.register(src)
        pbuf = peer.alloc(nbytes * NREQ, None)
        agent.add_remote(peer.metadata())
        peer.add_remote(agent.metadata())
        rng = np.random.default_rng(5)
        local = _blocks(src.ctypes.data, np.arange(NBLK) * BLK)
        reqs = []
        for i in range(NREQ):
            remote = _blocks(pbuf.addr + i * nbytes, rng.permutation(NBLK) * BLK)
            reqs.append(agent.create("WRITE", local, remote, peer.name, merge=False, notif=b"x"))
        # Warm up the endpoints, so that the requests below are in flight when the kill lands.
        reqs[0].post()
        assert reqs[0].wait(20) is XferStatus.DONE
        for r in reqs:
            r.post()
        os.kill(peer.pid or 0, signal.SIGKILL)
        killed_at = time.monotonic()
        in_flight = [r for r in reqs if r.status is XferStatus.IN_PROGRESS]
        ended: dict[int, float] = {}
        errors: list[BaseException] = []
        while len(ended) < len(reqs) and time.monotonic() - killed_at < 10:
            for i, r in enumerate(reqs):
                if i in ended:
                    continue
                try:
                    st = r.check()
                except TransferError as exc:
                    errors.append(exc)
                    st = XferStatus.ERROR
                if st is not XferStatus.IN_PROGRESS:
                    ended[i] = time.monotonic() - killed_at
            time.sleep(0.001)
        assert len(ended) == len(reqs), "a request never left IN_PROGRESS after the peer died"
        worst = max(ended.values())
        assert worst < 2.0, f"slowest request ended {worst:.3f} s after the kill"
        failed = [r for r in reqs if r.status is XferStatus.ERROR]
        # One request may have finished between the posts and the kill; the rest were in flight.
        assert len(failed) >= max(1, len(in_flight) - 1), (len(failed), len(in_flight))
        assert all(isinstance(e, RemoteDisconnectError) for e in errors), errors
        # The core removed the dead peer after the disconnect; a new post is refused.
        assert peer.name not in agent.remote_agents
        for r in reqs:
            r.release()
        # Re-add: a fresh process under the same agent name.
        peer.restart()
        pbuf = peer.alloc(nbytes, None)
        agent.add_remote(peer.metadata())
        peer.add_remote(agent.metadata())
        perm = rng.permutation(NBLK)
        with agent.create(
            "WRITE", local, _blocks(pbuf.addr, perm * BLK), peer.name, notif=b"again"
        ) as req:
            req.post()
            assert req.wait(20) is XferStatus.DONE
        want = np.empty((NBLK, BLK), np.uint8)
        want[perm] = src.reshape(NBLK, BLK)
        assert peer.digest(pbuf) == digest(want)
    finally:
        agent.close()
        peer.close()
