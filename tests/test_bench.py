"""nixl-bench: KV layout math, layouts, statistics, the CLI end to end, clean errors.

The end-to-end tests run tiny sweeps (two spawned processes each); no test asserts a measured
figure, only shapes, definitions and that data arrived.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest

from nixl_core import __version__, default_backend, list_backends
from nixl_core.bench import main, plan, session
from nixl_core.bench.engines import RowTimes
from nixl_core.bench.machine import gpu_status
from nixl_core.bench.options import build_parser
from nixl_core.bench.plan import choose_backends
from nixl_core.bench.report import p99, stats_of
from nixl_core.bench.runner import ImplRun, Setup, run_impl
from nixl_core.bench.session import Progress
from nixl_core.bench.workload import (
    KV_MODELS,
    SideLayout,
    alloc_buffer,
    block_slots,
    descs_array,
    digest_slots,
    fill_pattern,
    kv_layout,
    parse_size,
    poison_slots,
)

#: The measured keys of a JSON row (numbers, never null for our side).
STAT_KEYS = {
    "gbps",
    "avg_lat_us",
    "avg_prep_us",
    "p99_prep_us",
    "avg_post_us",
    "p99_post_us",
    "avg_tx_us",
    "p99_tx_us",
}
#: The keys the issue fixes for every JSON row.
ROW_KEYS = STAT_KEYS | {
    "backend",
    "path",
    "op",
    "initiator_seg",
    "target_seg",
    "layout",
    "block_size",
    "batch_size",
    "nixl_gbps",
    "ratio",
}
NIXL_COLUMNS = (
    "Block Size (B)",
    "Batch Size",
    "B/W (GB/Sec)",
    "Avg Lat. (us)",
    "Avg Prep (us)",
    "P99 Prep (us)",
    "Avg Post (us)",
    "P99 Post (us)",
    "Avg Tx (us)",
    "P99 Tx (us)",
    "Path",
)
TINY = ["--num-iter", "4", "--warmup-iter", "1", "--batch-size", "4"]


def _file_backend() -> bool:
    return any(b.available and "FILE" in b.mem_types for b in list_backends())


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- KV math
@pytest.mark.parametrize(
    ("model", "per_token", "desc", "descs", "request_bytes"),
    [
        ("llama-3.1-8b", 131_072, 32_768, 16_384, 512 << 20),
        ("llama-3.1-70b", 327_680, 32_768, 40_960, 1_342_177_280),
        ("qwen3-32b", 262_144, 32_768, 32_768, 1 << 30),
        ("deepseek-r1", 70_272, 18_432, 15_616, 287_834_112),
    ],
)
def test_kv_layout_defaults(
    model: str, per_token: int, desc: int, descs: int, request_bytes: int
) -> None:
    """At isl 4096, page 16, tp 1, bf16 each model has the documented per-token and request sizes."""
    kv = kv_layout(model, 4096, 1, 16, "bf16")
    assert kv.bytes_per_token == per_token
    assert kv.desc_bytes == desc
    assert kv.descs == descs
    assert kv.request_bytes == request_bytes
    assert kv.blocks == 256


def test_kv_layout_gqa_matches_kvbench_io_size() -> None:
    """A GQA block is two descriptors (K and V) of half kvbench's io_size; TP splits the heads."""
    m = KV_MODELS["llama-3.1-70b"]
    for tp in (1, 2, 4, 8):
        kv = kv_layout(m.name, 1000, tp, 16, "fp8")
        io_size = m.bytes_per_token(1) // m.layers // tp * 16
        assert 2 * kv.desc_bytes == io_size
        assert kv.regions == 2 * m.layers
        assert kv.blocks == 63  # ceil(1000 / 16)
        assert kv.bytes_per_token * tp == m.bytes_per_token(1)


def test_kv_layout_tp_edge_cases() -> None:
    """TP beyond the KV heads replicates one head; MLA is not split; a TP that fits neither fails."""
    assert kv_layout("llama-3.1-8b", 16, 16, 16, "bf16").heads_per_rank == 1
    assert kv_layout("deepseek-r1", 16, 8, 16, "bf16").desc_bytes == 16 * 576 * 2
    assert kv_layout("deepseek-r1", 16, 8, 16, "bf16").regions == 61
    with pytest.raises(ValueError, match="--tp 3"):
        kv_layout("llama-3.1-8b", 16, 3, 16, "bf16")
    with pytest.raises(ValueError, match="unknown --kv-model"):
        kv_layout("gpt-2", 16, 1, 16, "bf16")


