"""``nixl-bench``: argument parsing, the sweep plan, checks of impossible requests, the run.

Option names follow nixlbench (``--start-block-size``, ``--op`` ...); nixlbench's own underscore
spellings (``--start_block_size``, ``--op_type``, ``--check_consistency`` ...) are accepted too.
Every impossible request (VRAM without a GPU, an unknown backend, FILE without a backend that
registers FILE segments, a buffer that does not fit in memory) is refused before any process
starts, with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

from nixl_core.bench.engines import NIXL_INSTALL, RowTimes, nixl_version
from nixl_core.bench.report import (
    Progress,
    Row,
    json_rows,
    plot_available,
    render_table,
    stats_of,
    write_json,
    write_plot,
)
from nixl_core.bench.runner import BenchError, ImplRun, Setup, run_impl
from nixl_core.bench.worker import TARGET_SEED, RowPlan
from nixl_core.bench.workload import (
    DTYPE_BYTES,
    KV_MODELS,
    KVLayout,
    SideLayout,
    block_slots,
    fill_pattern,
    fmt_size,
    kv_layout,
    parse_size,
    split_ids,
)

__all__ = ["build_parser", "main"]

#: nixlbench's threshold above which iterations are divided by --large-blk-iter-ftr.
LARGE_BLOCK = 1 << 20
#: Fewest timed iterations a row gets when --max-row-bytes caps it.
MIN_ITERS = 10
SEGS = ("DRAM", "VRAM", "FILE")
_IMPL_NAMES = {"ours": "nixl-py", "nixl": "NIXL", "dd": "dd"}


# --------------------------------------------------------------------------- arguments
def _size(text: str) -> int:
    try:
        v = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return v


def _seg(text: str) -> str:
    v = text.strip().upper()
    if v not in SEGS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(SEGS)}, got {text!r}")
    return v


def _op(text: str) -> str:
    v = text.strip().upper()
    if v not in ("READ", "WRITE", "BOTH"):
        raise argparse.ArgumentTypeError(f"expected READ, WRITE or both, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (nixlbench names, plus nixlbench's underscore spellings)."""
    ap = argparse.ArgumentParser(
        prog="nixl-bench",
        description=(
            "Transfer benchmark of nixl-py, side by side with the real NIXL when it is "
            "installed: an initiator and a target agent in two processes, a block-size sweep "
            "(or one request's KV cache of a model), WRITE then READ, nixlbench's columns."
        ),
        epilog=(
            "Sizes take binary units (4K, 64M, 1G). Columns: B/W = bytes/1e9/total s of the "
            "timed loop; Avg Lat. = total us / (iterations x batch); Prep = building the "
            "request; Post = the post call; Tx = post's return to completion; Ratio = "
            "nixl-py / NIXL bandwidth."
        ),
    )
    g = ap.add_argument_group("implementations")
    g.add_argument(
        "--backend",
        help="nixl-py backend (default: UCX if installed, else LOOPBACK; for a FILE target the "
        "first installed backend that registers FILE, e.g. POSIX)",
    )
    g.add_argument(
        "--against",
        choices=("nixl", "none"),
        default="nixl",
        help="run the same workload through the real NIXL when it is importable (default); "
        "none: nixl-py only",
    )
    g.add_argument(
        "--nixl-backend", help="NIXL's backend (default: UCX, or POSIX for a FILE target)"
    )
    g.add_argument(
        "--dd",
        choices=("auto", "none"),
        default="auto",
        help="auto (default): for a FILE target with DRAM, also time a plain sequential "
        "pread/pwrite of the same bytes (dd bs=<block>) and print the 'dd B/W' and 'vs dd' columns",
    )
    g.add_argument(
        "--nixl-progress-thread",
        choices=("on", "off"),
        default="on",
        help="NIXL's progress thread (on = nixl_agent_config's default, what its users get)",
    )
    g = ap.add_argument_group("segments")
    g.add_argument(
        "--initiator-seg", "--initiator_seg_type", type=_seg, default="DRAM", metavar="SEG",
        help="initiator memory: DRAM or VRAM (default DRAM)",
    )  # fmt: skip
    g.add_argument(
        "--target-seg", "--target_seg_type", type=_seg, default="DRAM", metavar="SEG",
        help="target memory or storage: DRAM, VRAM or FILE (default DRAM)",
    )  # fmt: skip
    g.add_argument(
        "--devices", "--device_list", default="0", metavar="I,T",
        help="GPU indices of the initiator and the target for VRAM (default 0; one index = both)",
    )  # fmt: skip
    g.add_argument(
        "--filepath", metavar="DIR",
        help="directory of the benchmark file for a FILE target (default: the temp directory)",
    )  # fmt: skip
    g.add_argument(
        "--storage-enable-direct", "--storage_enable_direct", action="store_true",
        help="open the FILE target with O_DIRECT",
    )  # fmt: skip
    g = ap.add_argument_group("sweep")
    g.add_argument("--op", "--op_type", type=_op, default="BOTH", help="READ, WRITE or both")
    g.add_argument(
        "--start-block-size", "--start_block_size", type=_size, default=4 << 10, metavar="SIZE",
        help="first block size (default 4K)",
    )  # fmt: skip
    g.add_argument(
        "--max-block-size", "--max_block_size", type=_size, default=64 << 20, metavar="SIZE",
        help="last block size, doubling from the first (default 64M)",
    )  # fmt: skip
    g.add_argument(
        "--batch-size", metavar="N|A:B",
        help="blocks per request, or a doubling range A:B (default 64)",
    )  # fmt: skip
    g.add_argument("--start-batch-size", "--start_batch_size", type=int, metavar="N")
    g.add_argument("--max-batch-size", "--max_batch_size", type=int, metavar="N")
    g.add_argument(
        "--total-buffer-size", "--total_buffer_size", type=_size, default=256 << 20,
        metavar="SIZE",
        help="each side's buffer (default 256M); a batch is capped to what fits",
    )  # fmt: skip
    g.add_argument(
        "--layout", choices=("contiguous", "scattered"),
        help="contiguous blocks, or random block-aligned offsets in the buffer (default: "
        "contiguous; scattered for --kv-model)",
    )  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seed of the scattered offsets")
    g.add_argument("--num-iter", "--num_iter", type=int, default=1000, metavar="N")
    g.add_argument("--warmup-iter", "--warmup_iter", type=int, default=100, metavar="N")
    g.add_argument(
        "--large-blk-iter-ftr", "--large_blk_iter_ftr", type=int, default=16, metavar="F",
        help="divide iterations by F for blocks > 1 MiB (nixlbench's default 16)",
    )  # fmt: skip
    g.add_argument(
        "--max-row-bytes", type=_size, default=4 << 30, metavar="SIZE",
        help=f"stop a row after about this many bytes (at least {MIN_ITERS} iterations; "
        "default 4G; 0 = nixlbench's iteration counts exactly)",
    )  # fmt: skip
    g.add_argument(
        "--prepared", "--prepared_xfer", action="store_true",
        help="prepare both descriptor lists once per row, then make each request from index "
        "arrays (instead of one-shot create)",
    )  # fmt: skip
    g.add_argument(
        "--recreate-xfer", "--recreate_xfer", action="store_true",
        help="build a new request every iteration (default: build once, repost)",
    )  # fmt: skip
    g.add_argument(
        "--check", "--check_consistency", action="store_true",
        help="verify after every row that the destination blocks hold the source blocks",
    )  # fmt: skip
    g.add_argument(
        "--quick", action="store_true",
        help="a short sweep (block sizes x4 apart, fewer iterations): about 30 s",
    )  # fmt: skip
    g = ap.add_argument_group("KV-cache workload")
    g.add_argument("--kv-model", choices=sorted(KV_MODELS), help="move one request's KV cache")
    g.add_argument("--isl", type=int, default=4096, help="input sequence length (tokens)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallelism (splits KV heads)")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    g = ap.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="write meta and rows as JSON")
    g.add_argument("--plot", metavar="FILE.png", help="plot bandwidth vs block size")
    g.add_argument(
        "--progress", choices=("auto", "on", "off"), default="auto",
        help="progress bar on stderr (auto: on a terminal, for sweeps longer than 2 s)",
    )  # fmt: skip
    g.add_argument("--verbose", action="store_true", help="print the tracebacks of failures")
    return ap


