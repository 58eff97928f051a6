"""Commands on a fleet's etcd prefix: push (and `status --fleet`)."""

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from sidecar.cli.common import add_etcd_flags, etcd_tls, warn_size, with_etcd_errors


def add_commands(commands: Any) -> None:
    p = commands.add_parser("push", help="validate a rules file and write it to a fleet's etcd prefix")
    p.add_argument("rules", help="the rules file (YAML)")
    p.add_argument("url", metavar="etcd://HOST:PORT/PREFIX", help="the fleet's etcd address and prefix")
    add_etcd_flags(p)
    p.set_defaults(run=push)


def push(args: argparse.Namespace) -> int:
    from sidecar.sources.etcd_client import EtcdAddress, push_rules
    from sidecar.table.load import MAX_FILE_BYTES, load_rules, read_regular_file

    address = EtcdAddress.parse(args.url)
    table = load_rules(args.rules)  # refused with the same messages as `check`
    content = read_regular_file(Path(args.rules), MAX_FILE_BYTES)
    warn_size(table, args.rules)
    revision = asyncio.run(with_etcd_errors(push_rules(address, etcd_tls(args), content), address))
    print(f"{args.rules}: pushed version {table.version} to {address}/rules (etcd revision {revision})")
    return 0


def fleet_status(args: argparse.Namespace) -> int:
    from sidecar.fleet.fleet import fleet_status, format_fleet
    from sidecar.sources.etcd_client import EtcdAddress

    address = EtcdAddress.parse(args.fleet)
    report = asyncio.run(with_etcd_errors(fleet_status(address, etcd_tls(args)), address))
    print(json.dumps(report, indent=2) if args.json else format_fleet(report))
    return 0
