"""Requests read back from an Envoy access log (the generated format) and a decision log."""

import io
import json

from sidecar.changes.requests import ReadCount, read_requests
from sidecar.envoyconf.generate import access_log_format

ACCESS = (
    '[2026-12-03T06:00:00.000Z] "GET /cart?gray_id=7" 200 - cluster=canary rule=ramp bucket=3 lane=canary '
    "identity=spiffe://example.org/ns/a/sa/web version=abc mirror=- 3ms "
    "h:user-agent=curl/8.5 (x86_64; linux) h:x-user-id=u-1 h:x-tier=-\n"
)
DECISION = {
    "method": "POST",
    "path": "/pay?x=1",
    "identity": "api.example.org",
    "listener_port": 10000,
    "headers": {"x-user-id": "u-2", "x-secret": "<redacted>"},
    "decision": {"cluster": "stable"},
}


def test_the_generated_format_is_the_one_read() -> None:
    fmt = access_log_format("ns", headers=["user-agent", "x-user-id"])
    assert fmt.endswith("%DURATION%ms h:user-agent=%REQ(USER-AGENT)% h:x-user-id=%REQ(X-USER-ID)%\n")


def test_access_and_decision_log_lines_become_requests_and_the_rest_is_counted() -> None:
    count = ReadCount()
    lines = io.StringIO(ACCESS + json.dumps(DECISION) + "\n[warning] envoy says hello\n\n{not json\n")
    first, second = read_requests(lines, count)
    assert (first.method, first.path, first.query) == ("GET", "/cart", "gray_id=7")
    assert first.headers["user-agent"] == "curl/8.5 (x86_64; linux)"  # spaces kept
    assert first.headers["x-user-id"] == "u-1" and "x-tier" not in first.headers  # `-`: not sent
    assert first.identity.principal == "spiffe://example.org/ns/a/sa/web" and first.identity.mtls
    assert (second.method, second.path, second.listener_port) == ("POST", "/pay", 10000)
    assert second.headers["x-user-id"] == "u-2" and "x-secret" not in second.headers
    assert second.identity.principal == "api.example.org"
    assert (count.read, count.skipped, count.redacted) == (2, 2, 1)
