"""The examples under examples/ run as written (the README's usage example is one of them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("plugins", [None, "loopback"], ids=["default-backend", "loopback-only"])
def test_two_agents_example_runs(plugins: str | None) -> None:
    """examples/two_agents.py moves and verifies its blocks, with the default backend (UCX when
    installed) and with the core alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("NIXL_PLUGINS", "NIXL_DISABLE_PLUGINS")}
    if plugins:
        env["NIXL_PLUGINS"] = plugins
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "two_agents.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "verified 64 blocks over" in out.stdout
    assert "prefill-0 was told {'decode-0': [b'req-17']}" in out.stdout
