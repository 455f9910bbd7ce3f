"""NVLINK with CUDA VMM memory (cuMemCreate, PyTorch's expandable segments): a second process
registers VMM memory spanning several allocations; this process READs and WRITEs it through the
POSIX fds the exporter serves over its Unix socket. Allocations without the POSIX fd handle
type are refused with the fix named. Skips with probe()'s reason without a GPU."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from nixl_core.agent import Agent
from nixl_core.backend import XferStatus
from nixl_core.testing import BackendFixtures

SEED, OTHER_SEED = 404, 505
BLK = 4096

#: The exporter: allocates VMM memory (mode "cumem": two cuMemCreate allocations with POSIX fd
#: handles mapped back to back, through cuda-bindings; mode "torch": a tensor of PyTorch's
#: expandable segments), fills it with pattern(seed), registers it with an NVLINK agent, prints
#: one JSON line (metadata, address, handle types, refusals), then answers "digest" / "quit".
CHILD = r"""
import json, sys
import numpy as np
from nixl_core.agent import Agent, AgentConfig
from nixl_core.descriptors import DescList
from nixl_core.errors import NotSupportedError
from nixl_core.testing._peer import digest, pattern
from nixl_nvlink import _cuda

mode, nbytes, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
info = {"refused": None, "nofd_refused": None, "alloc": mode}
keep = []
if mode == "torch":
    import torch
    t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t.copy_(torch.from_numpy(pattern(seed, nbytes)))
    torch.cuda.synchronize()
    addr = t.data_ptr()
    keep.append(t)
    dig = lambda: digest(t.cpu().numpy())
