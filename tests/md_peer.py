"""A peer agent in its own process for the metadata-service tests: it publishes to etcd, then
waits to be killed (or for its stdin to close).

Usage: ``python md_peer.py NAME ENDPOINT NAMESPACE TTL SEED``. It registers 64 KiB filled with
the byte pattern of SEED, publishes its full metadata, and prints one JSON line: the buffer's
address, its incarnation (hex) and its pid.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from nixl_core import Agent, AgentConfig


def main() -> None:
    name, endpoint, namespace, ttl, seed = sys.argv[1:6]
    buf = np.random.default_rng(int(seed)).integers(0, 256, 1 << 16, dtype=np.uint8)
    cfg = AgentConfig(
        backends=["LOOPBACK"],
        md_store=f"etcd://{endpoint}",
        md_namespace=namespace,
        md_ttl=float(ttl),
    )
    with Agent(name, cfg) as agent:
        agent.register(buf)
        agent.publish_metadata().wait(10)
        print(json.dumps({"addr": int(buf.ctypes.data), "incarnation": agent.incarnation.hex()}))
        sys.stdout.flush()
        sys.stdin.read()  # until the test closes the pipe (or kills this process)


if __name__ == "__main__":
    main()
