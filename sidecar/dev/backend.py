"""A sample HTTP backend for the demo, the tests and docker-compose.

It answers every request with JSON naming itself and echoing the request line
and headers, so a caller can see which lane a request reached and what the
upstream received (e.g. that a client-sent routing header never arrives). A path ending
in `.html`, `.js` or `.css` gets a small document of that type instead (a page loads its
script and style sheet), for a browser to show which lane each of them came from. GET
/metrics is its own business metric for Prometheus: `checkout_total{version, outcome}`,
where a share of 200 answers can be counted as failed checkouts (`checkout_fail_rate`). With
`forward_to` it is a service in a call chain: it calls the next hop (through its own
outbound Envoy) with the trace context, baggage and lane header, and embeds the
answer.
"""

import http.client
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from sidecar.contract import ENVOY_MAX_HEADERS

# Envoy forwards as many headers as its own limit allows, plus the ones it adds; http.server
# refuses more than 100, so the sample backend takes more than Envoy can send: a test of
# Envoy's and the sidecar's limits never measures the sample backend's instead.
http.client._MAXHEADERS = 4 * ENVOY_MAX_HEADERS  # type: ignore[attr-defined]

# What a well-behaved service passes on to the services it calls: trace context and
# the W3C baggage (OpenTelemetry propagates both), and the lane header.
PROPAGATED = ("traceparent", "tracestate", "baggage", "x-graysteer-lane", "x-user-id")


# A page and its assets: (content type, body), BACKEND replaced by the backend's name.
PAGE_TYPES = {
    "html": (
        "text/html; charset=utf-8",
        '<!doctype html><html><head><title>BACKEND</title><link rel="stylesheet" href="page.css">'
        '<script src="page.js"></script></head><body>served by BACKEND</body></html>',
    ),
    "js": ("text/javascript", 'document.documentElement.dataset.script = "BACKEND";'),
    "css": ("text/css", "body { margin: 0 } /* BACKEND */"),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream connections expect
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    server: "BackendServer"

    def _answer(self) -> None:
        if self.path == "/metrics":  # its own business metrics, for Prometheus to scrape
            self._metrics()
            return
        self.server.requests += 1
        if self.server.delay_ms:  # a slow version, for rollout analysis tests
            time.sleep(self.server.delay_ms / 1000)
        if self.server.fail_rate and random.random() < self.server.fail_rate:
            self._fail()
            return
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        kind = PAGE_TYPES.get(self.path.partition("?")[0].rpartition(".")[2])
        if kind is not None:
            self._send(kind[0], kind[1].replace("BACKEND", self.server.name).encode())
            return
        echo: dict[str, object] = {
            "backend": self.server.name,
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            # every `cookie` header as received: `headers` keeps only the last of a repeated one
            "cookies": self.headers.get_all("cookie") or [],
        }
        if self.server.forward_to is not None:  # a service that calls the next hop
            echo["downstream"] = self._call_next_hop()
        # A checkout that goes wrong inside a 200 (a wrong price): only the business metric sees it
        failed = bool(self.server.checkout_fail_rate) and random.random() < self.server.checkout_fail_rate
        self.server.checkouts.labels(self.server.name, "failure" if failed else "success").inc()
        self._send("application/json", json.dumps(echo).encode())

    def _send(self, content_type: str, body: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("cache-control", "no-store")
        self.send_header("x-backend", self.server.name)
        self.end_headers()
        self.wfile.write(body)

    def _metrics(self) -> None:
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("content-type", CONTENT_TYPE_LATEST)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _fail(self) -> None:
        body = b'{"error": "injected failure"}'
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _call_next_hop(self) -> object:
        assert self.server.forward_to is not None
        headers = {name: self.headers[name] for name in PROPAGATED if name in self.headers}
        connection = http.client.HTTPConnection(*self.server.forward_to, timeout=10)
        try:
            connection.request("GET", self.path, headers=headers)
            response = connection.getresponse()
            return {"status": response.status, **json.loads(response.read() or b"{}")}
        except (OSError, ValueError) as error:
            return {"status": 0, "error": str(error)}
        finally:
            connection.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass  # Envoy's access log already records every request


class BackendServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, name: str, host: str = "127.0.0.1", port: int = 0, forward_to: tuple[str, int] | None = None
    ) -> None:
        super().__init__((host, port), _Handler)
        self.name = name
        self.forward_to = forward_to
        self.requests = 0
        self.fail_rate = 0.0  # share of requests answered 503 (settable while running)
        self.delay_ms = 0.0  # added to every answer (settable while running)
        # share of 200 answers counted as failed checkouts (settable while running)
        self.checkout_fail_rate = 0.0
        self.registry = CollectorRegistry()
        self.checkouts = Counter(
            "checkout",
            "Checkouts answered, by the version that answered and their outcome (success, failure).",
            ("version", "outcome"),
            registry=self.registry,
        )
        for outcome in ("success", "failure"):  # both series from the start: a rate of 0 is a value
            self.checkouts.labels(name, outcome)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start_in_thread(self) -> "BackendServer":
        threading.Thread(target=self.serve_forever, name=f"backend-{self.name}", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def run_backend(name: str, host: str, port: int) -> None:
    """`graysteer demo-backend`: serve in the foreground until interrupted."""
    server = BackendServer(name, host, port)
    print(f"backend {name} listening on {host}:{server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
