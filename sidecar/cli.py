"""The `graysteer` command line."""

import argparse
import asyncio
import json
import logging
import re
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.admin import client as admin_client
from sidecar.admin.client import AdminError
from sidecar.admin.security import AdminAuth, ClientAuth
from sidecar.core import RulesError, Table
from sidecar.server import ServeOptions, is_ascii_number, is_local_address, serve, split_host_port

if TYPE_CHECKING:
    from sidecar.runtime.etcd import EtcdTls


def _address(flag: str, allow_off: bool = False) -> "type[str]":
    def parse(value: str) -> str:
        if allow_off and value == "off":
            return value
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


def _admin_address(value: str) -> str:
    return value if value.startswith("unix:") else _address("--admin-listen")(value)


def _positive(value: str) -> int:
    if not is_ascii_number(value) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return int(value)


# float() also takes other scripts' digits, `_`, blanks, nan and inf: plain decimals only.
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def _seconds(value: str) -> float:
    if not _DECIMAL.fullmatch(value):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {value!r}")
    return float(value)


def _ratio(value: str) -> float:
    ratio = float(value) if _DECIMAL.fullmatch(value) else -1
    if not 0 <= ratio < 1:
        raise argparse.ArgumentTypeError(f"expected a share from 0 to below 1 (e.g. 0.05), got {value!r}")
    return ratio


