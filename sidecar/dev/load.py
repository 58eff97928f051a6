"""Clients for the local stack: one HTTP client through Envoy, and a steady background load
that records what was decided and what failed (never counting a request that skipped the
sidecar as a success)."""

import http.client
import itertools
import json
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from sidecar.dev.processes import wait_for


class HttpClient:
    """A keep-alive HTTP/1.1 client for one Envoy listener (HTTPS with `tls`)."""

    def __init__(
        self, port: int, host: str = "127.0.0.1", timeout: float = 10, tls: ssl.SSLContext | None = None
    ) -> None:
        self.conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)
            if tls
            else http.client.HTTPConnection(host, port, timeout=timeout)
        )

    def get(
        self, path: str = "/", headers: Mapping[str, str] | None = None, method: str = "GET"
    ) -> tuple[int, dict[str, Any]]:
        """Send one request; returns the status and the backend's JSON echo (or {})."""
        try:
            self.conn.request(method, path, headers=dict(headers or {}))
            response = self.conn.getresponse()
        except (http.client.HTTPException, ConnectionError):
            self.conn.close()  # a reset keep-alive connection: reconnect once
            self.conn.request(method, path, headers=dict(headers or {}))
            response = self.conn.getresponse()
        body = response.read()
        try:
            echo = json.loads(body) if body else {}
        except ValueError:
            echo = {"raw": body.decode(errors="replace")}
        return response.status, echo

    def close(self) -> None:
        self.conn.close()


class Sample(NamedTuple):
    """One response seen by BackgroundLoad (status 0: none, `error` says why)."""

    status: int
    backend: str  # the backend that answered ("" when none did)
    decided: bool  # the sidecar decided it: the backend received the routing header
    user: str  # the x-user-id sent ("" without one)
    peer: str = ""  # the x-forwarded-client-cert the backend received (mTLS: Envoy's own)
    error: str = ""  # why there was no response (a refused handshake, a reset)
    at: float = 0.0  # time.monotonic() when it was answered


class BackgroundLoad:
    """Threads sending requests to an Envoy listener until stopped; `samples` holds one
    Sample per response, in order. With `vary_user` each request carries a new x-user-id,
    so splits see many users; with `users` the requests cycle through those user ids.

    With `tls` (called for every new connection, so it can read rotated client certificate
    files) the load speaks HTTPS; `per_connection` requests then go over each connection, so
    new handshakes keep happening. A request that gets no response (a refused handshake, a
    reset) is a Sample with status 0 and the error, and the thread goes on."""

    def __init__(
        self,
        port: int,
        headers: Mapping[str, str],
        threads: int = 4,
        vary_user: bool = False,
        users: Sequence[str] = (),
        routing_header: str = "x-route-cluster",
        tls: Callable[[], ssl.SSLContext] | None = None,
        per_connection: int = 0,
    ) -> None:
        self.vary_user = vary_user
        self.users = list(users)
        self.routing_header = routing_header
        self.tls = tls
        self.per_connection = per_connection
        self._count = itertools.count()
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(port, dict(headers)), daemon=True)
            for _ in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, port: int, headers: dict[str, str]) -> None:
        client: HttpClient | None = None
        sent = 0
        try:
            while not self._stop.is_set():
                n = next(self._count)
                if self.users:
                    headers = {**headers, "x-user-id": self.users[n % len(self.users)]}
                elif self.vary_user:
                    headers = {**headers, "x-user-id": f"load-{n}"}
                user = headers.get("x-user-id", "")
                try:
                    if client is None:
                        client = HttpClient(port, tls=self.tls() if self.tls else None)
                    status, echo = client.get("/", headers)
                except (OSError, http.client.HTTPException) as error:
                    self.samples.append(Sample(0, "", False, user, error=repr(error), at=time.monotonic()))
                    if client is not None:
                        client.close()
                    client = None
                    continue
                received = echo.get("headers") or {}
                self.samples.append(
                    Sample(
                        status,
                        echo.get("backend", ""),
                        self.routing_header in received,
                        user,
                        received.get("x-forwarded-client-cert", ""),
                        at=time.monotonic(),
                    )
                )
                sent += 1
                if self.per_connection and sent % self.per_connection == 0:
                    client.close()
                    client = None
        finally:
            if client is not None:
                client.close()

    @property
    def results(self) -> list[tuple[int, str]]:
        """(status, backend) per response, in order."""
        return [(s.status, s.backend) for s in self.samples]

    def wait_for_more(self, count: int, what: str, timeout: float = 30) -> None:
        """Wait until `count` more responses than now have arrived."""
        target = len(self.samples) + count
        wait_for(lambda: len(self.samples) >= target, timeout, what)

    def stop(self) -> list[tuple[int, str]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        return self.results
