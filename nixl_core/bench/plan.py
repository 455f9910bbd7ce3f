"""What a run will do, decided and checked before any process starts.

:func:`make_plan` turns the options into rows (op, block, batch, layouts, iterations) and buffer
sizes; :func:`check_segments`, :func:`check_file_target` and :func:`choose_backends` refuse what
cannot run (VRAM without a GPU, FILE without a backend that registers it, a buffer that does not
fit in memory, a backend that cannot carry the segments), each with one line.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Mapping, Sequence

import attrs
import numpy as np

from nixl_core import BackendInfo, default_backend, list_backends
from nixl_core._plugins import INSTALL_HINTS
from nixl_core.bench.machine import gpu_status, mem_available
from nixl_core.bench.runner import BenchError
from nixl_core.bench.worker import RowPlan
from nixl_core.bench.workload import (
    KVLayout,
    SideLayout,
    block_slots,
    fmt_size,
    kv_layout,
    split_ids,
)
from nixl_core.errors import NotFoundError

__all__ = [
    "LARGE_BLOCK",
    "MIN_ITERS",
    "Backends",
    "Plan",
    "check_file_target",
    "check_segments",
    "choose_backends",
    "file_dir",
    "make_plan",
    "ops_of",
]

#: nixlbench's threshold above which iterations are divided by --large-blk-iter-ftr.
LARGE_BLOCK = 1 << 20
#: Fewest timed iterations a row gets when --max-row-bytes caps it.
MIN_ITERS = 10


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


def ops_of(args: argparse.Namespace) -> list[str]:
    """The ops of the run, in order (--op both: WRITE then READ)."""
    return ["WRITE", "READ"] if args.op == "BOTH" else [args.op]


def make_plan(args: argparse.Namespace) -> Plan:
    """Rows, layouts and buffer sizes of the run.

    Raises:
        BenchError: inconsistent sizes.
    """
    notes: list[str] = []
    ops = ops_of(args)
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
        if not _fits(2 * side_bytes):
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
    if not _fits(need):
        raise BenchError(
            f"the buffers need {fmt_size(need)} of host memory but only "
            f"{fmt_size(mem_available())} is available; lower "
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


def _fits(nbytes: int) -> bool:
    return nbytes <= 0.8 * mem_available()


def check_segments(args: argparse.Namespace) -> tuple[int, int]:
    """The GPU indices (initiator, target) of the segments: 0 for a side that is not VRAM.

    Raises:
        BenchError: a FILE initiator, malformed --devices, VRAM without a GPU or a GPU that is
            not there.
    """
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


def file_dir(args: argparse.Namespace) -> str:
    """The directory of a FILE target's file (--filepath, else the temp directory)."""
    return str(args.filepath or tempfile.gettempdir())


def check_file_target(args: argparse.Namespace) -> None:
    """Refuse a --filepath that is not a writable directory, or one without a FILE target.

    Raises:
        BenchError: the refusal.
    """
    if args.target_seg == "FILE":
        directory = file_dir(args)
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise BenchError(f"--filepath {directory}: not a writable directory")
    elif args.filepath:
        raise BenchError("--filepath is only used with --target-seg FILE")


@attrs.frozen
class Backends:
    """The backends of a run: nixl-py's, how it was chosen, and NIXL's.

    Attributes:
        ours: nixl-py's backend.
        chosen: "--backend" (asked for) or "default" (nixl-core's default for the segments).
        reason: why it was chosen: nixl-core's one line for a default, else "asked for with
            --backend".
        nixl: NIXL's backend (--nixl-backend, else UCX, or POSIX for a FILE target).
        unlike: "" when both run the same backend, else a line saying they do not and how to
            compare like with like.
    """

    ours: str
    chosen: str
    reason: str
    nixl: str
    unlike: str


def choose_backends(args: argparse.Namespace) -> Backends:
    """nixl-py's backend for the segments (--backend, else nixl-core's default) and NIXL's.

    Raises:
        BenchError: an unknown, unavailable or unable --backend; no installed backend can carry
            the segments.
    """
    infos = {b.name.upper(): b for b in list_backends()}
    mems = (args.initiator_seg, args.target_seg)
    remote = args.target_seg != "FILE"
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
        refusal = _why_not(infos[name], mems, remote)
        if refusal:
            raise BenchError(refusal)
        ours, chosen, reason = infos[name].name, "--backend", "asked for with --backend"
    else:
        try:
            ours, reason = default_backend(mems, remote=remote)
        except NotFoundError:
            if not remote:
                raise BenchError(
                    f"no installed backend supports FILE segments (installed: {installed}); "
                    f"install one, e.g. `{INSTALL_HINTS['POSIX']}`"
                ) from None
            raise BenchError(
                f"no installed backend moves {' -> '.join(mems)} between two processes "
                f"(installed: {installed}); e.g. `{INSTALL_HINTS['UCX']}`"
            ) from None
        chosen = "default"
    nixl = str(args.nixl_backend or ("UCX" if remote else "POSIX")).upper()
    unlike = "" if ours.upper() == nixl else _unlike(ours, nixl, infos, mems, remote)
    return Backends(ours, chosen, reason, nixl, unlike)


def _why_not(b: BackendInfo, mems: Sequence[str], remote: bool) -> str | None:
    """Why backend ``b`` cannot carry the segments ``mems`` (None: it can)."""
    if not b.available:
        return f"backend {b.name} is installed but not available here: {b.reason}"
    missing = sorted(m for m in set(mems) if m not in b.mem_types)
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


def _unlike(
    ours: str, nixl: str, infos: Mapping[str, BackendInfo], mems: Sequence[str], remote: bool
) -> str:
    """The header's line for nixl-py and NIXL running different backends, with the remedy."""
    head = f"nixl-py runs {ours}, NIXL runs {nixl}: not like with like; "
    if nixl in infos:
        refusal = _why_not(infos[nixl], mems, remote)
        return head + (refusal or f"--backend {nixl} compares like with like")
    hint = INSTALL_HINTS.get(nixl)
    if hint:
        return head + f"install nixl-py's {nixl} backend (`{hint}`) to compare like with like"
    return head + f"nixl-py has no {nixl} backend"
