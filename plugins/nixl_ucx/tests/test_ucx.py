"""UCX-specific behaviour: discovery, params, probe, transports reported, multi-worker batches,
the polled mode, and the errors of bad connection info or mismatched error modes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from nixl_ucx import _native
from nixl_ucx.params import PARAMS, UcxConfig

from nixl_core._plugins import list_backends
from nixl_core.agent import Agent, AgentConfig
from nixl_core.backend import XferStatus
from nixl_core.descriptors import DescList
from nixl_core.errors import (
    BackendUnavailableError,
    InvalidParamError,
    MetadataError,
    NotSupportedError,
    PluginError,
)
from nixl_core.params import resolve_params


def _agent(name: str, **params: object) -> Agent:
    return Agent(name, AgentConfig(backends=("UCX",), backend_params={"UCX": params}))


def test_discovered_through_entry_point(nixl_fresh_plugins: object) -> None:
    """The installed entry point registers UCX, available here, with its mem types and params."""
    infos = {b.name: b for b in list_backends()}
    ucx = infos["UCX"]
    assert ucx.plugin == "ucx"
    assert ucx.available, ucx.reason
    assert ucx.mem_types == ("DRAM", "VRAM")
    assert ucx.capabilities == {"local": True, "remote": True, "notif": True}
    assert {p.name: p.default for p in ucx.params} == {p.name: p.display for p in PARAMS}


def test_default_backend_is_ucx(nixl_fresh_plugins: object) -> None:
    """An agent configured with no backends picks UCX when the plugin is installed."""
    with Agent("nixl-ucx-default") as agent:
        assert agent.backends == ("UCX",)


def test_import_loads_nothing_native() -> None:
    """Importing the plugin and its backend module loads neither libucp nor the extension."""
    code = (
        "import sys, nixl_ucx, nixl_ucx._plugin, nixl_ucx.backend\n"
        "assert 'nixl_ucx._ucx_ext' not in sys.modules, 'extension imported'\n"
        "assert 'libucx' not in sys.modules, 'libucx imported'\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libucp' not in maps, 'libucp mapped'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cpu_host_prints_no_warnings() -> None:
    """Creating agents, transferring and closing prints nothing on stdout or stderr."""
    code = (
        "import numpy as np\n"
        "from nixl_core.agent import Agent, AgentConfig\n"
        "from nixl_core.descriptors import DescList\n"
        "a = Agent('w1', AgentConfig(backends=('UCX',)))\n"
        "b = Agent('w2', AgentConfig(backends=('UCX',)))\n"
        "s = np.ones(1 << 16, np.uint8); d = np.zeros(1 << 16, np.uint8)\n"
        "a.register(s); b.register(d); a.add_remote(b.metadata()); b.add_remote(a.metadata())\n"
        "r = a.create('WRITE', DescList.from_objects(s), DescList.from_objects(d), 'w2')\n"
        "r.post(); r.wait(10); assert d.all(); r.release(); a.close(); b.close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout == ""
    assert out.stderr == ""


@pytest.mark.parametrize(
    ("missing", "fix"),
    [("libucx", "pip install libucx-cu13"), ("nixl_ucx._ucx_ext", "pip install --force-reinstall")],
)
def test_probe_reports_what_is_missing_with_fix(missing: str, fix: str) -> None:
    """Without the libucx wheel or the built extension, probe() says so and names the pip
    command (a fresh process, where neither can be found)."""
    code = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        f"importlib.util.find_spec = lambda n, *a: None if n == {missing!r} else real(n, *a)\n"
        "from nixl_ucx.backend import UcxBackend\n"
        "a = UcxBackend.probe()\n"
        "assert not a.available\n"
        "print(a.reason)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert fix in out.stdout


def _without_ucx_defaults() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("UCX_LOG_FILE", "UCX_MEM_EVENTS")}


def test_probe_is_pure() -> None:
    """probe() reports UCX available yet changes nothing: the environment is as it was and
    neither the extension, nor libucx, nor libucs/libucp were loaded (a fresh process)."""
    code = (
        "import os, sys\n"
        "before = dict(os.environ)\n"
        "from nixl_ucx.backend import UcxBackend\n"
        "a = UcxBackend.probe()\n"
        "assert a.available, a.reason\n"
        "assert dict(os.environ) == before, 'probe changed the environment'\n"
        "assert 'nixl_ucx._ucx_ext' not in sys.modules, 'extension imported'\n"
        "assert 'libucx' not in sys.modules, 'libucx imported'\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libucs' not in maps and 'libucp' not in maps, 'UCX libraries mapped'\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=60, env=_without_ucx_defaults()
    )


_CREATE_AGENT = (
    "import logging, os, sys\n"
    "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(name)s: %(message)s')\n"
    "before = dict(os.environ)\n"
    "from nixl_core.agent import Agent, AgentConfig\n"
    "Agent('nixl-ucx-env', AgentConfig(backends=('UCX',))).close()\n"
    "assert dict(os.environ) == before, 'the environment was left changed'\n"
)


def test_ucx_defaults_logged_and_not_left_in_environment() -> None:
    """Creating a backend applies UCX_LOG_FILE=stderr (and, without an NVIDIA driver,
    UCX_MEM_EVENTS=no) for the load only: each is logged at INFO with how to override it, UCX
    then logs to stderr, and the process environment is unchanged afterwards."""
    env = {**_without_ucx_defaults(), "UCX_LOG_LEVEL": "info"}
    out = subprocess.run(
        [sys.executable, "-c", _CREATE_AGENT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    logged = [ln for ln in out.stdout.splitlines() if ln.startswith("nixl_ucx._native")]
    assert any("UCX_LOG_FILE=stderr" in ln and "set UCX_LOG_FILE" in ln for ln in logged), logged
    if not _native.cuda_driver_present():
        assert any("UCX_MEM_EVENTS=no" in ln and "set UCX_MEM_EVENTS" in ln for ln in logged)
    assert "UCX  INFO" in out.stderr
    assert "UCX  INFO" not in out.stdout


def test_user_log_file_is_never_overwritten(tmp_path: Path) -> None:
    """A UCX_LOG_FILE the user set stays as set, is not logged as a default, and is where UCX
    writes its log."""
    log = tmp_path / "ucx.log"
    env = {**_without_ucx_defaults(), "UCX_LOG_FILE": str(log), "UCX_LOG_LEVEL": "info"}
    code = _CREATE_AGENT + f"assert os.environ['UCX_LOG_FILE'] == {str(log)!r}\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    assert "UCX_LOG_FILE" not in out.stdout
    assert "UCX  INFO" in log.read_text()
    assert "UCX  INFO" not in out.stderr + out.stdout


@pytest.mark.parametrize(
    ("params", "field", "value"),
    [
        ({}, "workers", 1),
        ({"num_workers": "3"}, "workers", 3),
        ({"num_threads": 4}, "workers", 4),
        ({"progress_thread": "no"}, "threads", False),
        ({"progress_thread": "no", "num_threads": "2"}, "threads", True),
        ({"ucx_devices": "eth0:1"}, "device_list", "eth0:1"),
        (
            {"engine_config": "UCX_TLS=tcp, MAX_RMA_RAILS=2"},
            "engine_config",
            (("TLS", "tcp"), ("MAX_RMA_RAILS", "2")),
        ),
        ({"error_handling_mode": "NONE"}, "error_handling_mode", "none"),
    ],
)
def test_params_parse(params: dict[str, object], field: str, value: object) -> None:
    """NIXL's param names and spellings parse to the documented effective settings."""
    cfg = UcxConfig.of(resolve_params("UCX", PARAMS, params, env={}))
    assert getattr(cfg, field) == value


