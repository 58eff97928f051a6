"""A shadow table through the real Envoy, in both transports: every request is served by the
live rules, decided by the next ones too, and the sidecar's counts (status, the metric, the
decision log) equal the number of requests whose `graysteer explain` differs between the
two; the shadow follows its file and never touches what is served."""

import json
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sidecar.admin import client as admin_client
from sidecar.dev.devstack import Stack
from sidecar.dev.load import HttpClient
from sidecar.dev.processes import wait_for
from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document
from sidecar.table.load import load_rules
from sidecar.transports.explain import Peer

LIVE = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: no-admin
        match: {path: {prefix: /admin}}
        deny: {status: 403, reason: "no admin"}
      - name: beta
        match: {headers: {x-user-tier: {regex: "beta-[0-9]+"}}}
        route: canary
      - name: ramp
        split:
          key: [header:x-user-id]
          seed: shop
          to: [{cluster: stable, weight: 80}, {cluster: canary, weight: 20}]
          when_key_missing: stable
    """)
# The change under review: the ramp goes on to 40%, the beta regex is narrowed (beta-1x only),
# /admin opens to the canary.
NEXT = (
    LIVE.replace("weight: 80", "weight: 60")
    .replace("weight: 20", "weight: 40")
    .replace("beta-[0-9]+", "beta-1[0-9]")
    .replace('deny: {status: 403, reason: "no admin"}', "route: canary")
)
REQUESTS: list[tuple[str, dict[str, str]]] = [
    *[("/", {"x-user-id": f"user-{i}"}) for i in range(120)],
    *[("/", {"x-user-tier": f"beta-{i}"}) for i in range(5, 25)],
    *[("/admin/users", {}) for _ in range(5)],
    *[("/", {}) for _ in range(5)],
]


def explained(admin: str, path: str, headers: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(live, shadow) decisions from the sidecar's Explain, as `graysteer explain --admin`
    prints them."""
    result = admin_client.explain(admin, "GET", path, list(headers.items()), [], [], Peer())
    return result, result["shadow"]


def cli(*args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=30, check=True
    )
    return run.stdout


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz_http"])
def test_the_shadow_counts_are_the_requests_whose_explain_differs(mode: str, tmp_path: Path) -> None:
    live, upcoming, log = tmp_path / "rules.yaml", tmp_path / "next.yaml", tmp_path / "decisions.jsonl"
    live.write_text(LIVE)
    upcoming.write_text(NEXT)
    envoy = bootstrap_document(load_rules(live), EnvoyOptions(mode=mode))
    # every request decided by the shadow too (not a budget's sample): the counts are compared
    args = ["--shadow-config", str(upcoming), "--shadow-sample", "1", "--decision-log", str(log)]
    with Stack(live, envoy, tmp_path, sidecar_args=args) as stack:
        assert stack.sidecar is not None
        admin = stack.sidecar.admin
        client = stack.client()
        expected, differing_by_user = send_and_explain(client, admin)
        assert sum(expected.values()) >= 20  # the change moves something of each kind
        assert {rule for rule, _, _ in expected} == {"ramp", "beta", "no-admin"}

        def counted() -> dict[str, Any] | None:
            status = admin_client.status(admin)["shadow"]
            return status if int(status.get("requests", 0)) >= len(REQUESTS) else None

        shadow_status = wait_for(counted, 10, "the shadow's counts")
        assert int(shadow_status["requests"]) == len(REQUESTS)
        assert int(shadow_status["differing"]) == sum(expected.values())
        assert {
            (m["rule"], m["cluster"], m["shadow_cluster"]): int(m["requests"]) for m in shadow_status["moves"]
        } == dict(expected)
        assert shadow_status["version"] == load_rules(upcoming).version

        metrics = stack.sidecar.http_get("/metrics")[1]
        series = re.findall(
            r"^graysteer_shadow_decisions_total"
            r'\{cluster="([^"]*)",differs="(true|false)",rule="([^"]*)",shadow_cluster="([^"]*)"\} (\S+)$',
            metrics,
            re.M,
        )
        assert sum(float(n) for *_, n in series) == len(REQUESTS)
        assert {(r, c, s): int(float(n)) for c, d, r, s, n in series if d == "true"} == dict(expected)
        assert all((d == "true") == (c != s) for c, d, r, s, n in series)

        lines = wait_for(lambda: read_lines(log, len(REQUESTS)), 10, "the decision log")
        shadowed = [line for line in lines if "shadow" in line]
        assert len(shadowed) == sum(expected.values())
        for line in shadowed:
            if "x-user-id" in line["headers"]:
                assert line["shadow"]["cluster"] == differing_by_user[line["headers"]["x-user-id"]]

        shown = cli("status", "--admin", admin)  # `graysteer status` shows the rate
        assert f"{sum(expected.values())} of {len(REQUESTS)} requests decided differently" in shown
        printed = json.loads(cli("explain", "--admin", admin, "-H", "x-user-tier: beta-7"))
        assert (printed["cluster"], printed["shadow"]["cluster"]) == ("canary", "stable")

        upcoming.write_text(LIVE)  # the next rules become the same as the live ones
        wait_for(
            lambda: admin_client.status(admin)["shadow"].get("version") == load_rules(live).version,
            10,
            "the shadow to follow its file",
        )
        for path, headers in REQUESTS[:30]:
            client.get(path, headers)

        def recounted() -> dict[str, Any] | None:
            status = admin_client.status(admin)["shadow"]
            return status if int(status.get("requests", 0)) >= 30 else None

        after = wait_for(recounted, 10, "the new counts")
        assert int(after.get("differing", 0)) == 0  # counted from zero for the new pair, none differs

        upcoming.unlink()
        wait_for(lambda: not admin_client.status(admin)["shadow"].get("version"), 10, "the shadow to go")
        status, echo = client.get("/", {"x-user-tier": "beta-7"})
        assert status == 200 and echo["backend"] == "canary"  # served as ever


def send_and_explain(client: HttpClient, admin: str) -> tuple[Counter[tuple[str, str, str]], dict[str, str]]:
    """Send every request, checking that the live table serves it as `explain` says; the moves
    (rule, live outcome, shadow outcome) explain counts, and the shadow outcome by user id."""
    expected: Counter[tuple[str, str, str]] = Counter()
    differing_by_user: dict[str, str] = {}
    for path, headers in REQUESTS:
        status, echo = client.get(path, headers)
        served, shadow = explained(admin, path, headers)
        if served["deny_status"] is None:
            assert status == 200 and echo["backend"] == served["cluster"]  # the live table serves
        else:
            assert status == served["deny_status"]
        moved = (served["rule"], outcome_of(served), outcome_of(shadow))
        if moved[1] != moved[2]:
            expected[moved] += 1
            differing_by_user[headers.get("x-user-id", "")] = moved[2]
    return expected, differing_by_user


def outcome_of(decision: dict[str, Any]) -> str:
    return f"deny:{decision['deny_status']}" if decision.get("deny_status") else decision["cluster"]


def read_lines(log: Path, count: int) -> list[dict[str, Any]] | None:
    if not log.exists():
        return None
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return lines if len(lines) >= count else None
