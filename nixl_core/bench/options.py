"""``nixl-bench``'s options: the argument parser, its value parsers, the --quick caps.

Option names follow nixlbench (``--start-block-size``, ``--op`` ...); nixlbench's own underscore
spellings (``--start_block_size``, ``--op_type``, ``--check_consistency`` ...) are accepted too.
"""

from __future__ import annotations

import argparse

from nixl_core.bench.plan import MIN_ITERS
from nixl_core.bench.runner import BenchError
from nixl_core.bench.workload import DTYPE_BYTES, KV_MODELS, parse_size

__all__ = ["SEGS", "build_parser", "normalize"]

#: What --initiator-seg and --target-seg accept.
SEGS = ("DRAM", "VRAM", "FILE")


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
        help="nixl-py backend (default: nixl-core's default for the segments, e.g. UCX, or "
        "POSIX for a FILE target; the header says which and why)",
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


def normalize(args: argparse.Namespace) -> None:
    """Check the iteration counts and apply --quick's caps (in place).

    Raises:
        BenchError: a negative warm-up or fewer than one iteration.
    """
    if args.num_iter < 1 or args.warmup_iter < 0:
        raise BenchError("--num-iter must be >= 1 and --warmup-iter >= 0")
    if args.quick:
        args.num_iter = min(args.num_iter, 200)
        args.warmup_iter = min(args.warmup_iter, 20)
        args.max_row_bytes = min(args.max_row_bytes or (1 << 30), 1 << 30)
