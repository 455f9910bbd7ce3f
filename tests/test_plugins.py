"""Plugin discovery, allow/block lists, the backend registry and hooks."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import nixl_core
from nixl_core import (
    Agent,
    BackendNotFoundError,
    BackendUnavailableError,
    DescList,
    PluginError,
    hookspecs,
    list_backends,
)
from nixl_core._plugins import ENTRY_POINT_GROUP, get_plugin_manager

PLUGIN_SRC = """
import numpy as np
from nixl_core import hookimpl, Backend, Availability, MemType, XferStatus, BackendRequest

class FakeBackend(Backend):
    name = "FAKE"
    mem_types = frozenset({MemType.DRAM, MemType.FILE})
    def register(self, mem_type, rows, metas): return [("fake", int(a)) for a in rows[:, 0]]
    def deregister(self, handles): pass
    def prepare(self, op, local, remote, peer):
        r = BackendRequest(); r.path = "fake:mem"; return r
    def post(self, req, notif): return XferStatus.DONE
    def poll(self, req): return XferStatus.DONE
    def release(self, req): pass

class GoneBackend(FakeBackend):
    name = "GONE"
    @classmethod
    def probe(cls): return Availability(False, "libgone.so.1 not found")

@hookimpl
def nixl_register_backends(registry):
    registry.add(FakeBackend)
    registry.add(GoneBackend)
"""

SELECT_SRC = """
from nixl_core import hookimpl

@hookimpl
def nixl_select_backend(agent, op, local_mem, remote_mem, peer, candidates):
    return "FAKE" if "FAKE" in candidates else None
"""


def _install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, plugins: dict[str, str]) -> None:
    """Write plugin modules under tmp_path and expose them as fake entry points."""
    eps = []
    for ep_name, src in plugins.items():
        mod = f"fake_nixl_{ep_name}"
        (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))
        eps.append(importlib.metadata.EntryPoint(ep_name, mod, ENTRY_POINT_GROUP))
        sys.modules.pop(mod, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.entry_points

    def fake(**kw: object) -> object:
        if kw.get("group") == ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints(eps)
        return real(**kw)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def test_entry_point_backends_listed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Backends from entry points are listed with availability, reason, mem types and flags."""
    _install(monkeypatch, tmp_path, {"fake": PLUGIN_SRC})
    infos = {i.name: i for i in list_backends()}
    assert infos["FAKE"].available and infos["FAKE"].plugin == "fake"
    assert infos["FAKE"].mem_types == ("DRAM", "FILE")
    assert infos["GONE"].available is False and "libgone" in infos["GONE"].reason
    assert infos["LOOPBACK"].capabilities == {"local": True, "remote": True, "notif": True}


def test_unavailable_backend_raises_with_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Creating a backend whose probe says no raises BackendUnavailableError with the reason."""
    _install(monkeypatch, tmp_path, {"fake": PLUGIN_SRC})
    with pytest.raises(BackendUnavailableError, match="libgone"):
        Agent("a", backends=["GONE"])


def test_multi_backend_registration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Memory registers with every capable backend; deregistering one backend keeps the other."""
    _install(monkeypatch, tmp_path, {"fake": PLUGIN_SRC})
    a = Agent("a", backends=["LOOPBACK", "FAKE"])
    try:
        buf = np.zeros(4096, np.uint8)
        reg = a.register(buf)
        lp = a.prep("", DescList.strided("DRAM", buf.ctypes.data, 64, 4, 64))
        assert lp.backends == ("LOOPBACK", "FAKE")
        a.deregister(reg, backends=["FAKE"])
        assert a.prep("", lp.descs, "DRAM").backends == ("LOOPBACK",)
        a.deregister(reg)
        assert len(a.registered("DRAM")) == 0
        fe = a.register([(0, 0, 3, "rw:/x")], "FILE")  # only FAKE supports FILE
        assert fe.metas == (b"rw:/x",)
    finally:
        a.close()


