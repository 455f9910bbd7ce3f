"""Descriptor-path benchmark of the core, side by side with the real NIXL in the same process.

What a KV-cache transfer costs in Python before any byte moves: building 100k descriptors from
numpy arrays, preparing both sides (checking them against the registrations), making a request
from index arrays; building 1M strided descriptors; checking 100k descriptors against 1000
registrations. The same workloads run through NIXL's Python API (``nixl._api``) when it is
importable (``pip install --no-deps nixl-cu13==1.5.1 nixl``); its absence is reported, not an error.

    python bench/bench_core.py [--n 100000] [--regs 1000] [--repeat 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from nixl_core import Agent, DescList, __version__

BLOCK = 4096


def _timeit(
    fn: Callable[[], Any], repeat: int, cleanup: Callable[[Any], None] | None = None
) -> list[float]:
    """Milliseconds per call, after two warm-up calls."""
    out = []
    for i in range(repeat + 2):
        t0 = time.perf_counter()
        res = fn()
        dt = (time.perf_counter() - t0) * 1e3
        if cleanup is not None:
            cleanup(res)
        if i >= 2:
            out.append(dt)
    return out


def _stat(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"median_ms": statistics.median(s), "p90_ms": s[int(0.9 * (len(s) - 1))]}


class Workload:
    """Buffers and descriptor arrays shared by both implementations."""

    def __init__(self, n: int, regs: int) -> None:
        self.n = n
        self.src = np.zeros(n * BLOCK // 8, np.uint64)
        self.dst = np.zeros(n * BLOCK // 8, np.uint64)
        steps = np.arange(n, dtype=np.uint64) * np.uint64(BLOCK)
        self.local = np.stack(
            [self.src.ctypes.data + steps, np.full(n, BLOCK, np.uint64), np.zeros(n, np.uint64)],
            axis=1,
        )
        self.remote = self.local.copy()
        self.remote[:, 0] = self.dst.ctypes.data + steps
        rng = np.random.default_rng(7)
        self.perm = rng.permutation(n).astype(np.int32)
        self.sorted_idx = np.arange(n, dtype=np.int32)
        # 1000 registrations of 1 MiB inside one buffer, queries at random 4 KiB blocks of them
        self.n_regs = regs
        self.big = np.zeros(regs * (1 << 20) // 8, np.uint64)
        reg_starts = self.big.ctypes.data + np.arange(regs, dtype=np.uint64) * np.uint64(1 << 20)
        self.regs = np.stack(
            [reg_starts, np.full(regs, 1 << 20, np.uint64), np.zeros(regs, np.uint64)], axis=1
        )
        blocks = rng.integers(0, regs * 256, n).astype(np.uint64)
        self.queries = np.stack(
            [
                self.big.ctypes.data + blocks * np.uint64(BLOCK),
                np.full(n, BLOCK, np.uint64),
                np.zeros(n, np.uint64),
            ],
            axis=1,
        )


def bench_ours(w: Workload, repeat: int) -> dict[str, dict[str, float]]:
    """The nixl-py core with two LOOPBACK agents in one process."""
    a = Agent("bench-a", backends=["LOOPBACK"])
    b = Agent("bench-b", backends=["LOOPBACK"])
    c = Agent("bench-c", backends=["LOOPBACK"])
    try:
        a.register(w.src)
        b.register(w.dst)
        a.add_remote(b.metadata())
        c.register(w.regs, "DRAM")
        res: dict[str, dict[str, float]] = {}
        res["build"] = _stat(
            _timeit(
                lambda: (
                    DescList.from_array(w.local, "DRAM"),
                    DescList.from_array(w.remote, "DRAM"),
                ),
                repeat,
            )
        )
        ld, rd = DescList.from_array(w.local, "DRAM"), DescList.from_array(w.remote, "DRAM")
        res["prep"] = _stat(_timeit(lambda: (a.prep("", ld), a.prep("bench-b", rd)), repeat))
        lp, rp = a.prep("", ld), a.prep("bench-b", rd)
        res["make (random idx)"] = _stat(
            _timeit(lambda: a.make("WRITE", lp, w.perm, rp, w.perm), repeat, lambda r: r.release())
        )
        res["make (sorted idx)"] = _stat(
            _timeit(
                lambda: a.make("WRITE", lp, w.sorted_idx, rp, w.sorted_idx),
                repeat,
                lambda r: r.release(),
            )
        )

        def total() -> Any:
            l2 = a.prep("", DescList.from_array(w.local, "DRAM"))
            r2 = a.prep("bench-b", DescList.from_array(w.remote, "DRAM"))
            return a.make("WRITE", l2, w.perm, r2, w.perm)

        res["build+prep+make"] = _stat(_timeit(total, repeat, lambda r: r.release()))
        res["create (one-shot)"] = _stat(
            _timeit(
                lambda: a.create("WRITE", ld, rd, "bench-b", merge=False),
                repeat,
                lambda r: r.release(),
            )
        )
        bases = w.src.ctypes.data + np.arange(64, dtype=np.uint64) * np.uint64(1 << 26)
        res["1M strided build"] = _stat(
            _timeit(lambda: DescList.strided("DRAM", bases, BLOCK, (1 << 20) // 64, BLOCK), repeat)
        )
        qd = DescList.from_array(w.queries, "DRAM")
        res["validate vs 1k regs"] = _stat(_timeit(lambda: c.prep("", qd), repeat))
        req = a.make("WRITE", lp, w.perm, rp, w.perm)
        req.post()
        req.wait(timeout=120)
        if not np.array_equal(w.src, w.dst):
            raise SystemExit("ours: data check failed after the WRITE")
        req.release()
        return res
    finally:
        for x in (a, b, c):
            x.close()


def bench_nixl(
    w: Workload, repeat: int, prog_thread: bool
) -> tuple[dict[str, dict[str, float]] | None, str]:
    """The same workloads through NIXL's Python API (UCX backend; default config = progress thread)."""
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as exc:
        return None, f"NIXL not importable ({exc}); pip install --no-deps nixl-cu13==1.5.1 nixl"
    import nixl

    cfg = nixl_agent_config(enable_prog_thread=prog_thread, backends=["UCX"])
    tag = "pt" if prog_thread else "npt"
    a = nixl_agent(f"nixl-bench-a-{tag}", cfg)
    b_name = f"nixl-bench-b-{tag}"
    b = nixl_agent(b_name, cfg)
    c = nixl_agent(f"nixl-bench-c-{tag}", cfg)
    w.src[:] = 0
    w.dst[:] = 0
    a.register_memory(np.array([[w.src.ctypes.data, w.src.nbytes, 0]], np.uint64), "DRAM")
    b.register_memory(np.array([[w.dst.ctypes.data, w.dst.nbytes, 0]], np.uint64), "DRAM")
    c.register_memory(w.regs, "DRAM")
    a.add_remote_agent(b.get_agent_metadata())
    res: dict[str, dict[str, float]] = {}
    res["build"] = _stat(
        _timeit(
            lambda: (a.get_xfer_descs(w.local, "DRAM"), a.get_xfer_descs(w.remote, "DRAM")), repeat
        )
    )
    ld, rd = a.get_xfer_descs(w.local, "DRAM"), a.get_xfer_descs(w.remote, "DRAM")

    def rel_pair(p: Any) -> None:
        a.release_dlist_handle(p[0])
        a.release_dlist_handle(p[1])

    res["prep"] = _stat(
        _timeit(
            lambda: (
                a.prep_xfer_dlist("NIXL_INIT_AGENT", ld, "DRAM"),
                a.prep_xfer_dlist(b_name, rd, "DRAM"),
            ),
            repeat,
            rel_pair,
        )
    )
    lp = a.prep_xfer_dlist("NIXL_INIT_AGENT", ld, "DRAM")
    rp = a.prep_xfer_dlist(b_name, rd, "DRAM")
    rel = a.release_xfer_handle
    res["make (random idx)"] = _stat(
        _timeit(lambda: a.make_prepped_xfer("WRITE", lp, w.perm, rp, w.perm), repeat, rel)
    )
    res["make (sorted idx)"] = _stat(
        _timeit(
            lambda: a.make_prepped_xfer("WRITE", lp, w.sorted_idx, rp, w.sorted_idx), repeat, rel
        )
    )

    def total() -> Any:
        l2 = a.prep_xfer_dlist("NIXL_INIT_AGENT", a.get_xfer_descs(w.local, "DRAM"), "DRAM")
        r2 = a.prep_xfer_dlist(b_name, a.get_xfer_descs(w.remote, "DRAM"), "DRAM")
        return a.make_prepped_xfer("WRITE", l2, w.perm, r2, w.perm), l2, r2

    def rel_total(x: Any) -> None:
        a.release_xfer_handle(x[0])
        a.release_dlist_handle(x[1])
        a.release_dlist_handle(x[2])

    res["build+prep+make"] = _stat(_timeit(total, repeat, rel_total))
    res["create (one-shot)"] = _stat(
        _timeit(lambda: a.initialize_xfer("WRITE", ld, rd, b_name), repeat, rel)
    )
    # NIXL has no strided constructor: the nearest is building the Nx3 array and get_xfer_descs.
    bases = w.src.ctypes.data + np.arange(64, dtype=np.uint64) * np.uint64(1 << 26)

    def strided() -> Any:
        per = (1 << 20) // 64
        addrs = (
            bases[:, None] + np.arange(per, dtype=np.uint64)[None, :] * np.uint64(BLOCK)
        ).ravel()
        arr = np.stack(
            [addrs, np.full(addrs.size, BLOCK, np.uint64), np.zeros(addrs.size, np.uint64)], axis=1
        )
        return a.get_xfer_descs(arr, "DRAM")

    res["1M strided build"] = _stat(_timeit(strided, repeat))
    qd = c.get_xfer_descs(w.queries, "DRAM")
    res["validate vs 1k regs"] = _stat(
        _timeit(
            lambda: c.prep_xfer_dlist("NIXL_INIT_AGENT", qd, "DRAM"), repeat, c.release_dlist_handle
        )
    )
    h = a.make_prepped_xfer("WRITE", lp, w.perm, rp, w.perm)
    st = a.transfer(h)
    deadline = time.monotonic() + 120
    while st != "DONE" and time.monotonic() < deadline:
        st = a.check_xfer_state(h)
        b.get_new_notifs()  # without a progress thread the target's worker is driven here
    if st != "DONE" or not np.array_equal(w.src, w.dst):
        raise SystemExit(f"NIXL: WRITE did not complete correctly (state {st})")
    a.release_xfer_handle(h)
    version = getattr(nixl, "__version__", None) or _dist_version("nixl-cu13")
    how = "default config: progress thread" if prog_thread else "enable_prog_thread=False"
    return res, f"NIXL {version} (UCX backend, {how})"


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


