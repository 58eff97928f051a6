"""What Envoy decided itself (envoy_decides) feeds, through the real Envoy, besides the metrics:
the decision log (the same lines as another mode's, read alike by `diff` and `explain
--from-log`), the shadow table's comparison and the steering events; and a forged stream is
refused and counted, never a crash."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from sidecar.contract import LUA_NAMES
from sidecar.core import Table, compile_table
from sidecar.core.bucketing import bucket
from sidecar.core.lua_table import INPUTS_KEY, INPUTS_NAMESPACE, lua_source
from sidecar.dev.devstack import Stack
from sidecar.dev.processes import wait_for
from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document
from sidecar.table.load import load_rules
from sidecar.transports.envoy_decided import captured_headers
from sidecar.transports.envoy_inputs import inputs_request
from tests.e2e.test_lua_decisions import IDENTITY_RULES, each_peer
from tests.e2e.test_sticky_cookie import Visitor, cookie_key
from tests.lua_envoy import NAMES, LuaEnvoy, bootstrap, static_lua
from tests.tls import make_ca, make_leaf, write_pair

RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    trust: {override_headers: [x-force-cluster], plaintext: false}
    coloring: {lanes: {stable: stable, canary: canary}}
    decision_log: {redact: [x-secret]}
    rules:
      - name: beta
        match: {headers: {x-beta: "1", x-secret: {present: true}}}
        route: canary
      - name: forced
        match: {headers: {x-force-cluster: canary}}
        route: canary
      - name: shop
        match: {host: "shop.example.com", path: {prefix: /cart}}
        route: canary
      - name: ramp
        split:
          key: [header:x-user-id, query:uid, cookie:uid]
          seed: feeds
          to: [{cluster: stable, weight: 60}, {cluster: canary, weight: 40}]
          when_key_missing: stable
    """)
# The next rules: the ramp at 100% canary, and `beta` gone.
NEXT = RULES.replace("weight: 60}, {cluster: canary, weight: 40", "weight: 0}, {cluster: canary, weight: 100")
NEXT = NEXT.replace('match: {headers: {x-beta: "1", x-secret: {present: true}}}', "match: {method: PATCH}")


def sent() -> list[tuple[str, dict[str, str]]]:
    """(path, headers) of each request."""
    requests: list[tuple[str, dict[str, str]]] = []
    for i in range(24):
        requests.append((f"/?uid=q-{i}&token=secret-{i}", {"x-user-id": f"u-{i}"}))
    for i in range(6):
        requests.append(("/", {"x-beta": "1", "x-secret": f"s-{i}", "cookie": f"uid=c-{i}; other=x"}))
        requests.append(("/", {"x-force-cluster": "canary", "x-user-id": f"f-{i}"}))  # stripped: untrusted
        requests.append((f"/cart/{i}", {"host": "shop.example.com"}))
        requests.append(("/", {"cookie": f"uid=c-{i}"}))
    return requests


COMPARED_OUT = ("time", "decision_id", "transport", "trace_id", "span_id")


def lines(path: Path, port: int) -> list[str]:
    """The decision log's lines without what differs from request to request alike in every
    mode (time, ids), the transport, and the stack's port written PORT, sorted: the same
    requests give the same list."""
    return sorted(
        json.dumps({k: v for k, v in json.loads(text).items() if k not in COMPARED_OUT}, sort_keys=True)
        .replace(f":{port}", ":PORT")
        .replace(f": {port},", ": PORT,")
        for text in path.read_text().splitlines()
    )


