"""The table served to the real Envoy over ECDS (`serve --xds-listen`, `envoy-config --mode
envoy_decides`): each table change is a new version Envoy applies; a refused version or a
generation failure leaves the last good filter in place; Envoy keeps deciding with its last
table while the sidecar is away."""

import signal
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.core import Table, compile_table
from sidecar.core.lua_table import LuaFilter, LuaNames
from sidecar.dev.devstack import Stack
from sidecar.dev.load import BackgroundLoad
from sidecar.dev.processes import wait_for
from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document
from sidecar.table.load import load_rules
from sidecar.transports import ecds
from sidecar.transports.explain import explain_local
from tests.e2e.conftest import E2E_RULES
from tests.lua_envoy import EcdsServer, LuaEnvoy, applied_version, bootstrap, ecds_filter

ROUTE = {"version": 1, "clusters": ["stable", "canary"], "default": "stable"}


def routed_to(cluster: str) -> dict[str, Any]:
    return {**ROUTE, "rules": [{"name": f"all-to-{cluster}", "route": cluster}]}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[EcdsServer, LuaEnvoy]]:
    server = EcdsServer()
    decision, clusters = ecds_filter(server.port)
    envoy = LuaEnvoy(bootstrap(decision, clusters), tmp_path)
    try:
        yield server, envoy
    finally:
        envoy.stop()
        server.stop()


def cluster_of(envoy: LuaEnvoy) -> str | None:
    return envoy.ask("GET", "/", []).headers.get("x-route-cluster")


def test_before_the_first_table_every_request_is_left_to_the_sidecar(
    served: tuple[EcdsServer, LuaEnvoy],
) -> None:
    _, envoy = served
    assert applied_version(envoy.envoy) == ""
    assert envoy.ask("GET", "/", []).undecided


def applied(envoy: LuaEnvoy, version: str) -> bool:
    return applied_version(envoy.envoy) == version


def deciding(envoy: LuaEnvoy, cluster: str) -> bool:
    return cluster_of(envoy) == cluster


def test_every_table_change_is_a_version_envoy_applies(served: tuple[EcdsServer, LuaEnvoy]) -> None:
    server, envoy = served
    for cluster in ("canary", "stable", "canary"):
        version = server.push(compile_table(routed_to(cluster), f"to-{cluster}", "rules.yaml"))
        started = time.monotonic()
        wait_for(partial(applied, envoy, version), 10, f"Envoy to apply {version}")
        wait_for(partial(deciding, envoy, cluster), 10, f"requests decided for {cluster}")
        print(f"table {version} applied and deciding after {1000 * (time.monotonic() - started):.0f} ms")
    assert server.count("acked") == 3 and server.count("rejected") == 0