# --------------------------------------------------------------------------- plan
@attrs.frozen
class Plan:
    """Everything decided before any process starts."""

    rows: list[tuple[RowPlan, int]]  # (plan, bytes per iteration)
    init_bytes: int
    target_bytes: int
    layout: str
    kv: KVLayout | None
    cache_blocks: int
    notes: list[str]


def _batches(args: argparse.Namespace) -> list[int]:
    lo = hi = 64
    if args.batch_size:
        text = args.batch_size.replace("-", ":")
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            raise BenchError(f"--batch-size expects N or A:B, got {args.batch_size!r}") from None
        if len(parts) not in (1, 2):
            raise BenchError(f"--batch-size expects N or A:B, got {args.batch_size!r}")
        lo, hi = parts[0], parts[-1]
    if args.start_batch_size is not None:
        lo = args.start_batch_size
        hi = max(hi, lo) if args.max_batch_size is None else hi
    if args.max_batch_size is not None:
        hi = args.max_batch_size
    if lo < 1 or hi < lo:
        raise BenchError(f"batch sizes must satisfy 1 <= start <= max, got {lo}..{hi}")
    out = []
    b = lo
    while b <= hi:
        out.append(b)
        b *= 2
    return out


def _blocks(args: argparse.Namespace) -> list[int]:
    lo, hi = args.start_block_size, args.max_block_size
    if lo < 1 or hi < lo:
        raise BenchError(f"block sizes must satisfy 1 <= start <= max, got {lo}..{hi}")
    step = 4 if args.quick else 2
    out = []
    b = lo
    while b <= hi:
        out.append(b)
        b *= step
    return out


