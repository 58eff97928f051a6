"""The scenarios: each is a front Envoy config (from envoy/ or the generator) plus the
sidecar process behind it, if any. Upstreams are Envoy `direct_response` listeners in a
second Envoy, so they cost almost nothing."""

import copy
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.contract import XDS_CLUSTER
from sidecar.core import compile_table
from sidecar.dev.devstack import LUA_TABLE_VERSION, Envoy, Sidecar
from sidecar.dev.processes import Process, free_port, wait_for
from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document
from sidecar.table.load import load_rules

REPO = Path(__file__).parents[1]
RULES = REPO / "examples" / "rules.yaml"
ENVOY_YAML = REPO / "envoy" / "envoy.yaml"


ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def backends_config() -> dict[str, Any]:
    """One Envoy, two listeners (stable, canary) answering 200 from direct_response."""
    listeners = []
    for name in ("stable", "canary"):
        listeners.append(
            {
                "name": name,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                    "http_connection_manager.v3.HttpConnectionManager",
                                    "stat_prefix": name,
                                    "http_filters": [
                                        {
                                            "name": "envoy.filters.http.router",
                                            "typed_config": {"@type": ROUTER_TYPE},
                                        }
                                    ],
                                    "route_config": {
                                        "virtual_hosts": [
                                            {
                                                "name": name,
                                                "domains": ["*"],
                                                "routes": [
                                                    {
                                                        "match": {"prefix": "/"},
                                                        "direct_response": {
                                                            "status": 200,
                                                            "body": {"inline_string": name},
                                                        },
                                                    }
                                                ],
                                            }
                                        ]
                                    },
                                },
                            }
                        ]
                    }
                ],
            }
        )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": listeners},
    }


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def envoy_yaml() -> dict[str, Any]:
    return yaml.safe_load(ENVOY_YAML.read_text())


def native() -> dict[str, Any]:
    """(a) Envoy routes on a header the client sends; no sidecar, no strip."""
    config = envoy_yaml()
    hcm = _hcm(config)
    hcm["http_filters"] = hcm["http_filters"][-1:]  # the router only
    del hcm["early_header_mutation_extensions"]
    return config


def with_response_headers() -> dict[str, Any]:
    """(c) envoy.yaml with the response headers sent to the sidecar too."""
    config = envoy_yaml()
    _hcm(config)["http_filters"][0]["typed_config"]["processing_mode"]["response_header_mode"] = "SEND"
    return config


def ext_authz() -> dict[str, Any]:
    """(d) the ext_authz front proxy (plaintext: the load tool does not do client certs)."""
    table = load_rules(RULES)
    return bootstrap_document(table, EnvoyOptions(mode="ext_authz"))


def envoy_decides() -> dict[str, Any]:
    """(l) Envoy decides from the table as Lua (served over ECDS), the fast path behind it."""
    return bootstrap_document(load_rules(RULES), EnvoyOptions(mode="envoy_decides"))


def envoy_decides_realistic() -> dict[str, Any]:
    """(l50) (l) on the 50-rule realistic table (benchmarks/decide.py)."""
    from benchmarks.decide import realistic_document

    table = compile_table(realistic_document(), "realistic", "realistic.yaml")
    return bootstrap_document(table, EnvoyOptions(mode="envoy_decides"))


def ext_authz_http() -> dict[str, Any]:
    """(h) the ext_authz-over-HTTP front proxy: envoy/ext_authz_http.yaml's generator."""
    table = load_rules(RULES)
    return bootstrap_document(table, EnvoyOptions(mode="ext_authz_http"))


_collector: list[Any] = []


def collector_port() -> int:
    """A real OTLP receiver for the traced scenarios (started once, kept for the run)."""
    if not _collector:
        from sidecar.dev.otlp import Receiver

        _collector.append(Receiver(keep=False))  # counts what Envoy exports, decodes nothing
    return int(_collector[0].port)


