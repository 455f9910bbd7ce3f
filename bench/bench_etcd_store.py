"""Per-call latency of EtcdStore against a real etcd, next to bare etcd3gw calls.

Starts a private etcd (``nixl_core.testing.etcd.EtcdServer``, data on /dev/shm) unless
``--endpoints`` names one. Measured, each ``--n`` times after warm-up:

- publish: one put under the lease (the agent announced already);
- get: one range;
- wait-present: wait() on a key that exists (one range);
- wait-just-published: a thread in wait() on a missing key (its watch stream open), then a
  publish from another store: from the publish call to wait() returning;
- etcd3gw put / get: the same requests made with a bare ``etcd3gw.Etcd3Client`` (the floor).

    python bench/bench_etcd_store.py [--n 200] [--endpoints host:port] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable

import etcd3gw

from nixl_core.discovery.etcd import EtcdStore
from nixl_core.discovery.store import label_key
from nixl_core.testing.etcd import EtcdServer


def _ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_ms": statistics.median(s) * 1e3,
        "p90_ms": s[int(0.9 * (len(s) - 1))] * 1e3,
        "min_ms": s[0] * 1e3,
    }


def _time(fn: Callable[[int], object], n: int, warmup: int = 10) -> list[float]:
    out = []
    for i in range(n + warmup):
        t0 = time.perf_counter()
        fn(i)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def _just_published(pub: EtcdStore, sub: EtcdStore, n: int) -> list[float]:
    out = []
    for i in range(n + 5):
        got = threading.Event()
        key = f"late{i}"

        def waiter(key: str = key, got: threading.Event = got) -> None:
            assert sub.wait("bench", key, 10.0) == b"v"
            got.set()

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.02)  # let wait() find the key missing and open its watch
        t0 = time.perf_counter()
        pub.publish("bench", key, b"v")
        got.wait(10.0)
        dt = time.perf_counter() - t0
        t.join()
        if i >= 5:
            out.append(dt)
    return out


def run(endpoint: str, n: int) -> dict[str, dict[str, float]]:
    """The measurements, by name."""
    ns = f"/bench-{os.getpid()}"
    pub = EtcdStore(endpoint, namespace=ns, ttl=10)
    sub = EtcdStore(endpoint, namespace=ns, ttl=10)
    host, port = endpoint.rsplit(":", 1)
    raw = etcd3gw.Etcd3Client(host=host.strip("[]"), port=int(port), api_path="/v3/", timeout=5)
    value = b"x" * 512
    try:
        pub.publish("bench", "metadata", value)
        res = {
            "publish": _ms(_time(lambda i: pub.publish("bench", "metadata", value), n)),
            "get": _ms(_time(lambda i: sub.get("bench", "metadata"), n)),
            "wait-present": _ms(_time(lambda i: sub.wait("bench", "metadata", 5.0), n)),
            "wait-just-published": _ms(_just_published(pub, sub, n)),
        }
        key = label_key(ns, "raw", "metadata").encode()
        res["etcd3gw put"] = _ms(_time(lambda i: raw.put(key, value), n))
        res["etcd3gw get"] = _ms(_time(lambda i: raw.get(key), n))
        return res
    finally:
        pub.close()
        sub.close()
        raw.delete_prefix(ns)
        raw.session.close()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table (and JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--endpoints", help="an etcd to use instead of a private one")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.endpoints:
        res = run(args.endpoints, args.n)
    else:
        with EtcdServer() as server:
            res = run(server.endpoint, args.n)
    print(f"machine: {os.cpu_count()} cpus, {platform.machine()}, Python {sys.version.split()[0]}")
    print(f"{args.n} calls each, 512 B values; ms")
    print(f"{'call':<22}{'p50':>8}{'p90':>8}{'min':>8}")
    for name, st in res.items():
        print(f"{name:<22}{st['p50_ms']:8.3f}{st['p90_ms']:8.3f}{st['min_ms']:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
