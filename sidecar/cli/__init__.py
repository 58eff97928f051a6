"""The `graysteer` command line: one module per group of commands, each adding its
subcommands with the function that runs them."""

import argparse
import logging
import sys
from collections.abc import Sequence

from sidecar.admin.client import AdminError
from sidecar.core import RulesError
from sidecar.core.text import is_encodable, why_unencodable
from sidecar.ops.terminal import shown_lines


def build_parser() -> argparse.ArgumentParser:
    from sidecar.cli import changes, dev, fleet, operate, rules, serve

    parser = argparse.ArgumentParser(
        prog="graysteer", description="Gray-release traffic steering sidecar for Envoy."
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (serve, rules, operate, fleet, changes, dev):
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    given = sys.argv[1:] if argv is None else list(argv)
    for number, text in enumerate(given, 1):
        if not is_encodable(text):  # bytes that are not UTF-8, decoded with surrogateescape
            parser.error(f"argument {number} ({text!a}) {why_unencodable(text)}")
    args = parser.parse_args(given)
    check = getattr(args, "check", None)
    if check is not None and (problem := check(args)):
        getattr(args, "parser", parser).error(problem)  # the command's usage, then the problem
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change at INFO
    try:
        return int(args.run(args))
    except RulesError as error:
        print(shown_lines(str(error)), file=sys.stderr)
        return 1
    except (AdminError, OSError, ValueError) as error:
        print(shown_lines(f"graysteer {args.command}: {_described(error)}"), file=sys.stderr)
        return 1


def _described(error: Exception) -> str:
    """An error as a user reads it: a file's path and what is wrong with it, without Errno."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)
