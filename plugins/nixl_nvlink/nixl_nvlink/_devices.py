"""The GPUs as one NVLINK backend uses them: its stream on each GPU, and peer access it enabled.

Every kernel and upload of a backend runs on its own non-blocking stream of the GPU concerned
(created on first use), so ordering within a request needs no host synchronize; releasing memory
synchronizes them all first. Peer access (a kernel on one GPU reaching another's memory) is
enabled once per pair of GPUs.
"""

from __future__ import annotations

import contextlib
from typing import Any

from nixl_core.errors import NotSupportedError

__all__ = ["Devices"]


class Devices:
    """One backend's CUDA streams, one per GPU, and the GPU pairs it enabled peer access for.

    Args:
        cu: the process's :class:`nixl_nvlink._cuda.Cuda`.
    """

    def __init__(self, cu: Any) -> None:
        self._cu = cu
        self._cp: Any = cu.cupy
        self._streams: dict[int, Any] = {}
        self._peer_enabled: set[tuple[int, int]] = set()

    def stream(self, dev: int) -> Any:
        """The backend's stream on GPU ``dev`` (a non-blocking ``cupy.cuda.Stream``)."""
        s = self._streams.get(dev)
        if s is None:
            with self._cp.cuda.Device(dev):
                s = self._cp.cuda.Stream(non_blocking=True)
            self._streams[dev] = s
        return s

    def sync_all(self) -> None:
        """Wait for everything queued on the backend's streams (a faulted one is skipped)."""
        for s in self._streams.values():
            with contextlib.suppress(Exception):  # a faulted context: nothing left to wait for
                s.synchronize()

    def enable_peer(self, dev: int, other: int) -> None:
        """Let kernels on GPU ``dev`` reach GPU ``other``'s memory (no-op for the same GPU or
        host memory, ``other`` < 0).

        Raises:
            NotSupportedError: the two GPUs cannot access each other (names both).
        """
        if dev == other or other < 0 or (dev, other) in self._peer_enabled:
            return
        try:
            self._cu.enable_peer(dev, other)
        except self._cu.rt.CUDARuntimeError as exc:
            raise NotSupportedError(
                f"GPU {dev} cannot access GPU {other} directly (peer access: {exc}); NVLINK needs "
                "peer-capable GPUs (NVLink or PCIe P2P); use UCX between them"
            ) from exc
        self._peer_enabled.add((dev, other))
