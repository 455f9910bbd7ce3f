"""Descriptor lists: a memory type plus a read-only numpy (N, 3) uint64 array [addr, len, dev].

Descriptor lists are numpy arrays from the user's call to the backend. Everything that builds one
is vectorized: from an Nx3 array (zero-copy when it is already C-contiguous uint64), from tuples
(converted once by numpy), from tensors or any object exposing ``__array_interface__``,
``__cuda_array_interface__`` or DLPack, and from the strided builder that turns a paged KV cache
of layers x K/V x blocks into one list without a Python loop.

A :class:`RegDescList` adds one bytes field per region (NIXL's ``metaInfo``: a file path for
path-mode FILE registrations, an object key, ...).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from nixl_core.errors import InvalidDescriptorError, MemTypeError
from nixl_core.memory import MemType

__all__ = ["DescList", "RegDescList", "as_descs", "as_reg_descs"]

U64 = npt.NDArray[np.uint64]

_EMPTY = np.empty((0, 3), np.uint64)
_EMPTY.flags.writeable = False


def _readonly(arr: U64) -> U64:
    if arr.flags.writeable:
        arr = arr.view()
        arr.flags.writeable = False
    return arr


def _to_u64_rows(arr: Any, what: str = "descriptor") -> U64:
    """Validate and convert an (N, 3) integer array to read-only C-contiguous uint64."""
    a = np.asarray(arr)
    if a.ndim == 1 and a.shape[0] == 3:
        a = a.reshape(1, 3)
    if a.ndim != 2 or a.shape[1] != 3:
        raise InvalidDescriptorError(
            f"{what} array must have shape (N, 3) [addr, len, dev], got {a.shape}"
        )
    if a.dtype == np.uint64:
        return _readonly(np.ascontiguousarray(a))
    if a.size == 0:
        return _EMPTY
    if a.dtype.kind == "i":
        neg = a < 0
        if neg.any():
            bad = int(np.argmax(neg.any(axis=1)))
            raise InvalidDescriptorError(
                f"{what} {bad} has a negative field: {a[bad].tolist()}", index=bad
            )
        return _readonly(np.ascontiguousarray(a, dtype=np.uint64))
    if a.dtype.kind == "u":
        return _readonly(np.ascontiguousarray(a, dtype=np.uint64))
    if a.dtype == object:
        try:
            return _to_u64_rows(np.array(a.tolist(), dtype=np.int64), what)
        except (OverflowError, TypeError, ValueError):
            try:
                return _readonly(np.array(a.tolist(), dtype=np.uint64))
            except (OverflowError, TypeError, ValueError) as exc:
                raise InvalidDescriptorError(f"{what} array holds non-integers: {exc}") from exc
    raise InvalidDescriptorError(f"{what} array must hold integers, got dtype {a.dtype}")


class DescList:
    """A transfer descriptor list: ``mem_type`` and a read-only (N, 3) uint64 array.

    Build one with :meth:`from_array`, :meth:`from_tuples`, :meth:`from_objects`,
    :meth:`strided` or the generic :func:`as_descs`. Columns are :attr:`addrs`,
    :attr:`lengths` and :attr:`devices`. Indexing with a slice or an index array returns a new
    list (a numpy gather); indexing with an int returns an ``(addr, len, dev)`` tuple.
    """

    __slots__ = ("_arr", "mem_type")

    def __init__(self, mem_type: MemType | str, array: Any = _EMPTY) -> None:
        self.mem_type = MemType.parse(mem_type)
        self._arr = _to_u64_rows(array)

    @classmethod
    def _wrap(cls, mem_type: MemType, arr: U64) -> DescList:
        """Wrap an already valid read-only uint64 (N, 3) array without checks."""
        obj = cls.__new__(cls)
        obj.mem_type = mem_type
        obj._arr = arr
        return obj

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_array(cls, array: Any, mem_type: MemType | str) -> DescList:
        """From an (N, 3) integer array; zero-copy when it is C-contiguous uint64.

        Raises:
            InvalidDescriptorError: wrong shape, dtype or a negative field.
        """
        return cls(mem_type, array)

    @classmethod
    def from_tuples(cls, tuples: Sequence[Sequence[int]], mem_type: MemType | str) -> DescList:
        """From a sequence of ``(addr, len, dev)`` tuples, converted once by numpy.

        Raises:
            InvalidDescriptorError: a tuple does not have 3 non-negative integer fields.
        """
        if len(tuples) == 0:
            return cls._wrap(MemType.parse(mem_type), _EMPTY)
        try:
            arr = np.array(tuples, dtype=np.uint64)
        except (OverflowError, TypeError, ValueError) as exc:
            raise InvalidDescriptorError(
                f"descriptor tuples must be (addr, len, dev) non-negative integers: "
                f"{_first_bad_tuple(tuples, 3)}"
            ) from exc
        return cls(mem_type, arr)

    @classmethod
    def from_objects(cls, objs: Any, mem_type: MemType | str | None = None) -> DescList:
        """One descriptor per tensor-like object (or one for a single object).

        Accepts torch tensors, objects exposing ``__cuda_array_interface__``,
        ``__array_interface__`` or DLPack. The memory type and device are inferred (VRAM + GPU
        index for device memory, DRAM + 0 for host memory); all objects must agree.

        Raises:
            InvalidDescriptorError: an object is not contiguous or exposes no memory interface.
            MemTypeError: objects live in different memory types, or ``mem_type`` disagrees.
        """
        items = [objs] if _is_tensor_like(objs) else list(objs)
        rows = np.empty((len(items), 3), np.uint64)
        found: MemType | None = None
        for i, obj in enumerate(items):  # one iteration per tensor, not per descriptor
            mt, addr, nbytes, dev = _describe_object(obj, i)
            if found is None:
                found = mt
            elif mt is not found:
                raise MemTypeError(
                    f"object {i} is {mt.value} memory but object 0 is {found.value}: "
                    "one list holds one memory type"
                )
            rows[i] = (addr, nbytes, dev)
        want = MemType.parse(mem_type) if mem_type is not None else None
        if want is not None and found is not None and want is not found:
            raise MemTypeError(
                f"objects are {found.value} memory but mem_type={want.value} was given"
            )
        return cls._wrap(want or found or MemType.DRAM, _readonly(rows))

    @classmethod
    def strided(
        cls,
        mem_type: MemType | str,
        base: int | npt.ArrayLike,
        stride: int | npt.ArrayLike,
        count: int,
        length: int | npt.ArrayLike,
        dev: int | npt.ArrayLike = 0,
    ) -> DescList:
        """Descriptors ``base[r] + i * stride[r]`` for every region r and i in ``range(count)``.

        ``base``, ``stride``, ``length`` and ``dev`` are scalars or 1-D arrays with one entry per
        region (broadcast together). Rows are region-major: region 0's ``count`` blocks come
        first. A paged KV cache of L layers, K and V, B blocks of ``block_bytes``::

            DescList.strided("VRAM", base=kv_region_ptrs, stride=block_bytes, count=B,
                             length=block_bytes, dev=gpu)

        gives ``2 * L * B`` descriptors in one vectorized step.

        Raises:
            InvalidDescriptorError: negative values, or count < 0.
        """
        if count < 0:
            raise InvalidDescriptorError(f"count must be >= 0, got {count}")
        try:
            b, s, ln, d = np.broadcast_arrays(
                *(np.atleast_1d(np.asarray(x, dtype=np.int64)) for x in (base, stride, length, dev))
            )
        except OverflowError:
            b, s, ln, d = np.broadcast_arrays(
                *(
                    np.atleast_1d(np.asarray(x, dtype=np.uint64))
                    for x in (base, stride, length, dev)
                )
            )
        for name, col in (("base", b), ("stride", s), ("length", ln), ("dev", d)):
            if col.ndim != 1:
                raise InvalidDescriptorError(f"strided {name} must be a scalar or a 1-D array")
            if col.dtype.kind == "i" and (col < 0).any():
                raise InvalidDescriptorError(f"strided {name} has a negative entry")
        n_regions = b.shape[0]
        out = np.empty((n_regions, count, 3), np.uint64)
        steps = np.arange(count, dtype=np.uint64)
        np.multiply(s.astype(np.uint64)[:, None], steps[None, :], out=out[:, :, 0])
        out[:, :, 0] += b.astype(np.uint64)[:, None]
        out[:, :, 1] = ln.astype(np.uint64)[:, None]
        out[:, :, 2] = d.astype(np.uint64)[:, None]
        return cls._wrap(MemType.parse(mem_type), _readonly(out.reshape(n_regions * count, 3)))

    # ----------------------------------------------------------------- views
    @property
    def array(self) -> U64:
        """The read-only (N, 3) uint64 array [addr, len, dev]."""
        return self._arr

    @property
    def addrs(self) -> U64:
        """Column view of addresses (offsets for storage types)."""
        return self._arr[:, 0]

    @property
    def lengths(self) -> U64:
        """Column view of lengths in bytes."""
        return self._arr[:, 1]

    @property
    def devices(self) -> U64:
        """Column view of device ids (GPU index, fd, volume, key)."""
        return self._arr[:, 2]

    @property
    def total_bytes(self) -> int:
        """Sum of lengths."""
        return int(self._arr[:, 1].sum(dtype=np.uint64))

    def __len__(self) -> int:
        return int(self._arr.shape[0])

    @overload
    def __getitem__(self, key: int) -> tuple[int, int, int]: ...
    @overload
    def __getitem__(self, key: slice | npt.NDArray[Any] | Sequence[int]) -> DescList: ...

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)):
            a, ln, d = self._arr[int(key)].tolist()
            return (a, ln, d)
        return self._subset(np.asarray(self._arr[key]).reshape(-1, 3), key)

    def _subset(self, rows: U64, key: Any) -> DescList:
        return DescList._wrap(self.mem_type, _readonly(np.ascontiguousarray(rows)))

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """Convenience iteration as tuples (never used on a data path)."""
        yield from (tuple(r) for r in self._arr.tolist())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DescList):
            return NotImplemented
        return self.mem_type is other.mem_type and bool(np.array_equal(self._arr, other._arr))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n = len(self)
        head = ", ".join(f"(0x{a:x}, {ln}, {d})" for a, ln, d in self._arr[:3].tolist())
        more = f", ... {n - 3} more" if n > 3 else ""
        return f"{type(self).__name__}({self.mem_type.value}, n={n}, [{head}{more}])"

    def concat(self, *others: DescList) -> DescList:
        """Concatenate lists of the same memory type.

        Raises:
            MemTypeError: a list has another memory type.
        """
        for i, o in enumerate(others):
            if o.mem_type is not self.mem_type:
                raise MemTypeError(
                    f"cannot concatenate {o.mem_type.value} list {i} to a {self.mem_type.value} list"
                )
        arr = np.concatenate([self._arr, *(o._arr for o in others)])
        return DescList._wrap(self.mem_type, _readonly(arr))


class RegDescList(DescList):
    """A registration list: a :class:`DescList` plus one bytes field per region.

    ``metas[i]`` is NIXL's ``metaInfo``: e.g. ``b"rw,direct:/data/kv.bin"`` for a path-mode FILE
    registration, an object key for OBJ. Empty bytes when unused.
    """

    __slots__ = ("metas",)

    def __init__(
        self, mem_type: MemType | str, array: Any = _EMPTY, metas: Sequence[bytes] | None = None
    ) -> None:
        super().__init__(mem_type, array)
        self.metas = _check_metas(metas, len(self))

    @classmethod
    def from_descs(cls, descs: DescList, metas: Sequence[bytes | str] | None = None) -> RegDescList:
        """Attach metas (default: empty) to a descriptor list."""
        obj = cls.__new__(cls)
        obj.mem_type = descs.mem_type
        obj._arr = descs.array
        obj.metas = _check_metas(metas, len(descs))
        return obj

    def _subset(self, rows: U64, key: Any) -> DescList:
        idx = np.arange(len(self))[key]
        metas = tuple(self.metas[int(i)] for i in np.atleast_1d(idx))
        return RegDescList.from_descs(
            DescList._wrap(self.mem_type, _readonly(np.ascontiguousarray(rows))), metas
        )

    def trim(self) -> DescList:
        """The descriptors without their metas (NIXL's ``trim()``)."""
        return DescList._wrap(self.mem_type, self._arr)

    __hash__ = None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RegDescList):
            return super().__eq__(other) and self.metas == other.metas
        return super().__eq__(other)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", metas={list(self.metas[:3])})"


