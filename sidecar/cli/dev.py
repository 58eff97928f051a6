"""Commands for trying Graysteer locally: demo, demo-backend."""

import argparse
from typing import Any

from sidecar import values
from sidecar.serving.options import argparse_type


def add_commands(commands: Any) -> None:
    p = commands.add_parser("demo", help="run Envoy + sidecar + two backends and show routing")
    p.add_argument("--rules", default="examples/rules.yaml")
    p.add_argument("--envoy-config", default="envoy/envoy.yaml")
    p.add_argument(
        "--requests",
        type=argparse_type(values.whole_number),
        default=400,
        help="requests to send (default %(default)s)",
    )
    p.add_argument(
        "--keep-running", action="store_true", help="keep the stack running after the report until Ctrl-C"
    )
    p.set_defaults(run=demo)

    p = commands.add_parser("demo-backend", help="a sample HTTP backend that echoes the request")
    p.add_argument("--name", required=True, help="the name it reports (e.g. stable)")
    p.add_argument(
        "--listen",
        default="127.0.0.1:8081",
        type=argparse_type(lambda text: values.host_port(text, "--listen")),
    )
    p.set_defaults(run=demo_backend)


def demo(args: argparse.Namespace) -> int:
    from sidecar.dev.demo import run_demo

    return run_demo(args.rules, args.envoy_config, args.requests, args.keep_running)


def demo_backend(args: argparse.Namespace) -> int:
    from sidecar.dev.backend import run_backend

    host, port = args.listen
    run_backend(args.name, host, port)
    return 0
