"""``nixl-bench``: the transfer benchmark of nixl-py, side by side with the real NIXL.

Two local agents, initiator and target, in two processes (metadata exchanged over a pipe), move
a block-size sweep (or one request's KV cache of a model) with nixlbench's options and columns;
when the real NIXL (PyPI ``nixl``) is importable the identical workload runs through it in the same
invocation, and the table adds ``NIXL B/W (GB/Sec)`` and ``Ratio``.

Modules: :mod:`~nixl_core.bench.cli` (options, plan, report assembly), :mod:`~nixl_core.bench.workload`
(layouts, KV-cache model math, buffers), :mod:`~nixl_core.bench.engines` (nixl-py and NIXL behind one
interface, the timing loop), :mod:`~nixl_core.bench.worker` (the initiator and target processes),
:mod:`~nixl_core.bench.runner` (the coordinator's side), :mod:`~nixl_core.bench.report` (statistics,
table, JSON, plot, progress bar).
"""

from nixl_core.bench.cli import main

__all__ = ["main"]
