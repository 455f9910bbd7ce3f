"""GPU-initiated transfers: a kernel of your own reads (or writes) a peer's GPU memory directly.

:meth:`nixl_nvlink.backend.NvlinkBackend.mem_view` turns descriptors of a peer's registered VRAM,
resolved by the agent (:meth:`nixl_core.agent.Agent.resolve`), into a device array of pointers
mapped into this process. This module is the example that ships with the plugin: a gather
kernel that copies ``n`` blocks of ``block`` bytes, block ``i`` from ``ptrs[i]`` (peer memory),
into a contiguous local buffer. Any kernel can do the same with the pointers: read them, write
them, or mix them into its own computation::

    nv = agent.backend("NVLINK")
    side = agent.resolve(peer_name, peer_block_descs, "VRAM", backend="NVLINK")
    view = nv.mem_view(side)                             # cupy uint64 array, one pointer a block
    out = cupy.empty(n * block, cupy.uint8)
    gather_blocks(view, block, out)                      # one launch; no host work per block

Writes into a peer's memory become visible to the peer once the kernel has completed (the peer
still needs a signal, e.g. ``agent.send_notif`` after a stream synchronize).
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["GATHER_KERNEL", "gather_blocks", "scatter_blocks"]

GATHER_KERNEL = r"""
typedef unsigned long long u64;

// One block of threads per descriptor: block i copies len bytes between ptrs[i] and
// local + i * len, 8 bytes a thread when both sides allow it. to_peer selects the direction.
extern "C" __global__ void nvl_example_gather(const u64* __restrict__ ptrs, u64 len,
                                             unsigned char* local, long long n, int to_peer) {
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        unsigned char* remote = (unsigned char*)ptrs[i];
        unsigned char* mine = local + (u64)i * len;
        unsigned char* dst = to_peer ? remote : mine;
        const unsigned char* src = to_peer ? mine : remote;
        if ((((u64)src | (u64)dst | len) & 7) == 0) {
            for (u64 k = threadIdx.x; k < len / 8; k += blockDim.x)
                ((u64*)dst)[k] = ((const u64*)src)[k];
        } else {
            for (u64 k = threadIdx.x; k < len; k += blockDim.x) dst[k] = src[k];
        }
    }
}
"""


@functools.cache
def _kernel() -> Any:
    import cupy

    return cupy.RawKernel(GATHER_KERNEL, "nvl_example_gather")


def _launch(view: Any, block: int, local: Any, to_peer: bool, stream: Any = None) -> None:
    import cupy
    import numpy as np

    n = int(view.size)
    if local.nbytes < n * block:
        raise ValueError(f"local buffer holds {local.nbytes} bytes; {n} blocks need {n * block}")
    if n == 0:
        return
    grid = min(n, 65535)
    args = (view, np.uint64(block), local, np.int64(n), np.int32(1 if to_peer else 0))
    with stream if stream is not None else cupy.cuda.get_current_stream():
        _kernel()((grid,), (256,), args)


def gather_blocks(view: Any, block: int, out: Any, stream: Any = None) -> None:
    """Copy block ``i`` (``block`` bytes at ``view[i]``) to ``out[i * block:]``, on ``stream``."""
    _launch(view, block, out, False, stream)


def scatter_blocks(view: Any, block: int, src: Any, stream: Any = None) -> None:
    """Copy ``src[i * block:]`` to block ``i`` (``block`` bytes at ``view[i]``), on ``stream``."""
    _launch(view, block, src, True, stream)