# --------------------------------------------------------------------------- layouts
def test_block_slots_contiguous_and_scattered() -> None:
    """Contiguous takes the first slots; scattered takes distinct random ones, the same per seed;
    every region of a KV layout uses the same block ids."""
    assert block_slots(4, 100, "contiguous", np.random.default_rng(0)).tolist() == [0, 1, 2, 3]
    a = block_slots(50, 1000, "scattered", np.random.default_rng([0, 3]))
    b = block_slots(50, 1000, "scattered", np.random.default_rng([0, 3]))
    assert np.array_equal(a, b)
    assert len(set(a.tolist())) == 50 and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(np.sort(a), np.arange(50))
    kv = block_slots(3, 10, "scattered", np.random.default_rng(1), regions=4)
    per_region = kv.reshape(4, 3) - np.arange(4)[:, None] * 10
    assert (per_region == per_region[0]).all()
    with pytest.raises(ValueError, match="do not fit"):
        block_slots(11, 10, "contiguous", np.random.default_rng(0))


def test_descs_array_addresses() -> None:
    """Descriptor i is base + slot_i * block, of one block, on the given device."""
    side = SideLayout(4096, 2, 8, np.array([9, 0, 3], np.int64))
    arr = descs_array(1 << 20, side, 5)
    assert arr.dtype == np.uint64 and arr.shape == (3, 3)
    assert arr[:, 0].tolist() == [(1 << 20) + s * 4096 for s in (9, 0, 3)]
    assert set(arr[:, 1].tolist()) == {4096} and set(arr[:, 2].tolist()) == {5}
    assert side.nbytes == 2 * 8 * 4096


def test_parse_size_units() -> None:
    """Sizes take binary units and reject garbage."""
    assert parse_size("4K") == 4096
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("1g") == 1 << 30
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("4 lots")


def test_check_helpers_detect_missing_and_misplaced_blocks() -> None:
    """The --check digests match only when the destination slots hold the source slots, in order."""
    block = 256
    src, dst = alloc_buffer("DRAM", 16 * block), alloc_buffer("DRAM", 16 * block)
    assert src.ctypes.data % 4096 == 0
    fill_pattern(src, 1)
    fill_pattern(dst, 2)
    s_slots, d_slots = np.array([3, 7, 1]), np.array([0, 5, 9])
    want = digest_slots(src, block, s_slots)
    before = digest_slots(dst, block, d_slots)
    assert before != want
    rows_s, rows_d = src.reshape(-1, block), dst.reshape(-1, block)
    rows_d[d_slots] = rows_s[s_slots]
    assert digest_slots(dst, block, d_slots) == want
    rows_d[[0, 5]] = rows_d[[5, 0]]  # two blocks swapped
    assert digest_slots(dst, block, d_slots) != want
    rows_d[d_slots] = rows_s[s_slots]
    poison_slots(dst, block, d_slots, 77)
    assert digest_slots(dst, block, d_slots) not in (want, before)


# --------------------------------------------------------------------------- statistics
def test_stats_follow_nixlbench_definitions() -> None:
    """B/W is decimal GB over the loop's total time; Avg Lat. is per block; P99 is nearest rank."""
    times = RowTimes(
        prep_us=[10.0],
        post_us=[1.0, 2.0, 3.0, 4.0],
        tx_us=[5.0, 5.0, 5.0, 100.0],
        total_s=0.002,
        path="loopback:cma",
        desc_count=4,
    )
    s = stats_of(times, block=1_000_000, batch=4)
    assert s.gbps == pytest.approx(16e6 / 1e9 / 0.002)
    assert s.avg_lat_us == pytest.approx(2000.0 / 16)
    assert s.avg_tx_us == pytest.approx(28.75)
    assert s.p99_tx_us == 100.0
    assert s.avg_prep_us == s.p99_prep_us == 10.0
    assert s.ms_per_iter == pytest.approx(0.5)
    assert p99(list(range(1, 201))) == 198


def test_progress_bar_only_on_a_terminal() -> None:
    """The bar stays silent on a non-terminal stream in auto mode, draws when forced, erases itself."""

    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty, self.text = tty, ""

        def isatty(self) -> bool:
            return self.tty

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    quiet = Stream(tty=False)
    p = Progress(3, "auto", quiet)  # type: ignore[arg-type]
    p.step("x")
    p.finish()
    assert quiet.text == ""
    loud = Stream(tty=True)
    p = Progress(2, "on", loud)  # type: ignore[arg-type]
    p.step("nixl-py WRITE 4 KiB x 4")
    assert "0/2" in loud.text and "WRITE 4 KiB" in loud.text
    p.step("nixl-py READ 4 KiB x 4")
    p.finish()
    assert "1/2" in loud.text and loud.text.endswith("\r")


