"""The decision log: what a line holds (redacted, traced, within its size), and that neither a
full queue, a full disk, a pipe nobody reads nor a rotated file can slow or fail a decision."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sidecar.core import Request, decision_fields, steer
from sidecar.core.identity import Identity
from sidecar.dev.processes import wait_for
from sidecar.ops.decision_log import REDACTED, DecisionLog, trace_context
from sidecar.ops.metrics import Metrics
from tests.helpers import table_from_yaml

RULES = """
version: 1
clusters: [stable, canary]
default: stable
decision_log: {redact: [x-user-id]}
rules:
  - name: beta
    match: {headers: {x-tier: beta}}
    route: canary
  - name: by-user
    split:
      key: [header:x-user-id, cookie:uid]
      to: [{cluster: stable, weight: 50}, {cluster: canary, weight: 50}]
"""
TABLE = table_from_yaml(RULES)
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def decided(headers: dict[str, str]) -> tuple[Request, object]:
    request = Request(headers, "GET", "/x?q=1")
    return request, steer(TABLE, request)


def lines(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("graysteer_decision_log_lines_total", {"outcome": outcome}) or 0


def test_one_writer_switching_tables_and_decisions_writes_each_lines_own() -> None:
    """The writer reuses a decision's fields and a table's header names from line to line:
    never across tables, nor for another decision."""
    other = table_from_yaml(RULES.replace("x-tier", "x-plan").replace("{redact: [x-user-id]}", "{}"))
    log = DecisionLog("-", 1.0, Metrics(CollectorRegistry()))
    headers = {"x-tier": "beta", "x-plan": "beta", "x-user-id": "u1"}
    for _ in range(2):
        for table in (TABLE, other, TABLE):
            request = Request(dict(headers), "GET", "/")
            steering = steer(table, request)
            record = json.loads(log.line(1.7e9, "ext_proc", request, steering, table))
            assert record["decision"] == json.loads(json.dumps(decision_fields(steering.decision)))
            if table is TABLE:
                assert record["headers"] == {"x-tier": "beta", "x-user-id": REDACTED}
            else:
                assert record["headers"] == {"x-plan": "beta", "x-user-id": "u1"}


def test_a_line_holds_the_decision_its_trace_and_no_secret() -> None:
    log = DecisionLog("-", 1.0, Metrics(CollectorRegistry()))
    headers = {
        "x-tier": "gold",
        "x-user-id": "u1",
        "cookie": "uid=9",
        "traceparent": PARENT,
        "x-request-id": "r-1",
    }
    request, steering = decided(headers)
    record = json.loads(log.line(1.7e9, "ext_proc", request, steering, TABLE))  # type: ignore[arg-type]
    assert record["time"] == "2023-11-14T22:13:20.000Z"
    assert (record["decision_id"], record["trace_id"], record["span_id"]) == (
        "r-1",
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    )
    assert record["headers"] == {"x-tier": "gold", "x-user-id": REDACTED, "cookie": REDACTED}
    assert "traceparent" not in record["headers"]  # the rules do not read it
    assert (
        record["decision"]["rule"] == "by-user" and record["path"] == "/x?q=<redacted>"
    )  # the rules read no query


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        "00-0af7651916cd43dd8448eb211c80319c-00000000000000000-01",
        "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",
    ],
)
def test_a_traceparent_that_is_not_one_gives_no_trace(value: str) -> None:
    assert trace_context(value) == (None, None)


def test_a_line_over_the_limit_keeps_its_decision() -> None:
    metrics = Metrics(CollectorRegistry())
    log = DecisionLog("-", 1.0, metrics, max_line_bytes=2048)
    request, steering = decided({"x-tier": "x" * 50_000})
    text = log.line(0.0, "ext_proc", request, steering, TABLE)  # type: ignore[arg-type]
    record = json.loads(text)
    assert len(text.encode()) <= 2048 and record["truncated"] and record["decision"]["rule"] == "by-user"
    assert lines(metrics, "truncated") == 1


def test_a_value_that_is_not_utf8_is_written_escaped_and_times_are_exact() -> None:
    log = DecisionLog("-", 1.0, Metrics(CollectorRegistry()))
    request, steering = decided({"x-tier": "caf\udce9", "x-user-id": "\u00e9l\u00e8ve"})  # undecodable byte
    text = log.line(1.7e9 + 0.9996, "ext_proc", request, steering, TABLE)  # type: ignore[arg-type]
    text.encode()  # writable as UTF-8
    record = json.loads(text)
    assert record["headers"]["x-tier"] == "caf\udce9"
    again = json.loads(log.line(1.7e9 + 1.25, "ext_proc", request, steering, TABLE))  # type: ignore[arg-type]
    assert (record["time"], again["time"]) == ("2023-11-14T22:13:20.999Z", "2023-11-14T22:13:21.250Z")


def test_sampling_and_a_full_queue_drop_and_count_never_block() -> None:
    metrics = Metrics(CollectorRegistry())
    draws = iter([0.5, 0.005, 0.9, 0.001])
    sampled = DecisionLog("-", 0.01, metrics, chance=lambda: next(draws))
    request, steering = decided({})
    for _ in range(4):
        sampled.offer("ext_proc", request, steering, TABLE)  # type: ignore[arg-type]
    assert len(sampled._pending) == 2
    full = DecisionLog("-", 1.0, metrics, max_pending=3)  # no writer: nothing drains it
    for _ in range(10):
        full.offer("ext_proc", request, steering, TABLE)  # type: ignore[arg-type]
    assert len(full._pending) == 3 and lines(metrics, "dropped_queue_full") == 7


def test_a_full_disk_drops_and_counts(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    log = DecisionLog("/dev/full", 1.0, metrics)  # every write: ENOSPC
    log.start()
    request, steering = decided({})
    for _ in range(5):
        log.offer("ext_proc", request, steering, TABLE)  # type: ignore[arg-type]
    wait_for(lambda: lines(metrics, "dropped_write_error") == 5, 5, "the failed write counted")
    log.close()
    assert lines(metrics, "written") == 0


def test_a_pipe_nobody_reads_fills_drops_and_counts(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, never read
    try:
        metrics = Metrics(CollectorRegistry())
        log = DecisionLog(str(fifo), 1.0, metrics, max_pending=1000)
        log.start()
        request, steering = decided({"x-tier": "b" * 200})
        for _ in range(20_000):  # the pipe's 64 KiB fill, then the queue: the rest is dropped
            log.offer("ext_proc", request, steering, TABLE)  # type: ignore[arg-type]
        wait_for(lambda: lines(metrics, "dropped_queue_full") > 0, 10, "drops counted")
        log.close(timeout=0.5)  # the writer is stuck in a write: closing still returns
    finally:
        os.close(reader)  # the stuck write fails (EPIPE): the writer ends and closes its file
    log._thread.join(5)
    assert not log._thread.is_alive()


def test_serve_writes_lines_and_reopens_the_file_on_sighup(tmp_path: Path) -> None:
    """A real `serve` answering HTTP checks (the fast path's wire format) directly."""
    rules, log = tmp_path / "rules.yaml", tmp_path / "decisions.jsonl"
    rules.write_text(RULES)
    serve = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(rules), "--listen", "off",
         "--authz-http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--decision-log", str(log)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = 0
        started = time.monotonic()
        assert serve.stderr is not None
        while not port and time.monotonic() - started < 20:
            line = serve.stderr.readline()
            if "HTTP ext_authz on 127.0.0.1:" in line:
                port = int(line.split("HTTP ext_authz on 127.0.0.1:")[1].split()[0])
        assert port, "serve did not start"

        def check(user: str) -> None:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/graysteer-check/", headers={"x-user-id": user}
            )
            with urllib.request.urlopen(request, timeout=5) as answer:
                answer.read()

        check("a")
        wait_for(lambda: log.exists() and log.read_text().count("\n") == 1, 5, "the first line")
        log.rename(tmp_path / "decisions.jsonl.1")  # logrotate, then its postrotate signal
        serve.send_signal(signal.SIGHUP)
        wait_for(lambda: log.exists(), 5, "the file opened again")
        check("b")
        wait_for(lambda: log.read_text().count("\n") == 1, 5, "the next line in the new file")
        assert (tmp_path / "decisions.jsonl.1").read_text().count("\n") == 1
    finally:
        serve.terminate()
        serve.communicate(timeout=10)  # drains and closes its stderr


