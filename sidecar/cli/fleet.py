"""Commands on a fleet's etcd prefix: push (and `status --fleet`)."""

import argparse
import asyncio
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.sources.etcd_client import EtcdTls


def add_commands(commands: Any) -> None:
    p = commands.add_parser("push", help="validate a rules file and write it to a fleet's etcd prefix")
    p.add_argument("rules", help="the rules file (YAML)")
    p.add_argument("url", metavar="etcd://HOST:PORT/PREFIX", help="the fleet's etcd address and prefix")
    add_etcd_flags(p)
    p.set_defaults(run=push)


def add_etcd_flags(p: argparse.ArgumentParser) -> None:
    """TLS to etcd (with etcd:// addresses)."""
    p.add_argument("--etcd-ca", metavar="PEM", help="TLS to etcd: the CA of etcd's server certificate")
    p.add_argument("--etcd-cert", metavar="PEM", help="TLS to etcd: this client's certificate")
    p.add_argument("--etcd-key", metavar="PEM", help="TLS to etcd: this client's private key")


def etcd_tls(args: argparse.Namespace) -> "EtcdTls | None":
    from sidecar.sources.etcd_client import EtcdTls

    if not args.etcd_ca:
        if args.etcd_cert or args.etcd_key:
            raise ValueError("--etcd-cert and --etcd-key need --etcd-ca (TLS to etcd)")
        return None
    if bool(args.etcd_cert) != bool(args.etcd_key):
        raise ValueError("--etcd-cert and --etcd-key go together")
    return EtcdTls(
        Path(args.etcd_ca),
        Path(args.etcd_cert) if args.etcd_cert else None,
        Path(args.etcd_key) if args.etcd_key else None,
    )


def push(args: argparse.Namespace) -> int:
    from sidecar.cli.rules import warn_size
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


async def with_etcd_errors(work: Coroutine[Any, Any, Any], address: object) -> Any:
    """An etcd call from the CLI, with unreachable etcd as a one-line error."""
    from sidecar.sources.etcd_client import ETCD_ERRORS

    try:
        return await asyncio.wait_for(work, 15)
    except ETCD_ERRORS as error:
        raise OSError(f"{address}: etcd unreachable or refused: {error or type(error).__name__}") from error
