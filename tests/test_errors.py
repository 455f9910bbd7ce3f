"""The error tree: status mapping and public names."""

from __future__ import annotations

import pytest

import nixl_core
from nixl_core import errors


def test_every_error_status_maps_to_an_exception() -> None:
    """Each NIXL error status has an exception class carrying that status."""
    for st in errors.Status:
        if st in (errors.Status.IN_PROG, errors.Status.SUCCESS):
            with pytest.raises(ValueError, match="not an error"):
                errors.error_for_status(st)
            continue
        cls = errors.error_for_status(st)
        assert issubclass(cls, errors.NixlError)
        if st is errors.Status.ERR_NO_TELEMETRY:  # telemetry is always on: "not yet" = not posted
            assert cls is errors.NotPostedError
        else:
            assert cls.status is st or st is errors.Status.ERR_UNKNOWN


def test_builtin_bases() -> None:
    """Errors subclass the builtins generic code catches."""
    assert issubclass(errors.InvalidDescriptorError, ValueError)
    assert issubclass(errors.MemTypeError, TypeError)
    assert issubclass(errors.BackendNotFoundError, LookupError)
    assert issubclass(errors.RemoteDisconnectError, ConnectionError)
    assert issubclass(errors.TransferTimeoutError, TimeoutError)
    assert issubclass(errors.NixlError, RuntimeError)


def _isort_key(name: str) -> tuple[int, str]:
    # ruff's RUF022 order: CONSTANTS, then Classes, then functions
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted (isort style) and every name in it exists."""
    for mod in (nixl_core, errors):
        assert list(mod.__all__) == sorted(mod.__all__, key=_isort_key)
        for name in mod.__all__:
            assert hasattr(mod, name), name
