"""`graysteer serve`: its flags come from sidecar.serving.options, one per option."""

import argparse
from typing import Any

from sidecar.serving import options as serve_options


def add_commands(commands: Any) -> None:
    p = commands.add_parser("serve", help="serve Envoy's ext_proc and ext_authz APIs")
    serve_options.add_arguments(p)
    p.set_defaults(run=run, check=check, parser=p)


def check(args: argparse.Namespace) -> str | None:
    problems = serve_options.from_arguments(args).problems()
    return problems[0] if problems else None


def run(args: argparse.Namespace) -> int:
    options = serve_options.from_arguments(args, log_level=args.log_level)
    from sidecar.serving.descriptors import raise_open_file_limit

    raise_open_file_limit()  # before any worker starts: they inherit it
    if options.workers > 1:
        from sidecar.serving.workers import run_workers

        return run_workers(options)
    from sidecar.serving.run import run_event_loop, serve

    run_event_loop(serve(options), options.event_loop)
    return 0
