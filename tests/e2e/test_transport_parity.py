"""Every mode decides alike: the same rules and requests through the real Envoy with the
generated config of each mode (ext_proc, ext_authz over gRPC, ext_authz over HTTP, and Envoy
deciding from the table as Lua with the fast path behind it) reach the same backend with the
same steered headers, exactly as `graysteer explain` predicts."""

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.dev.devstack import Stack
from sidecar.dev.processes import wait_for
from sidecar.envoyconf.generate import MODES, EnvoyOptions, bootstrap_document
from sidecar.table.load import load_rules
from sidecar.transports.explain import explain_local

RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    trust:
      identities: [{trust_domain: example.org}]
      override_headers: [x-canary]
    coloring:
      lanes: {stable: stable, canary: canary}
    rules:
      - name: no-admin
        match: {path: {prefix: /admin}}
        deny: {status: 451, reason: "no admin here"}
      - name: api-v2
        match: {path: {prefix: /api/v2}, method: [GET]}
        route: canary
      - name: beta
        match: {headers: {x-user-tier: {regex: "beta-[0-9]+"}}}
        route: canary
      - name: force-canary
        match: {headers: {x-canary: "1"}}
        route: canary
      - name: beta-host
        match: {host: ["beta.*", "*.beta.example.com"]}
        route: canary
      - name: new-clients
        match: {headers: {x-client-version: {semver: ">=2.3.0 || ~1.9.1"}}}
        route: canary
      - name: cart-get
        match: {grpc: {service: shop.v1.Cart, method: Get}}
        route: canary
      - name: by-user
        split:
          key: [header:x-user-id, cookie:uid, query:gid]
          to: [{cluster: stable, weight: 50}, {cluster: canary, weight: 50}]
          when_key_missing: stable
    """)
CASES: list[tuple[str, str, dict[str, str]]] = [
    ("GET", "/", {}),
    ("GET", "/admin/users", {}),
    ("GET", "/api/v2/orders", {}),
    ("POST", "/api/v2/orders", {}),
    ("GET", "/", {"x-user-tier": "beta-7"}),
    ("GET", "/", {"x-user-tier": "beta-x"}),
    ("GET", "/", {"x-canary": "1"}),  # untrusted: the override is removed, never honoured
    ("GET", "/", {"x-graysteer-lane": "canary", "baggage": "t=1,graysteer.lane=canary"}),
    ("GET", "/", {"host": "beta.shop.io"}),
    ("GET", "/", {"host": "Eu.Beta.Example.com:8080"}),
    ("GET", "/", {"host": "shop.beta.io"}),
    ("GET", "/", {"x-client-version": "2.4.0"}),
    ("GET", "/", {"x-client-version": "v1.9.3"}),
    ("GET", "/", {"x-client-version": "1.10.0"}),
    ("GET", "/", {"x-client-version": "2.4.0-beta.1"}),  # a pre-release needs a range naming it
    ("GET", "/", {"x-client-version": "garbage"}),
    ("POST", "/shop.v1.Cart/Get", {"content-type": "application/grpc"}),
    ("POST", "/shop.v1.Cart/Put", {"content-type": "application/grpc"}),
    *[("GET", "/", {"x-user-id": f"user-{i}"}) for i in range(12)],
    *[("GET", "/", {"cookie": f"a=1; uid=c{i}"}) for i in range(6)],
    *[("GET", f"/p?gid=q{i}", {}) for i in range(6)],
]
STEERED = ("x-route-cluster", "x-graysteer-lane", "baggage", "x-canary")


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("parity") / "rules.yaml"
    path.write_text(RULES)
    return path


def outcomes(stack: Stack) -> list[tuple[Any, ...]]:
    """Per case: the status, the backend, and the steered headers it received (or the deny body)."""
    http = stack.client()
    seen = []
    for method, path, headers in CASES:
        status, echo = http.get(path, headers, method=method)
        if "backend" in echo:
            received = echo["headers"]
            seen.append((status, echo["backend"], {h: received.get(h) for h in STEERED}))
        else:
            seen.append((status, None, echo))
    return seen


def access_log_line(stack: Stack) -> str:
    stack.client().get("/marker-for-access-log", {"x-user-id": "user-3"})
    assert stack.envoy is not None
    log = stack.envoy.process
    return str(
        wait_for(
            lambda: re.search(r".*marker-for-access-log.*", log.log_text()), 10, "the access log line"
        ).group(0)
    )


LOG_LINES: dict[str, str] = {}
FAST_PATH_STATS: dict[str, dict[str, int]] = {}  # envoy_decides: Envoy's ext_authz counters


@pytest.fixture(scope="module")
def by_mode(
    rules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, list[tuple[Any, ...]]]]:
    results = {}
    for mode in MODES:
        config = bootstrap_document(load_rules(rules), EnvoyOptions(mode=mode))
        with Stack(rules, config, tmp_path_factory.mktemp(mode)) as stack:
            results[mode] = outcomes(stack)
            LOG_LINES[mode] = access_log_line(stack)
            assert stack.envoy is not None
            FAST_PATH_STATS[mode] = {
                k.rpartition(".")[2]: v
                for k, v in stack.envoy.stats().items()
                if k.startswith("http.ingress.ext_authz.")
            }
    yield results


def test_the_three_transports_route_and_color_alike(by_mode: dict[str, list[tuple[Any, ...]]]) -> None:
    reference = by_mode["ext_proc"]
    assert {backend for _, backend, _ in reference} == {"stable", "canary", None}  # a real mix
    for mode, seen in by_mode.items():
        for case, (got, want) in enumerate(zip(seen, reference, strict=True)):
            assert got == want, (mode, CASES[case])


def test_envoy_decides_what_lua_decides_exactly_and_asks_the_sidecar_for_the_rest(
    by_mode: dict[str, list[tuple[Any, ...]]],
) -> None:
    """envoy_decides: of the cases and the access log marker, only the 2 regex and 5 version
    cases reach the sidecar; Envoy's Lua decided the others (the deny answered by the Lua
    itself never reaches the fast path's filter)."""
    counts = FAST_PATH_STATS["envoy_decides"]
    assert counts["ok"] + counts["denied"] == 7
    assert counts["disabled"] == len(CASES) + 1 - 7 - 1