# --------------------------------------------------------------------------- end to end
def test_sweep_table_json_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A tiny scattered sweep prints nixlbench's columns per op and writes the JSON schema and a PNG."""
    out_json = tmp_path / "r.json"
    args = [
        *TINY,
        "--start-block-size", "4K", "--max-block-size", "16K",
        "--layout", "scattered", "--against", "none", "--json", str(out_json),
    ]  # fmt: skip
    have_mpl = importlib.util.find_spec("matplotlib") is not None
    if have_mpl:
        args += ["--plot", str(tmp_path / "bw.png")]
    rc, out, err = _run(capsys, *args)
    assert rc == 0, err
    for col in NIXL_COLUMNS:
        assert col in out
    assert "NIXL B/W" not in out  # comparison off
    assert "WRITE: DRAM -> DRAM" in out and "READ: DRAM -> DRAM" in out
    data = json.loads(out_json.read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["tool"] == "nixl-bench" and meta["command"].startswith("nixl-bench ")
    for key in ("machine", "gpu", "versions", "date", "ours", "nixl", "workload"):
        assert key in meta
    assert meta["nixl"]["compared"] is False
    assert [(r["op"], r["block_size"]) for r in rows] == [
        (op, b) for op in ("WRITE", "READ") for b in (4096, 8192, 16384)
    ]
    for r in rows:
        assert set(r) >= ROW_KEYS
        assert r["batch_size"] == 4 and r["layout"] == "scattered"
        assert r["initiator_seg"] == r["target_seg"] == "DRAM"
        assert r["nixl_gbps"] is None and r["ratio"] is None
        assert r["path"] and isinstance(r["backend"], str)
        for k in STAT_KEYS:
            assert isinstance(r[k], float) and r[k] >= 0
        assert r["gbps"] > 0
    if have_mpl:
        assert (tmp_path / "bw.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prepared_kv_request_with_check(capsys: pytest.CaptureFixture[str]) -> None:
    """A small llama-3.1-8b request (2 blocks x 64 regions) made from prepared lists arrives intact."""
    rc, out, err = _run(
        capsys,
        "--kv-model", "llama-3.1-8b", "--isl", "32", "--prepared", "--check",
        "--num-iter", "2", "--warmup-iter", "1", "--against", "none",
    )  # fmt: skip
    assert rc == 0, err
    assert "128 descriptors of 32 KiB" in out
    assert "ms/req" in out
    assert "data check: 2 of 2 rows verified" in out


def test_recreate_contiguous_check(capsys: pytest.CaptureFixture[str]) -> None:
    """Requests rebuilt every iteration over a contiguous layout pass the data check."""
    rc, out, err = _run(
        capsys,
        *TINY, "--start-block-size", "64K", "--max-block-size", "64K",
        "--recreate-xfer", "--check", "--op", "READ", "--against", "none",
    )  # fmt: skip
    assert rc == 0, err
    assert "rebuilt every iteration" in out
    assert "data check: 1 of 1 rows verified" in out


def test_file_target(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """With a FILE backend the sweep writes and reads back a file (removed after) beside the
    dd-like sequential baseline; without one the refusal names the missing capability."""
    files = tmp_path / "files"
    files.mkdir()
    out_json = tmp_path / "r.json"
    rc, out, err = _run(
        capsys,
        *TINY, "--start-block-size", "4K", "--max-block-size", "8K", "--total-buffer-size", "1M",
        "--target-seg", "FILE", "--filepath", str(files), "--check", "--against", "none",
        "--json", str(out_json),
    )  # fmt: skip
    if _file_backend():
        assert rc == 0, err
        assert "data check: 4 of 4 rows verified" in out
        assert "dd B/W" in out and "vs dd" in out
        assert list(files.iterdir()) == []
        for r in json.loads(out_json.read_text())["rows"]:
            assert r["dd_gbps"] > 0
            assert r["vs_dd"] == pytest.approx(r["gbps"] / r["dd_gbps"], rel=0.01)
    else:
        assert rc == 2
        assert "no installed backend supports FILE segments" in err
        assert "Traceback" not in err


def test_nixl_absence_is_reported_not_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an importable NIXL the run succeeds, says so, and leaves the NIXL columns null."""
    monkeypatch.setitem(sys.modules, "nixl", None)  # find_spec("nixl") -> None
    out_json = tmp_path / "r.json"
    rc, out, err = _run(
        capsys,
        *TINY, "--start-block-size", "4K", "--max-block-size", "4K", "--op", "WRITE",
        "--json", str(out_json),
    )  # fmt: skip
    assert rc == 0, err
    assert "NIXL:    not installed" in out
    data = json.loads(out_json.read_text())
    assert data["meta"]["nixl"]["compared"] is False
    assert [(r["nixl_gbps"], r["ratio"]) for r in data["rows"]] == [(None, None)]


@pytest.mark.skipif(
    importlib.util.find_spec("nixl") is None, reason="the real NIXL is not installed"
)
def test_side_by_side_with_nixl(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """With NIXL installed the same rows run through it and the table adds its B/W and the ratio."""
    out_json = tmp_path / "r.json"
    rc, out, err = _run(
        capsys,
        *TINY, "--start-block-size", "4K", "--max-block-size", "8K", "--op", "WRITE", "--check",
        "--json", str(out_json),
    )  # fmt: skip
    data = json.loads(out_json.read_text())
    if not data["meta"]["nixl"]["compared"]:
        pytest.skip(f"NIXL could not run here: {data['meta']['nixl']['status']}")
    assert rc == 0, err
    assert "NIXL B/W (GB/Sec)" in out and "Ratio" in out
    for r in data["rows"]:
        assert isinstance(r["nixl_gbps"], float) and r["nixl_gbps"] > 0
        assert r["ratio"] == pytest.approx(r["gbps"] / r["nixl_gbps"], rel=0.01)
        assert set(r["nixl"]) >= STAT_KEYS
    assert data["meta"]["check"]["nixl_failures"] == []
    same = data["meta"]["ours"]["backend"] == data["meta"]["nixl"]["backend"]
    assert ("not like with like" in out) is not same


# --------------------------------------------------------------------------- backends
@pytest.mark.parametrize("target", ["DRAM", "FILE"])
def test_default_backend_is_the_cores(target: str) -> None:
    """Without --backend, nixl-py runs what nixl_core.default_backend picks for the segments."""
    if target == "FILE" and not _file_backend():
        pytest.skip("no installed backend registers FILE")
    got = choose_backends(build_parser().parse_args(["--target-seg", target]))
    assert got.ours == default_backend(("DRAM", target), remote=target != "FILE")[0]


@pytest.mark.parametrize("backend", [None, "LOOPBACK"])
def test_header_names_the_backend_and_why(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, backend: str | None
) -> None:
    """The header and the JSON meta say which backend nixl-py ran and why: nixl-core's reason
    for a default choice, --backend when it was asked for."""
    out_json = tmp_path / "r.json"
    rc, out, err = _run(
        capsys,
        *TINY, "--start-block-size", "4K", "--max-block-size", "4K", "--op", "WRITE",
        "--against", "none", "--json", str(out_json), *(["--backend", backend] if backend else []),
    )  # fmt: skip
    assert rc == 0, err
    if backend:
        name, chosen, reason, how = backend, "--backend", "asked for with --backend", "--backend"
    else:
        name, reason = default_backend(("DRAM",))
        chosen, how = "default", f"chosen by default: {reason}"
    line = f"nixl-py: nixl-core {__version__}, backend {name} ({how}), initiator and target in two"
    assert line + " processes" in out.splitlines()
    ours = json.loads(out_json.read_text())["meta"]["ours"]
    assert (ours["backend"], ours["chosen"], ours["reason"]) == (name, chosen, reason)
    assert "like with like" not in out  # no NIXL row, nothing to compare


def test_unlike_note_when_nixl_runs_another_backend(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With NIXL's row on UCX and nixl-py on LOOPBACK the header says plainly that the comparison
    is not like with like (and the JSON meta has the same line). nixl-py's processes stand in for
    NIXL's: the header is under test, not NIXL, so this needs no NIXL and stays short. (Same
    backends, no note: the side-by-side test and the next one.)"""

    def stand_in(setup: Setup, *rest: Any) -> ImplRun:
        return run_impl(attrs.evolve(setup, impl="ours") if setup.impl == "nixl" else setup, *rest)

    monkeypatch.setattr(session, "_nixl_status", lambda args: (True, ""))
    monkeypatch.setattr(session, "run_impl", stand_in)
    out_json = tmp_path / "r.json"
    rc, out, err = _run(
        capsys,
        *TINY, "--start-block-size", "4K", "--max-block-size", "4K", "--op", "WRITE",
        "--backend", "LOOPBACK", "--json", str(out_json),
    )  # fmt: skip
    assert rc == 0, err
    nixl = json.loads(out_json.read_text())["meta"]["nixl"]
    assert nixl["compared"] is True and nixl["backend"] == "UCX"
    assert nixl["unlike"].startswith("nixl-py runs LOOPBACK, NIXL runs UCX: not like with like")
    header = out.split("\n\n")[0].splitlines()
    assert [ln for ln in header if "like with like" in ln] == [f"note:    {nixl['unlike']}"]


@pytest.mark.parametrize(
    ("argv", "drop", "remedy"),
    [
        (["--nixl-backend", "loopback"], None, None),
        ([], None, "--backend UCX compares like with like"),
        ([], "UCX", "install nixl-py's UCX backend (`pip install ./plugins/nixl_ucx`) to compare"),
        (["--nixl-backend", "gds"], None, "nixl-py has no GDS backend"),
    ],
)
def test_unlike_note_says_how_to_compare_like_with_like(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], drop: str | None, remedy: str | None
) -> None:
    """The note names both backends and the remedy: the --backend to pass, the plugin to
    install, or that nixl-py has no such backend."""
    infos = list_backends()
    if "--backend UCX" in (remedy or "") and not any(
        b.name == "UCX" and b.available for b in infos
    ):
        pytest.skip("UCX is not available here")
    monkeypatch.setattr(plan, "list_backends", lambda: [b for b in infos if b.name != drop])
    got = choose_backends(build_parser().parse_args(["--backend", "LOOPBACK", *argv]))
    if remedy is None:
        assert got.unlike == ""
    else:
        assert got.unlike.startswith(f"nixl-py runs LOOPBACK, NIXL runs {got.nixl}: not like")
        assert remedy in got.unlike


# --------------------------------------------------------------------------- clean errors
@pytest.mark.skipif(gpu_status()[0] > 0, reason="a GPU is present")
def test_vram_without_gpu_is_one_clean_line(capsys: pytest.CaptureFixture[str]) -> None:
    """VRAM on a machine without a usable GPU: one line on stderr, exit status 2."""
    rc, out, err = _run(capsys, "--initiator-seg", "VRAM", "--against", "none")
    assert rc == 2
    assert err.startswith("nixl-bench: error: VRAM segments need a CUDA GPU")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "NOPE"], "unknown backend 'NOPE'"),
        (["--backend", "GDS"], "unknown backend 'GDS'"),
        (["--initiator-seg", "FILE"], "put the file on the target side"),
        (["--target-seg", "FILE", "--backend", "LOOPBACK"], "cannot move FILE"),
        (["--batch-size", "8:2"], "batch sizes must satisfy"),
        (["--start-block-size", "1M", "--max-block-size", "4K"], "block sizes must satisfy"),
        (["--kv-model", "llama-3.1-8b", "--tp", "3"], "--tp 3"),
        (["--filepath", "/tmp"], "only used with --target-seg FILE"),
        (["--total-buffer-size", "64T"], "host memory"),
    ],
)
def test_impossible_requests_are_one_clean_line(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Requests that cannot run are refused before any process starts, with a one-line reason."""
    rc, out, err = _run(capsys, *args, "--against", "none")
    assert rc == 2
    assert err.startswith("nixl-bench: error: ") and message in err, err
    assert "Traceback" not in err and out == ""


def test_plot_without_matplotlib_says_how_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--plot without matplotlib is refused up front with the extra to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, _, err = _run(capsys, "--plot", str(tmp_path / "x.png"), "--against", "none")
    assert rc == 2
    assert "pip install 'nixl-core[plot]'" in err


def test_bad_option_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse rejects a bad choice with status 2 and names the option."""
    rc, _, err = _run(capsys, "--op", "COPY")
    assert rc == 2 and "--op" in err


def test_closed_stdout_is_not_a_traceback() -> None:
    """A reader that left (``nixl-bench ... | head``) ends the run quietly, status 141."""
    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "nixl_core.bench", *TINY, "--start-block-size", "4K",
             "--max-block-size", "4K", "--op", "WRITE", "--against", "none"],
            stdout=w, stderr=subprocess.PIPE, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(w)
    assert res.returncode == 141, res.stderr
    assert res.stderr == ""


def test_console_command_is_installed() -> None:
    """``nixl-bench`` is a console script of the distribution and ``python -m`` runs it too."""
    eps = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert eps.get("nixl-bench") == "nixl_core.bench:main"
    res = subprocess.run(
        [sys.executable, "-m", "nixl_core.bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "--kv-model" in res.stdout and "--against" in res.stdout
