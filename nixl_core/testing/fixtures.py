"""BackendFixtures: the fixtures every conformance suite runs on.

A plugin wires the suites for its backend with one class::

    from nixl_core.testing import (BackendFixtures, BadInputSuite, LocalXferSuite, NotifSuite,
                                   RegistrationSuite, RemoteXferSuite)

    class TestUcx(RegistrationSuite, LocalXferSuite, RemoteXferSuite, NotifSuite, BadInputSuite,
                  BackendFixtures):
        backend_name = "UCX"
        params = {"num_workers": 1}
        mem_types = ("DRAM", "VRAM")

The fixtures are methods of this class, so the suites work without registering any pytest
plugin. Tests that take a ``mem_type`` argument run once per entry of :attr:`mem_types`.
Each suite states the capability flags it needs (``supports_local``, ``supports_remote``,
``supports_notif``); an autouse fixture skips the suite's tests, with the reason, when the
backend class lacks one, when its ``probe()`` says it cannot run here, or when it cannot
register the memory type under test.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pytest

from nixl_core.agent import Agent, AgentConfig
from nixl_core.backend import Backend
from nixl_core.descriptors import DescList
from nixl_core.memory import MemType
from nixl_core.testing._peer import (
    SRC_SEED,
    PeerError,
    PeerProcess,
    alloc,
    digest,
    fill,
    pattern,
    to_host,
)

__all__ = ["BackendFixtures"]


def _cuda_devices() -> int:
    """Visible CUDA devices according to cupy (0 when cupy or a driver is missing)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no cupy, no driver, no device: all mean "no VRAM here"
        return 0


