"""One "host" of the two-host test, run as a script inside a network namespace.

Usage: ``python netns_host.py (initiator|target) DEVICE NBLK BLK``. It talks JSON lines on
stdin/stdout with the test: it prints its agent metadata, reads the other host's, and then:

- target: registers ``dst`` (zeros) and ``src`` (pattern 2); waits for the initiator's "written"
  notification, prints the digest of ``dst``; waits for "read", then exits.
- initiator: registers ``src`` (pattern 1) and ``dst`` (zeros); WRITEs its blocks into the
  target's ``dst`` in a permutation (notification "written"), READs the target's ``src`` in
  another permutation, prints its digests and the transport that carried the data, sends "read".

UCX is restricted to TCP on DEVICE (the veth end in this namespace).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import numpy as np


def _emit(**kw: object) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def _read() -> dict[str, object]:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("the test closed the pipe")
    out: dict[str, object] = json.loads(line)
    return out


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes()).hexdigest()


def main() -> None:
    from nixl_core.agent import Agent, AgentConfig
    from nixl_core.descriptors import DescList

    role, device, nblk, blk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    params = {"transports": "tcp", "device_list": device}
    agent = Agent(f"netns-{role}", AgentConfig(backends=("UCX",), backend_params={"UCX": params}))
    nbytes = nblk * blk
    rng1, rng2 = np.random.default_rng(1), np.random.default_rng(2)
    p1 = rng1.integers(0, 256, nbytes, dtype=np.uint8)
    p2 = rng2.integers(0, 256, nbytes, dtype=np.uint8)
    if role == "target":
        dst, src = np.zeros(nbytes, np.uint8), p2
    else:
        src, dst = p1, np.zeros(nbytes, np.uint8)
    agent.register(src)
    agent.register(dst)
    _emit(md=agent.metadata().hex(), src=int(src.ctypes.data), dst=int(dst.ctypes.data))
    other = _read()
    peer = agent.add_remote(bytes.fromhex(str(other["md"])))

    def wait_notif(msg: bytes) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if msg in agent.get_notifs().get(peer, []):
                return True
            time.sleep(0.001)
        return False

    if role == "target":
        got = wait_notif(b"written")
        _emit(notif=got, dst=_digest(dst))
        wait_notif(b"read")
        agent.close()
        return

    def blocks(base: int, order: np.ndarray) -> DescList:
        rows = np.empty((nblk, 3), np.uint64)
        rows[:, 0] = np.uint64(base) + order.astype(np.uint64) * np.uint64(blk)
        rows[:, 1] = blk
        rows[:, 2] = 0
        return DescList.from_array(rows, "DRAM")

    seq = np.arange(nblk)
    wperm, rperm = (
        np.random.default_rng(3).permutation(nblk),
        np.random.default_rng(4).permutation(nblk),
    )
    t0 = time.perf_counter()
    with agent.create(
        "WRITE",
        blocks(src.ctypes.data, seq),
        blocks(int(str(other["dst"])), wperm),
        peer,
        notif=b"written",
    ) as req:
        req.post()
        req.wait(30)
        path = req.path
    t1 = time.perf_counter()
    with agent.create(
        "READ", blocks(dst.ctypes.data, seq), blocks(int(str(other["src"])), rperm), peer
    ) as req:
        req.post()
        req.wait(30)
    t2 = time.perf_counter()
    agent.send_notif(peer, b"read")
    _emit(src=_digest(src), dst=_digest(dst), path=path, write_s=t1 - t0, read_s=t2 - t1)
    time.sleep(0.2)
    agent.close()


if __name__ == "__main__":
    main()
