"""OFREP on the operator endpoint through real sockets: hostile bodies get OFREP's error
answers (never a crash, the endpoint answering on), the bulk ETag and If-None-Match, the
read-only token, and OFREP's 429 when the endpoint is busy."""

import json
import socket
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from sidecar.core import compile_table
from sidecar.core.engine import Engine
from sidecar.core.ofrep import TABLE_FLAG
from sidecar.ops.health import Readiness
from sidecar.ops.ofrep_http import OfrepEndpoint
from sidecar.ops.operator_http import OperatorHttpServer, start_http

DOC = {
    "version": 1,
    "clusters": ["stable", "canary"],
    "default": "stable",
    "rules": [
        {
            "name": "ramp",
            "split": {
                "key": ["header:x-user-id"],
                "to": [{"cluster": "stable", "weight": 50}, {"cluster": "canary", "weight": 50}],
            },
        }
    ],
}
SINGLE = "/ofrep/v1/evaluate/flags/ramp"
BULK = "/ofrep/v1/evaluate/flags"
TOKEN = "s3cret"


class Current:
    """The engine the endpoint reads, swapped by a test as a reload would."""

    def __init__(self) -> None:
        self.engine = Engine(compile_table(DOC, "v1", "test"))


def serve(current: Current, authorized: object = None, open_without_token: bool = True) -> OperatorHttpServer:
    readiness = Readiness()
    readiness.ready = True
    endpoint = OfrepEndpoint(lambda: current.engine, authorized, open_without_token)  # type: ignore[arg-type]
    return start_http("127.0.0.1", 0, CollectorRegistry(), readiness, dict, ofrep=endpoint)


@pytest.fixture()
def current() -> Current:
    return Current()


@pytest.fixture()
def server(current: Current) -> Iterator[OperatorHttpServer]:
    http = serve(current)
    yield http
    http.shutdown()


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def post(port: int, path: str, body: bytes, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    head = f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\n{headers}\r\n"
    return exchange(port, head.encode() + body)


def ofrep_error(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, headers, body = answer
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)["errorCode"]


HOSTILE = [
    b"not json",
    b"{",
    b"[" * 5000 + b"]" * 5000,  # deeper than orjson's 1,024 levels
    b'{"context": {"targetingKey": "\\ud800"}}',  # a lone surrogate in a JSON escape
    b'{"context": {"\\udfff": "x"}}',
    b"\xff\xfe{}",  # not UTF-8
    b"",
]


@pytest.mark.parametrize("body", HOSTILE)
def test_bodies_that_are_no_json_are_parse_errors(server: OperatorHttpServer, body: bytes) -> None:
    port = server.server_address[1]
    for path in (SINGLE, BULK):
        assert ofrep_error(post(port, path, body)) == (400, "PARSE_ERROR")
    assert exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")[0] == 200


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"[]", "PARSE_ERROR"),
        (b'"x"', "PARSE_ERROR"),
        (b'{"context": []}', "INVALID_CONTEXT"),
        (b'{"context": {"targetingKey": 1}}', "INVALID_CONTEXT"),
        (b'{"context": {"header:x-user-id": {"a": [1]}}}', "INVALID_CONTEXT"),
        # nested within orjson's 1,024 levels, deeper than Python's recursion limit: no 500
        (b'{"context": {"a": ' + b"[" * 1020 + b"]" * 1020 + b"}}", "INVALID_CONTEXT"),
        (b'{"context": {"a": ' + b'{"b": ' * 1000 + b"1" + b"}" * 1000 + b"}}", "INVALID_CONTEXT"),
    ],
)
def test_wrong_types_are_ofreps_errors(server: OperatorHttpServer, body: bytes, code: str) -> None:
    for path in (SINGLE, BULK):
        assert ofrep_error(post(server.server_address[1], path, body)) == (400, code)


def test_bodies_it_does_not_read_are_parse_errors(server: OperatorHttpServer) -> None:
    port = server.server_address[1]
    oversized = f"POST {SINGLE} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 1000000\r\n\r\n"
    assert ofrep_error(exchange(port, oversized.encode())) == (400, "PARSE_ERROR")
    for length in ("", "transfer-encoding: chunked\r\n"):
        head = f"POST {BULK} HTTP/1.1\r\nhost: 127.0.0.1\r\n{length}\r\n"
        assert ofrep_error(exchange(port, head.encode("utf-8"))) == (400, "PARSE_ERROR")
    assert exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")[0] == 200


