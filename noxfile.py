"""Sessions: lint, core, plugin(<name>) per plugins/*/pyproject.toml, together, bench.

`nox -s lint core together` is the README's test command and what CI runs: `core` tests the core
with no plugin installed, `together` the core with every plugin.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.needs_version = ">=2024.10.9"
nox.options.sessions = ["lint", "core"]
nox.options.reuse_existing_virtualenvs = False

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml("pyproject.toml")
PLUGINS = sorted(p.name for p in (ROOT / "plugins").glob("*") if (p / "pyproject.toml").is_file())
SELECTED = [p for p in os.environ.get("NIXL_NOX_PLUGINS", ",".join(PLUGINS)).split(",") if p]
HW_TAGS = {"nixl_ucx": ["gpu", "rdma"], "nixl_nvlink": ["gpu"]}


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) over everything, mypy --strict over the core and every plugin."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def core(session: nox.Session) -> None:
    """The core's tests with no plugin installed (non-editable install)."""
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", "tests", *session.posargs)


@nox.session
@nox.parametrize("plugin", [nox.param(p, id=p, tags=HW_TAGS.get(p, [])) for p in PLUGINS] or [None])
def plugin(session: nox.Session, plugin: str | None) -> None:
    """One plugin with the core: import check, then its tests."""
    if plugin is None:
        session.skip("no plugins under plugins/")
    if plugin not in SELECTED:
        session.skip(f"{plugin} not in NIXL_NOX_PLUGINS")
    session.install(".", f"./plugins/{plugin}", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("python", "-c", f"import {plugin}")
    session.run("pytest", f"plugins/{plugin}/tests", *session.posargs)


@nox.session
def together(session: nox.Session) -> None:
    """The core and every plugin installed together; all tests.

    torch (the CPU build, pinned: any other version downloads a CUDA build of several GB) comes
    too, so the TCPStore metadata store and tensor descriptors are tested; ``core`` runs without.
    """
    plugins = [f"./plugins/{p}" for p in SELECTED]
    session.install(
        ".", *plugins, "torch==2.13.0", *nox.project.dependency_groups(PYPROJECT, "test")
    )
    paths = [
        "tests",
        *(f"plugins/{p}/tests" for p in SELECTED if (ROOT / "plugins" / p / "tests").is_dir()),
    ]
    session.run("pytest", *paths, *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """nixl-bench, then the descriptor-path benchmark; both side by side with the real NIXL.

    Arguments go to nixl-bench: ``nox -s bench -- --quick --plot bw.png``. NIXL is pinned to
    1.5.1 (the 1.5.2 meta package wants nixl-cu13 1.5.2); if it cannot be installed, both
    benchmarks say so and run without the comparison.
    """
    session.install(".[plot]")
    session.install("--no-deps", "nixl-cu13==1.5.1", "nixl==1.5.1", success_codes=[0, 1])
    session.run("nixl-bench", *session.posargs)
    session.run("python", "bench/bench_core.py")
