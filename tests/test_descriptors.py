"""Descriptor lists: construction from every input kind, views, strided builder."""

from __future__ import annotations

import numpy as np
import pytest

from nixl_core import DescList, InvalidDescriptorError, MemType, MemTypeError, RegDescList
from nixl_core.descriptors import as_descs, as_reg_descs


def test_from_uint64_array_is_zero_copy() -> None:
    """A C-contiguous uint64 (N, 3) array is wrapped without copying and made read-only."""
    arr = np.arange(30, dtype=np.uint64).reshape(10, 3)
    d = DescList.from_array(arr, "DRAM")
    assert np.shares_memory(d.array, arr)
    assert not d.array.flags.writeable
    assert arr.flags.writeable  # the caller's array is untouched


def test_from_int64_array_converts_and_rejects_negatives() -> None:
    """int64 input is converted; a negative field raises naming the row."""
    d = DescList.from_array(np.array([[1, 2, 0]], np.int64), "VRAM")
    assert d.array.dtype == np.uint64 and d.mem_type is MemType.VRAM
    with pytest.raises(InvalidDescriptorError) as ei:
        DescList.from_array(np.array([[1, 2, 0], [5, -1, 0]], np.int64), "DRAM")
    assert ei.value.index == 1


def test_wrong_shape_rejected() -> None:
    """An array that is not (N, 3) is refused."""
    with pytest.raises(InvalidDescriptorError, match=r"\(N, 3\)"):
        DescList.from_array(np.zeros((4, 2), np.uint64), "DRAM")


def test_from_tuples_and_bad_tuple() -> None:
    """Tuples convert once; a malformed tuple is named in the error."""
    d = DescList.from_tuples([(0x1000, 16, 0), (0x2000, 32, 1)], "DRAM")
    assert d[1] == (0x2000, 32, 1)
    assert list(d) == [(0x1000, 16, 0), (0x2000, 32, 1)]
    with pytest.raises(InvalidDescriptorError, match="item 1"):
        DescList.from_tuples([(1, 2, 3), (1, -2, 3)], "DRAM")


def test_columns_len_total_and_slicing() -> None:
    """Columns are views; slices and index arrays give new lists; total_bytes sums lengths."""
    d = DescList.strided("DRAM", 0x1000, 0x100, 8, 0x80)
    assert len(d) == 8 and d.total_bytes == 8 * 0x80
    assert d.addrs[3] == 0x1300 and d.lengths[0] == 0x80 and d.devices[0] == 0
    sub = d[np.array([7, 0])]
    assert isinstance(sub, DescList) and sub[0] == (0x1700, 0x80, 0)
    assert len(d[2:5]) == 3


def test_strided_kv_layout() -> None:
    """layers x K/V regions x blocks become region-major descriptors without a loop."""
    layers, blocks, blk = 4, 16, 4096
    bases = np.arange(2 * layers, dtype=np.uint64) * np.uint64(1 << 30)
    d = DescList.strided("VRAM", bases, blk, blocks, blk, dev=3)
    assert len(d) == 2 * layers * blocks
    assert d[blocks] == (1 << 30, blk, 3)
    assert d[blocks + 5] == ((1 << 30) + 5 * blk, blk, 3)
    assert d.mem_type is MemType.VRAM


def test_strided_per_region_lengths_and_devices() -> None:
    """base, length and dev broadcast per region."""
    d = DescList.strided("VRAM", [0, 1000], 10, 2, [4, 8], dev=[0, 1])
    assert list(d) == [(0, 4, 0), (10, 4, 0), (1000, 8, 1), (1010, 8, 1)]


def test_strided_rejects_negative_count() -> None:
    """A negative count is refused."""
    with pytest.raises(InvalidDescriptorError):
        DescList.strided("DRAM", 0, 1, -1, 1)


def test_from_numpy_objects() -> None:
    """Numpy arrays are described as DRAM regions; non-contiguous arrays are refused."""
    a = np.zeros(100, np.float32)
    b = np.zeros((4, 4), np.uint8)
    d = DescList.from_objects([a, b])
    assert d.mem_type is MemType.DRAM
    assert d[0] == (a.ctypes.data, 400, 0) and d[1] == (b.ctypes.data, 16, 0)
    with pytest.raises(InvalidDescriptorError, match=r"object 0.*not C-contiguous"):
        DescList.from_objects([b.T[:, ::2]])


