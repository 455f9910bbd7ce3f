"""``nixl-bench``'s entry point: options, plan, runs, report, exit status.

Every impossible request (VRAM without a GPU, an unknown backend, FILE without a backend that
registers FILE segments, a buffer that does not fit in memory) is refused before any process
starts, with one line on stderr and exit status 2; a failed data check exits 1; a closed stdout
(``| head``) ends the run quietly with status 141.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from collections.abc import Sequence

from nixl_core.bench.options import build_parser, normalize
from nixl_core.bench.plan import check_file_target, check_segments, choose_backends, make_plan
from nixl_core.bench.report import build_meta, plot_available, render, table_rows, write_outputs
from nixl_core.bench.runner import BenchError
from nixl_core.bench.session import run_all

__all__ = ["main"]


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    normalize(args)
    devs = check_segments(args)
    backends = choose_backends(args)
    if args.plot and (why := plot_available()):
        raise BenchError(why)
    check_file_target(args)
    plan = make_plan(args)
    started = _dt.datetime.now(_dt.timezone.utc)
    results = run_all(args, plan, backends, devs)
    rows = table_rows(plan, results)
    meta = build_meta(args, argv, plan, backends, devs, results, rows, started)
    print(render(meta, rows, plan, args))
    write_outputs(args, meta, rows, plan)
    failures = meta["check"]["failures"] + meta["check"]["nixl_failures"]
    for f in failures:
        print(f"nixl-bench: data check failed: {f}", file=sys.stderr)
    return 1 if failures else 0


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
    except BrokenPipeError:  # the reader left early (nixl-bench ... | head): nothing to report
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose pipe closed
