"""Header counts around Envoy's limit, through the real Envoy with the generated config of each
mode: every request Envoy's listener accepts is decided by the sidecar, and a request with too
many headers gets a 431 (Envoy's own above the limit), never a 500."""

import http.client
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.contract import ENVOY_MAX_HEADERS
from sidecar.dev.devstack import Stack
from sidecar.dev.processes import wait_for
from sidecar.envoyconf.generate import HEADERS_TOO_LARGE, MODES, EnvoyOptions, bootstrap_document
from sidecar.table.load import load_rules

# Coloring makes the sidecar set three headers (route, lane, baggage): the widest answer.
RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    coloring:
      lanes: {stable: stable, canary: canary}
    rules:
      - name: force-canary
        match: {headers: {x-canary: "1"}}
        route: canary
    """)
COUNTS = range(ENVOY_MAX_HEADERS - 15, ENVOY_MAX_HEADERS + 3)  # header lines on the wire, Host included


def send(port: int, count: int) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", f"/headers/{count}", skip_accept_encoding=True)
        for i in range(count - 1):
            connection.putheader(f"x-filler-{i}", "v")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def decisions(stack: Stack) -> float:
    assert stack.sidecar is not None
    families = text_string_to_metric_families(stack.sidecar.http_get("/metrics")[1])
    return sum(
        sample.value
        for family in families
        if family.name == "graysteer_decisions"
        for sample in family.samples
        if sample.name == "graysteer_decisions_total"
    )


@pytest.mark.parametrize("mode", MODES)
def test_every_accepted_header_count_is_decided_and_too_many_is_431(mode: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode=mode))
    with Stack(rules, config, tmp_path) as stack:
        before = decisions(stack)
        answers = {count: send(stack.port, count) for count in COUNTS}
        accepted = [count for count in COUNTS if count <= ENVOY_MAX_HEADERS]
        # counted as they are decided, or (envoy_decides) from Envoy's access-log stream, off the
        # request path: waited for, bounded
        wait_for(lambda: decisions(stack) - before >= len(accepted), 10, "the decisions to be counted")
        decided = decisions(stack) - before
    statuses = {count: status for count, (status, _) in answers.items()}
    assert set(statuses.values()) == {200, 431}, statuses  # never a 500
    routed = [count for count in accepted if statuses[count] == 200]
    # Routed up to a point (Envoy checks again once the answer's headers are added), then 431.
    assert routed == accepted[: len(routed)] and len(routed) >= 5, statuses
    for count, (status, body) in answers.items():
        if status == 431:
            assert body == HEADERS_TOO_LARGE.encode(), (count, body)  # Envoy's, not the sidecar's
    assert decided == len(accepted)  # the sidecar decided each request Envoy's listener accepted
