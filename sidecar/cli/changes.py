"""`graysteer diff OLD NEW`: what a change of the rules does to traffic, before it lands."""

import argparse
import itertools
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sidecar import values
from sidecar.cli.common import add_etcd_flags, etcd_tls, stdin_text
from sidecar.serving.options import argparse_type

if TYPE_CHECKING:
    from sidecar.changes.requests import ReadCount
    from sidecar.core import Request, Table

DEFAULT_SAMPLE = 10_000


def add_commands(commands: Any) -> None:
    p = commands.add_parser("diff", help="show which requests a change of the rules moves, before it lands")
    p.add_argument("old", help="the rules in force: a file, or etcd://HOST:PORT,.../PREFIX (a fleet's)")
    p.add_argument("new", help="the rules to be: a file, or etcd://HOST:PORT,.../PREFIX")
    p.add_argument(
        "--requests",
        action="append",
        default=[],
        metavar="FILE",
        help="decide these requests: a decision log (serve --decision-log) or an Envoy access log "
        "as the generated configs write it; '-' for stdin (repeatable)",
    )
    p.add_argument(
        "--sample",
        type=argparse_type(lambda text: values.whole_number(text, minimum=1)),
        metavar="N",
        help=f"also decide N synthetic requests built from the rules' match values and N user ids "
        f"(default {DEFAULT_SAMPLE} without --requests)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_etcd_flags(p)
    p.set_defaults(run=diff)


def diff(args: argparse.Namespace) -> int:
    """Exit 0, or 1 when anything moves backwards on a ramp."""
    from sidecar.changes.report import as_json, as_text, load_table
    from sidecar.changes.requests import ReadCount
    from sidecar.core.diff import compare, synthetic_requests
    from sidecar.ops.terminal import shown_lines

    tls = etcd_tls(args)
    old, new = load_table(args.old, tls), load_table(args.new, tls)
    if old is None or new is None:
        raise ValueError(f"no rules at {args.old if old is None else args.new}")
    count = ReadCount()
    sample = args.sample if args.sample is not None else (0 if args.requests else DEFAULT_SAMPLE)
    synthetic = synthetic_requests([old, new], sample) if sample else []
    requests = itertools.chain(logged_requests(args.requests, [old, new], count), synthetic)
    report = compare(old, new, requests)  # one request at a time: none is held
    if args.json:
        data = as_json(report)
        data["read"] = {
            "requests": count.read,
            "skipped_lines": count.skipped,
            "unreadable_lines": count.unreadable,
            "redacted": count.redacted,
        }
        print(json.dumps(data, indent=2))
    else:
        if args.requests:
            print(
                f"read {count.read} requests ({count.skipped} lines skipped, {count.unreadable} unreadable: "
                f"too long, nested too deep or ambiguous; {count.redacted} with redacted or cut values, "
                "decided again without them)"
            )
        print(shown_lines(as_text(report)))
    return 1 if report.backwards else 0


def logged_requests(names: list[str], tables: "list[Table]", count: "ReadCount") -> "Iterator[Request]":
    """The requests of each log file in turn, read as they are decided."""
    from sidecar.changes.requests import read_requests
    from sidecar.envoyconf.generate import logged_headers

    logged = [logged_headers(table) for table in tables]
    for name in names:
        handle = stdin_text() if name == "-" else open(name, encoding="utf-8", errors="replace")  # noqa: SIM115
        with handle:
            yield from read_requests(handle, count, logged)
