"""The `graysteer` command line."""

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence

from sidecar.core import RulesError
from sidecar.server import ServeOptions, serve, split_host_port


def _address(flag: str) -> "type[str]":
    def parse(value: str) -> str:
        try:
            split_host_port(value, flag)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return parse  # type: ignore[return-value]


def _header(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition(":")
    if not sep or not name.strip() or " " in name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {value!r}")
    return name.strip().lower(), rest.strip()


def _pair(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name=value, got {value!r}")
    return name, rest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graysteer", description="Gray-release traffic steering sidecar for Envoy.")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("serve", help="serve Envoy's ext_proc API")
    p.add_argument("--config", required=True, help="the rules file (YAML)")
    p.add_argument("--listen", default="127.0.0.1:50051", type=_address("--listen"),
                   help="HOST:PORT of the ext_proc gRPC server (default %(default)s)")
    p.add_argument("--metrics-listen", type=_address("--metrics-listen"),
                   help="HOST:PORT of the Prometheus /metrics endpoint (default: off)")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds to drain streams on SIGTERM (default %(default)s)")

    p = commands.add_parser("check", help="validate a rules file: exit 0 if valid, 1 if not")
    p.add_argument("rules", help="the rules file (YAML)")

    p = commands.add_parser("explain", help="print the decision for a described request (JSON)")
    p.add_argument("--config", required=True, help="the rules file (YAML)")
    p.add_argument("-H", "--header", dest="headers", type=_header, action="append", default=[],
                   metavar="'NAME: VALUE'", help="a request header (repeatable)")
    p.add_argument("--path", default="/", help="request path (default %(default)s)")
    p.add_argument("--method", default="GET", help="request method (default %(default)s)")
    p.add_argument("--cookie", dest="cookies", type=_pair, action="append", default=[],
                   metavar="NAME=VALUE", help="a cookie (repeatable)")
    p.add_argument("--query", dest="params", type=_pair, action="append", default=[],
                   metavar="NAME=VALUE", help="a query parameter (repeatable)")

    p = commands.add_parser("demo", help="run Envoy + sidecar + two backends and show routing")
    p.add_argument("--rules", default="examples/rules.yaml")
    p.add_argument("--envoy-config", default="envoy/envoy.yaml")
    p.add_argument("--requests", type=int, default=400, help="requests to send (default 400)")
    p.add_argument("--keep-running", action="store_true",
                   help="keep the stack running after the report until Ctrl-C")

    p = commands.add_parser("demo-backend", help="a sample HTTP backend that echoes the request")
    p.add_argument("--name", required=True, help="the name it reports (e.g. stable)")
    p.add_argument("--listen", default="127.0.0.1:8081", type=_address("--listen"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except RulesError as error:
        print(error, file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"graysteer {args.command}: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        asyncio.run(serve(ServeOptions(args.config, args.listen, args.metrics_listen, args.grace)))
        return 0
    if args.command == "check":
        from sidecar.rules_file import load_rules

        table = load_rules(args.rules)
        print(f"{args.rules}: ok, version {table.version}, {len(table.rules)} rules, "
              f"clusters {', '.join(table.clusters)}")
        return 0
    if args.command == "explain":
        from sidecar.explain import explain_local

        result = explain_local(args.config, args.method, args.path, args.headers,
                               args.cookies, args.params)
        print(json.dumps(result, indent=2))
        return 0
    if args.command == "demo":
        from sidecar.demo import run_demo

        return run_demo(args.rules, args.envoy_config, args.requests, args.keep_running)
    if args.command == "demo-backend":
        from sidecar.backend import run_backend

        host, port = split_host_port(args.listen, "--listen")
        run_backend(args.name, host, port)
        return 0
    raise AssertionError(args.command)
