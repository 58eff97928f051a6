"""Commands on a rules file: check, schema, explain, envoy-config."""

import argparse
import json
import sys
from typing import Any

from sidecar import values
from sidecar.cli.common import add_admin_client_flags, client_auth, stdin_text, warn_size
from sidecar.core import Table
from sidecar.envoyconf.sds import parse_sds
from sidecar.serving.options import argparse_type

DEFAULT_TLS_DIR = "/etc/graysteer/tls"


def add_commands(commands: Any) -> None:
    p = commands.add_parser("check", help="validate a rules file: exit 0 if valid, 1 if not")
    p.add_argument("rules", help="the rules file (YAML)")
    p.add_argument(
        "--envoy",
        metavar="ENVOY_YAML",
        help="also check an Envoy bootstrap against the rules (guard, strip, HTTP/2...)",
    )
    p.set_defaults(run=check)

    p = commands.add_parser("schema", help="print the rules file's JSON Schema (for editors)")
    p.set_defaults(run=schema)

    add_envoy_config(commands)
    add_explain(commands)


def add_envoy_config(commands: Any) -> None:
    p = commands.add_parser("envoy-config", help="print an Envoy bootstrap for a rules file")
    p.add_argument("--rules", required=True, help="the rules file (YAML)")
    p.add_argument(
        "--mode",
        choices=["ext_proc", "ext_authz", "ext_authz_http", "envoy_decides"],
        default="ext_proc",
        help="how Envoy calls the sidecar: ext_proc or ext_authz over gRPC, "
        "ext_authz over plain HTTP (serve --authz-http-listen), or envoy_decides: Envoy decides "
        "from the table the sidecar serves it as Lua (serve --xds-listen), the fast path what "
        "the Lua leaves (default %(default)s)",
    )
    add_listener_tls_flags(p)
    add_address_flags(p)
    add_tracing_flags(p)
    p.set_defaults(run=envoy_config)


def add_listener_tls_flags(p: argparse.ArgumentParser) -> None:
    """envoy-config: client certificates on Envoy's listener."""
    p.add_argument(
        "--mtls",
        action="store_true",
        help="require client certificates on the listener (see --tls-dir or --sds, --trust-domain)",
    )
    p.add_argument(
        "--tls-dir",
        help=f"with --mtls: ca.pem, server.pem and server.key, read once (default {DEFAULT_TLS_DIR})",
    )
    p.add_argument(
        "--sds",
        type=argparse_type(parse_sds),
        metavar="file:DIR|spire:unix:///PATH",
        help="with --mtls, certificates that rotate without a restart: file:DIR (a watched directory "
        "holding cert.yaml, ca.yaml, tls.crt, tls.key, ca.crt: see docs/envoy.md) or "
        "spire:unix:///PATH (the SPIRE agent's SDS API: SVID `default`, bundle `ROOTCA`)",
    )
    p.add_argument(
        "--trust-domain",
        default="example.org",
        help="with --mtls: accept client URI SANs spiffe://DOMAIN/... (default %(default)s)",
    )