def run_mode(mode: str, rules: Path, tmp_path: Path, args: list[str]) -> tuple[Path, str, int]:
    """Send every request through `mode` with a decision log; (the log, /metrics at the end,
    Envoy's port)."""
    log = tmp_path / f"{mode}.jsonl"
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode=mode))
    requests = sent()
    with Stack(rules, config, tmp_path / mode, sidecar_args=["--decision-log", str(log), *args]) as stack:
        assert stack.sidecar is not None
        client = stack.client()
        for path, headers in requests:
            assert client.get(path, headers)[0] == 200
        wait_for(
            lambda: log.exists() and len(log.read_text().splitlines()) >= len(requests),
            15,
            "the decision log",
        )
        metrics = stack.sidecar.http_get("/metrics")[1]
    return log, metrics, stack.port


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def graysteer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_envoys_decisions_are_logged_as_the_fast_path_logs_them(tmp_path: Path) -> None:
    rules, next_rules = tmp_path / "rules.yaml", tmp_path / "next.yaml"
    rules.write_text(RULES)
    next_rules.write_text(NEXT)
    tmp_path.joinpath("ext_authz_http").mkdir()
    tmp_path.joinpath("envoy_decides").mkdir()
    fast, fast_metrics, fast_port = run_mode("ext_authz_http", rules, tmp_path, [])
    envoy, envoy_metrics, port = run_mode("envoy_decides", rules, tmp_path, [])
    assert lines(envoy, port) == lines(fast, fast_port) and len(lines(envoy, port)) == len(sent())
    logged = [json.loads(text) for text in envoy.read_text().splitlines()]
    assert {line["transport"] for line in logged} == {"envoy_decides"}
    assert all(line["decision_id"] for line in logged)
    redacted = [line for line in logged if "x-secret" in line["headers"]]
    assert len(redacted) == 6 and all(line["headers"]["x-secret"] == "<redacted>" for line in redacted)
    events = samples(envoy_metrics, "graysteer_steering_events_total")
    assert events == samples(fast_metrics, "graysteer_steering_events_total")
    assert events[(("event", "untrusted_headers_removed"),)] == 6
    reports = []
    for log in (fast, envoy):
        run = graysteer("diff", str(rules), str(next_rules), "--requests", str(log), "--json")
        assert run.returncode in (0, 1), run.stderr
        report = json.loads(run.stdout)
        assert report["read"]["requests"] == len(sent())
        reports.append({k: v for k, v in report.items() if k != "read"})
    assert reports[0] == reports[1] and reports[1]["moved_requests"] > 0
    first = envoy.read_text().splitlines()[0]
    replayed = graysteer("explain", "--config", str(rules), "--from-log", first)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr


def test_envoys_decisions_are_compared_with_the_shadow_table(tmp_path: Path) -> None:
    rules, next_rules = tmp_path / "rules.yaml", tmp_path / "next.yaml"
    rules.write_text(RULES)
    next_rules.write_text(NEXT)
    shadow = ["--shadow-config", str(next_rules), "--shadow-sample", "1"]
    tmp_path.joinpath("ext_authz_http").mkdir()
    tmp_path.joinpath("envoy_decides").mkdir()
    _, fast_metrics, _ = run_mode("ext_authz_http", rules, tmp_path, shadow)
    envoy_log, envoy_metrics, _ = run_mode("envoy_decides", rules, tmp_path, shadow)
    compared = samples(envoy_metrics, "graysteer_shadow_decisions_total")
    assert compared == samples(fast_metrics, "graysteer_shadow_decisions_total")
    differing = sum(v for k, v in compared.items() if ("differs", "true") in k)
    assert sum(compared.values()) == len(sent()) and differing > 0
    logged = [json.loads(line) for line in envoy_log.read_text().splitlines()]
    assert sum("shadow" in line for line in logged) == differing


def forged(inputs: str | int) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    metadata = entry.common_properties.metadata.filter_metadata
    decided = struct_pb2.Struct()
    decided.update({LUA_NAMES.key_prefix + "cluster": "stable", LUA_NAMES.key_prefix + "rule": "default"})
    metadata[LUA_NAMES.namespace].CopyFrom(decided)
    filed = struct_pb2.Struct()
    filed.update({INPUTS_KEY: inputs})
    metadata[INPUTS_NAMESPACE].CopyFrom(filed)
    return entry