TARGETS = {"build+prep+make": 2.0, "1M strided build": 20.0, "validate vs 1k regs": 3.0}


def main(argv: list[str] | None = None) -> int:
    """Run both implementations and print the table with ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="descriptors per list")
    ap.add_argument("--regs", type=int, default=1000, help="registrations for the validation case")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--against", choices=["nixl", "none"], default="nixl")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    w = Workload(args.n, args.regs)
    ours = bench_ours(w, args.repeat)
    runs: list[tuple[dict[str, dict[str, float]] | None, str]] = []
    if args.against == "nixl":
        runs = [bench_nixl(w, args.repeat, True)]
        if runs[0][0] is not None:  # NIXL importable: its faster config too
            runs.append(bench_nixl(w, args.repeat, False))
    cpu = platform.processor() or platform.machine()
    print(f"nixl-py core {__version__}")
    for i, (_, label) in enumerate(runs):
        print(f"NIXL{i + 1}: {label}")
    if not runs:
        print("comparison off (--against none)")
    print(
        f"machine: {os.cpu_count()} cpus, {cpu}, Python {platform.python_version()}, numpy {np.__version__}"
    )
    print(f"{args.n} descriptors of {BLOCK} B, {args.repeat} repeats, median (p90) in ms")
    print("ratio = the faster NIXL's median / ours (> 1: nixl-py is faster)\n")
    theirs = [r for r, _ in runs]

    def cell(t: dict[str, float] | None) -> str:
        return f"{t['median_ms']:.3f} ({t['p90_ms']:.3f})" if t else "n/a"

    head = f"{'workload':24s} {'nixl-py':>16s}"
    head += "".join(f" {f'NIXL{i + 1}':>16s}" for i in range(len(runs)))
    head += f" {'ratio':>7s} {'target':>8s}"
    print(head)
    print("-" * len(head))
    rows = []
    for k, v in ours.items():
        ts = [t.get(k) if t else None for t in theirs]
        best = min((t["median_ms"] for t in ts if t), default=None)
        ratio = best / v["median_ms"] if best else None
        tgt = TARGETS.get(k)
        ratio_s = f"{ratio:.1f}x" if ratio else "n/a"
        tgt_s = f"<= {tgt:g}" if tgt else ""
        cells = "".join(f" {cell(t):>16s}" for t in ts)
        print(f"{k:24s} {cell(v):>16s}{cells} {ratio_s:>7s} {tgt_s:>8s}")
        rows.append({"workload": k, "ours": v, "nixl": ts, "ratio": ratio, "target_ms": tgt})
    if args.json:
        meta = {
            "command": " ".join(sys.argv),
            "anchors": [label for _, label in runs],
            "n": args.n,
            "cpus": os.cpu_count(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
