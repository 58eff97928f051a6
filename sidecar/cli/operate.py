"""Commands on a running sidecar, through its admin API: status, set-weight, rollout."""

import argparse
import json
from typing import Any

from sidecar import values
from sidecar.cli.common import add_admin_client_flags, add_etcd_flags, client_auth
from sidecar.core.actions import ACTIONS
from sidecar.ops.terminal import shown_tree
from sidecar.serving.options import argparse_type


def add_commands(commands: Any) -> None:
    p = commands.add_parser("status", help="show a running sidecar's table and last reload")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.add_argument(
        "--fleet",
        metavar="etcd://HOST:PORT,.../PREFIX",
        help="list every replica of a fleet (from etcd) with the version it serves, instead",
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="a live view, read again every second until Ctrl-C: splits, rollouts (steps, analysis "
        "against thresholds), requests per cluster, bypass; with --fleet also the replicas and the leader "
        "(plain lines when stdout is no terminal)",
    )
    add_admin_client_flags(p, address=True)
    add_etcd_flags(p)
    p.set_defaults(run=status)

    p = commands.add_parser("set-weight", help="change a split rule's weights at runtime")
    p.add_argument("rule", help="the split rule's name")
    p.add_argument(
        "weights",
        nargs="+",
        type=argparse_type(values.cluster_weight),
        metavar="CLUSTER=WEIGHT",
        help="e.g. canary=20 (with two clusters the other one takes the rest)",
    )
    add_admin_client_flags(p, address=True)
    p.set_defaults(run=set_weight)

    p = commands.add_parser(
        "rollout",
        help="promote, pause, resume or abort a rollout, or approve the step it waits at",
    )
    p.add_argument(
        "action",
        choices=list(ACTIONS),
        help="approve: the current step, which asks for an operator's approval (it may be given "
        "during the step's hold); resume also restarts an aborted or ramping-down rollout at step 0",
    )
    p.add_argument("rule", help="the split rule whose rollout to act on")
    add_admin_client_flags(p, address=True)
    p.set_defaults(run=rollout)


def status(args: argparse.Namespace) -> int:
    from sidecar.admin import client as admin_client

    if args.watch:
        if args.json:
            raise ValueError("--watch draws a live view; --json prints the status once: choose one")
        from sidecar.cli.watch import watch

        return watch(args)
    if args.fleet:
        from sidecar.cli.fleet import fleet_status

        return fleet_status(args)
    report = admin_client.status(args.admin, client_auth(args))
    print(json.dumps(report, indent=2) if args.json else admin_client.format_status(shown_tree(report)))
    return 0


def set_weight(args: argparse.Namespace) -> int:
    from sidecar.admin import client as admin_client

    report = shown_tree(
        admin_client.set_weights(args.admin, args.rule, dict(args.weights), client_auth(args))
    )
    (rule,) = [r for r in report["rules"] if r["name"] == args.rule]
    weights = " ".join(f"{w['cluster']}={w['weight']}" for w in rule["weights"])
    print(f"{args.rule}: {weights} (version {report['version']}, persisted in {report['state_file']})")
    return 0


def rollout(args: argparse.Namespace) -> int:
    from sidecar.admin import client as admin_client
    from sidecar.ops import view_rollout

    status = shown_tree(admin_client.rollout(args.admin, args.rule, args.action, client_auth(args)))
    print(
        f"{status['rule']}: {status['phase']}, step {status['step']}, canary weight "
        f"{status['canary_weight']} ({status['reason']})"
    )
    for wait in view_rollout.waits_view(view_rollout.report_of(status)):
        print(f"  {wait}")
    return 0