# Inputs the Lua never writes: each must be refused (tests/transports/test_envoy_decided.py
# has every kind; these go through the stream).
HOSTILE: list[str | int] = [
    7,  # not a string
    "1\nGET\n/\n\n\n\n\nX-Upper\nv",  # an upper-case header name
    "1\nGET\n/\n\n\n\n\nx-user-id\n" + "v" * (200 * 1024),  # oversized
    "1\nGET\n/\n\n\n\n\n" + "\n".join(f"h{i}\nv" for i in range(500)),  # too many headers
    "2\nGET\n/\n\n\n\n",  # another layout
    "1\nGET\n/\n\nm\nspiffe://a/b;DNS=c\n",  # a SAN XFCC cannot carry
]


def test_a_forged_stream_is_refused_and_counted_never_a_crash(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "decisions.jsonl"
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode="envoy_decides"))
    with Stack(rules, config, tmp_path, sidecar_args=["--decision-log", str(log)]) as stack:
        assert stack.sidecar is not None
        message = als_pb2.StreamAccessLogsMessage()
        message.http_logs.log_entry.extend(forged(inputs) for inputs in HOSTILE)
        raw = message.SerializeToString()
        garbage = raw + b"\x0a\x03\x0a\x01"  # an entry cut short
        with grpc.insecure_channel(f"127.0.0.1:{stack.xds_port}") as channel:
            stub = als_pb2_grpc.AccessLogServiceStub(channel)
            stub.StreamAccessLogs(iter([message]), timeout=10)
            with pytest.raises(grpc.RpcError):  # a message that is no message ends its stream
                channel.stream_unary(
                    "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
                    request_serializer=bytes,
                    response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
                )(iter([garbage]), timeout=10)
        sidecar = stack.sidecar

        def refused() -> float:
            found = samples(sidecar.http_get("/metrics")[1], "graysteer_access_log_entries_total")
            return found.get((("result", "refused_inputs"),), 0.0)

        wait_for(lambda: refused() == len(HOSTILE), 10, "every forged input refused")
        assert not log.exists() or log.read_text() == ""
        status, _ = stack.client().get("/", {"x-user-id": "after"})  # still deciding, still logging
        assert status == 200
        wait_for(lambda: log.exists() and "after" in log.read_text(), 10, "a genuine line after")


def test_the_inputs_envoy_files_are_the_request_as_the_fast_path_reads_it(tmp_path: Path) -> None:
    """Through the real Envoy's Lua, on mTLS: the peer's SANs (those x-forwarded-client-cert
    cannot carry: an unnamed peer), the local port, the path, the method and the headers the
    tables read, as received (an untrusted override header before it is stripped)."""
    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    write_pair(tmp_path, "server", make_leaf(ca, "localhost", dns=["localhost"], ips=["127.0.0.1"]))
    table = compile_table(yaml.safe_load(IDENTITY_RULES), "v1", "rules.yaml")
    names = captured_headers(table, load_rules_text(NEXT))
    envoy = LuaEnvoy(
        bootstrap(static_lua(lua_source(table, NAMES, names).source), tls_dir=tmp_path), tmp_path
    )
    headers = [("x-canary", "1"), ("x-force-cluster", "canary"), ("x-user-id", "u1"), ("x-other", "o")]
    try:
        for name, identity in each_peer(envoy, ca, tmp_path):
            observed = envoy.ask("POST", "/web/a?b=c", headers)
            assert observed.inputs is not None, name
            request = inputs_request(observed.inputs)
            assert request.identity == identity, name
            assert (request.method, request.path, request.query) == ("POST", "/web/a", "b=c")
            assert request.listener_port == envoy.envoy.port and request.headers["x-request-id"]
            shown = {
                k: v for k, v in request.headers.items() if not k.startswith(":") and k != "x-request-id"
            }
            assert shown == {
                "x-canary": "1",
                "x-force-cluster": "canary",  # read by the shadow table's trust; as received
                "x-user-id": "u1",
            }, name
    finally:
        envoy.stop()


def load_rules_text(text: str) -> Table:
    return compile_table(yaml.safe_load(text), "next", "next.yaml")


