"""The operator HTTP endpoint (/metrics, /healthz, /readyz) through real sockets, against slow
and half-open clients: the probes answer while slow clients hold every connection, a request
that does not arrive whole in time is cut off however its bytes are spread, and the work that
takes a thread is bounded."""

import http.client
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from sidecar.dev.processes import wait_for
from sidecar.ops.health import Readiness
from sidecar.ops.operator_http import Extra, Limits, OperatorHttpServer, Request, start_http
from tests.tls import make_ca, make_leaf, write_pair

DEADLINE = 3.0
LIMITS = Limits(request_deadline=DEADLINE)


def get(port: int, path: str, method: str = "GET", timeout: float = 1.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Drippers:
    """Connections that send a request head one byte every `interval`, forever, from a
    thread, far more often than any timeout per read; `cut` holds those the server closed."""

    def __init__(self, port: int, count: int, interval: float = 0.25) -> None:
        self.sockets = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nx-slow: ")
            self.sockets.append(sock)
        self.cut: set[int] = set()
        self.interval = interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self) -> None:
        while not self.stopped.wait(self.interval):
            for i, sock in enumerate(self.sockets):
                if i in self.cut:
                    continue
                try:
                    if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                        self.cut.add(i)
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    self.cut.add(i)
                    continue
                try:
                    sock.sendall(b"a")
                except OSError:
                    self.cut.add(i)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        for sock in self.sockets:
            sock.close()


@pytest.fixture()
def readiness() -> Readiness:
    ready = Readiness()
    ready.ready, ready.reason = True, "serving"
    return ready


@pytest.fixture()
def server(readiness: Readiness) -> Iterator[OperatorHttpServer]:
    running = start_http(
        "127.0.0.1", 0, CollectorRegistry(), readiness, lambda: {"version": "v1"}, limits=LIMITS
    )
    yield running
    running.shutdown()


def test_probes_answer_while_slow_clients_hold_every_connection(server: OperatorHttpServer) -> None:
    port = server.server_address[1]
    threads = threading.active_count()
    drippers = Drippers(port, LIMITS.max_connections + 16)  # more than it holds at once
    try:
        for _ in range(10):
            assert get(port, "/healthz") == (200, b"ok\n")
            status, body = get(port, "/readyz")
            assert status == 200 and b'"ready": true' in body
        # no thread per connection: only the dripping thread is new (and the pool's, if used)
        assert threading.active_count() - threads <= 1 + LIMITS.busy_slots
        wait_for(lambda: len(drippers.cut) == len(drippers.sockets), DEADLINE + 10, "every dripper cut off")
    finally:
        drippers.stop()


def test_a_request_that_does_not_arrive_whole_in_time_is_cut_off(server: OperatorHttpServer) -> None:
    drippers = Drippers(
        server.server_address[1], 1, interval=0.2
    )  # each byte well within any per-read timeout
    try:
        wait_for(lambda: drippers.cut, DEADLINE + 5, "the dripper to be cut off after the deadline")
    finally:
        drippers.stop()


def test_work_that_takes_a_thread_is_bounded_and_the_probes_are_not(readiness: Readiness) -> None:
    entered = threading.Semaphore(0)
    release = threading.Event()

    def slow_view(request: Request) -> tuple[int, object] | None:
        entered.release()
        release.wait(10)
        return 200, {"path": request.path}

    extra: Extra = slow_view
    server = start_http("127.0.0.1", 0, CollectorRegistry(), readiness, dict, extra, limits=LIMITS)
    port = server.server_address[1]
    results: list[int] = []
    callers = [
        threading.Thread(target=lambda: results.append(get(port, "/rollouts", timeout=10)[0]))
        for _ in range(LIMITS.busy_slots)
    ]
    try:
        for caller in callers:
            caller.start()
        for _ in callers:
            assert entered.acquire(timeout=5)  # every slot is taken by a view under way
        assert get(port, "/rollouts")[0] == 503  # at once, not queued
        assert get(port, "/metrics")[0] == 503
        assert get(port, "/healthz")[0] == 200 and get(port, "/readyz")[0] == 200
        release.set()
        for caller in callers:
            caller.join(10)
        assert results == [200] * LIMITS.busy_slots
        assert get(port, "/rollouts")[0] == 200
    finally:
        release.set()
        server.shutdown()


def test_what_it_answers(readiness: Readiness) -> None:
    registry = CollectorRegistry()
    Counter("graysteer_example", "An example.", registry=registry).inc()
    server = start_http("127.0.0.1", 0, registry, readiness, lambda: {"version": "v7"}, limits=LIMITS)
    port = server.server_address[1]
    try:
        status, body = get(port, "/metrics")
        assert status == 200 and b"graysteer_example_total 1.0" in body
        readiness.ready, readiness.reason = False, "starting: no table loaded yet"
        status, body = get(port, "/readyz?verbose")
        assert status == 503 and b'"reason": "starting: no table loaded yet", "version": "v7"' in body
        assert get(port, "/nowhere")[0] == 404
        assert get(port, "/healthz", method="POST")[0] == 405
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nx-big: " + b"a" * LIMITS.max_head_bytes + b"\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 431")
    finally:
        server.shutdown()


def test_an_address_in_use_is_an_error(server: OperatorHttpServer, readiness: Readiness) -> None:
    with pytest.raises(OSError):
        start_http("127.0.0.1", server.server_address[1], CollectorRegistry(), readiness, dict)