def test_params_env_fallback_and_explicit_win() -> None:
    """NIXL_UCX_<PARAM> fills a parameter not given; an explicit value wins, even one equal
    to the default (num_workers=1 against NIXL_UCX_NUM_WORKERS=4)."""
    env = {"NIXL_UCX_NUM_WORKERS": "4", "NIXL_UCX_TRANSPORTS": "tcp"}
    p = UcxConfig.of(resolve_params("UCX", PARAMS, {"num_workers": 1}, env=env))
    assert (p.num_workers, p.transports) == (1, "tcp")


@pytest.mark.parametrize(
    "params",
    [
        {"num_workers": "0"},
        {"num_workers": "two"},
        {"progress_thread": "maybe"},
        {"ucx_error_handling_mode": "strict"},
        {"engine_config": "NOVALUE"},
        {"no_such_param": "1"},
    ],
)
def test_bad_params_raise(params: dict[str, object]) -> None:
    """A malformed or unknown parameter raises InvalidParamError naming it."""
    with pytest.raises(InvalidParamError, match=next(iter(params))):
        resolve_params("UCX", PARAMS, params, env={})


def test_bad_ucx_option_raises() -> None:
    """An unknown UCX option in engine_config fails agent creation with the option named."""
    with pytest.raises(InvalidParamError, match="NO_SUCH_OPTION"):
        _agent("nixl-ucx-badopt", engine_config="NO_SUCH_OPTION=1")


def test_unusable_transport_raises() -> None:
    """A transport list UCX cannot satisfy fails creation with UCX's reason, not a crash."""
    with pytest.raises(BackendUnavailableError, match="ucp_init"):
        _agent("nixl-ucx-badtls", transports="rc_mlx5", device_list="mlx5_0:1")


def test_vram_without_cuda_is_refused(nixl_cuda_device_count: int) -> None:
    """On a host without CUDA, registering VRAM raises NotSupportedError with the reason."""
    if nixl_cuda_device_count:
        pytest.skip("a CUDA device is visible: VRAM registration is possible here")
    buf = np.zeros(4096, np.uint8)
    with _agent("nixl-ucx-novram") as a, pytest.raises(NotSupportedError, match="CUDA"):
        a.register(DescList.from_objects(buf).array, "VRAM")