class BackendFixtures:
    """Base class of a backend's conformance test class; override the class attributes.

    Attributes:
        backend_name: backend type name as agents are configured with it ("UCX", "LOOPBACK").
        params: backend parameters passed to every agent (the test's and the peer process's).
        mem_types: memory types the suites exercise (tests run once per type).
        peer_call_timeout: seconds the tests wait for each answer of the peer process.
        xfer_timeout: seconds a test waits for one transfer or notification.
    """

    backend_name: ClassVar[str] = ""
    params: ClassVar[Mapping[str, Any]] = {}
    mem_types: ClassVar[tuple[str, ...]] = ("DRAM",)
    peer_call_timeout: ClassVar[float] = 30.0
    xfer_timeout: ClassVar[float] = 20.0

    #: Capability flags a suite needs; set by each suite on its own class (read via the MRO).
    _nixl_requires: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ helpers
    @classmethod
    def backend_class(cls) -> type[Backend]:
        """The backend class the installed plugins provide for :attr:`backend_name`."""
        from nixl_core._plugins import get_plugin_manager

        if not cls.backend_name:
            raise TypeError(f"{cls.__name__} must set backend_name")
        return get_plugin_manager().registry.get(cls.backend_name)

    @classmethod
    def require(cls, *flags: str) -> type[Backend]:
        """Skip the running test unless the backend has every capability flag named."""
        bcls = cls.backend_class()
        avail = bcls.probe()
        if not avail.available:
            pytest.skip(f"backend {bcls.name} is not available here: {avail.reason}")
        missing = [f for f in flags if not getattr(bcls, f, False)]
        if missing:
            pytest.skip(f"backend {bcls.name} lacks {', '.join(missing)}")
        return bcls

    def require_mem_type(self, mem_type: str) -> None:
        """Skip unless the backend can register ``mem_type`` (and, for VRAM, a GPU is visible)."""
        bcls = self.backend_class()
        mt = MemType.parse(mem_type)
        if mt not in bcls.mem_types:
            pytest.skip(f"backend {bcls.name} cannot register {mt.value} memory")
        if mt is MemType.VRAM:
            pytest.importorskip("cupy", reason="VRAM test buffers need cupy")
            if _cuda_devices() < 1:
                pytest.skip("no CUDA device is visible")

    @staticmethod
    def fill(buf: Any, seed: int) -> None:
        """Overwrite a buffer with the reproducible pattern of ``seed``."""
        fill(buf, seed)

    @staticmethod
    def pattern(seed: int, nbytes: int) -> npt.NDArray[np.uint8]:
        """The reproducible byte pattern of ``seed`` (identical in the peer process)."""
        return pattern(seed, nbytes)

    @staticmethod
    def host(buf: Any) -> npt.NDArray[np.uint8]:
        """A host copy (or view) of a numpy or cupy buffer as flat uint8."""
        return to_host(buf)

    @staticmethod
    def digest(buf: Any) -> str:
        """The digest the peer process computes for the same bytes."""
        return digest(buf)

    @staticmethod
    def describe(buf: Any) -> tuple[int, int, int]:
        """``(addr, nbytes, dev)`` of a buffer, as the core sees it."""
        return DescList.from_objects(buf)[0]

    def registered_pair(
        self, agent: Agent, buffer_factory: Callable[..., Any], mem_type: str, nbytes: int
    ) -> tuple[Any, Any, tuple[int, int], tuple[int, int]]:
        """A patterned source and a zeroed destination, both registered with ``agent``.

        Returns ``(src, dst, (src_addr, src_dev), (dst_addr, dst_dev))``.
        """
        src = buffer_factory(mem_type, nbytes, SRC_SEED)
        dst = buffer_factory(mem_type, nbytes)
        agent.register(src)
        agent.register(dst)
        s_addr, _, s_dev = self.describe(src)
        d_addr, _, d_dev = self.describe(dst)
        return src, dst, (s_addr, s_dev), (d_addr, d_dev)

    @staticmethod
    def blocks(mem_type: str, base: int, dev: int, offsets: npt.ArrayLike, length: int) -> DescList:
        """A descriptor list of ``length``-byte blocks at ``base + offsets`` (vectorized)."""
        off = np.asarray(offsets, dtype=np.uint64)
        rows = np.empty((off.size, 3), np.uint64)
        rows[:, 0] = np.uint64(base) + off
        rows[:, 1] = length
        rows[:, 2] = dev
        return DescList.from_array(rows, mem_type)

    @staticmethod
    def wait_notifs(agent: Agent, sender: str, count: int, timeout: float) -> list[bytes]:
        """Poll ``agent`` until ``count`` messages from ``sender`` arrived or ``timeout`` passed."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got.extend(agent.get_notifs().get(sender, []))
            if len(got) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.0005)
        return got

    # ------------------------------------------------------------------ parametrization
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Run tests that take ``mem_type`` once per entry of :attr:`mem_types`."""
        if "mem_type" in metafunc.fixturenames:
            metafunc.parametrize("mem_type", list(self.mem_types))

    # ------------------------------------------------------------------ fixtures
    @pytest.fixture(autouse=True)
    def _nixl_capability_gate(self, request: pytest.FixtureRequest) -> None:
        """Skip a suite's test when the backend lacks what that suite needs."""
        name = request.function.__name__
        needs: tuple[str, ...] = ()
        for klass in type(self).__mro__:
            if name in vars(klass):
                needs = vars(klass).get("_nixl_requires", ())
                break
        self.require(*needs)
        if "mem_type" in request.fixturenames:
            self.require_mem_type(request.getfixturevalue("mem_type"))

    @pytest.fixture
    def buffer_factory(self) -> Iterator[Callable[..., Any]]:
        """``make(mem_type, nbytes, seed=None)``: a zeroed (or patterned) uint8 buffer.

        DRAM buffers are numpy arrays, VRAM buffers cupy arrays (the test skips without cupy or
        a GPU). Buffers live until the test's agents are closed.
        """
        bufs: list[Any] = []

        def make(mem_type: str, nbytes: int, seed: int | None = None) -> Any:
            self.require_mem_type(mem_type)
            buf = alloc(MemType.parse(mem_type).value, nbytes)
            if seed is not None:
                fill(buf, seed)
            bufs.append(buf)
            return buf

        yield make
        bufs.clear()

    @pytest.fixture
    def agent_factory(self, buffer_factory: Any) -> Iterator[Callable[..., Agent]]:
        """``make(name=None)``: an agent with this backend; every agent is closed at teardown.

        It depends on ``buffer_factory`` so that agents are closed before buffers are freed.
        """
        made: list[Agent] = []

        def make(name: str | None = None) -> Agent:
            agent = Agent(
                name or f"nixl-test-{uuid.uuid4().hex[:10]}",
                AgentConfig(
                    backends=(self.backend_name,),
                    backend_params={self.backend_name: dict(self.params)},
                ),
            )
            made.append(agent)
            return agent

        yield make
        for agent in reversed(made):
            agent.close()

    @pytest.fixture
    def agent(self, agent_factory: Callable[..., Agent]) -> Agent:
        """One agent with this backend."""
        return agent_factory()

    @pytest.fixture(scope="class")
    @classmethod
    def peer_process(cls) -> Iterator[PeerProcess]:
        """A peer agent in a ``spawn`` child process, shared by the tests of one class.

        Started on first use; stopped (bounded, killed if need be) after the class.
        """
        cls.require("supports_remote")
        proc = PeerProcess(cls.backend_name, cls.params, call_timeout=cls.peer_call_timeout)
        yield proc
        proc.close()

    @pytest.fixture
    def peer(self, peer_process: PeerProcess) -> Iterator[PeerProcess]:
        """The class's peer process, alive and reset (no buffers, no remotes, no notifications).

        A peer that died or stopped answering in an earlier test is replaced first.
        """
        try:
            if not peer_process.alive:
                raise PeerError("peer process is gone")
            peer_process.reset()
        except PeerError:
            peer_process.restart()
        yield peer_process
        if peer_process.alive:
            try:
                peer_process.reset()
            except PeerError:
                peer_process.kill()  # the next test starts a fresh one

    @staticmethod
    def link(agent: Agent, peer: PeerProcess) -> str:
        """Exchange metadata both ways (the peer's current registrations included)."""
        name = agent.add_remote(peer.metadata())
        peer.add_remote(agent.metadata())
        return name