def test_the_live_page_files_and_posts(readiness: Readiness) -> None:
    """/ui/ serves the page's own files with headers that keep it to itself; a POST reaches
    `extra` only whole, with a Content-Length, and small."""
    seen: list[Request] = []

    def extra(request: Request) -> tuple[int, object] | None:
        seen.append(request)
        return (200, {"got": request.body.decode()}) if request.path == "/ui/echo" else None

    limits = Limits(request_deadline=DEADLINE, max_body_bytes=64)
    server = start_http("127.0.0.1", 0, CollectorRegistry(), readiness, dict, extra, limits=limits, ui=True)
    port = server.server_address[1]
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/ui/")
        page = connection.getresponse()
        body = page.read()
        connection.close()
        assert page.status == 200 and page.getheader("content-type") == "text/html; charset=utf-8"
        assert b'<script src="app.js"' in body
        assert "default-src 'self'" in (page.getheader("content-security-policy") or "")
        assert page.getheader("x-frame-options") == "DENY" and page.getheader("cache-control") == "no-store"
        for name in ("app.js", "style.css", "favicon.svg"):
            assert get(port, f"/ui/{name}")[0] == 200
        assert get(port, "/ui/../../etc/passwd")[0] == 404  # only the page's own files
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("POST", "/ui/echo", body=b'{"a": 1}', headers={"content-type": "application/json"})
        answer = connection.getresponse()
        assert (answer.status, answer.read()) == (200, b'{\n "got": "{\\"a\\": 1}"\n}\n')
        connection.close()
        assert seen[-1].method == "POST" and seen[-1].headers["content-type"] == "application/json"
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /ui/echo HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 411")
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /ui/echo HTTP/1.1\r\ncontent-length: 65\r\n\r\n" + b"a" * 65)
            assert sock.recv(100).startswith(b"HTTP/1.1 413")
        assert get(port, "/metrics", method="POST")[0] == 405
        assert get(port, "/ui/nothing", method="POST")[0] == 405
    finally:
        server.shutdown()


def test_a_host_that_is_not_this_endpoints_is_refused_but_the_probes(readiness: Readiness) -> None:
    """DNS rebinding: a page of evil.example made to resolve to 127.0.0.1 sends its own name."""
    extra: Extra = lambda request: (200, {"path": request.path})  # noqa: E731
    server = start_http(
        "127.0.0.1",
        0,
        CollectorRegistry(),
        readiness,
        dict,
        extra,
        ui=True,
        hosts=frozenset({"Ops.Example."}),
    )
    port = server.server_address[1]

    def status(path: str, host: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", path, headers={"Host": host})
            return connection.getresponse().status
        finally:
            connection.close()

    try:
        for host in (
            "evil.example",
            f"evil.example:{port}",
            "127.0.0.1.evil.example",
            "localhost.evil",
            "[::1",
        ):
            assert [status(p, host) for p in ("/ui/", "/ui/view", "/metrics", "/readyz")] == [
                421,
                421,
                421,
                200,
            ]
        for host in (
            f"127.0.0.1:{port}",
            "localhost:8080",
            "app.localhost",
            "[::1]:9",
            "10.0.0.7",
            "ops.example",
        ):
            assert status("/ui/view", host) == 200, host
    finally:
        server.shutdown()


@pytest.mark.parametrize("tls", [False, True])
def test_a_probe_in_a_burst_of_silent_connections_is_answered(
    readiness: Readiness, tmp_path: Path, tls: bool
) -> None:
    """At the cap, a burst of silent connections arrives with a probe among them, all accepted
    in one batch before any is read (the endpoint's loop held while they queue): the silent
    ones take each other's places, never the probe's."""
    context = client = None
    if tls:
        ca = make_ca()
        key, cert = write_pair(tmp_path, "server", make_leaf(ca, "sidecar", dns=["localhost"]))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        client = ssl.create_default_context(cadata=ca.pem.decode())
    cap = Limits().max_connections  # production's, 64
    server = start_http(
        "127.0.0.1",
        0,
        CollectorRegistry(),
        readiness,
        lambda: {"version": "v1"},
        tls=(lambda: context) if context is not None else None,
    )
    port = server.server_address[1]
    silent: list[socket.socket] = []
    try:
        for _ in range(cap):
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_for(lambda: server.connections == cap, 10, "the cap to be full of silent connections")
        for _ in range(3):
            assert burst(server, silent, client) == [200]
    finally:
        for sock in silent:
            sock.close()
        server.shutdown()


def burst(
    server: OperatorHttpServer, silent: list[socket.socket], client: ssl.SSLContext | None
) -> list[int]:
    """Hold the endpoint's loop, queue a probe then more silent connections than the cap
    behind it, let the loop go: the probe's answer."""
    port, held, release = server.server_address[1], threading.Event(), threading.Event()
    assert server._loop is not None
    server._loop.call_soon_threadsafe(lambda: (held.set(), release.wait(30)))
    assert held.wait(10)
    answers: list[int] = []
    prober = threading.Thread(target=lambda: answers.append(probe(port, client)))
    prober.start()
    for _ in range(Limits().max_connections + 20):  # more than the cap, in the same batch
        silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    release.set()
    prober.join(30)
    return answers


def probe(port: int, tls: ssl.SSLContext | None) -> int:
    """GET /readyz as a kubelet does: the status, 0 when the connection was closed or failed."""
    if tls is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        connection = http.client.HTTPSConnection("localhost", port, context=tls, timeout=10)
    try:
        connection.request("GET", "/readyz")
        return connection.getresponse().status
    except OSError:
        return 0
    finally:
        connection.close()
