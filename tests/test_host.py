"""The one same-host rule (nixl_core.host), its wire form, and LOOPBACK applying it."""

from __future__ import annotations

import contextlib

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixl_core import Agent, MetadataError, NotSupportedError, PluginError, _loopback
from nixl_core.host import HostIdentity, local_identity

ME = HostIdentity(b"boot-a", "node1", 100, 4026531836, 4026531840)


def test_local_identity_is_this_process() -> None:
    """The local identity carries this process's pid and a readable boot id on Linux."""
    import os

    me = local_identity()
    assert me.pid == os.getpid() and me.boot_id and me.same_host(me)


def test_round_trip_and_strict_decoder() -> None:
    """encode/decode round-trips; a bad magic, truncation or trailing bytes raise MetadataError."""
    blob = ME.encode()
    assert HostIdentity.decode(blob) == ME
    with pytest.raises(MetadataError, match="bad magic"):
        HostIdentity.decode(b"XXXX" + blob[4:])
    for cut in range(len(blob)):
        with pytest.raises(MetadataError):
            HostIdentity.decode(blob[:cut])
    with pytest.raises(MetadataError, match="trailing"):
        HostIdentity.decode(blob + b"\0")


@given(st.binary(max_size=64))
def test_decoder_never_raises_anything_else(data: bytes) -> None:
    """Any bytes either decode or raise MetadataError."""
    with contextlib.suppress(MetadataError):
        HostIdentity.decode(data)


def test_same_host_rule() -> None:
    """Same host = equal boot ids (containers of one host share it); host names decide only
    when a boot id is unknown."""
    assert ME.same_host(attrs.evolve(ME, hostname="container-7", pid=5))
    assert not ME.same_host(attrs.evolve(ME, boot_id=b"boot-b"))
    assert ME.same_host(attrs.evolve(ME, boot_id=b""))
    assert not ME.same_host(attrs.evolve(ME, boot_id=b"", hostname="node2"))


@pytest.mark.parametrize(
    ("change", "pid_ns", "match"),
    [
        ({"boot_id": b"boot-b", "hostname": "node2"}, False, r"runs on another host .*use UCX"),
        ({"net_ns": 1}, False, "another network namespace"),
        ({"pid_ns": 1}, True, "another pid namespace"),
    ],
)
def test_check_peer_names_the_reason(change: dict[str, object], pid_ns: bool, match: str) -> None:
    """A peer a same-host backend cannot reach is refused with the reason and the way out."""
    with pytest.raises(NotSupportedError, match=match):
        ME.check_peer(attrs.evolve(ME, **change), peer="p", backend="X", same_pid_ns=pid_ns)
    ME.check_peer(attrs.evolve(ME, pid_ns=1), peer="p", backend="X")  # pid ns: only when asked


def test_loopback_refuses_an_agent_on_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """LOOPBACK applies the shared rule: metadata from another boot id is refused by name."""
    with Agent("here", backends=["LOOPBACK"]) as a:
        other = attrs.evolve(local_identity(), boot_id=b"another-boot", hostname="far")
        monkeypatch.setattr(_loopback, "local_identity", lambda: other)
        with (
            Agent("there", backends=["LOOPBACK"]) as b,
            pytest.raises(PluginError, match=r"'there' runs on another host .*use UCX"),
        ):
            a.add_remote(b.metadata())
