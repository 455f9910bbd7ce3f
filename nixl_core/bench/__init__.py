"""``nixl-bench``: the transfer benchmark of nixl-py, side by side with the real NIXL.

Two local agents, initiator and target, in two processes (metadata exchanged over a pipe), move
a block-size sweep (or one request's KV cache of a model) with nixlbench's options and columns;
when the real NIXL (PyPI ``nixl``) is importable the identical workload runs through it in the same
invocation, and the table adds ``NIXL B/W (GB/Sec)`` and ``Ratio``.

Modules: :mod:`~nixl_core.bench.cli` (the entry point), :mod:`~nixl_core.bench.options` (the
argument parser), :mod:`~nixl_core.bench.plan` (rows, buffers, backends and the refusals decided
before any process starts), :mod:`~nixl_core.bench.workload` (layouts, KV-cache model math,
buffers), :mod:`~nixl_core.bench.engines` (nixl-py and NIXL behind one interface, the timing loop),
:mod:`~nixl_core.bench.worker` (the initiator and target processes), :mod:`~nixl_core.bench.runner`
(the coordinator's side of one implementation's processes), :mod:`~nixl_core.bench.session` (each
implementation in turn, the progress bar), :mod:`~nixl_core.bench.machine` (facts about this
machine), :mod:`~nixl_core.bench.report` (statistics, header and tables, JSON, plot).
"""

from nixl_core.bench.cli import main

__all__ = ["main"]
