"""``python -m nixl_core md list|show NAME|watch``: what a metadata store holds.

- ``list``: one line per agent: name, incarnation (and when it started), labels, lease TTL left;
- ``show NAME``: each label of one agent: its size, incarnation, connection backends and
  registrations per (backend, memory type);
- ``watch``: agents appearing, changing (a new incarnation is a restart) and vanishing, as
  they happen (the store is read every ``--interval`` s).

The store is the one NIXL's environment names (``NIXL_ETCD_ENDPOINTS``, ``NIXL_ETCD_NAMESPACE``,
``NIXL_TCPSTORE_ENDPOINT``) unless ``--endpoint`` / ``--namespace`` say otherwise; values
tagged with a key need ``--key`` or ``NIXL_MD_KEY`` to be shown.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Iterable

from nixl_core.discovery.sealed import Kind, key_from, open_frame, parse_named
from nixl_core.discovery.store import AgentEntry, MetadataStore, label_key, store_from_env
from nixl_core.errors import MetadataError, NixlError
from nixl_core.metadata import AgentMetadata, incarnation_time

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``md`` command to ``python -m nixl_core``'s subcommands."""
    p = sub.add_parser("md", help="list, show or watch the agents in a metadata store")
    p.add_argument("--endpoint", help="etcd host:port[,host:port] (default: NIXL_ETCD_ENDPOINTS)")
    p.add_argument("--namespace", help="etcd key namespace (default: NIXL_ETCD_NAMESPACE)")
    p.add_argument("--key", help="metadata key for tagged values (default: NIXL_MD_KEY)")
    msub = p.add_subparsers(dest="md_cmd", required=True)
    msub.add_parser("list", help="the agents, their incarnations, labels and TTLs")
    show = msub.add_parser("show", help="every label of one agent")
    show.add_argument("name")
    watch = msub.add_parser("watch", help="print agents appearing, restarting and vanishing")
    watch.add_argument("--interval", type=float, default=0.5)
    watch.add_argument("--count", type=int, default=0, help="stop after N changes (0: never)")


def _open(args: argparse.Namespace) -> MetadataStore:
    env = dict(os.environ)
    if args.endpoint:
        env.pop("NIXL_TCPSTORE_ENDPOINT", None)
        env["NIXL_ETCD_ENDPOINTS"] = args.endpoint
    store = store_from_env(env, namespace=args.namespace)
    if store is None:
        raise SystemExit(
            "no metadata store: give --endpoint or set NIXL_ETCD_ENDPOINTS / NIXL_TCPSTORE_ENDPOINT"
        )
    return store


def _inc_text(inc: bytes | None) -> str:
    if inc is None:
        return "?"
    t = incarnation_time(inc)
    when = (
        datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(" (%Y-%m-%d %H:%M:%S)")
        if t is not None
        else ""
    )
    return inc.hex()[:12] + when


def _decode(store: MetadataStore, key: bytes | None, name: str, label: str, value: bytes) -> str:
    """One value described, or why it cannot be read."""
    try:
        frame = open_frame(value, key, label_key(store.namespace, name, label).encode())
        if frame.kind is Kind.ANNOUNCE:
            inc, who = parse_named(frame.payload)
            return f"announcement of {who!r}, incarnation {_inc_text(inc)}"
        if frame.kind is not Kind.VALUE:
            return f"a {frame.kind.name} frame"
        md = AgentMetadata.decode(frame.payload)
    except MetadataError as exc:
        return f"unreadable: {exc}"
    conns = ", ".join(b for b, _ in md.conns) or "none"
    secs = "; ".join(f"{s.backend}/{s.mem_type.value}: {len(s)} regions" for s in md.sections)
    return (
        f"{len(value)} B, incarnation {_inc_text(md.incarnation)}, connection info: {conns}"
        f"{', ' + secs if secs else ', no registrations'}"
    )


def _incarnation(store: MetadataStore, key: bytes | None, e: AgentEntry) -> bytes | None:
    for label, value in sorted(e.values.items()):
        try:
            frame = open_frame(value, key, label_key(store.namespace, e.name, label).encode())
            if frame.kind is Kind.ANNOUNCE:
                return parse_named(frame.payload)[0]
            if frame.kind is Kind.VALUE:
                return AgentMetadata.decode(frame.payload).incarnation
        except MetadataError:
            continue
    return None


def _ttl(e: AgentEntry) -> str:
    return "no lease" if e.ttl is None else f"{e.ttl:.0f} s"


def _list(store: MetadataStore, key: bytes | None, entries: Iterable[AgentEntry]) -> None:
    rows = [("AGENT", "INCARNATION", "LABELS", "TTL")]
    for e in sorted(entries, key=lambda e: e.name):
        labels = ",".join(sorted(lbl for lbl in e.values if lbl)) or "-"
        rows.append((e.name, _inc_text(_incarnation(store, key, e)), labels, _ttl(e)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _watch(store: MetadataStore, key: bytes | None, interval: float, count: int) -> None:
    seen: dict[str, bytes | None] = {}
    changes = 0
    while True:
        now = {e.name: _incarnation(store, key, e) for e in store.agents()}
        stamp = time.strftime("%H:%M:%S")
        for name in sorted(now.keys() - seen.keys()):
            print(f"{stamp} + {name} incarnation {_inc_text(now[name])}", flush=True)
            changes += 1
        for name in sorted(seen.keys() - now.keys()):
            print(f"{stamp} - {name} gone (keys deleted or expired)", flush=True)
            changes += 1
        for name in sorted(now.keys() & seen.keys()):
            if now[name] != seen[name]:
                print(f"{stamp} ~ {name} restarted: incarnation {_inc_text(now[name])}", flush=True)
                changes += 1
        seen = now
        if count and changes >= count:
            return
        time.sleep(interval)


def run(args: argparse.Namespace) -> int:
    """Run ``md``'s subcommand; returns the exit status."""
    try:
        key = key_from(args.key)
        store = _open(args)
    except NixlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.md_cmd == "list":
            _list(store, key, store.agents())
        elif args.md_cmd == "show":
            found = [e for e in store.agents() if e.name == args.name]
            if not found:
                print(f"no agent {args.name!r} in {store.kind} {store.endpoint}", file=sys.stderr)
                return 1
            e = found[0]
            print(f"{e.name}  (lease: {_ttl(e)})")
            for label, value in sorted(e.values.items()):
                print(f"  {label or '(announcement)'}: {_decode(store, key, e.name, label, value)}")
        else:
            _watch(store, key, args.interval, args.count)
    except NixlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        _close_quietly(store)
    return 0


def _close_quietly(store: MetadataStore) -> None:
    # The CLI publishes nothing: closing only stops the client's threads.
    with contextlib.suppress(NixlError):
        store.close()
