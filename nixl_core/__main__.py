"""``python -m nixl_core backends [--params] [--json]``: the installed backends, available or not
and why, what creating them does to the process, and (``--params``) every backend's parameters
with defaults, environment variables and where the value would come from now.

``python -m nixl_core md list|show NAME|watch``: the agents in a metadata store
(:mod:`nixl_core.discovery.cli`)."""

from __future__ import annotations

import argparse
import json
import sys

import attrs

from nixl_core._plugins import format_backends, list_backends
from nixl_core.discovery import cli as md_cli


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m nixl_core``."""
    parser = argparse.ArgumentParser(prog="python -m nixl_core")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backends", help="list installed backends and whether they can run here")
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    b.add_argument(
        "--params", action="store_true", help="also list each backend's parameters and sources"
    )
    md_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "md":
        return md_cli.run(args)
    infos = list_backends()
    if args.json:
        print(json.dumps([attrs.asdict(i) for i in infos], indent=2))
    else:
        print(format_backends(infos, params=args.params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
