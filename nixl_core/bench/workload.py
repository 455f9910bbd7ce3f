"""What a benchmark row moves: block layouts, KV-cache model layouts, buffers and their checks.

Everything here is plain numpy and is shared by the coordinator (which plans the rows) and the
initiator/target processes of both implementations (which build the very same descriptor arrays
from it), so nixl-py and NIXL always move identical descriptors.

Layouts
-------
A side's memory is one registered buffer cut into equal slots of ``block`` bytes. A row names,
per side, which slots it moves (``idx``), in order: descriptor ``i`` of the initiator pairs with
descriptor ``i`` of the target.

- ``contiguous``: slots ``0..n-1`` on both sides (neighbours are adjacent in memory, so a library
  that merges contiguous descriptors may move them as one).
- ``scattered``: ``n`` distinct slots drawn at random (block-aligned offsets in a large buffer, as
  KV blocks are), drawn independently for the initiator and the target from ``--seed``.

KV-cache models (``--kv-model``)
--------------------------------
Bytes of KV cache per token (kvbench's formulas, ../shared/reference/nixl_api.md §7.2):

- GQA models: ``layers x kv_heads x head_dim x 2 (K and V) x dtype bytes``;
- DeepSeek MLA: ``layers x (kv_lora_rank 512 + qk_rope_head_dim 64 = 576) x dtype bytes``
  (one compressed latent per token per layer; no separate K and V).

Layout of one TP rank's cache, as vLLM registers it: each layer has a K region and a V region
(MLA: one latent region per layer); a region holds the cache's blocks of ``page_size`` tokens;
a request's KV is one descriptor per block per region, the same block ids in every region. TP
splits the KV heads (``kv_heads / tp`` per rank; when ``tp > kv_heads`` each rank holds one
replicated head). MLA's latent is not split by TP: every rank holds all of it.

At ``--isl 4096 --page-size 16 --tp 1 --dtype bf16`` (the defaults):

============== ======= ========= ===== ===================== ============ =========== ==============
model          layers  KV heads  head  KV bytes/token        descriptor   descriptors bytes/request
============== ======= ========= ===== ===================== ============ =========== ==============
llama-3.1-8b   32      8         128   131,072 (128 KiB)     32 KiB (K|V) 16,384      512 MiB
llama-3.1-70b  80      8         128   327,680 (320 KiB)     32 KiB (K|V) 40,960      1.25 GiB
qwen3-32b      64      8         128   262,144 (256 KiB)     32 KiB (K|V) 32,768      1 GiB
deepseek-r1    61      MLA       576   70,272 (68.6 KiB)     18 KiB       15,616      274.5 MiB
============== ======= ========= ===== ===================== ============ =========== ==============

kvbench's ``io_size`` counts K and V of a block together (``kv_bytes_per_token / layers / tp x
page_size`` = 64 KiB for llama-3.1-8b); vLLM registers K and V as separate regions, so here that
block is two descriptors of half that size. The bytes per request are the same.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

__all__ = [
    "DTYPE_BYTES",
    "KV_MODELS",
    "KVLayout",
    "KVModel",
    "SideLayout",
    "alloc_buffer",
    "block_slots",
    "descs_array",
    "digest_slots",
    "fill_pattern",
    "fmt_size",
    "kv_layout",
    "parse_size",
    "poison_slots",
]

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"4K"``, ``"64MiB"``, ``"1g"``, ``"4096"`` -> bytes (binary units).

    Raises:
        ValueError: not a size.
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 4K, 64M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def fmt_size(n: int) -> str:
    """Bytes in the largest binary unit that divides them (4 KiB, 1.25 GiB for non-multiples)."""
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit:
            v = n / unit
            return f"{v:.0f} {name}" if n % unit == 0 else f"{v:.2f} {name}"
    return f"{n} B"


# --------------------------------------------------------------------------- layouts
@attrs.frozen
class SideLayout:
    """One side's memory: ``regions`` of ``slots`` blocks of ``block`` bytes, plus the blocks a
    request moves.

    Region ``r`` starts at byte ``r * slots * block`` of the side's buffer (or file), so slot ``s``
    of region ``r`` is buffer slot ``r * slots + s``. ``idx`` are buffer slots, in descriptor
    order.
    """

    block: int
    regions: int
    slots: int
    idx: I64 = attrs.field(eq=False)

    @property
    def total_slots(self) -> int:
        """Slots in the whole buffer."""
        return self.regions * self.slots

    @property
    def nbytes(self) -> int:
        """Bytes of buffer (or file) this layout needs."""
        return self.total_slots * self.block


def block_slots(n: int, slots: int, layout: str, rng: np.random.Generator, regions: int = 1) -> I64:
    """Buffer slots of ``n`` blocks per region: the first ``n`` or ``n`` distinct random ones.

    With several regions the same block ids are used in every region (a request's block table is
    shared by all layers), region-major, as vLLM builds its descriptor ids.
    """
    if n > slots:
        raise ValueError(f"{n} blocks do not fit in {slots} slots")
    if layout == "contiguous":
        ids = np.arange(n, dtype=np.int64)
    elif layout == "scattered":
        ids = rng.choice(slots, size=n, replace=False).astype(np.int64)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if regions == 1:
        return ids
    return (np.arange(regions, dtype=np.int64)[:, None] * slots + ids[None, :]).reshape(-1)


def descs_array(base: int, side: SideLayout, dev: int, idx: I64 | None = None) -> U64:
    """The (N, 3) uint64 [addr, len, dev] descriptors of ``idx`` (default: the row's blocks).

    Pass ``np.arange(side.total_slots)`` to describe every slot (a prepared list).
    """
    sel = side.idx if idx is None else idx
    out = np.empty((sel.size, 3), np.uint64)
    np.multiply(sel.astype(np.uint64), np.uint64(side.block), out=out[:, 0])
    out[:, 0] += np.uint64(base)
    out[:, 1] = side.block
    out[:, 2] = dev
    return out


# --------------------------------------------------------------------------- KV models
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "fp32": 4}


@attrs.frozen
class KVModel:
    """The KV-cache shape of a model. ``mla_dim`` > 0 means MLA (one latent per token per layer)."""

    name: str
    layers: int
    kv_heads: int = 0
    head_dim: int = 0
    mla_dim: int = 0

    def bytes_per_token(self, dtype_bytes: int) -> int:
        """KV bytes of one token over all layers (whole model, before TP)."""
        if self.mla_dim:
            return self.layers * self.mla_dim * dtype_bytes
        return self.layers * self.kv_heads * self.head_dim * 2 * dtype_bytes


KV_MODELS: dict[str, KVModel] = {
    m.name: m
    for m in (
        KVModel("llama-3.1-8b", layers=32, kv_heads=8, head_dim=128),
        KVModel("llama-3.1-70b", layers=80, kv_heads=8, head_dim=128),
        KVModel("qwen3-32b", layers=64, kv_heads=8, head_dim=128),
        # kv_lora_rank 512 + qk_rope_head_dim 64
        KVModel("deepseek-r1", layers=61, mla_dim=512 + 64),
    )
}


@attrs.frozen
class KVLayout:
    """One request's KV cache on one TP rank, laid out as vLLM registers it.

    Attributes:
        model, isl, tp, page_size, dtype: the inputs.
        regions: K and V per layer (GQA) or one latent per layer (MLA).
        heads_per_rank: KV heads one rank holds (GQA; 0 for MLA).
        desc_bytes: one block of one region (page_size tokens).
        blocks: blocks per request, ceil(isl / page_size).
        bytes_per_token: KV bytes of a token on this rank (all layers).
    """

    model: KVModel
    isl: int
    tp: int
    page_size: int
    dtype: str
    regions: int
    heads_per_rank: int
    desc_bytes: int
    blocks: int
    bytes_per_token: int

    @property
    def descs(self) -> int:
        """Descriptors per request: one per block per region."""
        return self.regions * self.blocks

    @property
    def request_bytes(self) -> int:
        """Bytes moved per request (whole pages)."""
        return self.descs * self.desc_bytes

    def describe(self) -> str:
        """One line for the report header."""
        m = self.model
        shape = (
            f"MLA {m.mla_dim}/token/layer"
            if m.mla_dim
            else f"{m.kv_heads} KV heads x {m.head_dim} ({self.heads_per_rank}/rank)"
        )
        kind = "latent" if m.mla_dim else "K+V"
        return (
            f"{m.name}: {m.layers} layers, {shape}, {self.dtype}, tp {self.tp}: "
            f"{self.bytes_per_token:,} B/token/rank; isl {self.isl}, page {self.page_size} -> "
            f"{self.blocks} blocks x {self.regions} regions ({kind}) = {self.descs:,} descriptors "
            f"of {fmt_size(self.desc_bytes)} = {fmt_size(self.request_bytes)} per request"
        )


def kv_layout(model: str, isl: int, tp: int, page_size: int, dtype: str) -> KVLayout:
    """Derive one rank's request layout.

    Raises:
        ValueError: unknown model or dtype, non-positive sizes, TP that does not divide the KV
            heads (nor is a multiple of them).
    """
    m = KV_MODELS.get(model.lower())
    if m is None:
        raise ValueError(f"unknown --kv-model {model!r}; known: {', '.join(KV_MODELS)}")
    prec = DTYPE_BYTES.get(dtype.lower())
    if prec is None:
        raise ValueError(f"unknown --dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    for name, v in (("--isl", isl), ("--tp", tp), ("--page-size", page_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if m.mla_dim:
        regions, heads, desc = m.layers, 0, page_size * m.mla_dim * prec
        per_token = m.bytes_per_token(prec)
    else:
        if m.kv_heads % tp and tp % m.kv_heads:
            raise ValueError(
                f"--tp {tp} neither divides nor is a multiple of {m.name}'s {m.kv_heads} KV heads"
            )
        heads = max(1, m.kv_heads // tp)
        regions = 2 * m.layers
        desc = page_size * heads * m.head_dim * prec
        per_token = m.layers * heads * m.head_dim * 2 * prec
    return KVLayout(
        model=m,
        isl=isl,
        tp=tp,
        page_size=page_size,
        dtype=dtype.lower(),
        regions=regions,
        heads_per_rank=heads,
        desc_bytes=desc,
        blocks=math.ceil(isl / page_size),
        bytes_per_token=per_token,
    )


# --------------------------------------------------------------------------- buffers
_PAGE = 4096


def alloc_buffer(mem_type: str, nbytes: int, dev: int = 0) -> Any:
    """A page-aligned uint8 buffer: numpy for DRAM, cupy on GPU ``dev`` for VRAM."""
    if mem_type == "VRAM":
        import cupy

        with cupy.cuda.Device(dev):
            return cupy.empty(nbytes, dtype=cupy.uint8)
    raw = np.empty(nbytes + _PAGE, np.uint8)
    off = (-raw.ctypes.data) % _PAGE
    return raw[off : off + nbytes]


def buffer_addr(buf: Any) -> int:
    """Address of a numpy or cupy buffer."""
    if isinstance(buf, np.ndarray):
        return int(buf.ctypes.data)
    return int(buf.data.ptr)


def _xp(buf: Any) -> Any:
    if isinstance(buf, np.ndarray):
        return np
    import cupy

    return cupy


def _words(xp: Any, n: int, seed: int, start: int = 0) -> Any:
    """``n`` uint64 words of a position-dependent pattern: no two 8-byte words of a buffer are
    equal, and two seeds never produce the same word at the same position."""
    w = xp.arange(start, start + n, dtype=xp.uint64)
    w *= xp.uint64(0x9E3779B97F4A7C15)
    w ^= xp.uint64((seed * 0xBF58476D1CE4E5B9 + 1) & 0xFFFF_FFFF_FFFF_FFFF)
    return w


def fill_pattern(buf: Any, seed: int) -> None:
    """Fill a whole buffer (length a multiple of 8) with the pattern of ``seed``; touches every
    page, so no page fault lands in a timed loop."""
    xp = _xp(buf)
    words = buf.view(xp.uint64)
    step = 1 << 24  # 128 MiB at a time keeps the temporary small
    for start in range(0, words.size, step):
        n = min(step, words.size - start)
        words[start : start + n] = _words(xp, n, seed, start)


def _rows(buf: Any, block: int) -> Any:
    n = (int(buf.size) // block) * block
    return buf[:n].reshape(-1, block)


def poison_slots(buf: Any, block: int, slots: I64, seed: int) -> None:
    """Overwrite the given slots with a pattern no transfer source holds (before a --check row)."""
    xp = _xp(buf)
    rows = _rows(buf, block)
    sel = xp.asarray(slots)
    total = int(slots.size) * block
    fresh = _words(xp, -(-total // 8), seed).view(xp.uint8)[:total].reshape(-1, block)
    rows[sel] = fresh


def digest_slots(buf: Any, block: int, slots: I64) -> str:
    """blake2b of the given slots' bytes, concatenated in the given order."""
    xp = _xp(buf)
    gathered = _rows(buf, block)[xp.asarray(slots)]
    host = gathered if xp is np else xp.asnumpy(gathered)
    return hashlib.blake2b(np.ascontiguousarray(host).data).hexdigest()


def digest_file_slots(path: str, block: int, slots: I64) -> str:
    """The same digest over blocks of a file (slot s = bytes s*block .. (s+1)*block)."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        return digest_slots(mm, block, slots)
    finally:
        del mm


def poison_file_slots(path: str, block: int, slots: I64, seed: int) -> None:
    """Overwrite blocks of a file with a fresh pattern (flushed before returning)."""
    mm = np.memmap(path, dtype=np.uint8, mode="r+")
    try:
        poison_slots(mm, block, slots, seed)
        mm.flush()
    finally:
        del mm


def split_ids(text: str, count: int = 2) -> Sequence[int]:
    """``"0,1"`` -> (0, 1); a single id is used for both sides."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--devices expects GPU indices like 0,1, got {text!r}") from None
    if not ids or len(ids) > count or any(i < 0 for i in ids):
        raise ValueError(f"--devices expects one or two GPU indices like 0,1, got {text!r}")
    return ids * count if len(ids) == 1 else ids
