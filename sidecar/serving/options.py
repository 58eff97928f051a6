"""Every option of `graysteer serve`, defined once: its field, flag, default, help and how a
value is read, and the checks across options. The command line's flags, the checks, the
options object the sidecar is built from and what `--workers` hands each worker all derive
from this one list (a worker receives the options object itself, never flags).
"""

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar import values
from sidecar.admin.security import AdminAuth, TokenFile
from sidecar.core.cost import DEFAULT_SHADOW_BUDGET_MS

if TYPE_CHECKING:
    from sidecar.sources.etcd_client import EtcdTls


@dataclass(frozen=True)
class Flag:
    """How an option is written on the command line."""

    name: str
    help: str
    read: Callable[[str], Any] | None = None  # a value's reader: ValueError says what is wrong
    metavar: str | None = None
    action: str = "store"  # store, store_true, store_false, append
    choices: Sequence[str] | None = None
    required: bool = False


def option(default: Any, flag: Flag | None) -> Any:
    """A field of ServeOptions: its default, and its flag (None: set by the program only)."""
    return field(default=default, metadata={"flag": flag})


def _address(flag: str) -> Callable[[str], str]:
    def read(text: str) -> str:
        values.host_port(text, flag)
        return text

    return read


def _listen(text: str) -> str | None:
    return None if text == "off" else _address("--listen")(text)


def _admin_address(text: str) -> str:
    return text if text.startswith("unix:") else _address("--admin-listen")(text)


