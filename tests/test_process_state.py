"""nixl-core changes nothing in a process behind its back: what it does, it says."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from nixl_core import _loopback
from nixl_core._loopback import LoopbackBackend


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_import_changes_nothing() -> None:
    """Importing nixl_core (and listing backends) leaves the environment as it was and tunes
    no allocator."""
    out = _python(
        """
        import os
        before = dict(os.environ)
        import nixl_core
        nixl_core.list_backends()
        assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
        from nixl_core import _malloc
        assert not _malloc._done
        print("ok")
        """
    )
    assert out.stdout.strip() == "ok"


def test_malloc_tuning_is_configurable_and_said_once() -> None:
    """AgentConfig(tune_malloc=False) leaves glibc alone; otherwise the first agent tunes it and
    says so once at INFO, with how to turn it off."""
    out = _python(
        """
        import logging
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        from nixl_core import Agent, AgentConfig, _malloc
        with Agent("a", AgentConfig(backends=("LOOPBACK",), tune_malloc=False)):
            assert not _malloc._done
        with Agent("b", backends=["LOOPBACK"]), Agent("c", backends=["LOOPBACK"]):
            pass
        print("tuned", _malloc._done)
        """
    )
    assert "tuned True" in out.stdout
    lines = [ln for ln in out.stderr.splitlines() if "M_MMAP_THRESHOLD" in ln]
    assert len(lines) == 1 and "tune_malloc=False" in lines[0] and "NIXL_MALLOC_TUNE=0" in lines[0]


def test_ptracer_change_is_listed_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under Yama ptrace_scope=1, LOOPBACK's process-wide PR_SET_PTRACER_ANY is announced by
    probe() (shown by `python -m nixl_core backends`) and logged once when it happens."""
    monkeypatch.setattr(_loopback, "_ptrace_scope", lambda: 1)
    monkeypatch.setattr(_loopback, "_ptracer_set", False)
    avail = LoopbackBackend.probe()
    assert avail.available and any("PR_SET_PTRACER_ANY" in n for n in avail.notes)
    with caplog.at_level(logging.INFO, logger="nixl_core._loopback"):
        for name in ("p1", "p2"):
            LoopbackBackend(name).close()
    assert sum("PR_SET_PTRACER_ANY" in r.message for r in caplog.records) == 1
    assert LoopbackBackend.probe().notes == ()  # done: nothing more will change
