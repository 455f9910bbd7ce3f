"""Two agents move KV-cache-like blocks: a complete, runnable version of the README's example.

The "prefill" agent owns a buffer of 4 KiB blocks; the "decode" agent reads a scattered subset
of them into its own buffer with one request, then checks the bytes. Both agents live in this
process here; in a real deployment they are two processes (or hosts) and the metadata bytes
travel over any channel you like (a socket, etcd, ...). The backend is nixl-core's default: UCX
when the nixl-ucx plugin is installed, else the built-in LOOPBACK.

    python examples/two_agents.py
"""

from __future__ import annotations

import time

import numpy as np

from nixl_core import Agent, DescList

BLOCK, NBLOCKS = 4096, 256

with Agent("prefill-0") as prefill, Agent("decode-0") as decode:
    kv = np.random.default_rng(0).integers(0, 256, NBLOCKS * BLOCK, dtype=np.uint8)
    prefill.register(kv)  # or a torch/cupy tensor, or (addr, len, dev) rows
    peer_metadata = prefill.metadata()  # bytes: send them to the decode side

    dst = np.zeros(NBLOCKS * BLOCK, np.uint8)
    decode.register(dst)
    peer = decode.add_remote(peer_metadata)  # "prefill-0"

    # Descriptor lists are numpy arrays: one row per block, built without a Python loop.
    peer_blocks = DescList.strided("DRAM", kv.ctypes.data, BLOCK, NBLOCKS, BLOCK)
    my_blocks = DescList.strided("DRAM", dst.ctypes.data, BLOCK, NBLOCKS, BLOCK)
    local = decode.prep("", my_blocks)  # "" = the initiator's own memory
    remote = decode.prep(peer, peer_blocks)  # checked once against the peer's registrations

    idx = np.random.default_rng(1).permutation(NBLOCKS)[:64]  # which blocks to read
    req = decode.make("READ", local, idx, remote, idx, notif=b"req-17")
    req.post()
    req.wait(timeout=5.0)  # or poll req.check(); never waits forever
    print(req.telemetry)  # post/transfer us, bytes, descriptors, path
    req.release()

    got = dst.reshape(NBLOCKS, BLOCK)[idx]
    want = kv.reshape(NBLOCKS, BLOCK)[idx]
    assert np.array_equal(got, want), "the blocks differ"
    deadline = time.monotonic() + 5.0
    while not (notifs := prefill.get_notifs()) and time.monotonic() < deadline:
        time.sleep(0.001)  # the notification follows the data
    print(f"verified {idx.size} blocks over {req.backend_name}; prefill-0 was told {notifs}")