def _check_metas(metas: Sequence[bytes | str] | None, n: int) -> tuple[bytes, ...]:
    if metas is None:
        return (b"",) * n
    out = tuple(m.encode() if isinstance(m, str) else bytes(m) for m in metas)
    if len(out) != n:
        raise InvalidDescriptorError(f"{len(out)} metas given for {n} descriptors")
    return out


def _first_bad_tuple(tuples: Sequence[Any], arity: int) -> str:
    for i, t in enumerate(tuples):
        try:
            ok = len(t) == arity and all(
                isinstance(v, (int, np.integer)) and int(v) >= 0 for v in t[:3]
            )
        except TypeError:
            ok = False
        if not ok:
            return f"item {i} is {t!r}"
    return "values out of the uint64 range"


# --------------------------------------------------------------------------- objects
def _is_tensor_like(obj: Any) -> bool:
    return (
        hasattr(obj, "__cuda_array_interface__")
        or hasattr(obj, "__array_interface__")
        or hasattr(obj, "__dlpack__")
        or _is_torch_tensor(obj)
    )


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch: only look when the caller already has
    return torch is not None and isinstance(obj, torch.Tensor)


def _c_contiguous(shape: Sequence[int], strides: Sequence[int] | None, itemsize: int) -> bool:
    if strides is None:
        return True
    expected = itemsize
    for dim, st in zip(reversed(shape), reversed(strides), strict=True):
        if dim != 1 and st != expected:
            return False
        expected *= dim
    return True