def _iters(args: argparse.Namespace, block: int, per_iter: int) -> tuple[int, int]:
    n, w = args.num_iter, args.warmup_iter
    if block > LARGE_BLOCK and args.large_blk_iter_ftr > 1:
        n //= args.large_blk_iter_ftr
        w //= args.large_blk_iter_ftr
    n = max(n, 1)
    if args.max_row_bytes and n * per_iter > args.max_row_bytes:
        n = max(min(MIN_ITERS, n), args.max_row_bytes // per_iter)
        w = min(w, max(2, n // 10))
    return n, w


def _ops(args: argparse.Namespace) -> list[str]:
    return ["WRITE", "READ"] if args.op == "BOTH" else [args.op]


def make_plan(args: argparse.Namespace) -> Plan:
    """Rows, layouts and buffer sizes of the run.

    Raises:
        BenchError: inconsistent sizes.
    """
    notes: list[str] = []
    ops = _ops(args)
    file_target = args.target_seg == "FILE"
    rows: list[tuple[RowPlan, int]] = []
    if args.kv_model:
        try:
            kv = kv_layout(args.kv_model, args.isl, args.tp, args.page_size, args.dtype)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        layout = args.layout or "scattered"
        # The cache holds twice the request's blocks, so a scattered request picks half of them.
        cache = 2 * kv.blocks
        side_bytes = kv.regions * cache * kv.desc_bytes
        if not _fits(args, 2 * side_bytes):
            cache = kv.blocks
            side_bytes = kv.regions * cache * kv.desc_bytes
            notes.append("the KV cache holds only the request's blocks (memory is short)")
        for i, op in enumerate(ops):
            rng = np.random.default_rng([args.seed, i])
            local = SideLayout(
                kv.desc_bytes,
                kv.regions,
                cache,
                block_slots(kv.blocks, cache, layout, rng, kv.regions),
            )
            remote = SideLayout(
                kv.desc_bytes,
                kv.regions,
                cache,
                block_slots(kv.blocks, cache, layout, rng, kv.regions),
            )
            n, w = _iters(args, 0, kv.request_bytes)
            rows.append(
                (_row_plan(args, i, op, local, remote, n, w, file_target), kv.request_bytes)
            )
        plan = Plan(rows, side_bytes, side_bytes, layout, kv, cache, notes)
    else:
        layout = args.layout or "contiguous"
        blocks, batches = _blocks(args), _batches(args)
        buf = max(args.total_buffer_size, blocks[-1])
        buf += -buf % 8  # the fill pattern is written in 8-byte words
        if buf > args.total_buffer_size:
            notes.append(f"buffer raised to the largest block, {fmt_size(buf)}")
        seen: set[tuple[str, int, int]] = set()
        for op in ops:
            for block in blocks:
                slots = buf // block
                for want in batches:
                    batch = min(want, slots)
                    if (op, block, batch) in seen:
                        continue
                    seen.add((op, block, batch))
                    if batch < want:
                        notes.append(
                            f"batch {want} of {fmt_size(block)} blocks capped to {batch} "
                            f"(--total-buffer-size {fmt_size(buf)})"
                        )
                    i = len(rows)
                    rng = np.random.default_rng([args.seed, i])
                    local = SideLayout(block, 1, slots, block_slots(batch, slots, layout, rng))
                    remote = SideLayout(block, 1, slots, block_slots(batch, slots, layout, rng))
                    n, w = _iters(args, block, block * batch)
                    rows.append(
                        (_row_plan(args, i, op, local, remote, n, w, file_target), block * batch)
                    )
        if layout == "contiguous" and not args.prepared:
            notes.insert(
                0,
                "contiguous blocks: nixl-py's create() merges neighbours into one descriptor; "
                "NIXL merges only in make_prepped_xfer (--prepared); --layout scattered avoids both",
            )
        plan = Plan(rows, buf, buf, layout, None, 0, list(dict.fromkeys(notes)))
    need = plan.init_bytes * (args.initiator_seg != "VRAM") + plan.target_bytes * (
        args.target_seg == "DRAM"
    )
    if not _fits(args, need):
        raise BenchError(
            f"the buffers need {fmt_size(need)} of host memory but only "
            f"{fmt_size(_mem_available())} is available; lower "
            f"{'--isl' if args.kv_model else '--total-buffer-size'}"
        )
    return plan


def _row_plan(
    args: argparse.Namespace,
    i: int,
    op: str,
    local: SideLayout,
    remote: SideLayout,
    n: int,
    w: int,
    file_target: bool,
) -> RowPlan:
    per_iter = local.block * int(local.idx.size)
    return RowPlan(
        row=i,
        op=op,
        local=local,
        remote=remote,
        iters=n,
        warmup=w,
        prepared=args.prepared,
        recreate=args.recreate_xfer,
        notif=None if file_target else f"nixl-bench:{i}".encode(),
        timeout=30.0 + per_iter / 20e6,
    )


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _fits(args: argparse.Namespace, nbytes: int) -> bool:
    return nbytes <= 0.8 * _mem_available()


# --------------------------------------------------------------------------- checks
def gpu_status() -> tuple[int, str]:
    """(number of CUDA GPUs, why none) as cupy sees them; cupy is only imported if installed."""
    if importlib.util.find_spec("cupy") is None:
        return 0, "cupy is not installed (pip install cupy-cuda12x or cupy-cuda13x)"
    try:
        import cupy

        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError without a driver or device
        return 0, f"CUDA is not usable: {exc}"
    return n, "" if n else "no CUDA GPU is visible"


def _check_segments(args: argparse.Namespace) -> tuple[int, int]:
    if args.initiator_seg == "FILE":
        raise BenchError(
            "--initiator-seg FILE: the initiator's side is memory (DRAM or VRAM); put the file "
            "on the target side (--target-seg FILE)"
        )
    try:
        init_dev, target_dev = split_ids(args.devices)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    if "VRAM" in (args.initiator_seg, args.target_seg):
        n, why = gpu_status()
        if n == 0:
            raise BenchError(f"VRAM segments need a CUDA GPU: {why}")
        for d in (init_dev, target_dev):
            if d >= n:
                raise BenchError(f"--devices {args.devices}: GPU {d} does not exist ({n} visible)")
    return (
        init_dev if args.initiator_seg == "VRAM" else 0,
        target_dev if args.target_seg == "VRAM" else 0,
    )


def resolve_backend(args: argparse.Namespace) -> str:
    """The nixl-py backend that can carry the requested segments.

    Raises:
        BenchError: unknown, unavailable or unable backend; none installed for FILE or VRAM.
    """
    from nixl_core import list_backends
    from nixl_core._plugins import INSTALL_HINTS

    infos = {b.name.upper(): b for b in list_backends()}
    mems = {args.initiator_seg, args.target_seg}
    remote = args.target_seg != "FILE"

    def why_not(name: str) -> str | None:
        b = infos[name]
        if not b.available:
            return f"backend {b.name} is installed but not available here: {b.reason}"
        missing = sorted(m for m in mems if m not in b.mem_types)
        if missing:
            return (
                f"backend {b.name} cannot move {'/'.join(missing)} (it supports "
                f"{', '.join(b.mem_types)})"
            )
        if remote and not b.capabilities.get("remote"):
            return (
                f"backend {b.name} cannot reach an agent in another process (it is local-only; "
                "use it with --target-seg FILE if it registers FILE)"
            )
        if not remote and not b.capabilities.get("local"):
            return f"backend {b.name} cannot do loopback (FILE) transfers"
        return None

    installed = ", ".join(
        f"{b.name} [{', '.join(b.mem_types)}]" if b.available else f"{b.name} (unavailable)"
        for b in infos.values()
    )
    if args.backend:
        name = args.backend.upper()
        if name not in infos:
            hint = INSTALL_HINTS.get(name)
            raise BenchError(
                f"unknown backend {args.backend!r} (installed: {installed})"
                + (f"; install it with `{hint}`" if hint else "")
            )
        reason = why_not(name)
        if reason:
            raise BenchError(reason)
        return infos[name].name
    default = "UCX" if "UCX" in infos and infos["UCX"].available else "LOOPBACK"
    order = [default, *sorted(n for n in infos if n != default)]
    for name in order:
        if name in infos and why_not(name) is None:
            return infos[name].name
    if args.target_seg == "FILE":
        raise BenchError(
            f"no installed backend supports FILE segments (installed: {installed}); install "
            f"one, e.g. `{INSTALL_HINTS['POSIX']}`"
        )
    raise BenchError(
        f"no installed backend moves {' -> '.join((args.initiator_seg, args.target_seg))} "
        f"between two processes (installed: {installed}); e.g. `{INSTALL_HINTS['UCX']}`"
    )


def _nixl_status(args: argparse.Namespace) -> tuple[bool, str]:
    if args.against == "none":
        return False, "comparison off (--against none)"
    if importlib.util.find_spec("nixl") is None:
        return False, f"not installed ({NIXL_INSTALL})"
    return True, ""


# --------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _gpus() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [x.strip() for x in out.stdout.splitlines() if x.strip()]


def _fs_type(path: str) -> str:
    best, fs = "", "?"
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mnt = parts[1]
                    inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                    if inside and len(mnt) > len(best):
                        best, fs = mnt, parts[2]
    except OSError:
        pass
    return fs


def _plugin_versions() -> dict[str, str]:
    from importlib.metadata import entry_points

    out: dict[str, str] = {}
    for ep in entry_points(group="nixl.backends"):
        dist = getattr(ep, "dist", None)
        if dist is not None:
            out[dist.metadata["Name"]] = dist.version
    return out


# --------------------------------------------------------------------------- run
def _label(impl: str) -> Callable[[RowPlan, int], str]:
    def label(plan: RowPlan, nbytes: int) -> str:
        return f"{impl} {plan.op} {fmt_size(plan.local.block)} x {plan.local.idx.size}"

    return label


def _make_file(path: str, nbytes: int) -> None:
    with open(path, "wb") as f:
        f.truncate(nbytes)
    mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(nbytes,))
    try:
        fill_pattern(mm, TARGET_SEED)
        mm.flush()
    finally:
        del mm


def _run_one(
    impl: str,
    args: argparse.Namespace,
    plan: Plan,
    engine: dict[str, Any],
    devs: tuple[int, int],
    progress: Progress,
) -> ImplRun:
    file = None
    path = ""
    if args.target_seg == "FILE":
        directory = args.filepath or _tempdir()
        path = os.path.join(directory, f"nixl-bench-{os.getpid()}-{impl}.bin")
        _make_file(path, plan.target_bytes)
        file = (path, bool(args.storage_enable_direct))
    setup = Setup(
        impl=impl,
        engine=engine,
        init_mem=args.initiator_seg,
        target_mem=args.target_seg,
        init_dev=devs[0],
        target_dev=devs[1],
        init_bytes=plan.init_bytes,
        target_bytes=plan.target_bytes,
        file=file,
        check=args.check and impl != "dd",  # dd moves other bytes: sequential, by design
        target_idle_poll=0.001 if impl == "nixl" and args.nixl_progress_thread == "off" else 0.02,
    )
    try:
        return run_impl(setup, plan.rows, progress.step, _label(_IMPL_NAMES[impl]))
    finally:
        if path and os.path.exists(path):
            os.unlink(path)


def _tempdir() -> str:
    import tempfile

    return tempfile.gettempdir()


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from nixl_core import __version__

    if args.num_iter < 1 or args.warmup_iter < 0:
        raise BenchError("--num-iter must be >= 1 and --warmup-iter >= 0")
    if args.quick:
        args.num_iter = min(args.num_iter, 200)
        args.warmup_iter = min(args.warmup_iter, 20)
        args.max_row_bytes = min(args.max_row_bytes or (1 << 30), 1 << 30)
    devs = _check_segments(args)
    backend = resolve_backend(args)
    if args.plot and (why := plot_available()):
        raise BenchError(why)
    if args.target_seg == "FILE":
        directory = args.filepath or _tempdir()
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise BenchError(f"--filepath {directory}: not a writable directory")
    elif args.filepath:
        raise BenchError("--filepath is only used with --target-seg FILE")
    plan = make_plan(args)
    compare, nixl_why = _nixl_status(args)
    nixl_backend = args.nixl_backend or ("POSIX" if args.target_seg == "FILE" else "UCX")
    engine = {
        "backend": backend,
        "nixl_backend": nixl_backend.upper(),
        "nixl_progress_thread": args.nixl_progress_thread == "on",
    }
    with_dd = args.dd == "auto" and args.target_seg == "FILE" and args.initiator_seg == "DRAM"
    started = _dt.datetime.now(_dt.timezone.utc)
    progress = Progress(len(plan.rows) * (1 + compare + with_dd), args.progress)
    dd: ImplRun | None = None
    try:
        ours = _run_one("ours", args, plan, engine, devs, progress)
        if with_dd:
            dd = _run_one("dd", args, plan, engine, devs, progress)
        theirs: ImplRun | None = None
        if compare:
            try:
                theirs = _run_one("nixl", args, plan, engine, devs, progress)
            except BenchError as exc:
                if exc.kind in ("ImportError", "ModuleNotFoundError"):
                    nixl_why = f"not importable ({exc.message}); {NIXL_INSTALL}"
                else:
                    nixl_why = f"failed: {exc}"
                if args.verbose and exc.detail:
                    progress.finish()
                    print(exc.detail, file=sys.stderr)
    finally:
        progress.finish()
    if theirs is None and compare:
        print(f"nixl-bench: warning: NIXL {nixl_why}", file=sys.stderr)
    rows = _rows(plan, ours, theirs, dd)
    ver = nixl_version()
    nixl_meta: dict[str, Any] = {
        "compared": theirs is not None,
        "status": "ok" if theirs is not None else nixl_why,
        "version": ver,
        "backend": nixl_backend.upper(),
        "progress_thread": args.nixl_progress_thread == "on",
    }
    gpus = _gpus()
    kv = plan.kv
    workload: dict[str, Any] = {
        "initiator_seg": args.initiator_seg,
        "target_seg": args.target_seg,
        "layout": plan.layout,
        "ops": _ops(args),
        "request": "prepared (prep once per row, make per request)"
        if args.prepared
        else "one-shot create",
        "recreate_xfer": args.recreate_xfer,
        "buffer_bytes": plan.init_bytes,
        "num_iter": args.num_iter,
        "warmup_iter": args.warmup_iter,
        "large_blk_iter_ftr": args.large_blk_iter_ftr,
        "max_row_bytes": args.max_row_bytes,
        "seed": args.seed,
        "devices": list(devs),
        "notes": plan.notes,
    }
    if args.target_seg == "FILE":
        directory = args.filepath or _tempdir()
        workload["file"] = {
            "directory": directory,
            "fs_type": _fs_type(directory),
            "direct": bool(args.storage_enable_direct),
        }
    meta: dict[str, Any] = {
        "tool": "nixl-bench",
        "version": __version__,
        "date": started.isoformat(timespec="seconds"),
        "command": "nixl-bench " + " ".join(argv),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "memory_bytes": _mem_total(),
            "platform": platform.platform(),
        },
        "gpu": gpus or None,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "nixl-core": __version__,
            "nixl": ver,
            **_plugin_versions(),
        },
        "ours": {"backend": backend, "path": rows[0].ours.path if rows and rows[0].ours else ""},
        "nixl": nixl_meta,
        "workload": workload,
        "kv": None
        if kv is None
        else {
            "model": kv.model.name,
            "isl": kv.isl,
            "tp": kv.tp,
            "page_size": kv.page_size,
            "dtype": kv.dtype,
            "regions": kv.regions,
            "blocks": kv.blocks,
            "cache_blocks": plan.cache_blocks,
            "desc_bytes": kv.desc_bytes,
            "descs": kv.descs,
            "bytes_per_token": kv.bytes_per_token,
            "request_bytes": kv.request_bytes,
        },
        "check": {
            "enabled": args.check,
            "failures": ours.check_failures,
            "nixl_failures": theirs.check_failures if theirs else [],
        },
    }
    text = _render(meta, rows, plan, args)
    print(text)
    if args.json:
        common = {
            "backend": backend,
            "initiator_seg": args.initiator_seg,
            "target_seg": args.target_seg,
            "layout": plan.layout,
        }
        write_json(args.json, meta, json_rows(rows, common))
    if args.plot:
        title = (
            f"nixl-py ({backend}) vs NIXL {ver or ''} ({nixl_backend.upper()}): "
            f"{args.initiator_seg} -> {args.target_seg}, {plan.layout}"
        )
        if kv is not None:
            title += f", {kv.model.name} isl {kv.isl}"
        write_plot(args.plot, rows, title, kv is not None)
    failures = ours.check_failures + (theirs.check_failures if theirs else [])
    if failures:
        for f in failures:
            print(f"nixl-bench: data check failed: {f}", file=sys.stderr)
        return 1
    return 0


