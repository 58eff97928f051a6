"""The fast path's server process with a low file descriptor limit (hard: `serve` raises its
soft limit to the hard one), flooded with idle connections: checks are still answered and a
rules change still loads, because the connection cap keeps descriptors back for everything
else."""

import http.client
import resource
import socket
from pathlib import Path

from sidecar.dev.devstack import Sidecar, Stack
from sidecar.dev.load import BackgroundLoad
from sidecar.dev.processes import wait_for
from sidecar.transports.authz_http import RESERVED_DESCRIPTORS
from tests.e2e.conftest import E2E_RULES, REPO

RULES = "version: 1\nclusters: [stable, canary]\ndefault: {default}\n"
LIMIT = 256  # the sidecar's RLIMIT_NOFILE, soft and hard
HALF_SENT = b"GET /graysteer-check/ HTTP/1.1\r\nhost: shop.example\r\n"  # a head never finished


def descriptor_limit() -> None:
    """In the sidecar's process before it starts: nothing may raise its limit past LIMIT."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def routed_to(port: int) -> str | None:
    """One check on a new connection: the cluster the answer routes to."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/graysteer-check/", headers={"x-graysteer-listener-port": "8080"})
        response = connection.getresponse()
        response.read()
        return response.getheader("x-route-cluster") if response.status == 200 else None
    finally:
        connection.close()


def test_a_flood_of_idle_connections_leaves_checks_and_reloads_working(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(default="stable"))
    sidecar = Sidecar(rules, tmp_path, transport="http", preexec=descriptor_limit)
    flood: list[socket.socket] = []
    try:
        cap = int(sidecar.wait_for_log(r"at most (\d+) connections").group(1))
        assert cap <= LIMIT - RESERVED_DESCRIPTORS
        for _ in range(LIMIT):  # more idle connections than the cap, and than the limit itself
            flood.append(socket.create_connection(("127.0.0.1", sidecar.port), timeout=5))
        assert routed_to(sidecar.port) == "stable"
        assert flood[0].recv(1) == b""  # the longest idle were closed for the newcomers
        rules.write_text(RULES.format(default="canary"))
        wait_for(lambda: routed_to(sidecar.port) == "canary", 15, "the changed rules to load")
        assert sidecar.http_get("/readyz")[0] == 200
    finally:
        for connection in flood:
            connection.close()
        sidecar.stop()


def test_silent_and_half_sent_connections_at_the_cap_never_cost_envoy_a_check(tmp_path: Path) -> None:
    """Through the real Envoy: while connections that send nothing, or half a request, arrive
    at the fast path past its cap (a few hundred, loopback), every check Envoy sends is
    answered: its pooled connections are not the ones given up, its new ones are taken in."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(E2E_RULES)
    with Stack(
        rules, REPO / "envoy" / "ext_authz_http.yaml", tmp_path, sidecar_preexec=descriptor_limit
    ) as stack:
        assert stack.sidecar is not None
        cap = int(stack.sidecar.wait_for_log(r"at most (\d+) connections").group(1))
        load = BackgroundLoad(stack.port, {}, threads=3, users=[f"user-{i}" for i in range(30)])
        flood: list[socket.socket] = []
        try:
            load.wait_for_more(50, "checks before the flood")
            start = len(load.samples)
            for _ in range(4):  # each round twice the cap of strangers, held open
                for i in range(2 * cap):
                    stranger = socket.create_connection(("127.0.0.1", stack.sidecar_port), timeout=5)
                    if i % 4:  # three in four half-sent: more of them than the cap
                        stranger.sendall(HALF_SENT)
                    flood.append(stranger)
                load.wait_for_more(50, "checks during the flood")
                for stranger in flood:
                    stranger.close()
                flood.clear()
            load.stop()
            samples = load.samples[start:]
        finally:
            load.stop()
            for stranger in flood:
                stranger.close()
    assert len(samples) >= 200
    assert [s for s in samples if s.status != 200] == []
    assert [s for s in samples if not s.decided] == []  # none skipped the sidecar (a failed check)