STICKY = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: web
        split:
          key: [header:x-user-id]
          seed: sticky-feeds
          to: [{cluster: stable, weight: 50}, {cluster: canary, weight: 50}]
          when_key_missing:
            assign: {cookie: gs_key, secure: false}
    """)
STICKY_NEXT = STICKY.replace(
    "weight: 50}, {cluster: canary, weight: 50", "weight: 10}, {cluster: canary, weight: 90"
)
NEW_VISITORS = 16


def lane(key: str, canary: int) -> str:
    return "canary" if bucket("sticky-feeds", key, 100) >= 100 - canary else "stable"


def new_visitors(
    mode: str, rules: Path, next_rules: Path, tmp_path: Path
) -> tuple[list[dict[str, Any]], str]:
    """NEW_VISITORS requests without a key through `mode`, with a decision log and a shadow
    table: each log line with the key issued to its request (`key`), and /metrics once every
    issued key is counted."""
    log = tmp_path / f"{mode}.jsonl"
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode=mode))
    args = ["--decision-log", str(log), "--shadow-config", str(next_rules), "--shadow-sample", "1"]
    keys = {}
    with Stack(rules, config, tmp_path / mode, sidecar_args=args) as stack:
        sidecar = stack.sidecar
        assert sidecar is not None
        visitor = Visitor(stack.port)
        try:
            for i in range(NEW_VISITORS):
                _, set_cookie, _ = visitor.get(f"/visit/{i}", cookie="")
                assert set_cookie is not None
                keys[f"/visit/{i}"] = cookie_key(set_cookie)
        finally:
            visitor.close()
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= NEW_VISITORS, 15, "the log")

        def issued() -> float:
            return sum(samples(sidecar.http_get("/metrics")[1], "graysteer_issued_keys_total").values())

        wait_for(lambda: issued() >= NEW_VISITORS, 15, "the issued keys counted")
        metrics = sidecar.http_get("/metrics")[1]
    logged = [json.loads(text) for text in log.read_text().splitlines()]
    return [{**line, "key": keys[line["path"]]} for line in logged], metrics


def test_a_new_visitor_envoy_decided_is_logged_and_compared_with_the_key_envoy_issued(
    tmp_path: Path,
) -> None:
    """envoy_decides with a decision log and a shadow table: the inputs are filed before the
    Lua adds the issued key, so the replay must take Envoy's key, not draw one. Each line and
    shadow comparison is the fast path's for the same visitor with the same key, and each key
    is counted once."""
    rules, next_rules = tmp_path / "rules.yaml", tmp_path / "next.yaml"
    rules.write_text(STICKY)
    next_rules.write_text(STICKY_NEXT)
    seen = {}
    for mode in ("ext_authz_http", "envoy_decides"):
        tmp_path.joinpath(mode).mkdir()
        logged, metrics = new_visitors(mode, rules, next_rules, tmp_path)
        assert len(logged) == NEW_VISITORS, mode
        shapes, moved_count = [], 0
        for line in logged:
            key, decision = line.pop("key"), line["decision"]
            assert decision["bucket"] == bucket("sticky-feeds", key, 100), (mode, line)
            assert decision["cluster"] == lane(key, 50) and decision["issued_cookie"] == "gs_key"
            moved = lane(key, 90) != lane(key, 50)
            moved_count += moved
            assert ("shadow" in line) == moved, (mode, line)
            if moved:
                assert (
                    line["shadow"]["bucket"] == decision["bucket"] and line["shadow"]["cluster"] == "canary"
                )
            # what the key decides is checked above; the rest is the same line in every mode
            del decision["bucket"], decision["cluster"]
            line.pop("shadow", None)
            kept = {k: v for k, v in line.items() if k not in (*COMPARED_OUT, "listener_port")}
            shapes.append(json.dumps(kept, sort_keys=True))
        seen[mode] = sorted(shapes)
        issued = samples(metrics, "graysteer_issued_keys_total")
        assert sum(issued.values()) == NEW_VISITORS, (mode, issued)  # once each
        compared = samples(metrics, "graysteer_shadow_decisions_total")
        assert sum(compared.values()) == NEW_VISITORS, (mode, compared)
        differing = sum(v for k, v in compared.items() if ("differs", "true") in k)
        assert differing == moved_count, (mode, compared)
    assert seen["envoy_decides"] == seen["ext_authz_http"]