def test_a_refused_filter_is_counted_and_envoy_keeps_the_last_good(
    served: tuple[EcdsServer, LuaEnvoy], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, envoy = served
    good = server.push(compile_table(routed_to("canary"), "good", "rules.yaml"))
    wait_for(lambda: applied_version(envoy.envoy) == good, 10, "the good table")
    monkeypatch.setattr(
        ecds, "lua_source", lambda table, names, *_: LuaFilter("function envoy_on_request(", True)
    )
    server.push(compile_table(routed_to("stable"), "broken", "rules.yaml"))
    wait_for(lambda: server.count("rejected") == 1, 10, "Envoy to refuse the broken filter")
    assert applied_version(envoy.envoy) == good and cluster_of(envoy) == "canary"


def test_a_generation_failure_keeps_the_last_good_filter(
    served: tuple[EcdsServer, LuaEnvoy], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, envoy = served
    good = server.push(compile_table(routed_to("canary"), "good", "rules.yaml"))

    def fails(*_: object) -> LuaFilter:
        raise RuntimeError("a generator bug")

    monkeypatch.setattr(ecds, "lua_source", fails)
    assert server.push(compile_table(routed_to("stable"), "next", "rules.yaml")) == good
    assert server.count("generation_failed") == 1
    wait_for(lambda: applied_version(envoy.envoy) == good, 10, "the good table")
    assert cluster_of(envoy) == "canary"


def test_a_lua_error_leaves_the_request_to_the_sidecar_marked(
    served: tuple[EcdsServer, LuaEnvoy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure inside the generated code (a bug) changes nothing of the request: it is
    marked for the fast path, with `lua_error` for the access log and Envoy's log."""
    server, envoy = served
    generate = ecds.lua_source

    def failing(table: Table, names: LuaNames, capture: Sequence[str] = ()) -> LuaFilter:
        made = generate(table, names, capture)
        broken = made.source.replace(
            "local function steer(si, h)\n",
            "local function steer(si, h)\n  if h:get('x-boom') then error('boom') end\n",
        )
        assert broken != made.source
        return LuaFilter(broken, made.decides)

    monkeypatch.setattr(ecds, "lua_source", failing)
    version = server.push(compile_table(routed_to("canary"), "v1", "rules.yaml"))
    wait_for(partial(applied, envoy, version), 10, "the table")
    boom = envoy.ask("GET", "/", [("x-boom", "1")])
    assert boom.undecided and boom.lua_error and "x-route-cluster" not in boom.headers
    assert cluster_of(envoy) == "canary"


def test_a_caller_trusted_by_listener_port(served: tuple[EcdsServer, LuaEnvoy]) -> None:
    """trust.listener_ports reads the port Envoy accepted the request on (Lua's
    downstreamLocalAddress), as the fast path reads %DOWNSTREAM_LOCAL_PORT%."""
    server, envoy = served
    override = {"name": "force", "match": {"headers": {"x-canary": "1"}}, "route": "canary"}
    for ports, expected in (([envoy.envoy.port], "canary"), ([envoy.envoy.port + 1], "stable")):
        document = {**ROUTE, "trust": {"listener_ports": ports, "override_headers": ["x-canary"]}}
        table = compile_table({**document, "rules": [override]}, f"port-{ports[0]}", "rules.yaml")
        version = server.push(table)
        wait_for(partial(applied, envoy, version), 10, "the table")
        answer = envoy.ask("GET", "/", [("x-canary", "1")])
        assert answer.headers["x-route-cluster"] == expected
        assert ("x-canary" in answer.headers) == (expected == "canary")  # an untrusted caller's is removed


SPLIT_RULES = """\
version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: beta
    match: {headers: {x-user-tier: {regex: "beta-[0-9]+"}}}
    route: canary
  - name: by-user
    split:
      key: [header:x-user-id]
      to: [{cluster: stable, weight: 50}, {cluster: canary, weight: 50}]
      when_key_missing: stable
"""


def test_reloads_reach_envoy_and_envoy_keeps_the_table_while_the_sidecar_is_away(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(SPLIT_RULES)
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode="envoy_decides"))
    users = [{"x-user-id": f"user-{i}"} for i in range(12)]
    with Stack(rules, config, tmp_path) as stack:
        assert stack.envoy is not None and stack.sidecar is not None
        envoy = stack.envoy
        version = load_rules(rules).version
        wait_for(lambda: applied_version(envoy).startswith(version + "."), 10, "the first table")
        http = stack.client()

        def backends() -> list[str]:
            return [http.get("/", user)[1]["backend"] for user in users]

        def predicted() -> list[str]:
            return [
                str(explain_local(str(rules), "GET", "/", list(user.items()))["cluster"]) for user in users
            ]

        assert backends() == predicted()
        rules.write_text(
            SPLIT_RULES.replace(
                "weight: 50}, {cluster: canary, weight: 50", "weight: 0}, {cluster: canary, weight: 100"
            )
        )
        changed = load_rules(rules).version
        wait_for(lambda: applied_version(envoy).startswith(changed + "."), 10, "the reloaded table")
        assert backends() == predicted() == ["canary"] * len(users)
        stack.sidecar.signal(signal.SIGKILL)
        stack.sidecar.popen.wait(10)
        decided = envoy.stats().get("http.ingress.ext_authz.disabled", 0)
        assert backends() == ["canary"] * len(users)  # Envoy's last table, without the sidecar
        assert envoy.stats()["http.ingress.ext_authz.disabled"] == decided + len(users)
        assert (
            http.get("/", {"x-user-tier": "beta-1"})[1]["backend"] == "stable"
        )  # left to the sidecar: fails open
        stack.start_sidecar()
        wait_for(
            lambda: http.get("/", {"x-user-tier": "beta-1"})[1]["backend"] == "canary", 10, "the sidecar back"
        )
        assert applied_version(envoy).startswith(changed + ".")


def decisions_counted(text: str) -> dict[tuple[str, str], float]:
    """graysteer_decisions_total by (cluster, rule), from /metrics."""
    counted = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "graysteer_decisions_total":
                counted[(sample.labels["cluster"], sample.labels["rule"])] = sample.value
    return counted


def test_envoy_decisions_are_counted_from_its_access_log_stream(tmp_path: Path) -> None:
    """What the Lua decided arrives over Envoy's gRPC access log and is counted in the metrics
    every mode counts; what the fast path decided is counted once, by the fast path."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(SPLIT_RULES)
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode="envoy_decides"))
    sent: list[dict[str, str]] = [{"x-user-id": f"user-{i}"} for i in range(30)]
    sent += [{}] * 5 + [{"x-user-tier": "beta-3"}] * 4  # a default, and 4 left to the fast path
    expected: dict[tuple[str, str], float] = {}
    for headers in sent:
        decision = explain_local(str(rules), "GET", "/", list(headers.items()))
        key = (str(decision["cluster"]), str(decision["rule"]))
        expected[key] = expected.get(key, 0) + 1
    with Stack(rules, config, tmp_path) as stack:
        assert stack.sidecar is not None and stack.envoy is not None
        http = stack.client()
        for headers in sent:
            assert http.get("/", headers)[0] == 200
        sidecar = stack.sidecar
        wait_for(
            lambda: decisions_counted(sidecar.http_get("/metrics")[1]) == expected,
            10,
            "every decision counted",
        )
        assert stack.envoy.stats()["http.ingress.ext_authz.ok"] == 4


def test_sigkill_under_load_leaves_no_request_failed_or_undecided(tmp_path: Path) -> None:
    """3 clients send requests while the sidecar is killed and restarted: every request is
    answered and decided by the table (the backend got the routing header), each user stays
    on its lane, and none went to the fast path or failed open."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(E2E_RULES)
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode="envoy_decides"))
    users = [f"user-{i}" for i in range(60)]
    with Stack(rules, config, tmp_path) as stack:
        assert stack.sidecar is not None and stack.envoy is not None
        load = BackgroundLoad(stack.port, {}, threads=3, users=users)
        try:
            load.wait_for_more(300, "load before the kill")
            stack.sidecar.kill()
            load.wait_for_more(300, "load while the sidecar is away")
            stack.start_sidecar()
            load.wait_for_more(300, "load after the restart")
        finally:
            load.stop()
        stats = stack.envoy.stats()
    samples = load.samples
    assert [s for s in samples if s.status != 200 or not s.decided] == []
    lanes: dict[str, set[str]] = {}
    for sample in samples:
        lanes.setdefault(sample.user, set()).add(sample.backend)
    predicted = {u: str(explain_local(str(rules), "GET", "/", [("x-user-id", u)])["cluster"]) for u in users}
    assert {u: lanes[u] for u in lanes} == {u: {predicted[u]} for u in lanes}
    assert (
        stats["http.ingress.ext_authz.ok"] == 0 and stats["http.ingress.ext_authz.failure_mode_allowed"] == 0
    )
    print(f"{len(samples)} requests, 0 failed, 0 undecided, through a SIGKILL and a restart")
