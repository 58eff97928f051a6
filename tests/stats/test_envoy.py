"""Reading Envoy's admin statistics: one request per poll, every observer fed, a failure
reported as unreadable (and the analysis told why)."""

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sidecar.stats.envoy import EnvoyStats
from tests.stats.test_bypass import EXT_PROC


class FakeEnvoyAdmin:
    """An HTTP server answering /stats/prometheus with a set text and status."""

    def __init__(self) -> None:
        self.text, self.status, self.paths = EXT_PROC, 200, list[str]()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                body = outer.text.encode()
                self.send_response(outer.status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = ("127.0.0.1", self.server.server_address[1])


@pytest.fixture()
def envoy_admin() -> Iterator[FakeEnvoyAdmin]:
    admin = FakeEnvoyAdmin()
    yield admin
    admin.server.shutdown()
    admin.server.server_close()


def test_each_poll_is_one_read_for_every_observer(envoy_admin: FakeEnvoyAdmin) -> None:
    """One read per poll, given to every observer (rollouts or not); an HTTP error is
    unreadable, and the analysis is told why."""
    seen: list[tuple[bool, str]] = []
    stats = EnvoyStats(
        envoy_admin.address,
        60,
        poll_seconds=0.05,
        observers=[lambda now, fams, error: seen.append((fams is not None, error))],
    )

    async def two_polls() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(stats.run(stop))
        while len(seen) < 1:
            await asyncio.sleep(0.01)
        assert stats.problem() is None
        envoy_admin.status = 503
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(two_polls())
    assert seen[0] == (True, "")
    assert seen[1][0] is False and "HTTP 503" in seen[1][1]
    assert "cannot be read" in (stats.problem() or "")
    # the one request asks for both the clusters' and the bypass counters
    query = envoy_admin.paths[0]
    for part in ("upstream_rq_", "failure_mode_allowed", "downstream_rq_total", "server%5C.uptime"):
        assert part in query, query