def test_error_mode_mismatch_is_explained() -> None:
    """Agents with different error handling modes refuse each other, naming the parameter."""
    with (
        _agent("nixl-ucx-peer") as a,
        _agent("nixl-ucx-none", ucx_error_handling_mode="none") as b,
        pytest.raises(PluginError, match="ucx_error_handling_mode"),
    ):
        a.add_remote(b.metadata())


def test_malformed_connection_info() -> None:
    """Corrupt UCX connection info raises MetadataError from the backend, loads nothing."""
    with _agent("nixl-ucx-conn") as a:
        ucx = a.backend("UCX")
        good = ucx.connection_info()
        for bad in (b"", b"XXXX" + good[4:], good[:-3], good + b"\0"):
            with pytest.raises(MetadataError):
                ucx.load_remote_conn("ghost", bad)


@pytest.mark.parametrize(
    "params",
    [
        {"num_workers": "2", "split_batch_size": "256"},
        {"num_threads": "2", "split_batch_size": "256"},
        {"progress_thread": "false", "num_workers": "2"},
    ],
    ids=["2workers-split", "num_threads", "polled-2workers"],
)
@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_batches_across_workers(params: dict[str, str], op: str) -> None:
    """Large scattered batches, split across workers or not, move every block to its place,
    with the notification after the data, and report the transport (cma on one host).

    ``params`` are the initiator's; the target keeps the defaults (its progress thread answers
    wire-up, which a passive target in this very process would otherwise never do).
    """
    n, blk = 4096, 1024
    perm = np.random.default_rng(9).permutation(n)
    src = np.random.default_rng(1).integers(0, 256, n * blk, dtype=np.uint8)
    with _agent("nixl-ucx-w1", **params) as a, _agent("nixl-ucx-w2") as b:
        theirs = np.zeros(n * blk, np.uint8) if op == "WRITE" else src.copy()
        mine = src.copy() if op == "WRITE" else np.zeros(n * blk, np.uint8)
        a.register(mine)
        b.register(theirs)
        a.add_remote(b.metadata())
        b.add_remote(a.metadata())

        def blocks(buf: np.ndarray, order: np.ndarray) -> DescList:
            rows = np.empty((n, 3), np.uint64)
            rows[:, 0] = np.uint64(buf.ctypes.data) + order.astype(np.uint64) * np.uint64(blk)
            rows[:, 1] = blk
            rows[:, 2] = 0
            return DescList.from_array(rows, "DRAM")

        for rep in range(3):  # reposts reuse the prepared request
            mine[:] = 0 if op == "READ" else src
            req = a.create(
                op,
                blocks(mine, np.arange(n)),
                blocks(theirs, perm),
                b.name,
                notif=b"n%d" % rep,
                merge=False,
            )
            req.post()
            assert req.wait(20) is XferStatus.DONE
            got: list[bytes] = []
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                got += b.get_notifs().get(a.name, [])
                time.sleep(0.0005)
            assert got == [b"n%d" % rep]
            if op == "WRITE":
                want = np.empty((n, blk), np.uint8)
                want[perm] = src.reshape(n, blk)
                np.testing.assert_array_equal(theirs.reshape(n, blk), want)
            else:
                np.testing.assert_array_equal(mine.reshape(n, blk), src.reshape(n, blk)[perm])
            assert req.path == "ucx:cma"
            assert req.telemetry.desc_count == n
            req.release()
        assert a.backend("UCX").transport(b.name) == "cma"  # type: ignore[attr-defined]


def test_release_in_flight_does_not_block() -> None:
    """Releasing a request still in flight returns at once; the agent closes cleanly after."""
    n, blk = 16384, 4096
    with _agent("nixl-ucx-r1") as a, _agent("nixl-ucx-r2") as b:
        src = np.ones(n * blk, np.uint8)
        dst = np.zeros(n * blk, np.uint8)
        a.register(src)
        b.register(dst)
        a.add_remote(b.metadata())
        rows = np.empty((n, 3), np.uint64)
        rows[:, 0] = np.uint64(dst.ctypes.data) + np.arange(n, dtype=np.uint64) * np.uint64(blk)
        rows[:, 1], rows[:, 2] = blk, 0
        lrows = rows.copy()
        lrows[:, 0] = np.uint64(src.ctypes.data) + np.arange(n, dtype=np.uint64) * np.uint64(blk)
        req = a.create(
            "WRITE",
            DescList.from_array(lrows, "DRAM"),
            DescList.from_array(rows, "DRAM"),
            b.name,
            merge=False,
            notif=b"late",
        )
        req.post()
        req.release()
        assert req.released
        # Closing right away stops the posting thread, closes the endpoints (FORCE) and frees
        # the request once UCX is done with it: nothing hangs or crashes.
