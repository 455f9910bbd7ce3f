"""Facts about this machine: CPU, memory, GPUs, file systems, installed plugins.

They fill the report's header and the JSON ``meta`` (what the figures were measured on), and
answer the pre-flight questions of the plan (is there memory for the buffers, a GPU for VRAM).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess

__all__ = [
    "cpu_model",
    "fs_type",
    "gpu_names",
    "gpu_status",
    "mem_available",
    "mem_total",
    "plugin_versions",
]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo(key: str, default: int) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return default


def mem_total() -> int:
    """Bytes of RAM (0 when ``/proc/meminfo`` cannot be read)."""
    return _meminfo("MemTotal", 0)


def mem_available() -> int:
    """Bytes of memory available now (unbounded when ``/proc/meminfo`` cannot be read)."""
    return _meminfo("MemAvailable", 1 << 62)


def gpu_names() -> list[str]:
    """The GPUs ``nvidia-smi`` lists (none without it)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [x.strip() for x in out.stdout.splitlines() if x.strip()]


def gpu_status() -> tuple[int, str]:
    """(number of CUDA GPUs, why none) as cupy sees them; cupy is only imported if installed."""
    if importlib.util.find_spec("cupy") is None:
        return 0, "cupy is not installed (pip install cupy-cuda12x or cupy-cuda13x)"
    try:
        import cupy

        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError without a driver or device
        return 0, f"CUDA is not usable: {exc}"
    return n, "" if n else "no CUDA GPU is visible"


def fs_type(path: str) -> str:
    """The file system type of the mount that holds ``path`` ("?" when unknown)."""
    best, fs = "", "?"
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mnt = parts[1]
                    inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                    if inside and len(mnt) > len(best):
                        best, fs = mnt, parts[2]
    except OSError:
        pass
    return fs


def plugin_versions() -> dict[str, str]:
    """Distribution name -> version of every installed ``nixl.backends`` plugin."""
    from importlib.metadata import entry_points

    out: dict[str, str] = {}
    for ep in entry_points(group="nixl.backends"):
        dist = getattr(ep, "dist", None)
        if dist is not None:
            out[dist.metadata["Name"]] = dist.version
    return out
