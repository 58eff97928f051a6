"""The steering events of the requests Envoy's Lua decides (envoy_decides), counted without a
decision log or shadow table from the one metadata key the Lua files when an event happens:
the same requests through the real Envoy give the same graysteer_steering_events_total as
the fast path (ext_authz_http) counts. (With a decision log, the replay counts them:
tests/e2e/test_envoy_decides_feeds.py; identity events over mTLS, compared with the
reference for each certificate: tests/e2e/test_lua_decisions.py.)"""

import textwrap
from pathlib import Path

import pytest

from sidecar.dev.devstack import Stack
from sidecar.dev.processes import wait_for
from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document
from sidecar.table.load import load_rules
from tests.e2e.test_envoy_decides_feeds import samples

RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    trust: {override_headers: [x-force-cluster], plaintext: PLAINTEXT}
    coloring: {lanes: {stable: stable, canary: canary}}
    rules:
      - name: forced
        match: {headers: {x-force-cluster: canary}}
        route: canary
      - name: v2
        match: {headers: {x-api-version: {semver: "^2"}}}
        route: canary
    """)
CROWDED = ",".join(f"m{i}=1" for i in range(64))  # no room for the lane's member
# (headers) of each request: every event a plaintext caller can cause, and requests without any
REQUESTS: list[dict[str, str]] = [
    {},
    {"x-user-id": "u1"},
    {"x-force-cluster": "canary"},  # untrusted: removed
    {"x-graysteer-lane": "canary"},  # untrusted: removed, then set to the decided lane
    {"baggage": "a=1,graysteer.lane=canary"},  # untrusted: the member stripped
    {"baggage": "graysteer.lane=canary"},
    {"baggage": "a=1,junk"},  # malformed
    {"baggage": " =1"},  # malformed: a blank key
    {"baggage": CROWDED},  # over the limit
    {"x-graysteer-lane": "no such lane"},  # malformed (trusted)
    {"x-graysteer-lane": "l" * 65},  # malformed (trusted)
    {"baggage": "graysteer.lane=bad/lane"},  # malformed (trusted)
    {"x-api-version": "2.1.0"},
    {"x-api-version": "banana"},  # malformed: left to the fast path, which counts it
    {"x-api-version": "2.0.0-beta.1"},  # not plainly a version: left to the fast path
    {"x-force-cluster": "canary", "x-graysteer-lane": "x y", "baggage": f"{CROWDED},z"},  # several
]


def run_mode(mode: str, rules: Path, workdir: Path) -> dict[tuple[tuple[str, str], ...], float]:
    """graysteer_steering_events_total once every request sent through `mode` is counted
    (no decision log, no shadow table)."""
    workdir.mkdir()
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode=mode))
    with Stack(rules, config, workdir) as stack:
        sidecar = stack.sidecar
        assert sidecar is not None
        client = stack.client()
        for headers in REQUESTS:
            assert client.get("/", headers)[0] == 200, headers

        def decided() -> float:
            return sum(samples(sidecar.http_get("/metrics")[1], "graysteer_decisions_total").values())

        wait_for(lambda: decided() >= len(REQUESTS), 15, "every request counted")
        metrics = sidecar.http_get("/metrics")[1]
        assert decided() == len(REQUESTS)
    return samples(metrics, "graysteer_steering_events_total")


@pytest.mark.parametrize(
    ("plaintext", "expected"),
    [
        ("false", {"untrusted_headers_removed": 2, "malformed_baggage": 3, "baggage_over_limit": 2}),
        ("true", {"malformed_lane": 4, "malformed_baggage": 3, "baggage_over_limit": 2}),
    ],
)
def test_envoy_decides_counts_the_steering_events_the_fast_path_counts(
    tmp_path: Path, plaintext: str, expected: dict[str, float]
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("PLAINTEXT", plaintext))
    fast = run_mode("ext_authz_http", rules, tmp_path / "ext_authz_http")
    envoy = run_mode("envoy_decides", rules, tmp_path / "envoy_decides")
    assert envoy == fast
    assert {labels[0][1]: value for labels, value in envoy.items()} == {**expected, "malformed_version": 1}
