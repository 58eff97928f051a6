"""The operator HTTP endpoint (/metrics, /healthz, /readyz) stays bounded against slow and
half-open clients: threads capped, slow requests cut off, probes still answered."""

import http.client
import socket
import threading
import time

from prometheus_client import CollectorRegistry

from sidecar.ops import health
from sidecar.ops.health import Readiness, start_http


def test_half_open_connections_hold_neither_threads_nor_the_probes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(health, "READ_TIMEOUT_SECONDS", 0.5)
    readiness = Readiness()
    readiness.ready, readiness.reason = True, "serving"
    threads_before = threading.active_count()

    # The handler class reads the timeout when it is created, inside start_http.
    server = start_http("127.0.0.1", 0, CollectorRegistry(), readiness, dict)
    port = server.server_address[1]
    half_open = []
    try:
        for _ in range(200):  # each sends half a request line and nothing more
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            half_open.append(sock)
        time.sleep(0.2)
        assert threading.active_count() - threads_before <= health.MAX_CONNECTIONS + 2
        # over the limit: refused at once (503, or a reset: its request was never read), not
        # queued behind the slow ones
        half_open[-1].settimeout(2)
        try:
            refused = half_open[-1].recv(100)
        except ConnectionResetError:
            refused = b""
        assert refused in (b"",) or refused.startswith(b"HTTP/1.0 503")
        # the slow ones are cut off after the read timeout; then a probe is answered
        deadline = time.monotonic() + 10
        while True:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/readyz")
            status = connection.getresponse().status
            connection.close()
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 200
        assert half_open[0].recv(100) == b""  # closed by the server
    finally:
        for sock in half_open:
            sock.close()
        server.shutdown()
        server.server_close()
