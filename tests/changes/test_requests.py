"""Requests read back from an Envoy access log (the generated format) and a decision log:
strictly, within bounds, one at a time."""

import io
import json
import tracemalloc
from pathlib import Path

import pytest

from sidecar.changes.requests import ReadCount, read_requests
from sidecar.cli import main
from sidecar.envoyconf.generate import access_log_format

LOGGED = [["user-agent", "x-tier", "x-user-id"]]

ACCESS = (
    '[2026-12-03T06:00:00.000Z] "GET /cart?gray_id=7" 200 - cluster=canary rule=ramp bucket=3 lane=canary '
    "identity=spiffe://example.org/ns/a/sa/web version=abc mirror=- 3ms "
    "h:user-agent=curl/8.5 (x86_64; linux) h:x-tier=- h:x-user-id=u-1\n"
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
    first, second = read_requests(lines, count, LOGGED)
    assert (first.method, first.path, first.query) == ("GET", "/cart", "gray_id=7")
    assert first.headers["user-agent"] == "curl/8.5 (x86_64; linux)"  # spaces kept
    assert first.headers["x-user-id"] == "u-1" and "x-tier" not in first.headers  # `-`: not sent
    assert first.identity.principal == "spiffe://example.org/ns/a/sa/web" and first.identity.mtls
    assert (second.method, second.path, second.listener_port) == ("POST", "/pay", 10000)
    assert second.headers["x-user-id"] == "u-2" and "x-secret" not in second.headers
    assert second.identity.principal == "api.example.org"
    assert (count.read, count.skipped, count.redacted) == (2, 2, 1)


def access(values: str) -> str:
    return ACCESS.replace(" h:user-agent=curl/8.5 (x86_64; linux) h:x-tier=- h:x-user-id=u-1", values)


def test_a_header_value_cannot_forge_another_header() -> None:
    """Envoy writes a value as it came: ` h:x-canary=1` inside it is part of the value when
    the config logs no x-canary, and makes the line unreadable when it does."""
    count = ReadCount()
    forged = access(" h:x-user-id=u1 h:x-canary=1")
    (request,) = read_requests([forged], count, [["x-user-id"]])
    assert request.headers["x-user-id"] == "u1 h:x-canary=1" and "x-canary" not in request.headers
    both = access(" h:x-canary=- h:x-user-id=u1 h:x-canary=1")
    assert list(read_requests([both], count, [["x-canary", "x-user-id"]])) == []
    other = access(" h:x-plan=gold")  # written by a config of other rules
    assert list(read_requests([other], count, [["x-user-id"]])) == []
    assert (count.read, count.unreadable) == (1, 2)


def test_a_deep_or_long_line_is_counted_and_the_run_goes_on() -> None:
    count = ReadCount()
    lines = [
        "[" * 5_000 + "\n",  # no JSON object: a line of neither kind
        "{" * 100_000 + "\n",
        '{"a": ' * 3_000 + "1" + "}" * 3_000 + "\n",
        json.dumps(DECISION) + "\n",
        access(" h:x-user-id=" + "u" * 70_000),
    ]
    (request,) = read_requests(lines, count, LOGGED)
    assert request.path == "/pay" and (count.read, count.unreadable, count.skipped) == (1, 3, 1)


def test_diff_streams_the_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """50,000 lines are decided as they are read: the peak of memory does not grow with them
    (each request held would cost about 1.6 KB)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nclusters: [stable, canary]\ndefault: stable\nrules:\n  - name: ramp\n"
        "    split:\n      key: [header:x-user-id]\n      to: [{cluster: stable, weight: 90}, "
        "{cluster: canary, weight: 10}]\n"
    )
    moved = tmp_path / "moved.yaml"
    moved.write_text(rules.read_text().replace("90}", "50}").replace("10}", "50}"))
    log = tmp_path / "decisions.jsonl"
    line = {"method": "GET", "path": "/p?x=1", "headers": {"x-user-id": "u"}, "decision": {}}
    with log.open("w") as out:
        for index in range(50_000):
            line["headers"] = {"x-user-id": f"u{index % 100}", "x-pad": "p" * 200}
            out.write(json.dumps(line) + "\n")
    tracemalloc.start()
    try:
        assert main(["diff", str(rules), str(moved), "--requests", str(log)]) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "read 50000 requests" in capsys.readouterr().out
    assert peak < 8 * 1024 * 1024  # well under 50,000 held requests (80 MB)