def _describe_object(obj: Any, i: int) -> tuple[MemType, int, int, int]:
    """(mem_type, addr, nbytes, dev) of a tensor-like object; raises if not contiguous."""
    if _is_torch_tensor(obj):
        if not obj.is_contiguous():
            raise InvalidDescriptorError(
                f"object {i}: torch tensor of shape {tuple(obj.shape)} is not contiguous; "
                "pass tensor.contiguous() or describe its blocks with a strided list",
                index=i,
            )
        dev = obj.device
        nbytes = obj.numel() * obj.element_size()
        if dev.type == "cuda":
            return MemType.VRAM, int(obj.data_ptr()), nbytes, int(dev.index or 0)
        if dev.type == "cpu":
            return MemType.DRAM, int(obj.data_ptr()), nbytes, 0
        raise MemTypeError(f"object {i}: torch device {dev.type!r} has no NIXL memory type")
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        shape = tuple(cai["shape"])
        itemsize = np.dtype(cai["typestr"]).itemsize
        if not _c_contiguous(shape, cai.get("strides"), itemsize):
            raise InvalidDescriptorError(
                f"object {i}: device array of shape {shape} is not C-contiguous", index=i
            )
        dev_id = 0
        device = getattr(obj, "device", None)
        if device is not None and hasattr(device, "id"):
            dev_id = int(device.id)
        elif hasattr(obj, "__dlpack_device__"):
            dev_id = int(obj.__dlpack_device__()[1])
        return (
            MemType.VRAM,
            int(cai["data"][0]),
            int(np.prod(shape, dtype=np.int64)) * itemsize,
            dev_id,
        )
    ai = getattr(obj, "__array_interface__", None)
    if ai is not None:
        shape = tuple(ai["shape"])
        itemsize = np.dtype(ai["typestr"]).itemsize
        if not _c_contiguous(shape, ai.get("strides"), itemsize):
            raise InvalidDescriptorError(
                f"object {i}: array of shape {shape} is not C-contiguous; pass "
                "np.ascontiguousarray(a) or describe its blocks with a strided list",
                index=i,
            )
        offset = int(ai.get("offset", 0) or 0)
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        return MemType.DRAM, int(ai["data"][0]) + offset, nbytes, 0
    if hasattr(obj, "__dlpack__"):
        return _describe_dlpack(obj, i)
    raise InvalidDescriptorError(
        f"object {i} of type {type(obj).__name__} exposes no memory interface (torch tensor, "
        "__cuda_array_interface__, __array_interface__ or DLPack)",
        index=i,
    )


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_KDL_CPU, _KDL_CUDA, _KDL_CUDA_HOST, _KDL_CUDA_MANAGED = 1, 2, 3, 13