def _upstream(value: str) -> tuple[str, tuple[str, int]]:
    cluster, sep, address = value.partition("=")
    if not sep or not cluster:
        raise argparse.ArgumentTypeError(f"expected CLUSTER=HOST:PORT, got {value!r}")
    try:
        return cluster, split_host_port(address, "--upstream")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _weight(value: str) -> tuple[str, int]:
    cluster, sep, weight = value.partition("=")
    if not sep or not cluster or not is_ascii_number(weight):
        raise argparse.ArgumentTypeError(f"expected CLUSTER=WEIGHT with a whole number >= 0, got {value!r}")
    return cluster, int(weight)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graysteer", description="Gray-release traffic steering sidecar for Envoy."
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("serve", help="serve Envoy's ext_proc API")
    p.add_argument(
        "--config",
        required=True,
        help="the rules file (YAML), or etcd://HOST:PORT/PREFIX: a fleet's rules and state in etcd",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        type=_address("--listen", allow_off=True),
        help="HOST:PORT of the gRPC server (ext_proc, ext_authz, health), or 'off' "
        "to serve only --authz-http-listen (default %(default)s)",
    )
    p.add_argument(
        "--authz-http-listen",
        type=_address("--authz-http-listen"),
        metavar="HOST:PORT",
        help="also answer Envoy's ext_authz over plain HTTP/1.1 here: the fast path "
        "(envoy-config --mode ext_authz_http; default off)",
    )
    p.add_argument(
        "--authz-http-shared-port",
        action="store_true",
        help="with --workers N: every worker listens on the --authz-http-listen port "
        "itself (SO_REUSEPORT; the kernel spreads Envoy's connections) instead of "
        "port, port+1, ...",
    )
    p.add_argument(
        "--admin-listen",
        default="127.0.0.1:50052",
        type=_admin_address,
        help="HOST:PORT or unix:PATH of the admin API (default %(default)s)",
    )
    p.add_argument(
        "--admin-allow-remote",
        action="store_true",
        help="allow --admin-listen on a non-loopback address (needs --admin-token-file or --admin-tls-*)",
    )
    p.add_argument(
        "--admin-token-file",
        metavar="PATH",
        help="admin calls must carry 'authorization: Bearer TOKEN' with the token in this "
        "file (read again when it changes)",
    )
    p.add_argument(
        "--admin-tls-cert", metavar="PEM", help="serve the admin API over TLS with this certificate"
    )
    p.add_argument("--admin-tls-key", metavar="PEM", help="... and this key")
    p.add_argument("--admin-tls-ca", metavar="PEM", help="... requiring client certificates from this CA")
    p.add_argument(
        "--admin-allow",
        action="append",
        default=[],
        metavar="IDENTITY",
        help="with --admin-tls-*: a client identity allowed to call (a SPIFFE ID, a glob "
        "spiffe://td/ns/ops/*, or a DNS name; repeatable)",
    )
    p.add_argument(
        "--http-listen",
        type=_address("--http-listen"),
        help="HOST:PORT for /metrics, /healthz and /readyz (default: off)",
    )
    p.add_argument(
        "--state-file",
        help="where runtime weight changes are persisted "
        "(default: .RULES.graysteer-state.json beside the rules file; in etcd with etcd://)",
    )
    _add_etcd_flags(p)
    p.add_argument(
        "--etcd-cache",
        metavar="DIR",
        help="with etcd://: where the last table served is kept, to start from during an etcd "
        "outage (default ~/.cache/graysteer/etcd/...)",
    )
    p.add_argument(
        "--replica-id",
        help="with etcd://: this replica's name in its fleet (default HOSTNAME-PID)",
    )
    p.add_argument(
        "--drain",
        type=_seconds,
        default=1.0,
        help="on SIGTERM, seconds to report NOT_SERVING before closing, so Envoy's "
        "health checks stop sending streams (default %(default)s)",
    )
    p.add_argument(
        "--grace",
        type=_seconds,
        default=5.0,
        help="then, seconds to let open streams finish (default %(default)s)",
    )
    p.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="do not watch the rules file (SIGHUP still reloads)",
    )
    p.add_argument(
        "--watch-poll", action="store_true", help="poll the rules directory instead of using inotify"
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="worker processes, on ports --listen, +1, ... (default 1; see README)",
    )
    p.add_argument(
        "--event-loop",
        choices=["auto", "uvloop", "asyncio"],
        default="auto",
        help="auto: uvloop when installed (default), else asyncio's own loop",
    )
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--envoy-admin",
        type=_address("--envoy-admin"),
        metavar="HOST:PORT",
        help="Envoy's admin address, read for rollout analysis and to count requests "
        "Envoy sends on without a decision (default: none)",
    )
    p.add_argument(
        "--rollout-poll",
        type=_seconds,
        default=1.0,
        help="seconds between reads of Envoy's stats: rollout analyses and bypass "
        "counts (default %(default)s)",
    )
    p.add_argument(
        "--ready-max-bypass-ratio",
        type=_ratio,
        metavar="R",
        help="/readyz answers 503 while Envoy sends more than this share of requests "
        "on without a decision (needs --envoy-admin and --http-listen; default off)",
    )

    p = commands.add_parser("check", help="validate a rules file: exit 0 if valid, 1 if not")
    p.add_argument("rules", help="the rules file (YAML)")
    p.add_argument(
        "--envoy",
        metavar="ENVOY_YAML",
        help="also check an Envoy bootstrap against the rules (guard, strip, HTTP/2...)",
    )

    commands.add_parser("schema", help="print the rules file's JSON Schema (for editors)")

    p = commands.add_parser("envoy-config", help="print an Envoy bootstrap for a rules file")
    p.add_argument("--rules", required=True, help="the rules file (YAML)")
    p.add_argument(
        "--mode",
        choices=["ext_proc", "ext_authz", "ext_authz_http"],
        default="ext_proc",
        help="how Envoy calls the sidecar: ext_proc or ext_authz over gRPC, or "
        "ext_authz over plain HTTP (serve --authz-http-listen) (default %(default)s)",
    )
    p.add_argument(
        "--mtls",
        action="store_true",
        help="require client certificates on the listener (see --tls-dir, --trust-domain)",
    )
    p.add_argument(
        "--tls-dir",
        default="/etc/graysteer/tls",
        help="with --mtls: ca.pem, server.pem and server.key (default %(default)s)",
    )
    p.add_argument(
        "--trust-domain",
        default="example.org",
        help="with --mtls: accept client URI SANs spiffe://DOMAIN/... (default %(default)s)",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:10000",
        type=_address("--listen"),
        help="Envoy's listener (default %(default)s)",
    )
    p.add_argument(
        "--admin",
        default="127.0.0.1:9901",
        type=_address("--admin"),
        help="Envoy's admin address (default %(default)s)",
    )
    p.add_argument(
        "--sidecar",
        default="127.0.0.1:50051",
        type=_address("--sidecar"),
        help="the sidecar's address: serve --listen, or --authz-http-listen with "
        "--mode ext_authz_http (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="sidecar worker processes (serve --workers): endpoints --sidecar, +1, ...",
    )
    p.add_argument(
        "--upstream",
        dest="upstreams",
        action="append",
        default=[],
        type=_upstream,
        metavar="CLUSTER=HOST:PORT",
        help="a cluster's address (repeatable; default 127.0.0.1:8081, 8082, ...)",
    )
    p.add_argument(
        "--upstream-protocol",
        choices=["http1", "http2", "downstream"],
        default="http1",
        help="how Envoy speaks to the clusters: http1, http2 (gRPC backends) or downstream "
        "(the client's protocol: gRPC and HTTP/1 traffic on one listener) (default %(default)s)",
    )

    p = commands.add_parser("explain", help="print the decision for a described request (JSON)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="decide against this rules file")
    where.add_argument("--admin", metavar="ADDR", help="ask a running sidecar's admin API")
    p.add_argument(
        "-H",
        "--header",
        dest="headers",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header (repeatable)",
    )
    p.add_argument("--path", default="/", help="request path (default %(default)s)")
    p.add_argument("--method", default="GET", help="request method (default %(default)s)")
    p.add_argument(
        "--host",
        help="the request's host (:authority), as `match.host` reads it (default graysteer.local)",
    )
    p.add_argument(
        "--cookie",
        dest="cookies",
        type=_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a cookie (repeatable)",
    )
    p.add_argument(
        "--query",
        dest="params",
        type=_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a query parameter (repeatable)",
    )
    p.add_argument(
        "--identity",
        default="",
        metavar="URI_SAN",
        help="the client certificate's URI SAN, e.g. spiffe://example.org/ns/qa/sa/x "
        "(implies mTLS; default: a plaintext request)",
    )
    p.add_argument("--dns", default="", metavar="DNS_SAN", help="the client certificate's DNS SAN")
    p.add_argument("--listener-port", type=int, help="the local port the request arrived on")

    _add_admin_client_flags(p)

    p = commands.add_parser("status", help="show a running sidecar's table and last reload")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.add_argument(
        "--fleet",
        metavar="etcd://HOST:PORT/PREFIX",
        help="list every replica of a fleet (from etcd) with the version it serves, instead",
    )
    _add_admin_client_flags(p, address=True)
    _add_etcd_flags(p)

    p = commands.add_parser("push", help="validate a rules file and write it to a fleet's etcd prefix")
    p.add_argument("rules", help="the rules file (YAML)")
    p.add_argument("url", metavar="etcd://HOST:PORT/PREFIX", help="the fleet's etcd address and prefix")
    _add_etcd_flags(p)

    p = commands.add_parser("set-weight", help="change a split rule's weights at runtime")
    p.add_argument("rule", help="the split rule's name")
    p.add_argument(
        "weights",
        nargs="+",
        type=_weight,
        metavar="CLUSTER=WEIGHT",
        help="e.g. canary=20 (with two clusters the other one takes the rest)",
    )
    _add_admin_client_flags(p, address=True)

    p = commands.add_parser("rollout", help="promote, pause, resume or abort a rollout")
    p.add_argument("action", choices=["promote", "pause", "resume", "abort"])
    p.add_argument("rule", help="the split rule whose rollout to act on")
    _add_admin_client_flags(p, address=True)

    p = commands.add_parser("demo", help="run Envoy + sidecar + two backends and show routing")
    p.add_argument("--rules", default="examples/rules.yaml")
    p.add_argument("--envoy-config", default="envoy/envoy.yaml")
    p.add_argument("--requests", type=int, default=400, help="requests to send (default 400)")
    p.add_argument(
        "--keep-running", action="store_true", help="keep the stack running after the report until Ctrl-C"
    )

    p = commands.add_parser("demo-backend", help="a sample HTTP backend that echoes the request")
    p.add_argument("--name", required=True, help="the name it reports (e.g. stable)")
    p.add_argument("--listen", default="127.0.0.1:8081", type=_address("--listen"))
    return parser


def _add_admin_client_flags(p: argparse.ArgumentParser, address: bool = False) -> None:
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


def _add_etcd_flags(p: argparse.ArgumentParser) -> None:
    """TLS to etcd (with etcd:// addresses)."""
    p.add_argument("--etcd-ca", metavar="PEM", help="TLS to etcd: the CA of etcd's server certificate")
    p.add_argument("--etcd-cert", metavar="PEM", help="TLS to etcd: this client's certificate")
    p.add_argument("--etcd-key", metavar="PEM", help="TLS to etcd: this client's private key")


def _etcd_tls(args: argparse.Namespace) -> "EtcdTls | None":
    from sidecar.runtime.etcd import EtcdTls

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


async def _with_etcd_errors(work: Coroutine[Any, Any, Any], address: object) -> Any:
    """An etcd call from the CLI, with unreachable etcd as a one-line error."""
    from sidecar.runtime.etcd import ETCD_ERRORS

    try:
        return await asyncio.wait_for(work, 15)
    except ETCD_ERRORS as error:
        raise OSError(f"{address}: etcd unreachable or refused: {error or type(error).__name__}") from error


def _client_auth(args: argparse.Namespace) -> ClientAuth:
    return ClientAuth(args.admin_token_file, args.admin_tls_ca, args.admin_tls_cert, args.admin_tls_key)


def run_event_loop(main: "Coroutine[Any, Any, None]", choice: str) -> None:
    """Run on uvloop when asked for or (auto) installed; asyncio's loop otherwise."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ValueError(
                    "--event-loop uvloop: uvloop is not installed (a dependency of graysteer: "
                    "reinstall graysteer, or use --event-loop asyncio)"
                ) from None
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main)
            return
    asyncio.run(main)


def _check_envoy(table: "Table", path: str) -> int:
    import yaml

    from sidecar.envoyconf.lint import check

    try:
        with open(path) as handle:
            envoy = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read Envoy config: {error}") from error
    if not isinstance(envoy, dict):
        raise ValueError(f"{path}: not an Envoy bootstrap (expected a mapping)")
    findings = check(table, envoy)
    for finding in findings:
        print(f"{path}: {finding}", file=sys.stderr)
    if not findings:
        print(f"{path}: ok for these rules")
    return 1 if findings else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        auth = AdminAuth(
            args.admin_token_file,
            args.admin_tls_cert,
            args.admin_tls_key,
            args.admin_tls_ca,
            tuple(args.admin_allow),
        )
        problem = auth.problem()
        if problem:
            parser.error(problem)
        if not is_local_address(args.admin_listen) and not (args.admin_allow_remote and auth.authenticates):
            parser.error(
                f"--admin-listen {args.admin_listen} is not loopback or a unix socket: add "
                "--admin-allow-remote and authentication (--admin-token-file, or --admin-tls-* with "
                "--admin-allow) to bind it there"
            )
        args.admin_auth = auth
    if (
        args.command == "serve"
        and args.authz_http_shared_port
        and (not args.authz_http_listen or args.authz_http_listen.endswith(":0"))
    ):
        parser.error("--authz-http-shared-port needs --authz-http-listen with a fixed port")
    if args.command == "serve":
        etcd = args.config.startswith("etcd://")
        misplaced = [
            flag
            for flag, value in (
                ("--etcd-ca", args.etcd_ca),
                ("--etcd-cert", args.etcd_cert),
                ("--etcd-key", args.etcd_key),
                ("--etcd-cache", args.etcd_cache),
                ("--replica-id", args.replica_id),
            )
            if value and not etcd
        ]
        if misplaced:
            parser.error(f"{', '.join(misplaced)} need(s) --config etcd://HOST:PORT/PREFIX")
        if etcd and args.state_file:
            parser.error("--state-file does not apply to --config etcd://: the state lives in etcd")
    if args.command == "serve" and args.listen == "off" and not args.authz_http_listen:
        parser.error("--listen off leaves nothing to serve: add --authz-http-listen HOST:PORT")
    if (
        args.command == "serve"
        and args.ready_max_bypass_ratio is not None
        and not (args.envoy_admin and args.http_listen)
    ):
        parser.error(
            "--ready-max-bypass-ratio needs --envoy-admin (where the ratio is read) "
            "and --http-listen (the /readyz it acts on)"
        )
    worker = f"[worker {args.worker_index}] " if getattr(args, "worker_index", None) is not None else ""
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {worker}%(name)s: %(message)s",
    )
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change at INFO
    try:
        return _run(args)
    except RulesError as error:
        print(error, file=sys.stderr)
        return 1
    except AdminError as error:
        print(f"graysteer {args.command}: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"graysteer {args.command}: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        if args.config.startswith("etcd://"):
            from sidecar.runtime.etcd import EtcdAddress

            EtcdAddress.parse(args.config)  # a bad address is a one-line error before anything starts
        options = ServeOptions(
            config=args.config,
            listen=None if args.listen == "off" else args.listen,
            authz_http_listen=args.authz_http_listen,
            admin_listen=args.admin_listen,
            authz_http_shared_port=args.authz_http_shared_port,
            http_listen=args.http_listen,
            state_file=args.state_file,
            grace_seconds=args.grace,
            drain_seconds=args.drain,
            watch=args.watch,
            watch_polling=args.watch_poll,
            admin_allow_remote=args.admin_allow_remote,
            admin_auth=args.admin_auth,
            worker_index=args.worker_index,
            event_loop=args.event_loop,
            envoy_admin=args.envoy_admin,
            rollout_poll_seconds=args.rollout_poll,
            ready_max_bypass_ratio=args.ready_max_bypass_ratio,
            etcd_tls=_etcd_tls(args),
            etcd_cache=args.etcd_cache,
            replica_id=args.replica_id,
        )
        if args.workers > 1:
            from sidecar.workers import run_workers

            return run_workers(options, args.workers, args.log_level)
        run_event_loop(serve(options), args.event_loop)
        return 0
    if args.command == "check":
        from sidecar.runtime.load import load_rules

        table = load_rules(args.rules)
        print(
            f"{args.rules}: ok, version {table.version}, {len(table.rules)} rules, "
            f"clusters {', '.join(table.clusters)}"
        )
        if args.envoy:
            return _check_envoy(table, args.envoy)
        return 0
    if args.command == "schema":
        from sidecar.core.schema import RULES_SCHEMA

        print(json.dumps(RULES_SCHEMA, indent=2, sort_keys=True))
        return 0
    if args.command == "envoy-config":
        from sidecar.envoyconf.generate import EnvoyOptions, TlsOptions, bootstrap, render_yaml
        from sidecar.runtime.load import load_rules

        table = load_rules(args.rules)
        unknown = sorted({c for c, _ in args.upstreams} - set(table.clusters))
        if unknown:
            raise ValueError(f"--upstream names cluster(s) the rules do not have: {', '.join(unknown)}")
        envoy_options = EnvoyOptions(
            listen=split_host_port(args.listen, "--listen"),
            admin=split_host_port(args.admin, "--admin"),
            sidecar=split_host_port(args.sidecar, "--sidecar"),
            sidecar_workers=args.workers,
            upstreams=dict(args.upstreams),
            mode=args.mode,
            upstream_protocol=args.upstream_protocol,
            mtls=TlsOptions(
                f"{args.tls_dir}/ca.pem",
                f"{args.tls_dir}/server.pem",
                f"{args.tls_dir}/server.key",
                f"spiffe://{args.trust_domain}/",
            )
            if args.mtls
            else None,
        )
        flags = " ".join(sys.argv[2:]) if sys.argv[1:2] == ["envoy-config"] else f"--rules {args.rules}"
        print(
            f"# Generated by: graysteer envoy-config {flags}\n"
            + render_yaml(bootstrap(table, envoy_options)),
            end="",
        )
        return 0
    if args.command == "explain":
        from sidecar.transports.explain import Peer, explain_local

        peer = Peer(args.identity, args.dns, args.listener_port)
        if args.host is not None:
            args.headers.append((":authority", args.host))
        if args.admin:
            result = admin_client.explain(
                args.admin,
                args.method,
                args.path,
                args.headers,
                args.cookies,
                args.params,
                peer,
                _client_auth(args),
            )
        else:
            result = explain_local(
                args.config, args.method, args.path, args.headers, args.cookies, args.params, peer
            )
        print(json.dumps(result, indent=2))
        return 0
    if args.command == "push":
        from sidecar.runtime.etcd import EtcdAddress, push_rules
        from sidecar.runtime.load import MAX_FILE_BYTES, load_rules, read_regular_file

        address = EtcdAddress.parse(args.url)
        table = load_rules(args.rules)  # refused with the same messages as `check`
        content = read_regular_file(Path(args.rules), MAX_FILE_BYTES)
        revision = asyncio.run(_with_etcd_errors(push_rules(address, _etcd_tls(args), content), address))
        print(f"{args.rules}: pushed version {table.version} to {address}/rules (etcd revision {revision})")
        return 0
    if args.command == "status" and args.fleet:
        from sidecar.runtime.etcd import EtcdAddress
        from sidecar.runtime.fleet import fleet_status, format_fleet

        address = EtcdAddress.parse(args.fleet)
        report = asyncio.run(_with_etcd_errors(fleet_status(address, _etcd_tls(args)), address))
        print(json.dumps(report, indent=2) if args.json else format_fleet(report))
        return 0
    if args.command == "status":
        report = admin_client.status(args.admin, _client_auth(args))
        print(json.dumps(report, indent=2) if args.json else admin_client.format_status(report))
        return 0
    if args.command == "rollout":
        status = admin_client.rollout(args.admin, args.rule, args.action, _client_auth(args))
        print(
            f"{status['rule']}: {status['phase']}, step {status['step']}, canary weight "
            f"{status['canary_weight']} ({status['reason']})"
        )
        return 0
    if args.command == "set-weight":
        report = admin_client.set_weights(args.admin, args.rule, dict(args.weights), _client_auth(args))
        (rule,) = [r for r in report["rules"] if r["name"] == args.rule]
        print(
            f"{args.rule}: "
            + " ".join(f"{w['cluster']}={w['weight']}" for w in rule["weights"])
            + f" (version {report['version']}, persisted in {report['state_file']})"
        )
        return 0
    if args.command == "demo":
        from sidecar.dev.demo import run_demo

        return run_demo(args.rules, args.envoy_config, args.requests, args.keep_running)
    if args.command == "demo-backend":
        from sidecar.dev.backend import run_backend

        host, port = split_host_port(args.listen, "--listen")
        run_backend(args.name, host, port)
        return 0
    raise AssertionError(args.command)
