"""What several commands share: reaching a running sidecar's admin API, reaching etcd, and
the warning for a large table."""

import argparse
import asyncio
import io
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.admin.security import ClientAuth
from sidecar.core import Table

if TYPE_CHECKING:
    from sidecar.sources.etcd_client import EtcdTls


def add_admin_client_flags(p: argparse.ArgumentParser, address: bool = False) -> None:
    """How to reach and authenticate to a running sidecar's admin API."""
    if address:
        p.add_argument(
            "--admin",
            default="127.0.0.1:50052",
            metavar="ADDR",
            help="the sidecar's admin API: HOST:PORT or unix:PATH (default %(default)s)",
        )
    p.add_argument("--admin-token-file", metavar="PATH", help="send the bearer token in this file")
    p.add_argument("--admin-tls-ca", metavar="PEM", help="talk TLS, verifying the sidecar with this CA")
    p.add_argument("--admin-tls-cert", metavar="PEM", help="with --admin-tls-ca: this client certificate")
    p.add_argument("--admin-tls-key", metavar="PEM", help="... and its key")


def client_auth(args: argparse.Namespace) -> ClientAuth:
    return ClientAuth(args.admin_token_file, args.admin_tls_ca, args.admin_tls_cert, args.admin_tls_key)


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


async def with_etcd_errors(work: Coroutine[Any, Any, Any], address: object, timeout: float = 15) -> Any:
    """An etcd call from the CLI, with unreachable etcd as a one-line error."""
    from sidecar.sources.etcd_client import ETCD_ERRORS

    try:
        return await asyncio.wait_for(work, timeout)
    except ETCD_ERRORS as error:
        raise OSError(f"{address}: etcd unreachable or refused: {error or type(error).__name__}") from error


def warn_size(table: Table, path: str) -> None:
    from sidecar.table.load import size_warning

    warning = size_warning(table, Path(path).stat().st_size)
    if warning:
        print(f"{path}: {warning}", file=sys.stderr)


def stdin_text() -> io.TextIOWrapper:
    """Standard input as UTF-8 text, undecodable bytes replaced (U+FFFD), whatever the locale:
    in the C locale Python decodes stdin with surrogateescape, and the lone surrogates that
    makes would reach the C extensions (see sidecar.core.text)."""
    return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
