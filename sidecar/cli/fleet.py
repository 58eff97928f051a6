"""Commands on a fleet's etcd prefix: push (and `status --fleet`)."""

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from sidecar import values
from sidecar.cli.common import add_etcd_flags, etcd_tls, warn_size, with_etcd_errors
from sidecar.ops.terminal import shown, shown_lines, shown_tree
from sidecar.serving.options import argparse_type


def add_commands(commands: Any) -> None:
    p = commands.add_parser("push", help="validate a rules file and write it to a fleet's etcd prefix")
    p.add_argument("rules", help="the rules file (YAML)")
    p.add_argument("url", metavar="etcd://HOST:PORT,.../PREFIX", help="the fleet's etcd address and prefix")
    p.add_argument(
        "--max-moved",
        type=argparse_type(values.share),
        default=0.05,
        metavar="R",
        help="push only when at most this share of requests changes cluster against the rules the fleet "
        "serves (graysteer diff, on synthetic requests), and none moves backwards on a ramp; else ask "
        "for --yes (default %(default)s)",
    )
    p.add_argument("--yes", action="store_true", help="push whatever the change moves")
    p.add_argument(
        "--next",
        action="store_true",
        help="write PREFIX/rules.next instead: every replica decides requests with it too (a sample "
        "within its --shadow-budget), as a shadow table, and counts where it differs (nothing is "
        "served from it; graysteer status shows the rate); prints what a decision by it costs first",
    )
    add_etcd_flags(p)
    p.set_defaults(run=push)
    p = commands.add_parser("drop-next", help="remove a fleet's shadow table (PREFIX/rules.next)")
    p.add_argument("url", metavar="etcd://HOST:PORT,.../PREFIX", help="the fleet's etcd address and prefix")
    add_etcd_flags(p)
    p.set_defaults(run=drop_next)


def push(args: argparse.Namespace) -> int:
    from sidecar.sources.etcd_client import EtcdAddress, push_rules
    from sidecar.table.load import MAX_FILE_BYTES, load_rules, read_regular_file

    address = EtcdAddress.parse(args.url)
    table = load_rules(args.rules)  # refused with the same messages as `check`
    content = read_regular_file(Path(args.rules), MAX_FILE_BYTES)
    warn_size(table, args.rules)
    if args.next:  # a shadow moves no request: nothing to confirm, but it costs
        print(shadow_cost(table, args.rules))
        key = address.next_rules_key
    elif not args.yes and not safe_change(args, table):
        return 1
    else:
        key = address.rules_key
    revision = asyncio.run(with_etcd_errors(push_rules(address, etcd_tls(args), content, key), address))
    name = key.decode().rsplit("/", 1)[1]
    print(
        shown(f"{args.rules}: pushed version {table.version} to {address}/{name} (etcd revision {revision})")
    )
    return 0


def shadow_cost(table: Any, where: str) -> str:
    """What deciding every request with `table` as a shadow costs, and the share of requests
    replicas then decide with it (sidecar.table.shadow)."""
    from sidecar.core.cost import DEFAULT_SHADOW_BUDGET_MS, sample_rate, steering_cost
    from sidecar.core.engine import Engine

    cost = steering_cost(Engine(table))
    share = sample_rate(cost.seconds, DEFAULT_SHADOW_BUDGET_MS / 1000)
    return (
        f"{where}: as a shadow table: {cost.describe()}; replicas decide it for {share:.2%} of requests "
        f"within the default --shadow-budget of {DEFAULT_SHADOW_BUDGET_MS:g} ms per request "
        "(or their --shadow-sample)"
    )


def drop_next(args: argparse.Namespace) -> int:
    from sidecar.sources.etcd_client import EtcdAddress, delete_key

    address = EtcdAddress.parse(args.url)
    found = asyncio.run(
        with_etcd_errors(delete_key(address, etcd_tls(args), address.next_rules_key), address)
    )
    print(shown(f"{address}/rules.next: {'removed' if found else 'there was none'}"))
    return 0


def safe_change(args: argparse.Namespace, table: Any) -> bool:
    """Whether the change moves at most --max-moved of the requests and none backwards; the
    report is printed when it does not."""
    from sidecar.changes.report import as_text, load_table
    from sidecar.core.diff import compare, synthetic_requests

    served = load_table(args.url, etcd_tls(args))
    if served is None:
        return True  # the first push: nothing to move
    report = compare(served, table, synthetic_requests([served, table], 10_000))
    if report.moved_share <= args.max_moved and not report.backwards:
        if report.moved_requests:
            moved = f"{report.moved_share:.2%} of requests change cluster"
            print(f"{args.rules}: {moved} (at most {args.max_moved:.0%})")
        return True
    print(shown_lines(as_text(report)), file=sys.stderr)
    print(
        f"{args.rules}: not pushed: {report.moved_share:.2%} of requests change cluster (more than "
        f"--max-moved {args.max_moved:g})"
        + (", some backwards on a ramp" if report.backwards else "")
        + "; push with --yes if this is intended",
        file=sys.stderr,
    )
    return False


def fleet_status(args: argparse.Namespace) -> int:
    from sidecar.fleet.fleet import fleet_status, format_fleet
    from sidecar.sources.etcd_client import EtcdAddress

    address = EtcdAddress.parse(args.fleet)
    report = asyncio.run(with_etcd_errors(fleet_status(address, etcd_tls(args)), address))
    print(json.dumps(report, indent=2) if args.json else format_fleet(shown_tree(report)))
    return 0
