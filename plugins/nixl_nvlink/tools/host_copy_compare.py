"""DRAM <-> VRAM: the NVLINK copy kernel over mapped pinned memory vs batched cudaMemcpy.

Run on a GPU machine: ``python plugins/nixl_nvlink/tools/host_copy_compare.py``. Scattered
32 KiB x 16384 blocks (512 MiB) between pinned DRAM and VRAM, both directions, GB/s (1e9), the
median of 10 timed iterations after 3 warm-ups; plus one contiguous cudaMemcpyAsync of the same
bytes (the PCIe copy-engine ceiling).
"""

from __future__ import annotations

import os
import statistics
import time

import cupy as cp
import numpy as np

from nixl_core.agent import Agent, AgentConfig
from nixl_core.descriptors import DescList

N, BLK = 16384, 32 << 10
NBYTES = N * BLK


def timed(fn, iters: int = 10, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return NBYTES / statistics.median(ts) / 1e9


def main() -> None:
    host = np.zeros(NBYTES, np.uint8)
    dev = cp.zeros(NBYTES, cp.uint8)
    agent = Agent("hostcmp", AgentConfig(backends=("NVLINK",)))
    agent.register(host)
    agent.register(dev)
    perm = np.random.default_rng(0).permutation(N).astype(np.uint64)
    h0, g0 = int(host.ctypes.data), int(dev.data.ptr)
    hrows = np.stack([h0 + np.arange(N, dtype=np.uint64) * BLK, np.full(N, BLK), np.zeros(N)], 1)
    grows = np.stack([g0 + perm * BLK, np.full(N, BLK), np.zeros(N)], 1)
    local = DescList.from_array(hrows.astype(np.uint64), "DRAM")
    remote = DescList.from_array(grows.astype(np.uint64), "VRAM")
    out = {}
    for op in ("WRITE", "READ"):
        req = agent.create(op, local, remote, agent.name, merge=False)

        def run(req=req) -> None:
            req.post()
            req.wait(30)

        out[f"kernel {op} ({'DRAM->VRAM' if op == 'WRITE' else 'VRAM->DRAM'})"] = timed(run)
        req.release()
    # Batched memcpy (CUDA 12.8+): one call for all 16384 blocks.
    try:
        from cuda.bindings import runtime as crt

        stream = cp.cuda.Stream(non_blocking=True)
        srcs_h = hrows[:, 0].astype(np.uint64).tolist()
        dsts_g = grows[:, 0].astype(np.uint64).tolist()
        sizes = [BLK] * N
        attr = crt.cudaMemcpyAttributes()
        attr.srcAccessOrder = crt.cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
        for name, dsts, srcs in (("DRAM->VRAM", dsts_g, srcs_h), ("VRAM->DRAM", srcs_h, dsts_g)):

            def run(dsts=dsts, srcs=srcs) -> None:
                res = crt.cudaMemcpyBatchAsync(dsts, srcs, sizes, N, [attr], [0], 1, stream.ptr)
                err = res[0] if isinstance(res, tuple) else res
                if int(err) != 0:
                    raise RuntimeError(f"cudaMemcpyBatchAsync: {err}")
                stream.synchronize()

            out[f"cudaMemcpyBatchAsync {name}"] = timed(run)
    except Exception as exc:
        out[f"cudaMemcpyBatchAsync unavailable ({type(exc).__name__}: {exc})"] = float("nan")
    s = cp.cuda.Stream(non_blocking=True)
    for name, kind in (("DRAM->VRAM", 1), ("VRAM->DRAM", 2)):

        def run(kind=kind) -> None:
            if kind == 1:
                cp.cuda.runtime.memcpyAsync(g0, h0, NBYTES, kind, s.ptr)
            else:
                cp.cuda.runtime.memcpyAsync(h0, g0, NBYTES, kind, s.ptr)
            s.synchronize()

        out[f"one contiguous cudaMemcpyAsync {name} (ceiling)"] = timed(run)
    agent.close()
    # The kernel's shape for host paths: chunk size x blocks per SM (NVL_SWEEP=1).
    if os.environ.get("NVL_SWEEP"):
        for chunk in (8192, 16384, 65536):
            for per_sm in (2, 4, 8, 16):
                params = {"chunk_bytes": str(chunk), "blocks_per_sm": str(per_sm)}
                a = Agent(
                    f"sweep{chunk}_{per_sm}",
                    AgentConfig(backends=("NVLINK",), backend_params={"NVLINK": params}),
                )
                a.register(host)
                a.register(dev)
                for op in ("WRITE", "READ"):
                    req = a.create(op, local, remote, a.name, merge=False)

                    def run(req=req) -> None:
                        req.post()
                        req.wait(30)

                    out[f"kernel {op} chunk {chunk} blocks/SM {per_sm}"] = timed(run, 5, 2)
                    req.release()
                a.close()
    print(f"DRAM <-> VRAM, 32 KiB x {N} scattered (512 MiB), GB/s, median of 10:")
    for k, v in out.items():
        print(f"  {k:<60} {v:8.2f}")


if __name__ == "__main__":
    main()