def _http_url(text: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{text!r} is not an http:// or https:// URL with a host (and no query)")
    return text


def _gate_allow(text: str) -> str:
    from sidecar.rollouts.destinations import parse_allowed

    parse_allowed(text)
    return text


def _positive(text: str) -> int:
    return values.whole_number(text, minimum=1)


@dataclass(frozen=True)
class ServeOptions:
    # fmt: off
    config: str = option("", Flag(
        "--config", "the rules file (YAML), or etcd://HOST:PORT,.../PREFIX: a fleet's rules and state (etcd)",
        metavar="RULES|etcd://HOST:PORT,.../PREFIX", required=True))
    listen: str | None = option("127.0.0.1:50051", Flag(
        "--listen", "HOST:PORT of the gRPC server (ext_proc, ext_authz, health), or 'off' to serve only "
        "--authz-http-listen (default %(default)s)", _listen, "HOST:PORT|off"))
    authz_http_listen: str | None = option(None, Flag(
        "--authz-http-listen", "also answer Envoy's ext_authz over plain HTTP/1.1 here: the fast path "
        "(envoy-config --mode ext_authz_http; default off)", _address("--authz-http-listen"), "HOST:PORT"))
    authz_http_shared_port: bool = option(False, Flag(
        "--authz-http-shared-port", "with --workers N: every worker listens on the --authz-http-listen port "
        "itself (SO_REUSEPORT; the kernel spreads Envoy's connections) instead of port, port+1, ...",
        action="store_true"))
    xds_listen: str | None = option(None, Flag(
        "--xds-listen", "serve Envoy the table as a Lua filter over ECDS here: Envoy decides each request "
        "itself (envoy-config --mode envoy_decides, with --authz-http-listen for what the Lua leaves; "
        "default off)", _address("--xds-listen"), "HOST:PORT"))
    admin_listen: str = option("127.0.0.1:50052", Flag(
        "--admin-listen", "HOST:PORT or unix:PATH of the admin API (default %(default)s)",
        _admin_address, "ADDR"))
    admin_allow_remote: bool = option(False, Flag(
        "--admin-allow-remote", "allow --admin-listen on a non-loopback address (needs --admin-token-file "
        "or --admin-tls-*)", action="store_true"))
    admin_token_file: str | None = option(None, Flag(
        "--admin-token-file", "admin calls must carry 'authorization: Bearer TOKEN' with the token in this "
        "file (read again when it changes; refused when others can read it)", metavar="PATH"))
    admin_tls_cert: str | None = option(None, Flag(
        "--admin-tls-cert", "serve the admin API over TLS with this certificate", metavar="PEM"))
    admin_tls_key: str | None = option(None, Flag("--admin-tls-key", "... and this key", metavar="PEM"))
    admin_tls_ca: str | None = option(None, Flag(
        "--admin-tls-ca", "... requiring client certificates from this CA", metavar="PEM"))
    admin_allow: tuple[str, ...] = option((), Flag(
        "--admin-allow", "with --admin-tls-*: a client identity allowed to call (a SPIFFE ID, a glob "
        "spiffe://td/ns/ops/*, or a DNS name; repeatable)", metavar="IDENTITY", action="append"))
    http_listen: str | None = option(None, Flag(
        "--http-listen", "HOST:PORT for /metrics, /healthz, /readyz, /rollouts, the live page /ui/ and "
        "OpenFeature remote evaluation /ofrep/v1/ (default: off)",
        _address("--http-listen"), "HOST:PORT"))
    http_host: tuple[str, ...] = option((), Flag(
        "--http-host", "a host name the --http-listen endpoint answers to besides its IP addresses and "
        "localhost (its DNS name behind an ingress or a Service; repeatable): a request naming another "
        "host is refused 421, the probes excepted (DNS rebinding)", metavar="NAME", action="append"))
    http_actions: bool = option(False, Flag(
        "--http-actions", "let the live page on --http-listen (/ui/) promote, pause, resume and abort "
        "rollouts, for callers the admin API's authentication accepts: its bearer token (--admin-token-file) "
        "and/or a client certificate on --admin-allow (with --admin-tls-*, the endpoint then serves HTTPS); "
        "default read-only", action="store_true"))
    ofrep_token_file: str | None = option(None, Flag(
        "--ofrep-token-file", "OpenFeature remote evaluation (OFREP, /ofrep/v1/... on --http-listen) must "
        "carry 'authorization: Bearer TOKEN' with the token in this file: a read-only credential for "
        "applications (read again when it changes; refused when others can read it). Without it, OFREP "
        "answers on a loopback --http-listen only", metavar="PATH"))
    shadow_config: str | None = option(None, Flag(
        "--shadow-config", "the next rules file: decide requests with it too (a sample within "
        "--shadow-budget), serve none of its decisions, count where it differs "
        "(graysteer_shadow_decisions_total, status; with etcd:// the fleet's PREFIX/rules.next, written "
        "by push --next)", metavar="NEXT"))
    shadow_sample: float | None = option(None, Flag(
        "--shadow-sample", "the share of requests the shadow table decides too, e.g. 0.1 (default: the "
        "share that keeps its cost under --shadow-budget)", values.share, "R"))
    shadow_budget_ms: float = option(DEFAULT_SHADOW_BUDGET_MS, Flag(
        "--shadow-budget", "without --shadow-sample: the milliseconds a shadow decision may add to a "
        "request on average; a costlier shadow table decides that share of requests (default %(default)s)",
        values.seconds, "MS"))
    state_file: str | None = option(None, Flag(
        "--state-file", "where runtime weight changes are persisted (default: .RULES.graysteer-state.json "
        "beside the rules file; in etcd with etcd://)", metavar="PATH"))
    etcd_ca: str | None = option(None, Flag(
        "--etcd-ca", "TLS to etcd: the CA of etcd's server certificate", metavar="PEM"))
    etcd_cert: str | None = option(None, Flag("--etcd-cert", "TLS to etcd: this client's certificate",
                                              metavar="PEM"))
    etcd_key: str | None = option(None, Flag("--etcd-key", "TLS to etcd: this client's private key",
                                             metavar="PEM"))
    etcd_cache: str | None = option(None, Flag(
        "--etcd-cache", "with etcd://: where the last table served is kept, to start from during an etcd "
        "outage (default ~/.cache/graysteer/etcd/...)", metavar="DIR"))
    replica_id: str | None = option(None, Flag(
        "--replica-id", "with etcd://: this replica's name in its fleet (default HOSTNAME-PID)",
        metavar="NAME"))
    drain_seconds: float = option(1.0, Flag(
        "--drain", "on SIGTERM, seconds to report NOT_SERVING before closing, so Envoy's health checks "
        "stop sending streams (default %(default)s)", values.seconds, "SECONDS"))
    grace_seconds: float = option(5.0, Flag(
        "--grace", "then, seconds to let open streams finish (default %(default)s)",
        values.seconds, "SECONDS"))
    watch: bool = option(True, Flag(
        "--no-watch", "do not watch the rules file (SIGHUP still reloads)", action="store_false"))
    watch_polling: bool = option(False, Flag(
        "--watch-poll", "poll the rules directory instead of using inotify", action="store_true"))
    workers: int = option(1, Flag(
        "--workers", "worker processes, on ports --listen, +1, ... (default 1; see docs/operations.md)",
        _positive, "N"))
    event_loop: str = option("auto", Flag(
        "--event-loop", "auto: uvloop when installed (default), else asyncio's own loop",
        choices=("auto", "uvloop", "asyncio")))
    envoy_admin: str | None = option(None, Flag(
        "--envoy-admin", "Envoy's admin address, read for rollout analysis and to count requests Envoy "
        "sends on without a decision (default: none)", _address("--envoy-admin"), "HOST:PORT"))
    gate_allow: tuple[str, ...] = option((), Flag(
        "--gate-allow", "let rollouts' webhook gates reach this non-public destination: an address or "
        "network (10.0.0.0/8), ADDRESS:PORT ([::1]:9000), or a host name (approvals.internal[:PORT]); "
        "repeatable; default: public addresses only (never this sidecar's listeners or Envoy's admin)",
        _gate_allow, "DEST", action="append"))
    prometheus: str | None = option(None, Flag(
        "--prometheus", "Prometheus' URL (http[s]://HOST:PORT[/PREFIX]), queried for rollouts' metric checks "
        "(analysis.metrics; default: none, and a rollout with metric checks waits)", _http_url, "URL"))
    prometheus_token_file: str | None = option(None, Flag(
        "--prometheus-token-file", "queries to --prometheus carry 'authorization: Bearer TOKEN' with the "
        "token in this file (read at every query)", metavar="PATH"))
    prometheus_ca: str | None = option(None, Flag(
        "--prometheus-ca", "TLS to --prometheus: the CA of its server certificate (default: the system's)",
        metavar="PEM"))
    rollout_poll_seconds: float = option(1.0, Flag(
        "--rollout-poll", "seconds between reads of Envoy's stats and rollout steps (default %(default)s)",
        values.seconds, "SECONDS"))
    ready_max_bypass_ratio: float | None = option(None, Flag(
        "--ready-max-bypass-ratio", "/readyz answers 503 while Envoy sends more than this share of requests "
        "on without a decision (needs --envoy-admin and --http-listen; default off)", values.ratio, "R"))
    decision_log: str | None = option(None, Flag(
        "--decision-log", "write one JSON line per decision to this file, or '-' for stdout "
        "(docs/observability.md; default off)", metavar="PATH|-"))
    decision_log_sample: float = option(1.0, Flag(
        "--decision-log-sample", "with --decision-log: the share of decisions written, e.g. 0.01 "
        "(default %(default)s: every one)", values.share, "R"))
    # set by the program, not by flags
    log_level: str = option("INFO", None)
    worker_index: int | None = option(None, None)  # set for each worker of `serve --workers N`
    # ... with the (flag, HOST:PORT) of every listener of its group: no gate may reach them
    group_listeners: tuple[tuple[str, str], ...] = option((), None)
    # fmt: on

    # -- what the options mean together ------------------------------------------------------

    @property
    def is_etcd(self) -> bool:
        return self.config.startswith("etcd://")

    @property
    def primary(self) -> bool:
        """The one process of a group of workers that acts for the group on the shared Envoy:
        runs the (file-mode) rollouts, publishes Envoy's counts to a fleet (worker 0, or the
        only process)."""
        return self.worker_index in (None, 0)

    @property
    def admin_auth(self) -> AdminAuth:
        return AdminAuth(
            self.admin_token_file,
            self.admin_tls_cert,
            self.admin_tls_key,
            self.admin_tls_ca,
            self.admin_allow,
        )

    @property
    def etcd_tls(self) -> "EtcdTls | None":
        from sidecar.sources.etcd_client import EtcdTls

        if not self.etcd_ca:
            return None
        return EtcdTls(
            Path(self.etcd_ca),
            Path(self.etcd_cert) if self.etcd_cert else None,
            Path(self.etcd_key) if self.etcd_key else None,
        )

    def problems(self) -> list[str]:
        """What is wrong with these options together (each flag already read its own value)."""
        return [*self._listener_problems(), *self._etcd_problems(), *self._feature_problems()]

    def _listener_problems(self) -> list[str]:
        """Where and how the listeners may serve."""
        found = []
        if problem := self.admin_auth.problem():
            found.append(problem)
        if not values.is_local_address(self.admin_listen) and not (
            self.admin_allow_remote and self.admin_auth.authenticates
        ):
            found.append(
                f"--admin-listen {self.admin_listen} is not loopback or a unix socket: add "
                "--admin-allow-remote and authentication (--admin-token-file, or --admin-tls-* with "
                "--admin-allow) to bind it there"
            )
        if self.xds_listen and not values.is_local_address(self.xds_listen):
            found.append(
                f"--xds-listen {self.xds_listen} is not loopback: its ECDS feed (the whole table) and "
                "its access-log stream (counted as decisions) take no authentication, so they serve "
                "the Envoy beside the sidecar only (the pod's loopback)"
            )
        if self.authz_http_shared_port and (
            not self.authz_http_listen or self.authz_http_listen.endswith(":0")
        ):
            found.append("--authz-http-shared-port needs --authz-http-listen with a fixed port")
        if self.listen is None and not self.authz_http_listen:
            found.append("--listen off leaves nothing to serve: add --authz-http-listen HOST:PORT")
        if self.xds_listen and self.workers > 1:
            found.append(
                "--xds-listen serves one Envoy's table from one process: use it with --workers 1 "
                "(the fast path it falls back to takes what the Lua leaves)"
            )
        if self.http_actions and not (self.http_listen and self.admin_auth.authenticates):
            found.append(
                "--http-actions needs --http-listen and the admin API's authentication (--admin-token-file, "
                "or --admin-tls-* with --admin-allow): the live page never acts for an unauthenticated caller"
            )
        if self.ofrep_token_file is not None:
            found.extend(self._ofrep_problems(self.ofrep_token_file))
        if self.http_actions and self.workers > 1:
            found.append(
                "--http-actions: with --workers the operator endpoint serves the group's metrics, not the "
                "live page (use `graysteer status --watch` and `graysteer rollout` on a worker's admin API)"
            )
        return found

    def _ofrep_problems(self, token_file: str) -> list[str]:
        if not self.http_listen:
            return ["--ofrep-token-file needs --http-listen (OFREP is served there)"]
        if self.workers > 1:
            return [
                "--ofrep-token-file: with --workers the operator endpoint serves the group's metrics, not "
                "OFREP (each worker decides alike: run OFREP on a sidecar with --workers 1)"
            ]
        try:
            TokenFile(token_file, "OFREP token file").token()
        except (OSError, ValueError) as error:
            return [f"--ofrep-token-file {token_file}: {error}"]
        return []

    def _etcd_problems(self) -> list[str]:
        """The etcd flags, with or without --config etcd://."""
        found = []
        etcd_only = [
            f"--{name.replace('_', '-')}"
            for name in ("etcd_ca", "etcd_cert", "etcd_key", "etcd_cache", "replica_id")
            if getattr(self, name) and not self.is_etcd
        ]
        if etcd_only:
            found.append(f"{', '.join(etcd_only)} need(s) --config etcd://HOST:PORT,.../PREFIX")
        if self.is_etcd:
            from sidecar.sources.etcd_client import EtcdAddress

            if self.state_file:
                found.append("--state-file does not apply to --config etcd://: the state lives in etcd")
            if self.shadow_config:
                found.append(
                    "--shadow-config does not apply to --config etcd://: a fleet's shadow table is "
                    "PREFIX/rules.next (graysteer push --next NEXT URL)"
                )
            try:
                EtcdAddress.parse(self.config)
            except ValueError as error:
                found.append(str(error))
        if (self.etcd_cert or self.etcd_key) and not self.etcd_ca:
            found.append("--etcd-cert and --etcd-key need --etcd-ca (TLS to etcd)")
        elif bool(self.etcd_cert) != bool(self.etcd_key):
            found.append("--etcd-cert and --etcd-key go together")
        return found

    def _feature_problems(self) -> list[str]:
        """What the decision log, gates and the bypass ratio need."""
        found = []
        if self.decision_log_sample != 1.0 and self.decision_log is None:
            found.append("--decision-log-sample needs --decision-log PATH|-")
        if self.gate_allow and not self.envoy_admin:
            from sidecar.rollouts.destinations import GateDestinations

            if GateDestinations.parse(self.gate_allow).covers_loopback():
                found.append(
                    "--gate-allow lets gates reach loopback on every port: name Envoy's admin with "
                    "--envoy-admin HOST:PORT so that no gate can reach it, or allow one port "
                    "(127.0.0.1:PORT)"
                )
        found.extend(self._prometheus_problems())
        if self.ready_max_bypass_ratio is not None and not (self.envoy_admin and self.http_listen):
            found.append(
                "--ready-max-bypass-ratio needs --envoy-admin (where the ratio is read) "
                "and --http-listen (the /readyz it acts on)"
            )
        return found

    def _prometheus_problems(self) -> list[str]:
        """--prometheus' companions: each file must be usable now, not at the first query."""
        from sidecar.rollouts.prometheus import ca_context, read_token

        if (self.prometheus_token_file or self.prometheus_ca) and not self.prometheus:
            return ["--prometheus-token-file and --prometheus-ca need --prometheus URL"]
        found = []
        if self.prometheus_ca and self.prometheus and not self.prometheus.startswith("https:"):
            found.append("--prometheus-ca is for an https:// --prometheus URL")
        checks: list[tuple[str, str | None, Callable[[Path], object]]] = [
            ("--prometheus-token-file", self.prometheus_token_file, read_token),
            ("--prometheus-ca", self.prometheus_ca, ca_context),
        ]
        for flag, path, check in checks:
            if path is None:
                continue
            try:
                check(Path(path))
            except OSError as error:
                found.append(f"{flag} {path}: {error.strerror or error}")
            except ValueError as error:
                found.append(f"{flag} {path}: {error}")
        return found


def flags() -> list[tuple[str, Flag, Any]]:
    """(field name, flag, default) of every option set by a flag, in order."""
    out = []
    for f in dataclasses.fields(ServeOptions):
        flag = f.metadata.get("flag")
        if flag is not None:
            out.append((f.name, flag, f.default))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One argparse argument per option, its `dest` the field's name."""
    for name, flag, default in flags():
        kwargs: dict[str, Any] = {"dest": name, "help": flag.help}
        if flag.action in ("store_true", "store_false"):
            kwargs["action"] = flag.action
        else:
            if flag.read is not None:
                kwargs["type"] = argparse_type(flag.read)
            if flag.metavar:
                kwargs["metavar"] = flag.metavar
            if flag.choices:
                kwargs["choices"] = flag.choices
            if flag.action == "append":
                kwargs["action"] = "append"
                default = []
            kwargs["required"] = flag.required
        kwargs["default"] = default
        parser.add_argument(flag.name, **kwargs)


def from_arguments(args: argparse.Namespace, **program: Any) -> ServeOptions:
    """The options the parsed flags (and the program, e.g. log_level) give."""
    given = {name: getattr(args, name) for name, _, _ in flags()}
    for repeated in ("admin_allow", "gate_allow", "http_host"):
        given[repeated] = tuple(given[repeated] or ())
    return ServeOptions(**given, **program)


def argparse_type(read: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type` from a value reader (its ValueError is argparse's message)."""

    def parse(text: str) -> Any:
        try:
            return read(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = getattr(read, "__name__", "value")  # argparse names it in its message
    return parse