def traced(mode: str) -> Callable[[], dict[str, Any]]:
    """(bt, ht, et, h0t) the generated front proxy with --otlp: Envoy traces every request."""

    def config() -> dict[str, Any]:
        options = EnvoyOptions(mode=mode, otlp=("127.0.0.1", collector_port()))
        return bootstrap_document(load_rules(RULES), options)

    return config


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    envoy: Callable[[], dict[str, Any]]
    sidecar: str  # "graysteer", "empty" (an empty servicer of the transport's shape) or "none"
    transport: str = "grpc"  # or "http": ext_authz over HTTP
    floor: str | None = "e"  # the scenario that is this transport's floor, for the ratios
    workers: int = 1
    headers: dict[str, str] = field(default_factory=dict)  # sent by the load tool
    vary_user: bool = True  # a different x-user-id per request (exercises the split)
    sidecar_args: tuple[str, ...] = ()
    xds: bool = False  # the sidecar serves Envoy the table as Lua over ECDS (--xds-listen)
    realistic: bool = False  # the sidecar serves the 50-rule realistic table, not RULES

    def start_sidecar(self, workdir: Path) -> Process | None:
        if self.sidecar == "none":
            return None
        if self.sidecar == "empty":
            module = "benchmarks.empty_servicer" if self.transport == "grpc" else "benchmarks.empty_http"
            process = Process(
                f"empty-{self.key}", [sys.executable, "-m", module, "0"], workdir / f"empty-{self.key}.log"
            )
            process.ports = [int(process.wait_for_log(r"on 127\.0\.0\.1:(\d+)").group(1))]  # type: ignore[attr-defined]
            return process
        args = ["--workers", str(self.workers)] if self.workers > 1 else []
        if any("{next}" in a for a in self.sidecar_args):
            next_rules(workdir / "next.yaml")
        args += [
            a.replace("{workdir}", str(workdir)).replace("{next}", str(workdir / "next.yaml"))
            for a in self.sidecar_args
        ]
        shared = "--authz-http-shared-port" in self.sidecar_args  # needs a fixed port
        xds_port = free_port() if self.xds else 0
        if self.xds:
            args += ["--xds-listen", f"127.0.0.1:{xds_port}"]
        rules = RULES
        if self.realistic:
            from benchmarks.decide import realistic_document

            # A directory of its own, as a ConfigMap's: the sidecar watches the rules'
            # directory, and workdir holds the logs Envoy and the sidecar write as they serve
            # (every write would wake the watcher and re-read the rules: CPU per request that
            # no deployment has, and that (h), on examples/, never paid).
            rules = workdir / "rules" / "realistic.yaml"
            rules.parent.mkdir(exist_ok=True)
            rules.write_text(yaml.safe_dump(realistic_document()))
        sidecar = Sidecar(
            rules,
            workdir,
            args,
            name=f"sidecar-{self.key}",
            transport=self.transport,
            port=free_port() if shared else 0,
        )
        sidecar.xds_port = xds_port  # type: ignore[attr-defined]
        return sidecar


DECISION_LOG = ("--decision-log", "{workdir}/decisions.jsonl")
SHADOW = ("--shadow-config", "{next}")


def next_rules(path: Path) -> None:
    """The shadow table of the (bs, hs) scenarios: the example rules with the ramp at 50%."""
    text = RULES.read_text()
    changed = text.replace("{cluster: stable, weight: 90}", "{cluster: stable, weight: 50}").replace(
        "{cluster: canary, weight: 10}", "{cluster: canary, weight: 50}"
    )
    assert changed != text, "examples/rules.yaml has no 90/10 split to shadow"
    path.write_text(changed)