QUERY_AND_LANES = """
version: 1
clusters: [stable, canary]
default: stable
coloring: {lanes: {stable: stable, canary: canary}}
rules:
  - name: by-user
    split:
      key: [query:uid]
      to: [{cluster: stable, weight: 50}, {cluster: canary, weight: 50}]
"""


def test_a_line_shows_query_values_and_baggage_members_only_where_the_rules_read_them() -> None:
    table = table_from_yaml(QUERY_AND_LANES)
    log = DecisionLog("-", 1.0, Metrics(CollectorRegistry()))
    headers = {"baggage": "graysteer.lane=canary;p=1, session=s3cret,,user=u%201"}
    request = Request(headers, "GET", "/cart?access_token=T0KEN&uid=u7&flag&to%6Ben=x&a=1=2")
    record = json.loads(log.line(1.7e9, "ext_proc", request, steer(table, request), table))
    assert record["path"] == ("/cart?access_token=<redacted>&uid=u7&flag&to%6Ben=<redacted>&a=<redacted>")
    assert record["headers"]["baggage"] == "graysteer.lane=canary;p=1,session=<redacted>,user=<redacted>"
    assert "T0KEN" not in json.dumps(record) and "s3cret" not in json.dumps(record)


@pytest.mark.parametrize("field", ["path", "decision_id", "identity", "header"])
def test_every_field_is_within_the_line_bound(field: str) -> None:
    """A 60 KB path (or decision id, identity, header value) is cut with a marker."""
    metrics = Metrics(CollectorRegistry())
    log = DecisionLog("-", 1.0, metrics, max_line_bytes=4096)
    big = "a" * 60_000
    headers = {"x-request-id": big} if field == "decision_id" else {}
    headers |= {"x-tier": big} if field == "header" else {}
    request = Request(headers, "GET", "/" + big if field == "path" else "/x")
    steering = steer(TABLE, request)
    if field == "identity":
        steering = dataclasses.replace(steering, identity=Identity(True, dns_sans=(big,)))
    text = log.line(0.0, "ext_proc", request, steering, TABLE)
    record = json.loads(text)
    assert len(text.encode()) <= 4096 and record["truncated"]
    assert record["decision"]["rule"] == "by-user"
    assert "...<cut>" in text and lines(metrics, "truncated") == 1