def test_select_hook_overrides_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A plugin's nixl_select_backend wins over the core's first-candidate default."""
    _install(monkeypatch, tmp_path, {"fake": PLUGIN_SRC, "sel": SELECT_SRC})
    a = Agent("a", backends=["LOOPBACK", "FAKE"])
    try:
        s, d = np.zeros(256, np.uint8), np.zeros(256, np.uint8)
        a.register(s)
        a.register(d)
        ls = DescList.from_objects(s)
        req = a.create("WRITE", ls, DescList.from_objects(d), "a")
        assert req.backend_name == "FAKE" and req.path == "fake:mem"
        assert (
            a.create("WRITE", ls, DescList.from_objects(d), "a", backends=["LOOPBACK"]).backend_name
            == "LOOPBACK"
        )
    finally:
        a.close()


def test_select_hook_is_asked_once_per_choice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """nixl_select_backend stays off the data path: asked once per (op, memory types, peer,
    candidates), then the agent reuses the answer for every make and create."""
    counting = SELECT_SRC.replace("@hookimpl", "CALLS = []\n\n@hookimpl").replace(
        "    return", "    CALLS.append(op)\n    return"
    )
    _install(monkeypatch, tmp_path, {"fake": PLUGIN_SRC, "sel": counting})
    with Agent("a", backends=["LOOPBACK", "FAKE"]) as a:
        s, d = np.zeros(256, np.uint8), np.zeros(256, np.uint8)
        a.register(s)
        a.register(d)
        ls, ds = DescList.from_objects(s), DescList.from_objects(d)
        lp, rp = a.prep("", ls), a.prep("a", ds)
        for _ in range(5):
            assert a.create("WRITE", ls, ds, "a").backend_name == "FAKE"
            assert a.make("WRITE", lp, [0], rp, [0]).backend_name == "FAKE"
        a.create("READ", ls, ds, "a")
        assert [op.value for op in sys.modules["fake_nixl_sel"].CALLS] == ["WRITE", "READ"]


def test_allow_and_block_lists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """NIXL_DISABLE_PLUGINS blocks a plugin; NIXL_PLUGINS allows only the listed ones, the
    built-in loopback plugin included."""
    _install(monkeypatch, tmp_path, {"fake": PLUGIN_SRC})
    monkeypatch.setenv("NIXL_DISABLE_PLUGINS", "fake")
    names = {i.name for i in list_backends() if i.available}
    assert "FAKE" not in names and "LOOPBACK" in names
    nixl_core.reset_plugin_manager()
    monkeypatch.delenv("NIXL_DISABLE_PLUGINS")
    monkeypatch.setenv("NIXL_PLUGINS", "loopback")
    with pytest.raises(BackendNotFoundError):
        Agent("a", backends=["FAKE"])
    nixl_core.reset_plugin_manager()
    monkeypatch.setenv("NIXL_PLUGINS", "fake")
    assert {i.name for i in list_backends() if i.available} == {"FAKE"}


def test_missing_dependency_skipped_broken_plugin_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plugin missing a dependency is skipped with its reason; an error in its own code raises."""
    _install(
        monkeypatch,
        tmp_path,
        {"needy": "import surely_not_installed_native_lib\n"},
    )
    infos = {i.name: i for i in list_backends()}
    assert infos["NEEDY"].available is False
    assert "surely_not_installed_native_lib" in infos["NEEDY"].reason
    assert "skipped" in caplog.text
    nixl_core.reset_plugin_manager()
    _install(monkeypatch, tmp_path, {"broken": "import fake_nixl_broken.sub\n"})
    with pytest.raises(PluginError, match="broken"):
        get_plugin_manager()
    nixl_core.reset_plugin_manager()
    _install(monkeypatch, tmp_path, {"bug": "1 / 0\n"})
    with pytest.raises(ZeroDivisionError):
        get_plugin_manager()


def test_registry_validates_classes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A remote-capable backend without notifications, or one written for another plugin API
    version, is refused: its plugin is skipped with that reason and the others stay usable."""
    src = PLUGIN_SRC.replace('name = "FAKE"', 'name = "FAKE"\n    supports_remote = True')
    old = PLUGIN_SRC.replace('name = "FAKE"', 'name = "OLDAPI"\n    api_version = 1')
    _install(monkeypatch, tmp_path, {"fake": src, "oldapi": old})
    infos = {i.plugin: i for i in list_backends()}
    assert "notifications" in infos["fake"].reason and not infos["fake"].available
    assert "plugin API 1" in infos["oldapi"].reason
    with Agent("survivor", backends=["LOOPBACK"]) as a:
        assert a.backends == ("LOOPBACK",)


def test_failing_registration_hook_skips_only_that_plugin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plugin whose nixl_register_backends raises (a lazy import, a bug) is skipped like one
    that cannot be imported: what it added before raising is taken back, its reason is shown by
    `python -m nixl_core backends`, and agents of the other plugins still start."""
    bad = PLUGIN_SRC.replace(
        "    registry.add(GoneBackend)",
        "    registry.add(GoneBackend)\n    import surely_missing_lazy_dep",
    )
    _install(monkeypatch, tmp_path, {"bad": bad})
    infos = {i.name: i for i in list_backends()}
    assert "FAKE" not in infos and "GONE" not in infos
    assert "surely_missing_lazy_dep" in infos["BAD"].reason
    assert "nixl plugin bad skipped" in caplog.text
    with Agent("still-works", backends=["LOOPBACK"]) as a:
        assert a.backends == ("LOOPBACK",)
    with pytest.raises(BackendNotFoundError, match="surely_missing_lazy_dep"):
        Agent("wants-fake", backends=["FAKE"])
    out = subprocess.run(
        [sys.executable, "-m", "nixl_core", "backends"], capture_output=True, text=True, check=True
    )
    assert "LOOPBACK" in out.stdout


def test_every_hookspec_documented() -> None:
    """Each hook specification has a docstring with an Args or summary line."""
    specs = [n for n in dir(hookspecs) if n.startswith("nixl_")]
    assert set(specs) == {
        "nixl_register_backends",
        "nixl_select_backend",
        "nixl_agent_started",
        "nixl_agent_closing",
    }
    for n in specs:
        assert (getattr(hookspecs, n).__doc__ or "").strip()


def test_cli_lists_backends() -> None:
    """`python -m nixl_core backends` prints the loopback backend, as a table and as JSON."""
    root = Path(nixl_core.__file__).resolve().parent.parent
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "nixl_core", "backends"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    assert "LOOPBACK" in out and "available" in out
    js = subprocess.run(
        [sys.executable, "-m", "nixl_core", "backends", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    assert any(b["name"] == "LOOPBACK" and b["available"] for b in json.loads(js))
