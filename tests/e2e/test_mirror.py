"""Mirror rules through the real Envoy, in all three modes: the mirror cluster receives copies of exactly the
requests the rule picks (sticky by the split key, as `explain` predicts), the client only
ever gets the primary cluster's answers, and a client cannot ask for a copy itself."""

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.dev.devstack import Stack
from sidecar.dev.processes import wait_for
from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document
from sidecar.table.load import load_rules
from sidecar.transports.explain import explain_local

RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: shadow-canary
        split:
          key: [header:x-user-id]
          to: [{cluster: stable, weight: 100}]
        mirror: {cluster: canary, percent: 30}
    """)
USERS = [f"user-{i}" for i in range(120)]


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mirror") / "rules.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz", "ext_authz_http"])
def stack(
    rules: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode=request.param))
    with Stack(rules, config, tmp_path_factory.mktemp(request.param)) as stack:
        yield stack


def mirrored_users(rules: Path) -> list[str]:
    return [
        user
        for user in USERS
        if explain_local(str(rules), "GET", "/", [("x-user-id", user)]).get("mirror") == "canary"
    ]


def test_the_mirror_cluster_gets_copies_and_the_client_only_primary_answers(
    stack: Stack, rules: Path
) -> None:
    expected = mirrored_users(rules)
    assert 0.15 * len(USERS) < len(expected) < 0.45 * len(USERS)
    canary, stable = stack.backends["canary"], stack.backends["stable"]
    client = stack.client()
    answers: list[Any] = []
    for user in USERS:
        status, echo = client.get("/orders", {"x-user-id": user})
        answers.append((status, echo.get("backend")))
    assert set(answers) == {(200, "stable")}  # copies never reach the client
    wait_for(lambda: canary.requests >= len(expected), 10, "the copies to arrive")
    assert stable.requests >= len(USERS)
    # Sticky: the same users again make exactly as many copies again.
    for user in USERS:
        client.get("/orders", {"x-user-id": user})
    wait_for(lambda: canary.requests >= 2 * len(expected), 10, "the second round of copies")
    assert canary.requests == 2 * len(expected)


def test_a_client_sent_mirror_header_copies_nothing(stack: Stack, rules: Path) -> None:
    canary = stack.backends["canary"]
    not_mirrored = next(u for u in USERS if u not in mirrored_users(rules))
    before = canary.requests
    client = stack.client()
    for _ in range(20):
        status, echo = client.get("/", {"x-user-id": not_mirrored, "x-mirror-cluster": "canary"})
        assert (status, echo.get("backend")) == (200, "stable")
        assert "x-mirror-cluster" not in echo["headers"]
    sentinel = next(u for u in USERS if u in mirrored_users(rules))
    client.get("/", {"x-user-id": sentinel})  # one real copy, so the wait below is not vacuous
    wait_for(lambda: canary.requests == before + 1, 10, "the one real copy")
    assert canary.requests == before + 1


def test_the_access_log_and_metrics_show_the_mirror(stack: Stack, rules: Path) -> None:
    user = next(u for u in USERS if u in mirrored_users(rules))
    stack.client().get("/mirror-log-marker", {"x-user-id": user})
    assert stack.envoy is not None and stack.sidecar is not None
    log = stack.envoy.process
    line = wait_for(lambda: re.search(r".*mirror-log-marker.*", log.log_text()), 10, "the access log line")
    assert "rule=shadow-canary" in line.group(0) and "mirror=canary" in line.group(0)
    status, metrics = stack.sidecar.http_get("/metrics")
    assert status == 200
    assert re.search(r'graysteer_mirrored_total\{cluster="canary",rule="shadow-canary"\} [1-9]', metrics)
