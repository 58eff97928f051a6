"""In-process cost of one fast-path check and of its pieces, in µs per call (best of a few
repeats), as the sidecar serves them: deciding on the 50-rule table (benchmarks/decide.py),
steering on examples/rules.yaml with coloring, the Decider's turn (steering, metrics), and one whole
check through the HTTP ext_authz connection (parse, decide, count, answer) without sockets.

Only the package's public entry points are used, so the same script measures another
checkout of the package (see benchmarks/ab.py: A/B between two commits, interleaved).
Run: python -m benchmarks.check_path [--json]"""

import asyncio
import json
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks.decide import realistic_document, sample_requests
from sidecar.core import Request, Table, compile_table, steer
from sidecar.ops.metrics import Metrics
from sidecar.table.decider import Decider
from sidecar.table.holder import TableHolder
from sidecar.table.load import load_rules
from sidecar.transports.authz_http import AuthzHttpServer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rules.yaml"
USERS = 500  # distinct x-user-id values cycled through, as wrk sends a new one per request


class _Transport(asyncio.Transport):
    """Takes the answers and drops them: the check without a socket."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False


TRACEPARENT = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"


def check_bytes(user: int, traced: bool = False) -> bytes:
    """One check as Envoy's ext_authz HTTP client sends it for the benchmark's requests
    (`traced`: with the `traceparent` a tracing Envoy adds, all a trace changes here)."""
    return (
        "GET /graysteer-check/checkout HTTP/1.1\r\n"
        "host: 127.0.0.1:10000\r\n"
        f"x-user-id: user-{user}\r\n"
        "x-forwarded-proto: http\r\n"
        "x-request-id: 7d3c5ac8-4b7e-4e1f-a5d0-6a3c6d2f9e10\r\n"
        "x-graysteer-listener-port: 10000\r\n"
        "x-envoy-expected-rq-timeout-ms: 200\r\n"
        + (TRACEPARENT if traced else "")
        + "content-length: 0\r\n\r\n"
    ).encode()


def served(table: Table) -> tuple[Callable[[Request], Any], Callable[[Request], Any]]:
    """(decide, steer) as the sidecar serves `table`: its engine where the package has one
    (sidecar.core.engine), else the reference `Table.decide` and `steer`."""
    engine = getattr(TableHolder(table), "engine", None)
    if engine is not None:
        return engine.decide, engine.steer
    return table.decide, lambda request: steer(table, request)


def per_call_us(loop: Any, calls: int, number: int = 5, repeat: int = 5) -> float:
    return min(timeit.repeat(loop, number=number, repeat=repeat)) / (number * calls) * 1e6


def measure() -> dict[str, float]:
    big = compile_table(realistic_document(), "bench", "bench")
    example = load_rules(EXAMPLE)
    requests = sample_requests()

    decide_big = served(big)[0]

    def decide() -> None:
        for request in requests:
            decide_big(request)

    example_requests = [
        Request({":method": "GET", ":path": "/checkout", "x-user-id": f"user-{i}"}, "GET", "/checkout")
        for i in range(USERS)
    ]

    steer_served = served(example)[1]

    def steer_example() -> None:
        for request in example_requests:
            steer_served(request)

    decider = Decider(TableHolder(example), Metrics(CollectorRegistry()))

    def decider_turn() -> None:
        for i in range(USERS):
            headers = {":method": "GET", ":path": "/checkout", "x-user-id": f"user-{i}"}
            decider.steer_input("ext_authz_http", dict(headers).copy, Request.from_headers)

    server = AuthzHttpServer(decider, lambda: True)
    protocol_factory: Any = sys.modules[AuthzHttpServer.__module__]._Connection
    protocol = protocol_factory(server)
    protocol.connection_made(_Transport())
    checks = [check_bytes(i) for i in range(USERS)]
    traced_checks = [check_bytes(i, traced=True) for i in range(USERS)]

    def whole_check() -> None:
        for data in checks:
            protocol.data_received(data)

    def whole_check_traced() -> None:
        for data in traced_checks:
            protocol.data_received(data)

    table: Table = example
    assert steer(table, example_requests[0]).decision.rule == "checkout-ramp"
    return {
        "decide_50_rules_us": per_call_us(decide, len(requests)),
        "steer_example_us": per_call_us(steer_example, USERS),
        "decider_turn_us": per_call_us(decider_turn, USERS),
        "whole_check_us": per_call_us(whole_check, USERS),
        "whole_check_traced_us": per_call_us(whole_check_traced, USERS),
    }


if __name__ == "__main__":
    result = measure()
    if "--json" in sys.argv:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:22} {value:7.2f}")