def add_address_flags(p: argparse.ArgumentParser) -> None:
    """envoy-config: where Envoy listens and what it sends to, and how."""
    address = argparse_type(values.host_port)  # -> (host, port)
    p.add_argument(
        "--listen", default="127.0.0.1:10000", type=address, help="Envoy's listener (default %(default)s)"
    )
    p.add_argument(
        "--admin", default="127.0.0.1:9901", type=address, help="Envoy's admin address (default %(default)s)"
    )
    p.add_argument(
        "--sidecar",
        default="127.0.0.1:50051",
        type=address,
        help="the sidecar's address: serve --listen, or --authz-http-listen with "
        "--mode ext_authz_http or envoy_decides (default %(default)s)",
    )
    p.add_argument(
        "--sidecar-xds",
        default="127.0.0.1:18000",
        type=address,
        help="with --mode envoy_decides: the sidecar's serve --xds-listen (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=argparse_type(lambda text: values.whole_number(text, minimum=1)),
        default=1,
        help="sidecar worker processes (serve --workers): endpoints --sidecar, +1, ...",
    )
    p.add_argument(
        "--upstream",
        dest="upstreams",
        action="append",
        default=[],
        type=argparse_type(values.cluster_address),
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


def add_tracing_flags(p: argparse.ArgumentParser) -> None:
    """envoy-config: Envoy's OpenTelemetry tracer."""
    p.add_argument(
        "--otlp",
        type=argparse_type(values.host_port),
        metavar="HOST:PORT",
        help="trace every request with Envoy's OpenTelemetry tracer, exporting OTLP/gRPC to this "
        "collector, the decision on Envoy's span as graysteer.* and feature_flag.* tags "
        "(docs/observability.md; default off)",
    )
    p.add_argument(
        "--otlp-service-name",
        default="envoy",
        metavar="NAME",
        help="with --otlp: the service.name of Envoy's spans (default %(default)s)",
    )


def add_explain(commands: Any) -> None:
    p = commands.add_parser("explain", help="print the decision for a described request (JSON)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="decide against this rules file")
    where.add_argument("--admin", metavar="ADDR", help="ask a running sidecar's admin API")
    p.add_argument(
        "-H",
        "--header",
        dest="headers",
        type=argparse_type(values.header),
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header (repeatable)",
    )
    p.add_argument("--path", default="/", help="request path (default %(default)s)")
    p.add_argument("--method", default="GET", help="request method (default %(default)s)")
    p.add_argument(
        "--host", help="the request's host (:authority), as `match.host` reads it (default graysteer.local)"
    )
    for flag, dest, what in (("--cookie", "cookies", "a cookie"), ("--query", "params", "a query parameter")):
        p.add_argument(
            flag,
            dest=dest,
            type=argparse_type(values.pair),
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help=f"{what} (repeatable)",
        )
    p.add_argument(
        "--identity",
        default="",
        metavar="URI_SAN",
        help="the client certificate's URI SAN, e.g. spiffe://example.org/ns/qa/sa/x "
        "(implies mTLS; default: a plaintext request)",
    )
    p.add_argument("--dns", default="", metavar="DNS_SAN", help="the client certificate's DNS SAN")
    p.add_argument(
        "--from-log",
        metavar="LINE|-",
        help="decide again the request of a decision log line (serve --decision-log; '-': read "
        "it from stdin) and say whether today's table decides the same (exit 0) or not (exit 1)",
    )
    p.add_argument(
        "--listener-port",
        type=argparse_type(values.whole_number),
        help="the local port the request arrived on",
    )
    add_admin_client_flags(p)
    p.set_defaults(run=explain)


def check(args: argparse.Namespace) -> int:
    from sidecar.table.load import load_rules

    table = load_rules(args.rules)
    print(
        f"{args.rules}: ok, version {table.version}, {len(table.rules)} rules, "
        f"clusters {', '.join(table.clusters)}"
    )
    warn_size(table, args.rules)
    return check_envoy(table, args.envoy) if args.envoy else 0


def schema(args: argparse.Namespace) -> int:
    from sidecar.core.schema import RULES_SCHEMA

    print(json.dumps(RULES_SCHEMA, indent=2, sort_keys=True))
    return 0


def envoy_config(args: argparse.Namespace) -> int:
    from sidecar.envoyconf.generate import EnvoyOptions, bootstrap, render_yaml
    from sidecar.envoyconf.tls import TlsOptions
    from sidecar.table.load import load_rules

    table = load_rules(args.rules)
    unknown = sorted({c for c, _ in args.upstreams} - set(table.clusters))
    if unknown:
        raise ValueError(f"--upstream names cluster(s) the rules do not have: {', '.join(unknown)}")
    if (args.tls_dir or args.sds) and not args.mtls:
        raise ValueError("--tls-dir and --sds configure the listener's TLS: add --mtls")
    if args.tls_dir and args.sds:
        raise ValueError("--tls-dir (files read once) and --sds (certificates by SDS) exclude each other")
    tls = None
    if args.mtls:
        directory = args.tls_dir or DEFAULT_TLS_DIR
        tls = TlsOptions(
            f"{directory}/ca.pem",
            f"{directory}/server.pem",
            f"{directory}/server.key",
            f"spiffe://{args.trust_domain}/",
            args.sds,
        )
    options = EnvoyOptions(
        listen=args.listen,
        admin=args.admin,
        sidecar=args.sidecar,
        xds=args.sidecar_xds,
        sidecar_workers=args.workers,
        upstreams=dict(args.upstreams),
        mode=args.mode,
        upstream_protocol=args.upstream_protocol,
        mtls=tls,
        otlp=args.otlp,
        otlp_service_name=args.otlp_service_name,
    )
    flags = " ".join(sys.argv[2:]) if sys.argv[1:2] == ["envoy-config"] else f"--rules {args.rules}"
    print(
        f"# Generated by: graysteer envoy-config {flags}\n" + render_yaml(bootstrap(table, options)), end=""
    )
    return 0


def explain(args: argparse.Namespace) -> int:
    from sidecar.admin import client as admin_client
    from sidecar.transports.explain import Peer, compare_logged, explain_local, logged_request

    peer = Peer(args.identity, args.dns, args.listener_port)
    if args.host is not None:
        args.headers.append((":authority", args.host))
    request = (args.method, args.path, args.headers, args.cookies, args.params, peer)
    redacted: list[str] = []
    line = stdin_text().readline() if args.from_log == "-" else args.from_log
    if line is not None:
        method, path, headers, peer, redacted = logged_request(line)
        request = (method, path, headers, [], [], peer)
    if args.admin:
        result = admin_client.explain(args.admin, *request, client_auth(args))
    else:
        result = explain_local(args.config, *request)
    if line is not None:
        result = compare_logged(line, result)
        if redacted:  # decided again without them: a rule reading them may decide otherwise
            result["redacted"] = redacted
    print(json.dumps(result, indent=2))
    return 0 if line is None or result["same"] else 1


def check_envoy(table: Table, path: str) -> int:
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
