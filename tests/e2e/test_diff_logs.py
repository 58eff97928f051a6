"""`graysteer diff --requests` on the logs real traffic left: the access log the generated
Envoy config writes and the sidecar's decision log. Both give exactly what deciding each
request sent with `graysteer explain`, on the old and on the new rules, gives."""

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sidecar.changes.requests import from_access_log
from sidecar.dev.devstack import Stack
from sidecar.dev.processes import wait_for
from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document, logged_headers
from sidecar.table.load import load_rules
from sidecar.transports.explain import explain_local

OLD = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: beta
        match: {headers: {x-user-tier: {regex: "beta-[0-9]+"}}}
        route: canary
      - name: mobile
        match: {headers: {user-agent: {prefix: "shop-app/"}}}
        route: stable
      - name: ramp
        split:
          key: [header:x-user-id]
          seed: shop
          to: [{cluster: stable, weight: 80}, {cluster: canary, weight: 20}]
          when_key_missing: stable
    """)
# Rules reordered (mobile now wins over beta), the regex narrowed, the ramp at 35%.
NEW = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: mobile
        match: {headers: {user-agent: {prefix: "shop-app/"}}}
        route: stable
      - name: beta
        match: {headers: {x-user-tier: {regex: "beta-1[0-9]"}}}
        route: canary
      - name: ramp
        split:
          key: [header:x-user-id]
          seed: shop
          to: [{cluster: stable, weight: 65}, {cluster: canary, weight: 35}]
          when_key_missing: stable
    """)
SENT: list[dict[str, str]] = [
    *[{"x-user-id": f"u-{i}"} for i in range(150)],
    *[{"x-user-tier": f"beta-{i}", "user-agent": "shop-app/2.1 (iOS 17; en)"} for i in range(0, 30, 3)],
    *[{"x-user-tier": f"beta-{i}"} for i in range(5, 25)],
]


def moves(old: Path, new: Path) -> Counter[tuple[str, str, str, str]]:
    """What `graysteer explain` says moves, request by request."""
    found: Counter[tuple[str, str, str, str]] = Counter()
    for headers in SENT:
        before = explain_local(str(old), "GET", "/", list(headers.items()))
        after = explain_local(str(new), "GET", "/", list(headers.items()))
        if before["cluster"] != after["cluster"]:
            found[(before["rule"], after["rule"], before["cluster"], after["cluster"])] += 1
    return found


def diff(old: Path, new: Path, log: Path) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, "-m", "sidecar", "diff", str(old), str(new), "--requests", str(log), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr  # a ramp up and a narrower regex: nothing backwards
    return dict(json.loads(run.stdout))


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz_http"])
def test_diff_on_the_access_log_and_the_decision_log_is_what_explain_says(mode: str, tmp_path: Path) -> None:
    old, new, decisions = tmp_path / "old.yaml", tmp_path / "new.yaml", tmp_path / "decisions.jsonl"
    old.write_text(OLD)
    new.write_text(NEW)
    envoy = bootstrap_document(load_rules(old), EnvoyOptions(mode=mode))
    with Stack(old, envoy, tmp_path, sidecar_args=["--decision-log", str(decisions)]) as stack:
        client = stack.client()
        for headers in SENT:
            assert client.get("/", headers)[0] == 200
        wait_for(lambda: len(decisions.read_text().splitlines()) >= len(SENT), 10, "the decision log")
        access_log = tmp_path / "envoy.log"  # Envoy's stdout: the access log alone
        wait_for(lambda: access_log.read_text().count("\n") >= len(SENT), 10, "the access log")
    expected = moves(old, new)
    assert {key[:2] for key in expected} >= {("beta", "mobile"), ("beta", "ramp"), ("ramp", "ramp")}
    for log in (access_log, decisions):
        report = diff(old, new, log)
        assert report["read"] == {
            "requests": len(SENT),
            "skipped_lines": 0,
            "unreadable_lines": 0,
            "redacted": 0,
        }, log
        assert report["requests"] == len(SENT)
        assert report["moved_requests"] == sum(expected.values()), log
        found = {
            (m["from"]["rule"], m["to"]["rule"], m["from"]["cluster"], m["to"]["cluster"]): m["requests"]
            for m in report["moves"]
        }
        assert found == dict(expected), log
        assert report["backwards"] == []


def test_the_access_log_file_holds_the_access_log_alone(tmp_path: Path) -> None:
    """Envoy writes its buffered access log one 16 KiB piece at a time, and its own log (stderr)
    as it comes: in one shared file, a line of its own (`caught ENVOY_SIGTERM` on a stop)
    lands inside an access log line split between two pieces, and `graysteer diff --requests`
    then reads a header value with Envoy's line glued to it. The devstack keeps the two apart."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(OLD)
    with Stack(rules, bootstrap_document(load_rules(rules), EnvoyOptions()), tmp_path) as stack:
        assert stack.client().get("/", {"x-user-id": "u-1"})[0] == 200
        assert stack.envoy is not None
        own_log = stack.envoy.own_log
    lines = (tmp_path / "envoy.log").read_text().splitlines()
    assert len(lines) == 1, lines
    request = from_access_log(lines[0], [logged_headers(load_rules(rules))])
    assert request is not None and request.headers["x-user-id"] == "u-1", lines
    assert "caught ENVOY_SIGTERM" in own_log.read_text()
