"""The report: nixlbench's statistics, the header and tables, the JSON file, the plot.

Definitions follow nixlbench (../shared/reference/nixl_api.md §7.1): bytes = block x batch x
iterations; ``B/W (GB/Sec)`` = bytes / 1e9 / total seconds of the timed loop (decimal GB);
``Avg Lat. (us)`` = total µs / (iterations x batch), i.e. per block; ``Prep`` = building the
request; ``Post`` = the post call; ``Tx`` = post's return to completion observed; P99 over the
samples (nearest rank). ``Ratio`` = ours / NIXL bandwidth (> 1: nixl-py is faster). FILE rows
with a DRAM initiator add ``dd B/W`` (the same bytes moved by sequential pread/pwrite calls of one
block each) and ``vs dd`` = ours / dd.

The header names the machine, both implementations (nixl-py's backend and how it was chosen, NIXL's
version and backend, and a note when the two run different backends) and the workload; the JSON
``meta`` holds the same facts.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from nixl_core import __version__
from nixl_core.bench.engines import RowTimes, nixl_version
from nixl_core.bench.machine import cpu_model, fs_type, gpu_names, mem_total, plugin_versions
from nixl_core.bench.plan import Backends, Plan, file_dir, ops_of
from nixl_core.bench.session import Results
from nixl_core.bench.workload import fmt_size

__all__ = [
    "COLUMNS",
    "Row",
    "Stats",
    "build_meta",
    "json_rows",
    "plot_available",
    "render",
    "render_table",
    "stats_of",
    "table_rows",
    "write_json",
    "write_outputs",
    "write_plot",
]


@attrs.frozen
class Stats:
    """nixlbench's metrics of one row of one implementation."""

    gbps: float
    avg_lat_us: float
    avg_prep_us: float
    p99_prep_us: float
    avg_post_us: float
    p99_post_us: float
    avg_tx_us: float
    p99_tx_us: float
    ms_per_iter: float
    iters: int
    path: str
    desc_count: int | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (six significant digits)."""
        d = attrs.asdict(self)
        return {k: (_round(v) if isinstance(v, float) else v) for k, v in d.items()}


def p99(values: Sequence[float]) -> float:
    """Nearest-rank 99th percentile (the value itself for fewer than 100 samples' tail)."""
    if not values:
        return 0.0
    s = sorted(values)
    return float(s[max(0, math.ceil(0.99 * len(s)) - 1)])


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def stats_of(t: RowTimes, block: int, batch: int) -> Stats:
    """nixlbench's metrics from raw timings."""
    iters = len(t.tx_us)
    nbytes = block * batch * iters
    total_us = t.total_s * 1e6
    return Stats(
        gbps=nbytes / 1e9 / t.total_s if t.total_s > 0 else 0.0,
        avg_lat_us=total_us / (iters * batch) if iters else 0.0,
        avg_prep_us=_mean(t.prep_us),
        p99_prep_us=p99(t.prep_us),
        avg_post_us=_mean(t.post_us),
        p99_post_us=p99(t.post_us),
        avg_tx_us=_mean(t.tx_us),
        p99_tx_us=p99(t.tx_us),
        ms_per_iter=total_us / 1e3 / iters if iters else 0.0,
        iters=iters,
        path=t.path,
        desc_count=t.desc_count,
    )


@attrs.define
class Row:
    """One line of the report: a workload point and both implementations' stats."""

    op: str
    block: int
    batch: int
    ours: Stats | None
    nixl: Stats | None
    dd: Stats | None = None  # the sequential baseline of a FILE row

    @property
    def ratio(self) -> float | None:
        """ours / NIXL bandwidth."""
        if self.ours is None or self.nixl is None or self.nixl.gbps <= 0:
            return None
        return self.ours.gbps / self.nixl.gbps

    @property
    def vs_dd(self) -> float | None:
        """ours / dd-like sequential bandwidth."""
        if self.ours is None or self.dd is None or self.dd.gbps <= 0:
            return None
        return self.ours.gbps / self.dd.gbps


#: (header, width) of the table's columns; nixlbench's names first.
COLUMNS: list[tuple[str, int]] = [
    ("Block Size (B)", 14),
    ("Batch Size", 10),
    ("B/W (GB/Sec)", 12),
    ("Avg Lat. (us)", 13),
    ("Avg Prep (us)", 13),
    ("P99 Prep (us)", 13),
    ("Avg Post (us)", 13),
    ("P99 Post (us)", 13),
    ("Avg Tx (us)", 11),
    ("P99 Tx (us)", 11),
    ("Path", 14),
    ("NIXL B/W (GB/Sec)", 17),
    ("Ratio", 6),
]
KV_COLUMNS: list[tuple[str, int]] = [("ms/req", 9), ("NIXL ms/req", 11)]
DD_COLUMNS: list[tuple[str, int]] = [("dd B/W", 8), ("vs dd", 6)]


def _num(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if v >= 1e5:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def render_table(rows: Sequence[Row], kv: bool, compared: bool) -> str:
    """The table of one op (rows in sweep order)."""
    cols = list(COLUMNS) + (KV_COLUMNS if kv else [])
    if any(r.dd is not None for r in rows):
        cols += DD_COLUMNS
    if not compared:
        cols = [c for c in cols if c[0] not in ("NIXL B/W (GB/Sec)", "Ratio", "NIXL ms/req")]
    head = "  ".join(f"{h:>{w}}" if h != "Path" else f"{h:<{w}}" for h, w in cols).rstrip()
    lines = [head, "-" * len(head)]
    for r in rows:
        o, n = r.ours, r.nixl
        vals: dict[str, str] = {
            "Block Size (B)": str(r.block),
            "Batch Size": str(r.batch),
            "B/W (GB/Sec)": _num(o.gbps if o else None, 3),
            "Avg Lat. (us)": _num(o.avg_lat_us if o else None),
            "Avg Prep (us)": _num(o.avg_prep_us if o else None, 1),
            "P99 Prep (us)": _num(o.p99_prep_us if o else None, 1),
            "Avg Post (us)": _num(o.avg_post_us if o else None, 1),
            "P99 Post (us)": _num(o.p99_post_us if o else None, 1),
            "Avg Tx (us)": _num(o.avg_tx_us if o else None, 1),
            "P99 Tx (us)": _num(o.p99_tx_us if o else None, 1),
            "Path": o.path if o else "-",
            "NIXL B/W (GB/Sec)": _num(n.gbps if n else None, 3),
            "Ratio": _num(r.ratio, 2),
            "ms/req": _num(o.ms_per_iter if o else None, 2),
            "NIXL ms/req": _num(n.ms_per_iter if n else None, 2),
            "dd B/W": _num(r.dd.gbps if r.dd else None, 3),
            "vs dd": _num(r.vs_dd, 2),
        }
        lines.append(
            "  ".join(
                f"{vals[h]:>{w}}" if h != "Path" else f"{vals[h]:<{w}}" for h, w in cols
            ).rstrip()
        )
    return "\n".join(lines)


def json_rows(rows: Sequence[Row], common: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows in the issue's schema (plus per-implementation details)."""
    out = []
    for r in rows:
        o, n = r.ours, r.nixl
        d: dict[str, Any] = dict(common)
        d.update(
            {
                "path": o.path if o else None,
                "op": r.op,
                "block_size": r.block,
                "batch_size": r.batch,
                "gbps": _round(o.gbps if o else None),
                "avg_lat_us": _round(o.avg_lat_us if o else None),
                "avg_prep_us": _round(o.avg_prep_us if o else None),
                "p99_prep_us": _round(o.p99_prep_us if o else None),
                "avg_post_us": _round(o.avg_post_us if o else None),
                "p99_post_us": _round(o.p99_post_us if o else None),
                "avg_tx_us": _round(o.avg_tx_us if o else None),
                "p99_tx_us": _round(o.p99_tx_us if o else None),
                "nixl_gbps": _round(n.gbps if n else None),
                "ratio": _round(r.ratio),
                "iters": o.iters if o else None,
                "ms_per_iter": _round(o.ms_per_iter if o else None),
                "desc_count": o.desc_count if o else None,
                "nixl": n.as_dict() if n else None,
                "dd_gbps": _round(r.dd.gbps if r.dd else None),
                "vs_dd": _round(r.vs_dd),
            }
        )
        out.append(d)
    return out


def _round(v: float | None) -> float | None:
    # Significant digits, not decimals: a slow row's 0.0123 GB/s keeps its precision (ratios
    # recomputed from the JSON then agree with the table's).
    return None if v is None else float(f"{v:.6g}")


def write_json(path: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write ``{"meta": ..., "rows": [...]}``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
        f.write("\n")


def plot_available() -> str | None:
    """None when matplotlib can be imported, else the install hint."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'nixl-core[plot]'"
    return None


def write_plot(path: str, rows: Sequence[Row], title: str, kv: bool) -> None:
    """Bandwidth vs block size (log-2 x axis), ours solid and NIXL dashed, one line per op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    ops = list(dict.fromkeys(r.op for r in rows))
    colors = {"WRITE": "tab:blue", "READ": "tab:orange"}
    for op in ops:
        mine = [r for r in rows if r.op == op]
        color = colors.get(op, "tab:gray")
        for impl, style in (("nixl-py", "-"), ("NIXL", "--")):
            pts = [
                (r.block, s.gbps)
                for r in mine
                if (s := (r.ours if impl == "nixl-py" else r.nixl)) is not None
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, marker="o", color=color, label=f"{impl} {op}")
    ax.set_xscale("log", base=2)
    blocks = sorted({r.block for r in rows})
    ax.set_xticks(blocks)
    ax.set_xticklabels([fmt_size(b).replace(" ", "") for b in blocks], rotation=45)
    ax.set_xlabel("descriptor size (one KV block of one region)" if kv else "block size")
    ax.set_ylabel("B/W (GB/s, decimal)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_meta(
    args: argparse.Namespace,
    argv: Sequence[str],
    plan: Plan,
    backends: Backends,
    devs: tuple[int, int],
    results: Results,
    rows: Sequence[Row],
    started: _dt.datetime,
) -> dict[str, Any]:
    """The JSON ``meta``: the tool, the machine, versions, both implementations, the workload."""
    ver = nixl_version()
    nixl_meta: dict[str, Any] = {
        "compared": results.nixl is not None,
        "status": results.nixl_status,
        "version": ver,
        "backend": backends.nixl,
        "unlike": backends.unlike or None,
        "progress_thread": args.nixl_progress_thread == "on",
    }
    gpus = gpu_names()
    kv = plan.kv
    workload: dict[str, Any] = {
        "initiator_seg": args.initiator_seg,
        "target_seg": args.target_seg,
        "layout": plan.layout,
        "ops": ops_of(args),
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
        directory = file_dir(args)
        workload["file"] = {
            "directory": directory,
            "fs_type": fs_type(directory),
            "direct": bool(args.storage_enable_direct),
        }
    meta: dict[str, Any] = {
        "tool": "nixl-bench",
        "version": __version__,
        "date": started.isoformat(timespec="seconds"),
        "command": "nixl-bench " + " ".join(argv),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "memory_bytes": mem_total(),
            "platform": platform.platform(),
        },
        "gpu": gpus or None,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "nixl-core": __version__,
            "nixl": ver,
            **plugin_versions(),
        },
        "ours": {
            "backend": backends.ours,
            "chosen": backends.chosen,
            "reason": backends.reason,
            "path": rows[0].ours.path if rows and rows[0].ours else "",
        },
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
            "failures": results.ours.check_failures,
            "nixl_failures": results.nixl.check_failures if results.nixl else [],
        },
    }
    return meta


def table_rows(plan: Plan, results: Results) -> list[Row]:
    """The report's rows: each planned row with each implementation's stats (None where absent)."""
    ours, theirs, dd = results.ours, results.nixl, results.dd
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


def render(meta: dict[str, Any], rows: Sequence[Row], plan: Plan, args: argparse.Namespace) -> str:
    """The report: the header (machine, both implementations, workload, notes), one table per op."""
    m, w, nx, ours = meta["machine"], meta["workload"], meta["nixl"], meta["ours"]
    how = "--backend" if ours["chosen"] == "--backend" else f"chosen by default: {ours['reason']}"
    gpu = ", ".join(meta["gpu"]) if meta["gpu"] else "no GPU"
    lines = [
        f"nixl-bench {meta['version']} · {meta['date']} · {m['cpus']} CPUs ({m['cpu']}), "
        f"{fmt_size(m['memory_bytes'])} RAM, {gpu} · Python {meta['versions']['python']}, "
        f"numpy {meta['versions']['numpy']}",
        f"nixl-py: nixl-core {meta['version']}, backend {ours['backend']} ({how})"
        + (", initiator and target in two processes" if args.target_seg != "FILE" else ""),
    ]
    if nx["compared"]:
        pt = "on (nixl_agent_config default)" if nx["progress_thread"] else "off"
        lines.append(
            f"NIXL:    {nx['version']}, backend {nx['backend']}, progress thread {pt}"
            + (", two processes" if args.target_seg != "FILE" else "")
        )
        if nx["unlike"]:
            lines.append(f"note:    {nx['unlike']}")
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
    for op in ops_of(args):
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


def write_outputs(
    args: argparse.Namespace, meta: dict[str, Any], rows: Sequence[Row], plan: Plan
) -> None:
    """Write the --json file and the --plot image, where asked for."""
    if args.json:
        common = {
            "backend": meta["ours"]["backend"],
            "initiator_seg": args.initiator_seg,
            "target_seg": args.target_seg,
            "layout": plan.layout,
        }
        write_json(args.json, meta, json_rows(rows, common))
    if args.plot:
        nx, kv = meta["nixl"], plan.kv
        title = (
            f"nixl-py ({meta['ours']['backend']}) vs NIXL {nx['version'] or ''} ({nx['backend']}): "
            f"{args.initiator_seg} -> {args.target_seg}, {plan.layout}"
        )
        if kv is not None:
            title += f", {kv.model.name} isl {kv.isl}"
        write_plot(args.plot, rows, title, kv is not None)