def test_host_semver_and_grpc_conditions_decide(by_mode: dict[str, list[tuple[Any, ...]]]) -> None:
    first = CASES.index(("GET", "/", {"host": "beta.shop.io"}))
    backends = [backend for _, backend, _ in by_mode["ext_proc"][first : first + 10]]
    expected = ["canary", "canary", "stable", "canary", "canary", "stable", "stable", "stable", "canary"]
    assert backends == [*expected, "stable"]


def test_explain_predicts_every_transport(rules: Path, by_mode: dict[str, list[tuple[Any, ...]]]) -> None:
    for case, (method, path, headers) in enumerate(CASES):
        explained: dict[str, Any] = explain_local(str(rules), method, path, list(headers.items()))
        for mode, seen in by_mode.items():
            status, backend, received = seen[case]
            if explained.get("deny_status"):
                assert (status, received) == (explained["deny_status"], {"raw": explained["deny_reason"]})
                continue
            assert status == 200 and backend == explained["cluster"], (mode, CASES[case])
            for name, value in explained["set_headers"].items():
                assert received[name] == value, (mode, CASES[case], name)
            for name in explained["remove_headers"]:
                if name not in explained["set_headers"]:
                    assert received[name] is None, (mode, CASES[case], name)


def test_every_transport_logs_the_decision(rules: Path, by_mode: dict[str, list[tuple[Any, ...]]]) -> None:
    explained = explain_local(str(rules), "GET", "/", [("x-user-id", "user-3")])
    for mode in by_mode:
        line = LOG_LINES[mode]
        assert f"cluster={explained['cluster']} rule=by-user bucket={explained['bucket']}" in line, mode
        assert f"lane={explained['cluster']}" in line and f"version={explained['version']}" in line, mode
