"""The trust boundary through the real Envoy with configs from `graysteer envoy-config`:
deny rules, the strip of what an untrusted caller may not carry, and path normalization
hold with the sidecar answering and with it away (routing fails open, security does not)."""

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.dev.devstack import Stack
from sidecar.dev.processes import wait_for
from sidecar.envoyconf.generate import EnvoyOptions, bootstrap, bootstrap_document, render_yaml
from sidecar.table.load import load_rules

RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    trust:
      identities: [{trust_domain: example.org}]   # nobody on plaintext: every caller here is untrusted
      override_headers: [x-canary]
    coloring:
      lanes: {stable: stable, canary: canary}
    rules:
      - name: block-admin
        match: {path: {prefix: /admin}}
        deny: {status: 403, reason: "admin is internal"}
      - name: no-internal-delete
        match: {method: [DELETE], headers: {x-internal: {present: true}}}
        deny: {status: 401, reason: "not for you"}
      - name: force-canary
        match: {headers: {x-canary: "1"}}
        route: canary
    """)
SMUGGLED = {
    "x-canary": "1",
    "x-graysteer-lane": "canary",
    "baggage": "tenant=acme,graysteer.lane=canary, other=1",
}
WALKAROUNDS = [
    "/admin",
    "/admin/users",
    "//admin",
    "/./admin",
    "/%61dmin",
    "/api/../admin",
    "/api/%2e%2e/admin",
    "/%2e/admin",
    "///admin//x",
]


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz", "ext_authz_http"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Envoy with the generated config of each mode; the sidecar starts after Envoy."""
    workdir = tmp_path_factory.mktemp(f"trust-{request.param}")
    rules = workdir / "rules.yaml"
    rules.write_text(RULES)
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode=request.param))
    with Stack(rules, config, workdir, sidecar_first=False) as running:
        yield running


def assert_secure(stack: Stack, sidecar_up: bool) -> None:
    http = stack.client()
    for path in WALKAROUNDS:
        status, echo = http.get(path)
        assert status == 403, (path, status, echo)
        if sidecar_up:
            assert echo == {"raw": "admin is internal"}, path  # the rule's own answer
    status, _ = http.get("/x", {"x-internal": "1"}, method="DELETE")
    assert status == (401 if sidecar_up else 403)  # the backstop answers 403 for every rule
    # Not denied: served, on the default route when the sidecar is away; nothing smuggled.
    status, echo = http.get("/api/fine", SMUGGLED)
    assert status == 200
    assert echo["backend"] == "stable"
    received = echo["headers"]
    assert "x-canary" not in received
    assert received.get("x-graysteer-lane") == ("stable" if sidecar_up else None)  # never "canary"
    members = [m.strip() for m in received["baggage"].split(",")]
    assert "tenant=acme" in members and "other=1" in members
    lane_members = [m for m in members if m.startswith("graysteer.lane")]
    assert lane_members == (["graysteer.lane=stable"] if sidecar_up else [])
    assert ("x-route-cluster" in received) == sidecar_up


def test_security_holds_while_the_sidecar_has_not_started(stack: Stack) -> None:
    assert stack.sidecar is None
    assert_secure(stack, sidecar_up=False)


def test_security_holds_with_the_sidecar_answering(stack: Stack) -> None:
    sidecar = stack.start_sidecar()
    http = stack.client()
    wait_for(
        lambda: "x-route-cluster" in http.get("/")[1].get("headers", {}), 10, "Envoy to consult the sidecar"
    )
    assert_secure(stack, sidecar_up=True)
    sidecar.kill()


def test_security_holds_after_the_sidecar_was_killed(stack: Stack) -> None:
    assert stack.sidecar is not None and stack.sidecar.popen.poll() is not None
    http = stack.client()
    wait_for(
        lambda: "x-route-cluster" not in http.get("/")[1].get("headers", {}),
        10,
        "Envoy to route without the sidecar",
    )
    assert_secure(stack, sidecar_up=False)


def test_the_generated_configs_say_why(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    text = render_yaml(bootstrap(load_rules(rules), EnvoyOptions()))
    assert "block-admin" in text and "no-internal-delete" in text and "graysteer.lane" in text
