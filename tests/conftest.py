"""Core test fixtures: a fresh plugin manager per test, and agents closed at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nixl_core import Agent, reset_plugin_manager


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test discovers plugins anew and sees no allow/block list from the environment."""
    monkeypatch.delenv("NIXL_PLUGINS", raising=False)
    monkeypatch.delenv("NIXL_DISABLE_PLUGINS", raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def make_agent() -> Iterator[Callable[..., Agent]]:
    """Create LOOPBACK agents that are closed after the test."""
    made: list[Agent] = []

    def factory(name: str, **kw: Any) -> Agent:
        kw.setdefault("backends", ["LOOPBACK"])
        a = Agent(name, **kw)
        made.append(a)
        return a

    yield factory
    for a in made:
        a.close()


pytest_plugins = ["pytester"]
