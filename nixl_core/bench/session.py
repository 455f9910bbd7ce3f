"""One invocation's runs: the plan through nixl-py, the dd baseline, then the real NIXL.

:func:`run_all` runs each implementation in turn with :func:`~nixl_core.bench.runner.run_impl`
(its own initiator and target processes), makes the FILE target's file for each and removes it
after, and draws the progress bar (:class:`Progress`). nixl-py's failure is the run's failure;
NIXL's is reported as a warning and its columns stay empty.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import attrs
import numpy as np

from nixl_core.bench.engines import NIXL_INSTALL
from nixl_core.bench.plan import Backends, Plan, file_dir
from nixl_core.bench.runner import BenchError, ImplRun, Setup, run_impl
from nixl_core.bench.worker import TARGET_SEED, RowPlan
from nixl_core.bench.workload import fill_pattern, fmt_size

__all__ = ["Progress", "Results", "run_all"]

_IMPL_NAMES = {"ours": "nixl-py", "nixl": "NIXL", "dd": "dd"}


@attrs.frozen
class Results:
    """What the implementations produced.

    Attributes:
        ours: nixl-py's run.
        dd: the sequential baseline's run (FILE target with DRAM), else None.
        nixl: NIXL's run, None when it was not compared or failed.
        nixl_status: "ok", or why NIXL's columns are empty.
    """

    ours: ImplRun
    dd: ImplRun | None
    nixl: ImplRun | None
    nixl_status: str


def _nixl_status(args: argparse.Namespace) -> tuple[bool, str]:
    if args.against == "none":
        return False, "comparison off (--against none)"
    if importlib.util.find_spec("nixl") is None:
        return False, f"not installed ({NIXL_INSTALL})"
    return True, ""


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
        path = os.path.join(file_dir(args), f"nixl-bench-{os.getpid()}-{impl}.bin")
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


def run_all(
    args: argparse.Namespace, plan: Plan, backends: Backends, devs: tuple[int, int]
) -> Results:
    """Run the plan through nixl-py, the dd baseline (FILE target with DRAM) and NIXL.

    Raises:
        BenchError: nixl-py or the dd baseline failed (NIXL's failure is a warning on stderr).
    """
    compare, nixl_why = _nixl_status(args)
    engine = {
        "backend": backends.ours,
        "nixl_backend": backends.nixl,
        "nixl_progress_thread": args.nixl_progress_thread == "on",
    }
    with_dd = args.dd == "auto" and args.target_seg == "FILE" and args.initiator_seg == "DRAM"
    progress = Progress(len(plan.rows) * (1 + compare + with_dd), args.progress)
    dd: ImplRun | None = None
    theirs: ImplRun | None = None
    try:
        ours = _run_one("ours", args, plan, engine, devs, progress)
        if with_dd:
            dd = _run_one("dd", args, plan, engine, devs, progress)
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
    return Results(ours, dd, theirs, "ok" if theirs is not None else nixl_why)


class Progress:
    """A one-line progress bar on stderr: only on a terminal, and only once a sweep has run for
    ``delay`` seconds (short runs and captured output stay quiet)."""

    def __init__(self, total: int, mode: str = "auto", stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = mode == "on" or (mode == "auto" and tty)
        self.delay = 0.0 if mode == "on" else 2.0
        self.t0 = time.monotonic()
        self.shown = False

    def step(self, label: str) -> None:
        """Called as each row starts."""
        self._draw(label)
        self.done += 1

    def _draw(self, label: str) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.t0
        if elapsed < self.delay:
            return
        width = 28
        filled = int(width * self.done / self.total)
        eta = ""
        if self.done:
            eta = f" ETA {elapsed / self.done * (self.total - self.done):4.0f}s"
        line = (
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{elapsed:4.0f}s{eta}  {label}"
        )
        self.stream.write(line[:120].ljust(120))
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        """Erase the bar."""
        if self.shown:
            self.stream.write("\r" + " " * 121 + "\r")
            self.stream.flush()
            self.shown = False
