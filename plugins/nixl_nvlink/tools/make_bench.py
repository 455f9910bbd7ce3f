"""make() cost of NVLINK with prepared lists: staged host gather, GPU gather, old host path.

One process, one agent, VRAM -> VRAM on one GPU (path nvlink:local; make's cost does not depend
on where the remote memory lives, only on the descriptor count). For each batch size, both
prepared lists hold 65536 4 KiB blocks and every request picks ``batch`` of them with two random
index arrays (the KV-cache pattern). Paths: ``host staged`` (host_gather_max large: numpy gathers
into pinned staging memory, one async copy), ``device gather`` (host_gather_max=0: index upload
from pinned staging + gather kernel), ``default`` (the backend's default crossover) and
``host + sync upload`` (device_gather=0, the create path). Prints medians in microseconds:

    make         agent.make(...) alone (the request's table built and resident)
    post+done    post() to wait() == DONE of that request
    make+xfer    make, post, wait, release: a request used once
    GB/s         batch x 4 KiB / (post+done)

    python plugins/nixl_nvlink/tools/make_bench.py [--iters 200] [--profile BATCH]

``--profile`` also prints where make() spends its time (cProfile, device gather) for one batch.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import cupy as cp
import numpy as np

from nixl_core import Agent, DescList

BLK, N = 4096, 65536


PATHS = (
    ("host staged", {"host_gather_max": str(1 << 30)}),
    ("device gather", {"host_gather_max": "0"}),
    ("default", {}),
    ("host + sync upload", {"device_gather": "0"}),
)


def run(
    params: dict[str, str], batches: list[int], iters: int
) -> list[tuple[int, float, float, float]]:
    """Rows (batch, make us, post+done us, make+xfer us) for one parameter setting."""
    a = Agent(f"mk{len(params)}", backends=["NVLINK"], backend_params={"NVLINK": params})
    try:
        src = cp.arange(N * BLK, dtype=cp.uint8)
        dst = cp.zeros(N * BLK, cp.uint8)
        a.register(src)
        a.register(dst)
        lp = a.prep("", DescList.strided("VRAM", src.data.ptr, BLK, N, BLK, 0))
        rp = a.prep(a.name, DescList.strided("VRAM", dst.data.ptr, BLK, N, BLK, 0))
        rng = np.random.default_rng(1)
        rows = []
        for batch in batches:
            mk, px, once = [], [], []
            for i in range(iters + 10):
                li = rng.permutation(N)[:batch].astype(np.int32)
                ri = rng.permutation(N)[:batch].astype(np.int32)
                t0 = time.perf_counter()
                req = a.make("WRITE", lp, li, rp, ri)
                t1 = time.perf_counter()
                req.post()
                req.wait(30)
                t2 = time.perf_counter()
                req.release()
                t3 = time.perf_counter()
                if i >= 10:
                    mk.append((t1 - t0) * 1e6)
                    px.append((t2 - t1) * 1e6)
                    once.append((t3 - t0) * 1e6)
            # correctness of the last request
            got = cp.asnumpy(dst.reshape(N, BLK)[cp.asarray(ri)])
            want = cp.asnumpy(src.reshape(N, BLK)[cp.asarray(li)])
            assert np.array_equal(got, want), f"{params} batch={batch}: wrong bytes"
            rows.append(
                (batch, statistics.median(mk), statistics.median(px), statistics.median(once))
            )
        return rows
    finally:
        a.close()


def profile(batch: int, iters: int) -> None:
    """cProfile of make() + release() (default params), ``batch`` descriptors each."""
    a = Agent("mkprof", backends=["NVLINK"])
    try:
        src = cp.zeros(N * BLK, cp.uint8)
        dst = cp.zeros(N * BLK, cp.uint8)
        a.register(src)
        a.register(dst)
        lp = a.prep("", DescList.strided("VRAM", src.data.ptr, BLK, N, BLK, 0))
        rp = a.prep(a.name, DescList.strided("VRAM", dst.data.ptr, BLK, N, BLK, 0))
        rng = np.random.default_rng(2)
        li = rng.permutation(N)[:batch].astype(np.int32)
        ri = rng.permutation(N)[:batch].astype(np.int32)
        for _ in range(20):
            a.make("WRITE", lp, li, rp, ri).release()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(iters):
            a.make("WRITE", lp, li, rp, ri).release()
        pr.disable()
        print(f"# cProfile of {iters} x (make + release), batch {batch}")
        pstats.Stats(pr).sort_stats("tottime").print_stats(14)
    finally:
        a.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--profile", type=int, default=0, metavar="BATCH")
    args = ap.parse_args()
    batches = [64, 256, 1024, 4096, 65536]
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"# {name}, 4 KiB blocks, prepared lists of {N}, median of {args.iters}, microseconds")
    print(f"{'path':<22}{'batch':>7}{'make':>10}{'post+done':>11}{'make+xfer':>11}{'GB/s':>9}")
    for label, params in PATHS:
        for batch, mk, px, once in run(params, batches, args.iters):
            gbs = batch * BLK / (px * 1e-6) / 1e9
            print(f"{label:<22}{batch:>7}{mk:>10.1f}{px:>11.1f}{once:>11.1f}{gbs:>9.1f}")
    if args.profile:
        profile(args.profile, args.iters)


if __name__ == "__main__":
    main()
