"""Builds the cffi extension ``nixl_ucx._ucx_ext``; everything else is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["nixl_ucx/_build.py:ffibuilder"])
