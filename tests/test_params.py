"""Backend parameters: one declaration per backend, one precedence rule applied by the core."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nixl_core import Agent, AgentConfig, InvalidParamError
from nixl_core.params import Param, resolve_params

SPECS = (
    Param.integer("num_workers", 1, "workers", minimum=1, maximum=8),
    Param.integer("chunk", 512, "chunk bytes", minimum=512, multiple_of=16),
    Param.boolean("gather", True, "gather on the device"),
    Param.choice("mode", "auto", ("auto", "fast"), "mode", aliases=("engine",)),
    Param.string("devices", "", "device list"),
    Param.boolean("progress_thread", True, "progress thread"),
)


def test_precedence_explicit_config_env_default() -> None:
    """Explicit > config > environment > default, and a value given explicitly wins even when
    it equals the default (NIXL_UCX_NUM_WORKERS=4 must not beat an explicit num_workers=1)."""
    env = {"NIXL_X_NUM_WORKERS": "4", "NIXL_X_CHUNK": "1024", "NIXL_X_MODE": "fast"}
    p = resolve_params("X", SPECS, {"num_workers": 1}, {"chunk": 2048}, env=env)
    assert p["num_workers"] == 1 and p.source("num_workers") == "explicit"
    assert p["chunk"] == 2048 and p.source("chunk") == "config"
    assert p["mode"] == "fast" and p.source("mode") == "env NIXL_X_MODE"
    assert p["gather"] is True and p.source("gather") == "default"
    assert p.as_strings()["gather"] == "true"


@pytest.mark.parametrize(
    ("raw", "value"),
    [("false", False), ("0", False), ("no", False), ("OFF", False), ("true", True), (1, True)],
)
def test_booleans_mean_what_they_say(raw: object, value: bool) -> None:
    """'false' is false (NVLINK once read device_gather='false' as true)."""
    assert resolve_params("X", SPECS, {"gather": raw}, env={})["gather"] is value


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({"gather": "maybe"}, r"X param gather='maybe'.*expected a boolean"),
        ({"num_workers": "0"}, r"num_workers='0'.*in 1\.\.8"),
        ({"num_workers": True}, r"num_workers=True.*an integer"),
        ({"chunk": 520}, r"chunk=520.*multiple of 16"),
        ({"mode": "slow"}, r"mode='slow'.*one of auto, fast"),
        ({"num_workrs": 2}, r"unknown X param 'num_workrs'.*did you mean 'num_workers'"),
    ],
)
def test_bad_values_and_unknown_names_are_named(given: dict[str, object], match: str) -> None:
    """A bad value names the parameter, the value and what is accepted; an unknown name
    gets close matches."""
    with pytest.raises(InvalidParamError, match=match) as err:
        resolve_params("X", SPECS, given, env={})
    assert err.value.param == next(iter(given))


def test_bad_environment_value_names_the_variable() -> None:
    """A malformed NIXL_<BACKEND>_<PARAM> is an error naming the variable, not a silent default."""
    with pytest.raises(InvalidParamError, match="environment variable NIXL_X_CHUNK"):
        resolve_params("X", SPECS, env={"NIXL_X_CHUNK": "big"})


def test_aliases_and_agent_wide_fields() -> None:
    """Aliases reach the canonical name; agent-wide fields apply only where declared."""
    p = resolve_params(
        "X", SPECS, {"engine": "FAST"}, None, {"progress_thread": False, "num_threads": 3}, env={}
    )
    assert p["mode"] == "fast" and p["progress_thread"] is False and "num_threads" not in p


def test_agent_config_reaches_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """AgentConfig.num_threads feeds LOOPBACK's num_threads below backend_params; the
    environment ranks below both; explicit create_backend params win over all."""
    monkeypatch.setenv("NIXL_LOOPBACK_INLINE_BYTES", "123")
    monkeypatch.setenv("NIXL_LOOPBACK_NUM_THREADS", "7")
    with Agent("p", AgentConfig(backends=("LOOPBACK",), num_threads=2)) as a:
        lb = a.backend("LOOPBACK")
        assert lb.params["num_threads"] == 2 and lb.params["inline_bytes"] == 123
    cfg = AgentConfig(backends=(), num_threads=2, backend_params={"LOOPBACK": {"num_threads": 3}})
    with Agent("q", cfg) as a:
        assert a.create_backend("LOOPBACK", {"inline_bytes": 0}).params["inline_bytes"] == 0
        assert a.backend("LOOPBACK").params["num_threads"] == 3
    with pytest.raises(InvalidParamError, match="did you mean 'inline_bytes'"):
        Agent(
            "r",
            AgentConfig(backends=("LOOPBACK",), backend_params={"LOOPBACK": {"inline_byte": 1}}),
        )


def test_backends_params_listing() -> None:
    """`python -m nixl_core backends --params` lists each param with default, env var, the value
    an agent would get now and its source."""
    env = {**os.environ, "NIXL_LOOPBACK_NUM_THREADS": "5"}
    out = subprocess.run(
        [sys.executable, "-m", "nixl_core", "backends", "--params"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    assert "LOOPBACK params (precedence: explicit > AgentConfig > env > default)" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("num_threads"))
    assert "NIXL_LOOPBACK_NUM_THREADS" in line and "env NIXL_LOOPBACK_NUM_THREADS" in line
    assert " 5 " in line
