"""`graysteer status --watch`: the live view of a sidecar (and with --fleet, of its fleet),
read again every second until Ctrl-C. A full screen on a terminal (rich's Live); plain
lines, printed when they change, anywhere else (a pipe, a log).

A sidecar or an etcd that cannot be reached is a line on the screen, not the end of the
view: it keeps reading, and shows the sidecar again when it answers.
"""

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from sidecar.admin.client import AdminError, StatusReader
from sidecar.cli.common import client_auth, etcd_tls, with_etcd_errors
from sidecar.ops import view, view_text
from sidecar.ops.terminal import shown_tree

REFRESH_SECONDS = 1.0
READ_TIMEOUT_SECONDS = 3.0  # a read that takes longer is shown as a problem


def watch(args: argparse.Namespace) -> int:
    """Draw the view every REFRESH_SECONDS until Ctrl-C (exit status 0)."""
    reader = StatusReader(args.admin, client_auth(args), READ_TIMEOUT_SECONDS)
    fleet = fleet_reader(args) if args.fleet else None
    try:
        if sys.stdout.isatty():
            _draw_live(lambda: read_view(reader, fleet))
        else:
            _print_changes(lambda: read_view(reader, fleet))
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `status --watch | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    finally:
        reader.close()
    return 0


def read_view(reader: StatusReader, fleet: Callable[[], dict[str, Any]] | None) -> dict[str, Any]:
    """One reading of everything the view shows, every string escaped for a terminal
    (sidecar.ops.terminal: etcd's and the sidecar's strings are not ours); what cannot be
    read is a problem line."""
    problems = []
    fleet_report = None
    if fleet is not None:
        try:
            fleet_report = fleet()
        except (OSError, ValueError, TimeoutError) as error:
            problems.append(f"fleet: {error}")
    try:
        status = reader.read()
    except AdminError as error:
        status = None
        problems.append(str(error))
    built: dict[str, Any] = shown_tree(view.build(status, fleet_report, problems, time.time()))
    return built


def fleet_reader(args: argparse.Namespace) -> Callable[[], dict[str, Any]]:
    from sidecar.fleet.fleet import fleet_status
    from sidecar.sources.etcd_client import EtcdAddress

    address = EtcdAddress.parse(args.fleet)
    tls = etcd_tls(args)
    return lambda: asyncio.run(with_etcd_errors(fleet_status(address, tls), address, READ_TIMEOUT_SECONDS))


def _draw_live(read: Callable[[], dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.live import Live

    from sidecar.cli.screen import render

    console = Console()
    with Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            began = time.monotonic()
            live.update(render(read()), refresh=True)
            time.sleep(max(0.0, REFRESH_SECONDS - (time.monotonic() - began)))


def _print_changes(read: Callable[[], dict[str, Any]]) -> None:
    last: list[str] = []
    while True:
        began = time.monotonic()
        lines = view_text.lines(read())
        if lines[1:] != last[1:]:  # the first line is the time
            print("\n".join(lines) + "\n", flush=True)
            last = lines
        time.sleep(max(0.0, REFRESH_SECONDS - (time.monotonic() - began)))