def test_a_record_that_cannot_fit_keeps_its_time() -> None:
    log = DecisionLog("-", 1.0, Metrics(CollectorRegistry()), max_line_bytes=64)
    request, steering = decided({"x-tier": "beta"})
    record = json.loads(log.line(0.0, "ext_proc", request, steering, TABLE))  # type: ignore[arg-type]
    assert record == {"time": "1970-01-01T00:00:00.000Z", "truncated": True}


def test_a_replay_leaves_out_redacted_query_values_and_decides_the_same() -> None:
    from sidecar.changes.requests import ReadCount, read_requests
    from sidecar.transports.explain import compare_logged, logged_request

    table = table_from_yaml(QUERY_AND_LANES)
    log = DecisionLog("-", 1.0, Metrics(CollectorRegistry()), max_line_bytes=2048)
    request = Request({}, "GET", "/" + "p" * 5000 + "?access_token=tok&uid=u7")
    steering = steer(table, request)
    line = log.line(0.0, "ext_proc", request, steering, table)
    method, path, _, _, redacted = logged_request(line)
    assert path.endswith("...<cut>") and redacted == []  # the query was past the cut
    assert compare_logged(line, {})["truncated"]
    plain = log.line(0.0, "ext_proc", Request({}, "GET", "/c?access_token=tok&uid=u7"), steering, table)
    method, path, _, _, redacted = logged_request(plain)
    assert (method, path, redacted) == ("GET", "/c?uid=u7", ["query:access_token"])
    count = ReadCount()
    (again,) = read_requests(iter([plain]), count, [])
    assert again.query == "uid=u7" and count.redacted == 1
    assert steer(table, again).decision.bucket == steering.decision.bucket