def _rows(
    plan: Plan, ours: ImplRun, theirs: ImplRun | None, dd: ImplRun | None = None
) -> list[Row]:
    out = []
    for i, (rp, _) in enumerate(plan.rows):
        block, batch = rp.local.block, int(rp.local.idx.size)
        mine: RowTimes | None = ours.times[i] if i < len(ours.times) else None
        their = theirs.times[i] if theirs is not None and i < len(theirs.times) else None
        seq = dd.times[i] if dd is not None and i < len(dd.times) else None
        out.append(
            Row(
                op=rp.op,
                block=block,
                batch=batch,
                ours=stats_of(mine, block, batch) if mine else None,
                nixl=stats_of(their, block, batch) if their else None,
                dd=stats_of(seq, block, batch) if seq else None,
            )
        )
    return out


def _render(meta: dict[str, Any], rows: list[Row], plan: Plan, args: argparse.Namespace) -> str:
    m, w, nx = meta["machine"], meta["workload"], meta["nixl"]
    gpu = ", ".join(meta["gpu"]) if meta["gpu"] else "no GPU"
    lines = [
        f"nixl-bench {meta['version']} · {meta['date']} · {m['cpus']} CPUs ({m['cpu']}), "
        f"{fmt_size(m['memory_bytes'])} RAM, {gpu} · Python {meta['versions']['python']}, "
        f"numpy {meta['versions']['numpy']}",
        f"nixl-py: nixl-core {meta['version']}, backend {meta['ours']['backend']}"
        + (", initiator and target in two processes" if args.target_seg != "FILE" else ""),
    ]
    if nx["compared"]:
        pt = "on (nixl_agent_config default)" if nx["progress_thread"] else "off"
        lines.append(
            f"NIXL:    {nx['version']}, backend {nx['backend']}, progress thread {pt}"
            + (", two processes" if args.target_seg != "FILE" else "")
        )
    else:
        lines.append(f"NIXL:    {nx['status']}")
    req = w["request"] + (", rebuilt every iteration" if w["recreate_xfer"] else ", reposted")
    if plan.kv is not None:
        lines.append(f"KV:      {plan.kv.describe()}")
        lines.append(
            f"         one request per iteration; cache of {plan.cache_blocks} blocks per region "
            f"({fmt_size(plan.init_bytes)} per side), {plan.layout} block ids; {req}"
        )
    else:
        lines.append(
            f"sweep:   {w['initiator_seg']} -> {w['target_seg']}, {plan.layout} layout, {req}; "
            f"buffer {fmt_size(plan.init_bytes)} per side; up to {args.num_iter} iterations "
            f"(+{args.warmup_iter} warm-up)"
            + (
                f", about {fmt_size(args.max_row_bytes)} per row at most"
                if args.max_row_bytes
                else ""
            )
        )
    if "file" in w:
        f = w["file"]
        lines.append(
            f"file:    {f['directory']} ({f['fs_type']}){', O_DIRECT' if f['direct'] else ''}"
        )
    for note in plan.notes:
        lines.append(f"note:    {note}")
    for op in _ops(args):
        mine = [r for r in rows if r.op == op]
        a, b = w["initiator_seg"], w["target_seg"]
        lines.append("")
        lines.append(
            f"{op}: {a} -> {b}" if op == "WRITE" else f"{op}: {b} -> {a} (initiator reads)"
        )
        lines.append(render_table(mine, plan.kv is not None, nx["compared"]))
    if args.check:
        lines.append("")
        fails = meta["check"]["failures"]
        lines.append(
            f"data check: {len(rows) - len(fails)} of {len(rows)} rows verified"
            + (f", {len(fails)} FAILED" if fails else "")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nixl-bench`` console command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage and the error
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        return _run(args, argv)
    except BenchError as exc:
        print(f"nixl-bench: error: {exc}", file=sys.stderr)
        if args.verbose and exc.detail:
            print(exc.detail, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nixl-bench: interrupted", file=sys.stderr)
        return 130