def test_evaluations_and_the_bulk_etag(server: OperatorHttpServer, current: Current) -> None:
    port = server.server_address[1]
    context = b'{"context": {"targetingKey": "alice"}}'
    status, _, body = post(port, SINGLE, context)
    single = json.loads(body)
    assert status == 200 and single["key"] == "ramp" and single["value"] in ("stable", "canary")
    status, headers, body = post(port, BULK, context)
    tag = headers["etag"]
    flags = {flag["key"]: flag for flag in json.loads(body)["flags"]}
    assert (
        status == 200 and flags["ramp"] == single and flags[TABLE_FLAG]["metadata"]["key_source"] == "random"
    )
    for sent in (tag, f"W/{tag}", f'"other", {tag}'):
        status, headers, body = post(port, BULK, context, f"if-none-match: {sent}\r\n")
        assert (status, headers["etag"], body) == (304, tag, b"")
    assert post(port, BULK, b'{"context": {"targetingKey": "bob"}}', f"if-none-match: {tag}\r\n")[0] == 200
    weights = [{"cluster": "stable", "weight": 0}, {"cluster": "canary", "weight": 1}]
    current.engine = Engine(
        compile_table(
            {**DOC, "rules": [{**DOC["rules"][0], "split": {**DOC["rules"][0]["split"], "to": weights}}]},
            "v1",
            "test",
        )
    )  # type: ignore[dict-item]
    status, headers, body = post(port, BULK, context, f"if-none-match: {tag}\r\n")
    assert status == 200 and headers["etag"] != tag
    assert {flag["key"]: flag["value"] for flag in json.loads(body)["flags"]}["ramp"] == "canary"
    assert ofrep_error(post(port, "/ofrep/v1/evaluate/flags/nope", context)) == (404, "FLAG_NOT_FOUND")
    assert exchange(port, f"GET {SINGLE} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())[0] == 405


def test_the_read_only_token(current: Current) -> None:
    http = serve(current, lambda header: header == f"Bearer {TOKEN}")
    try:
        port = http.server_address[1]
        body = b'{"context": {"targetingKey": "alice"}}'
        assert post(port, SINGLE, body)[0] == 401
        assert post(port, SINGLE, body, "authorization: Bearer wrong\r\n")[0] == 401
        assert post(port, SINGLE, body, f"authorization: Bearer {TOKEN}\r\n")[0] == 200
    finally:
        http.shutdown()
    closed = serve(current, open_without_token=False)  # not loopback, no token: refused
    try:
        assert post(closed.server_address[1], SINGLE, body)[0] == 403
    finally:
        closed.shutdown()


def test_a_busy_endpoint_answers_ofreps_429_with_retry_after(server: OperatorHttpServer) -> None:
    server.busy = server.limits.busy_slots  # every slot taken
    status, headers, _ = post(server.server_address[1], SINGLE, b"{}")
    server.busy = 0
    assert (status, headers["retry-after"]) == (429, "1")


def test_a_flood_of_evaluations_leaves_metrics_a_slot(server: OperatorHttpServer) -> None:
    port = server.server_address[1]
    server.busy = server.limits.busy_slots - 1  # all but one slot taken
    try:
        status, headers, _ = post(port, SINGLE, b"{}")
        metrics = exchange(port, b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")[0]
    finally:
        server.busy = 0
    assert (status, headers["retry-after"], metrics) == (429, "1", 200)


def test_the_bulk_path_with_a_slash_and_if_none_match_star(server: OperatorHttpServer) -> None:
    port = server.server_address[1]
    context = b'{"context": {"targetingKey": "alice"}}'
    status, headers, body = post(port, BULK + "/", context)
    assert status == 200 and "flags" in json.loads(body)
    assert post(port, BULK, context, "if-none-match: *\r\n")[:2] == (304, {**headers, "content-length": "0"})


@pytest.mark.parametrize(
    "twice",
    [
        "authorization: Bearer wrong\r\nauthorization: Bearer s3cret\r\n",
        "host: evil.example\r\n",  # a second Host after post's own
    ],
)
def test_a_field_sent_once_given_twice_is_refused(current: Current, twice: str) -> None:
    http = serve(current, lambda header: header == f"Bearer {TOKEN}")
    try:
        body = b'{"context": {"targetingKey": "alice"}}'
        status, _, said = post(http.server_address[1], SINGLE, body, twice)
        assert status == 400 and b"given twice" in said
    finally:
        http.shutdown()