def _describe_dlpack(obj: Any, i: int) -> tuple[MemType, int, int, int]:
    """Read a DLPack capsule's DLTensor header (first member of DLManagedTensor) with ctypes."""
    capsule = obj.__dlpack__()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    ptr = get(capsule, b"dltensor")
    t = _DLTensor.from_address(ptr)
    ndim = int(t.ndim)
    shape = [int(t.shape[k]) for k in range(ndim)]
    strides = [int(t.strides[k]) for k in range(ndim)] if t.strides else None
    bits = int(t.dtype.bits) * int(t.dtype.lanes)
    itemsize = max(bits // 8, 1)
    # DLPack strides count elements, not bytes.
    if not _c_contiguous(shape, strides, 1):
        raise InvalidDescriptorError(
            f"object {i}: DLPack tensor of shape {shape} is not contiguous", index=i
        )
    dev_type = int(t.device.device_type)
    if dev_type in (_KDL_CPU, _KDL_CUDA_HOST):
        mt, dev = MemType.DRAM, 0
    elif dev_type in (_KDL_CUDA, _KDL_CUDA_MANAGED):
        mt, dev = MemType.VRAM, int(t.device.device_id)
    else:
        raise MemTypeError(f"object {i}: DLPack device type {dev_type} has no NIXL memory type")
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    return mt, int(t.data or 0) + int(t.byte_offset), nbytes, dev


# --------------------------------------------------------------------------- generic
def _is_desc_array(obj: Any) -> bool:
    """An (N, 3) 64-bit integer ndarray is a descriptor array (NIXL's rule); any other array
    is memory to describe."""
    return (
        isinstance(obj, np.ndarray)
        and obj.ndim == 2
        and obj.shape[1] == 3
        and obj.dtype in (np.uint64, np.int64)
    )


def as_descs(obj: Any, mem_type: MemType | str | None = None) -> DescList:
    """Convert any supported input to a :class:`DescList`.

    Accepts a DescList (returned as is), an (N, 3) integer array, a list of ``(addr, len, dev)``
    tuples, a tensor-like object or a list of them. Arrays and tuples need ``mem_type``.

    Raises:
        MemTypeError: ``mem_type`` missing for arrays/tuples, or disagreeing with the list's.
        InvalidDescriptorError: malformed input.
    """
    if isinstance(obj, DescList):
        if mem_type is not None and MemType.parse(mem_type) is not obj.mem_type:
            raise MemTypeError(
                f"descriptor list is {obj.mem_type.value} but mem_type={MemType.parse(mem_type).value}"
            )
        return obj.trim() if isinstance(obj, RegDescList) else obj
    if _is_desc_array(obj):
        if mem_type is None:
            raise MemTypeError("mem_type is required for descriptor arrays")
        return DescList.from_array(obj, mem_type)
    if _is_tensor_like(obj):
        return DescList.from_objects(obj, mem_type)
    if isinstance(obj, (list, tuple)):
        if len(obj) == 0:
            if mem_type is None:
                raise MemTypeError("mem_type is required for an empty descriptor list")
            return DescList._wrap(MemType.parse(mem_type), _EMPTY)
        first = obj[0]
        if isinstance(first, (tuple, list)):
            if mem_type is None:
                raise MemTypeError("mem_type is required for descriptor tuples")
            return DescList.from_tuples(obj, mem_type)
        if _is_tensor_like(first):
            return DescList.from_objects(obj, mem_type)
    raise InvalidDescriptorError(
        f"cannot build descriptors from {type(obj).__name__}: pass an (N, 3) array, (addr, len, dev) "
        "tuples, a DescList or tensors"
    )


def as_reg_descs(
    obj: Any, mem_type: MemType | str | None = None, metas: Sequence[bytes | str] | None = None
) -> RegDescList:
    """Convert any supported input to a :class:`RegDescList`.

    Accepts what :func:`as_descs` accepts plus ``(addr, len, dev, meta)`` 4-tuples.

    Raises:
        MemTypeError, InvalidDescriptorError: as :func:`as_descs`.
    """
    if isinstance(obj, RegDescList):
        if metas is not None:
            return RegDescList.from_descs(obj, metas)
        if mem_type is not None and MemType.parse(mem_type) is not obj.mem_type:
            raise MemTypeError(
                f"registration list is {obj.mem_type.value} but mem_type={MemType.parse(mem_type).value}"
            )
        return obj
    if (
        isinstance(obj, (list, tuple))
        and obj
        and isinstance(obj[0], (tuple, list))
        and len(obj[0]) == 4
    ):
        if mem_type is None:
            raise MemTypeError("mem_type is required for registration tuples")
        if any(len(t) != 4 for t in obj):
            raise InvalidDescriptorError(
                f"registration tuples must be (addr, len, dev, meta): {_first_bad_tuple(obj, 4)}"
            )
        base = DescList.from_tuples([t[:3] for t in obj], mem_type)
        return RegDescList.from_descs(base, metas if metas is not None else [t[3] for t in obj])
    return RegDescList.from_descs(as_descs(obj, mem_type), metas)