SCENARIOS = [
    Scenario(
        "a",
        "Envoy native header routing (no sidecar)",
        native,
        "none",
        headers={"x-route-cluster": "stable"},
        vary_user=False,
        floor=None,
    ),
    Scenario("b", "ext_proc, request headers only", envoy_yaml, "graysteer"),
    Scenario("c", "ext_proc, request + response headers", with_response_headers, "graysteer"),
    Scenario("d", "ext_authz", ext_authz, "graysteer"),
    Scenario("e", "empty ext_proc servicer (floor of Python gRPC)", envoy_yaml, "empty"),
    Scenario("f2", "(b) with 2 worker processes", envoy_yaml, "graysteer", workers=2),
    Scenario("f3", "(b) with 3 worker processes", envoy_yaml, "graysteer", workers=3),
    Scenario(
        "h", "ext_authz over HTTP (the fast path)", ext_authz_http, "graysteer", transport="http", floor="h0"
    ),
    Scenario(
        "l",
        "Envoy decides from the table as Lua (ECDS), the fast path for what the Lua leaves",
        envoy_decides,
        "graysteer",
        transport="http",
        floor="h0",
        xds=True,
    ),
    Scenario(
        "l50",
        "(l) on the 50-rule realistic table",
        envoy_decides_realistic,
        "graysteer",
        transport="http",
        floor="h0",
        xds=True,
        realistic=True,
    ),
    Scenario(
        "h0",
        "empty HTTP responder (floor of the HTTP transport)",
        ext_authz_http,
        "empty",
        transport="http",
        floor="h0",
    ),
    Scenario(
        "h2",
        "(h) with 2 worker processes, ports +0, +1",
        ext_authz_http,
        "graysteer",
        workers=2,
        transport="http",
        floor="h0",
    ),
    Scenario(
        "h2s",
        "(h) with 2 worker processes sharing one port (SO_REUSEPORT)",
        ext_authz_http,
        "graysteer",
        workers=2,
        transport="http",
        floor="h0",
        sidecar_args=("--authz-http-shared-port",),
    ),
    Scenario(
        "bt", "(b) traced: Envoy exports every request's span over OTLP", traced("ext_proc"), "graysteer"
    ),
    Scenario(
        "et",
        "(e) traced: the gRPC floor behind the traced Envoy (what tracing costs around any servicer)",
        traced("ext_proc"),
        "empty",
    ),
    Scenario(
        "h0t",
        "(h0) traced: the HTTP floor behind the traced Envoy (what tracing costs around any responder)",
        traced("ext_authz_http"),
        "empty",
        transport="http",
        floor="h0",
    ),
    Scenario("bl", "(b) with the decision log at 100%", envoy_yaml, "graysteer", sidecar_args=DECISION_LOG),
    Scenario(
        "ht",
        "(h) traced: Envoy exports every request's span over OTLP",
        traced("ext_authz_http"),
        "graysteer",
        transport="http",
        floor="h0",
    ),
    Scenario(
        "hl",
        "(h) with the decision log at 100%",
        ext_authz_http,
        "graysteer",
        transport="http",
        floor="h0",
        sidecar_args=DECISION_LOG,
    ),
    Scenario(
        "l50l",
        "(l50) with the decision log at 100% (Envoy files each request's inputs)",
        envoy_decides_realistic,
        "graysteer",
        transport="http",
        floor="h0",
        xds=True,
        realistic=True,
        sidecar_args=DECISION_LOG,
    ),
    Scenario(
        "bs",
        "(b) with a shadow table (every request decided twice)",
        envoy_yaml,
        "graysteer",
        sidecar_args=SHADOW,
    ),
    Scenario(
        "hs",
        "(h) with a shadow table (every request decided twice)",
        ext_authz_http,
        "graysteer",
        transport="http",
        floor="h0",
        sidecar_args=SHADOW,
    ),
]


def front_envoy(
    scenario: Scenario,
    sidecar_ports: list[int],
    upstreams: dict[str, int],
    workdir: Path,
    xds_port: int = 0,
    wrapper: Sequence[str] = (),
    start_timeout: float = 20,
) -> Envoy:
    from sidecar.dev.devstack import rewrite_envoy_config

    endpoints: dict[str, Any] = {name: ("127.0.0.1", port) for name, port in upstreams.items()}
    if sidecar_ports:  # one endpoint per distinct port (workers sharing one port: one)
        endpoints["graysteer"] = [("127.0.0.1", port) for port in sorted(set(sidecar_ports))]
    if xds_port:
        endpoints[XDS_CLUSTER] = ("127.0.0.1", xds_port)
    config = copy.deepcopy(scenario.envoy())
    envoy = Envoy(
        rewrite_envoy_config(config, endpoints),
        workdir,
        name=f"front-{scenario.key}",
        wrapper=wrapper,
        start_timeout=start_timeout,
    )
    if xds_port:  # measure Envoy deciding, not the default that asks the sidecar
        wait_for(
            lambda: envoy.stats().get(LUA_TABLE_VERSION), start_timeout, "Envoy to get the table over ECDS"
        )
    return envoy