else:
    import cupy as cp
    cp.cuda.Device(0).use()
    cp.zeros(1)  # the runtime's context, current
    def vmm_alloc(size, posix):
        from cuda.bindings import driver as cu
        def ok(res):
            assert int(res[0]) == 0, res
            return res[1:]
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = 0
        if posix:
            prop.requestedHandleTypes = (
                cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
            )
        (gran,) = ok(cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
        chunk = -(-(size // 2) // int(gran)) * int(gran)
        (va,) = ok(cu.cuMemAddressReserve(2 * chunk, 0, 0, 0))
        va = int(va)
        for k in range(2):
            (h,) = ok(cu.cuMemCreate(chunk, prop, 0))
            ok(cu.cuMemMap(va + k * chunk, chunk, 0, h, 0))
            ok(cu.cuMemRelease(h))
        acc = cu.CUmemAccessDesc()
        acc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        acc.location.id = 0
        acc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        ok(cu.cuMemSetAccess(va, 2 * chunk, [acc], 1))
        return va, chunk
    addr, chunk = vmm_alloc(nbytes, True)
    info["chunk"] = chunk
    mem = cp.cuda.UnownedMemory(addr, nbytes, None)
    arr = cp.ndarray((nbytes,), cp.uint8, cp.cuda.MemoryPointer(mem, 0))
    arr.set(pattern(seed, nbytes))
    cp.cuda.Device(0).synchronize()
    keep.append(arr)
    dig = lambda: digest(arr)
    bad, _ = vmm_alloc(1 << 21, False)  # no shareable handle type: refused, with the fix
    a0 = Agent("vmm-nofd", AgentConfig(backends=("NVLINK",)))
    try:
        a0.register(DescList.from_tuples([(bad, 1 << 20, 0)], "VRAM"))
    except NotSupportedError as exc:
        info["nofd_refused"] = str(exc)
    a0.close()
v = _cuda.vmm()
h = v.retain(addr)
info["types"] = v.handle_types(h) if h is not None else -1
if h is not None:
    v.release(h)
a = Agent("vmm-" + mode, AgentConfig(backends=("NVLINK",)))
try:
    a.register(DescList.from_tuples([(addr, nbytes, 0)], "VRAM"))
except NotSupportedError as exc:
    info["refused"] = str(exc)
info.update(md=a.metadata().hex(), addr=addr)
print(json.dumps(info), flush=True)
for line in sys.stdin:
    if line.strip() == "digest":
        print(json.dumps({"digest": dig()}), flush=True)
    else:
        break
a.close()
"""


class TestNvlinkVmm(BackendFixtures):
    """VMM regions of a peer process."""

    backend_name = "NVLINK"
    xfer_timeout = 30.0

    def _start(self, tmp_path: Any, mode: str, nbytes: int, env: dict[str, str] | None = None):
        err = open(tmp_path / f"{mode}.err", "w")  # noqa: SIM115 - closed by the caller's wait
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, mode, str(nbytes), str(SEED)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            self._stop(proc, err)
            raise AssertionError("exporter died: " + (tmp_path / f"{mode}.err").read_text())
        return proc, json.loads(line), err

    def _stop(self, proc: Any, err: Any) -> None:
        with contextlib.suppress(OSError):
            proc.stdin.write("quit\n")
            proc.stdin.flush()
        try:
            proc.wait(30)
        finally:
            for f in (proc.stdin, proc.stdout, err):
                with contextlib.suppress(OSError):
                    f.close()

    def _digest(self, proc: Any) -> str:
        proc.stdin.write("digest\n")
        proc.stdin.flush()
        return str(json.loads(proc.stdout.readline())["digest"])

    def _read_write(self, agent: Agent, buffer_factory: Any, proc: Any, info: dict, n: int) -> None:
        """READ the peer's VMM region into scattered local blocks, WRITE them back permuted,
        check both; the mapping is cached while loaded and gone after remove_remote."""
        from nixl_nvlink import _regions

        peer = agent.add_remote(bytes.fromhex(info["md"]))
        nbytes = n * BLK
        dst = buffer_factory("VRAM", nbytes)
        agent.register(dst)
        perm = np.random.default_rng(7).permutation(n)
        local = self.blocks("VRAM", self.describe(dst)[0], 0, perm * BLK, BLK)
        remote = self.blocks("VRAM", int(info["addr"]), 0, np.arange(n) * BLK, BLK)
        with agent.create("READ", local, remote, peer, merge=False) as req:
            req.post()
            assert req.wait(self.xfer_timeout) is XferStatus.DONE
            assert req.path == "nvlink:ipc"
        want = self.pattern(SEED, nbytes).reshape(n, BLK)
        np.testing.assert_array_equal(self.host(dst).reshape(n, BLK)[perm], want)
        assert any(k.startswith(b"VMM") for k in _regions._MAPS)
        self.fill(dst, OTHER_SEED)
        rev = perm[::-1].copy()
        local = self.blocks("VRAM", self.describe(dst)[0], 0, rev * BLK, BLK)
        with agent.create("WRITE", local, remote, peer, merge=False) as req:
            req.post()
            assert req.wait(self.xfer_timeout) is XferStatus.DONE
        other = self.pattern(OTHER_SEED, nbytes).reshape(n, BLK)
        assert self._digest(proc) == self.digest(np.ascontiguousarray(other[rev]))
        agent.remove_remote(peer)
        assert not any(k.startswith(b"VMM") for k in _regions._MAPS)

    def test_cumem_region_read_write_from_peer(
        self, agent: Agent, buffer_factory: Any, tmp_path: Any
    ) -> None:
        """cuMemCreate memory (POSIX fd handles, two allocations under one region) registered
        in another process is read and written; a handle without POSIX fds is refused."""
        n = 1536  # 6 MiB: the region spans both allocations
        proc, info, err = self._start(tmp_path, "cumem", n * BLK)
        try:
            print("exporter:", {k: v for k, v in info.items() if k != "md"})
            assert info["refused"] is None, info["refused"]
            assert info["types"] & 1
            msg = info["nofd_refused"]
            assert msg and "POSIX" in msg and "cudaMalloc" in msg and "UCX" in msg, msg
            self._read_write(agent, buffer_factory, proc, info, n)
        finally:
            self._stop(proc, err)

    def test_torch_expandable_segments_read_write_from_peer(
        self, agent: Agent, buffer_factory: Any, tmp_path: Any
    ) -> None:
        """A PyTorch tensor of expandable segments (48 MiB: several 20 MiB allocations) is read
        and written from another process when PyTorch made POSIX fd handles (it does on Linux);
        otherwise registration is refused naming expandable_segments and the fix."""
        pytest.importorskip("torch")
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
        n = 12288
        proc, info, err = self._start(tmp_path, "torch", n * BLK, env)
        try:
            print("exporter:", {k: v for k, v in info.items() if k != "md"})
            assert info["types"] >= 0, "PyTorch did not make VMM memory with expandable_segments"
            if not info["types"] & 1:
                msg = info["refused"]
                assert msg and "expandable_segments" in msg and "cudaMalloc" in msg, msg
                return
            assert info["refused"] is None, info["refused"]
            self._read_write(agent, buffer_factory, proc, info, n)
        finally:
            self._stop(proc, err)