class _FakeCuda:
    """An object exposing only __cuda_array_interface__, like a GPU array of another library."""

    def __init__(self, ptr: int, shape: tuple[int, ...], strides: tuple[int, ...] | None) -> None:
        self.__cuda_array_interface__ = {
            "data": (ptr, False),
            "shape": shape,
            "typestr": "<f2",
            "strides": strides,
            "version": 3,
        }


def test_cuda_array_interface_is_vram() -> None:
    """__cuda_array_interface__ objects become VRAM; non-contiguous strides are refused."""
    d = DescList.from_objects(_FakeCuda(0xABC000, (8, 16), None))
    assert d.mem_type is MemType.VRAM and d[0] == (0xABC000, 256, 0)
    with pytest.raises(InvalidDescriptorError):
        DescList.from_objects(_FakeCuda(0xABC000, (8, 16), (64, 2)))


def test_dlpack_object() -> None:
    """A DLPack-only object is read through its capsule."""

    class OnlyDlpack:
        def __init__(self, arr: np.ndarray) -> None:
            self._arr = arr

        def __dlpack__(self, **kw: object) -> object:
            return self._arr.__dlpack__()

        def __dlpack_device__(self) -> tuple[int, int]:
            return self._arr.__dlpack_device__()

    a = np.arange(10, dtype=np.int64)
    d = DescList.from_objects(OnlyDlpack(a))
    assert d[0] == (a.ctypes.data, 80, 0) and d.mem_type is MemType.DRAM


def test_mixed_mem_types_rejected() -> None:
    """One list holds one memory type."""
    with pytest.raises(MemTypeError, match="object 1"):
        DescList.from_objects([np.zeros(4), _FakeCuda(0x1000, (4,), None)])


def test_object_without_interface() -> None:
    """Objects with no memory interface raise naming their type."""
    with pytest.raises(InvalidDescriptorError, match="str"):
        DescList.from_objects(["nope"])


def test_as_descs_dispatch() -> None:
    """as_descs accepts arrays, tuples, objects and lists; arrays need a mem type."""
    arr = np.zeros((2, 3), np.uint64)
    assert len(as_descs(arr, "DRAM")) == 2
    with pytest.raises(MemTypeError):
        as_descs(arr)
    with pytest.raises(MemTypeError):
        as_descs([(1, 2, 3)])
    assert as_descs(np.zeros(16, np.uint8)).mem_type is MemType.DRAM
    with pytest.raises(MemTypeError):
        as_descs(DescList.from_array(arr, "DRAM"), "VRAM")


def test_reg_descs_from_four_tuples_and_trim() -> None:
    """4-tuples carry metas; trim drops them; equality includes metas."""
    r = as_reg_descs([(0, 0, 5, "rw:/tmp/x"), (0, 0, 6, b"")], "FILE")
    assert isinstance(r, RegDescList) and r.metas == (b"rw:/tmp/x", b"")
    assert r.trim() == DescList.from_tuples([(0, 0, 5), (0, 0, 6)], "FILE")
    assert r != RegDescList("FILE", r.array, [b"", b""])
    with pytest.raises(InvalidDescriptorError):
        RegDescList("FILE", r.array, [b""])


def test_mem_type_aliases() -> None:
    """NIXL's spellings parse; unknown names raise MemTypeError."""
    assert MemType.parse("cpu") is MemType.DRAM
    assert MemType.parse("VRAM_SEG") is MemType.VRAM
    assert MemType.parse("BLOCK") is MemType.BLK
    with pytest.raises(MemTypeError, match="V-RAM"):
        MemType.parse("V-RAM")


def test_concat_and_repr() -> None:
    """Lists of one type concatenate; repr shows the head."""
    a = DescList.strided("DRAM", 0, 8, 4, 8)
    assert len(a.concat(a)) == 8
    assert "n=4" in repr(a)
    with pytest.raises(MemTypeError):
        a.concat(DescList.strided("VRAM", 0, 8, 4, 8))
