"""Traffic through the real Envoy binary, the ext_proc sidecar and two backends."""

import collections
import math
import re
import signal
from pathlib import Path

from sidecar.dev.devstack import Stack
from sidecar.dev.processes import wait_for
from sidecar.table.load import load_rules
from tests.e2e.conftest import ENVOY_CONFIG, envoy_validate
from tests.helpers import request


def test_envoy_config_validates() -> None:
    result = envoy_validate(ENVOY_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_header_override_reaches_canary(stack: Stack) -> None:
    client = stack.client()
    status, echo = client.get("/checkout", {"x-canary": "1", "x-user-id": "any"})
    assert (status, echo["backend"]) == (200, "canary")
    assert echo["headers"]["x-route-cluster"] == "canary"  # set by the sidecar


def test_split_user_is_sticky_for_50_requests(stack: Stack) -> None:
    client = stack.client()
    for user in ("alice", "bob", "carol", "dave"):
        backends = {client.get("/", {"x-user-id": user})[1]["backend"] for _ in range(50)}
        assert len(backends) == 1, (user, backends)


def test_2000_users_split_by_weight_and_exactly_as_the_engine_decides(stack: Stack, rules_file: Path) -> None:
    table = load_rules(rules_file)
    client = stack.client()
    landed = collections.Counter()
    for i in range(2000):
        user = f"user-{i}"
        status, echo = client.get("/", {"x-user-id": user})
        assert status == 200
        assert echo["backend"] == table.decide(request(x_user_id=user)).cluster
        landed[echo["backend"]] += 1
    sigma = math.sqrt(2000 * 0.3 * 0.7)
    assert abs(landed["canary"] - 600) < 5 * sigma, landed


def test_cookie_key_through_envoy(stack: Stack, rules_file: Path) -> None:
    table = load_rules(rules_file)
    client = stack.client()
    for i in range(20):
        _, echo = client.get("/", {"cookie": f"theme=dark; uid=c{i}"})
        expected = table.decide(request(cookie=f"uid=c{i}")).cluster
        assert echo["backend"] == expected


def test_client_sent_routing_header_is_ignored(stack: Stack, rules_file: Path) -> None:
    table = load_rules(rules_file)
    stable_users = [
        u for u in (f"s{i}" for i in range(100)) if table.decide(request(x_user_id=u)).cluster == "stable"
    ][:10]
    client = stack.client()
    for user in stable_users:
        _, echo = client.get("/", {"x-route-cluster": "canary", "x-user-id": user})
        assert echo["backend"] == "stable"
        assert echo["headers"]["x-route-cluster"] == "stable"  # the sidecar's, not the client's
    _, echo = client.get("/", {"x-route-cluster": "nonexistent"})
    assert echo["backend"] == "stable"


def test_no_503_nc_ever(stack: Stack) -> None:
    client = stack.client()
    for headers in ({"x-route-cluster": "no-such-cluster"}, {"x-canary": "1"}, {}):
        assert client.get("/", headers)[0] == 200
    assert stack.envoy is not None
    stats = stack.envoy.stats()
    assert stats["http.ingress.no_cluster"] == 0
    assert stats["http.ingress.ext_proc.spurious_msgs_received"] == 0
    assert stats["http.ingress.ext_proc.streams_failed"] == 0
    assert " NC " not in stack.envoy.process.log_text()


def test_access_log_shows_rule_and_version(stack: Stack, rules_file: Path) -> None:
    version = load_rules(rules_file).version
    stack.client().get("/marker-for-access-log", {"x-canary": "1"})
    assert stack.envoy is not None
    line = wait_for(
        lambda: re.search(r".*marker-for-access-log.*", stack.envoy.process.log_text()), 10, "access log line"
    ).group(0)
    assert "cluster=canary rule=force-canary" in line
    assert f"version={version}" in line


def test_sidecar_killed_requests_still_succeed_on_default(own_stack: Stack) -> None:
    client = own_stack.client()
    assert client.get("/", {"x-canary": "1"})[1]["backend"] == "canary"
    assert own_stack.sidecar is not None and own_stack.envoy is not None
    own_stack.sidecar.signal(signal.SIGKILL)
    own_stack.sidecar.popen.wait(10)
    for headers in ({"x-canary": "1"}, {"x-user-id": "u1"}, {"x-route-cluster": "canary"}, {}):
        status, echo = client.get("/", headers)
        assert (status, echo["backend"]) == (200, "stable"), headers
        # the early strip removed the client's header; nobody set one
        assert "x-route-cluster" not in echo["headers"]
    stats = own_stack.envoy.stats()
    assert stats["http.ingress.ext_proc.failure_mode_allowed"] >= 4
    assert stats["http.ingress.no_cluster"] == 0


def test_rules_cluster_unknown_to_envoy_falls_back_to_default(tmp_path: Path) -> None:
    """The route guard only admits names Envoy has; anything else takes the default route."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nclusters: [stable, canary, v3]\ndefault: stable\n"
        "rules: [{name: to-v3, match: {headers: {x-v3: '1'}}, route: v3}]\n"
    )
    with Stack(rules, ENVOY_CONFIG, tmp_path) as stack:
        status, echo = stack.client().get("/", {"x-v3": "1"})
        assert (status, echo["backend"]) == (200, "stable")
        assert echo["headers"]["x-route-cluster"] == "v3"
        assert stack.envoy is not None
        assert stack.envoy.stats()["http.ingress.no_cluster"] == 0
