"""Two "hosts": network namespaces joined by a veth pair, UCX over TCP between them.

The test creates the namespaces, the veth pair and its addresses (198.18.0.0/30, the benchmark
range: nothing outside this machine) and removes them afterwards. It needs root and iproute2
(``ip``); it is skipped, with the reason, without them. Data is verified by digests computed on
both hosts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.netns

HOST = Path(__file__).with_name("netns_host.py")
NBLK, BLK = 2048, 4096


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _wait_running(*links: tuple[str, str]) -> None:
    """Wait (bounded) until each veth end has carrier: UCX ignores interfaces not RUNNING."""
    deadline = time.monotonic() + 10
    for ns, dev in links:
        while True:
            out = subprocess.run(
                ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/carrier"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout.strip()
            flags = subprocess.run(
                ["ip", "-n", ns, "-o", "link", "show", "dev", dev],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
            if out == "1" and "LOWER_UP" in flags:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"veth {dev} in {ns} never came up: {flags}")
            time.sleep(0.02)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str, str, str]]:
    """Two namespaces with a veth pair 198.18.0.1 <-> 198.18.0.2; removed at teardown."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed: apt-get install iproute2")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b = f"nxa-{tag}", f"nxb-{tag}"
    dev_a, dev_b = f"nxa{tag}", f"nxb{tag}"
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
    except subprocess.CalledProcessError as exc:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.decode().strip()}")
    try:
        _ip(
            "link",
            "add",
            dev_a,
            "netns",
            ns_a,
            "type",
            "veth",
            "peer",
            "name",
            dev_b,
            "netns",
            ns_b,
        )
        for ns, dev, addr in ((ns_a, dev_a, "198.18.0.1/30"), (ns_b, dev_b, "198.18.0.2/30")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _wait_running((ns_a, dev_a), (ns_b, dev_b))
        yield ns_a, dev_a, ns_b, dev_b
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _start(ns: str, role: str, dev: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, str(HOST), role, dev, str(NBLK), str(BLK)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _line(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        pytest.fail(f"host process ended early (exit {proc.wait(10)}):\n{err}")
    out: dict[str, object] = json.loads(line)
    return out


def _send(proc: subprocess.Popen[str], **kw: object) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(kw) + "\n")
    proc.stdin.flush()


def _digest(a: np.ndarray) -> str:
    import hashlib

    return hashlib.blake2b(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_write_and_read_across_namespaces(namespaces: tuple[str, str, str, str]) -> None:
    """A scattered WRITE and READ between two namespaces over TCP arrive intact on both hosts."""
    ns_a, dev_a, ns_b, dev_b = namespaces
    target = _start(ns_b, "target", dev_b)
    init = _start(ns_a, "initiator", dev_a)
    try:
        t_hello, i_hello = _line(target), _line(init)
        _send(target, md=i_hello["md"])
        _send(init, md=t_hello["md"], src=t_hello["src"], dst=t_hello["dst"])
        t_done = _line(target)
        i_done = _line(init)
        assert init.wait(30) == 0
        assert target.wait(30) == 0
    finally:
        for p in (init, target):
            if p.poll() is None:
                p.kill()
                p.wait(10)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
    n = NBLK * BLK
    p1 = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).reshape(NBLK, BLK)
    p2 = np.random.default_rng(2).integers(0, 256, n, dtype=np.uint8).reshape(NBLK, BLK)
    wperm = np.random.default_rng(3).permutation(NBLK)
    rperm = np.random.default_rng(4).permutation(NBLK)
    written = np.empty_like(p1)
    written[wperm] = p1
    assert t_done["notif"] is True, "the WRITE's notification never reached the target"
    assert t_done["dst"] == _digest(written), "target: written blocks differ"
    assert i_done["src"] == _digest(p1), "initiator: its source changed"
    assert i_done["dst"] == _digest(p2[rperm]), "initiator: read blocks differ"
    assert "tcp" in str(i_done["path"]), f"data went over {i_done['path']}, not TCP"
