"""In a fleet, only the leader queries Prometheus: three `serve` replicas sharing one etcd
prefix (a real etcd), each behind its own Envoy, run a rollout with a metric check against a
real Prometheus. Each replica is given its own address for Prometheus, a small forwarding
server that records who asked and passes the query on; Prometheus' own query log shows the
queries that reached it. Only the leader's queries arrive, the followers' /rollouts show the
check "not queried", and when the leader is killed the new leader queries."""

import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sidecar.dev.devstack import Stack
from sidecar.dev.etcd import Etcd
from sidecar.dev.processes import free_port, wait_for
from sidecar.dev.prometheus import PrometheusServer
from sidecar.rollouts.report import NOT_QUERIED
from tests.e2e.conftest import ENVOY_CONFIG
from tests.e2e.test_fleet import PLAIN, cli

# Prometheus scrapes itself: `up` is 1 for its own job, a real answer with no other target.
QUERY = 'sum(up{job="prometheus", instance!="{lane}"})'
ROLLOUT = f"""
version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: checkout
    split:
      key: [header:x-user-id]
      to: [{{cluster: stable, weight: 100}}, {{cluster: canary, weight: 0}}]
    rollout:
      canary: canary
      steps: [{{weight: 10, hold: 600s}}, {{weight: 100}}]
      analysis:
        window: 3s
        min_requests: 20
        max_error_rate: 0.1
        metrics:
          - {{name: targets-up, query: '{QUERY}', min: 1, timeout: 2s}}
"""


@dataclass
class Recorder:
    """A stand-in address for Prometheus, one per replica: it counts the queries that come
    through it and forwards each to the real Prometheus, returning its answer unchanged."""

    upstream: str
    queries: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> "Recorder":
        recorder = self

        class Forward(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                recorder.queries.append(body.decode())
                ask = urllib.request.Request(recorder.upstream + self.path, body, method="POST")
                ask.add_header("content-type", self.headers.get("content-type", ""))
                with urllib.request.urlopen(ask, timeout=5) as answer:
                    status, data = answer.status, answer.read()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class Fleet:
    etcd: Etcd
    url: str
    prometheus: PrometheusServer
    query_log: Path
    recorders: list[Recorder]
    stacks: list[Stack]

    def http(self, i: int, path: str) -> str:
        sidecar = self.stacks[i].sidecar
        assert sidecar is not None
        return sidecar.http_get(path)[1]

    def is_leader(self, i: int) -> bool:
        return re.search(r"^graysteer_fleet_leader 1(\.0)?$", self.http(i, "/metrics"), re.M) is not None

    def leader(self, among: list[int]) -> int:
        return int(wait_for(lambda: next((str(i) for i in among if self.is_leader(i)), None), 15, "a leader"))

    def check(self, i: int) -> dict:
        metrics = json.loads(self.http(i, "/rollouts/checkout"))["metrics"]
        assert [m["name"] for m in metrics] == ["targets-up"]
        return dict(metrics[0])

    def logged_queries(self) -> list[str]:
        if not self.query_log.exists():
            return []
        lines = self.query_log.read_text().splitlines()
        return [json.loads(line)["params"]["query"] for line in lines if line.strip()]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    etcd = Etcd(tmp_path)
    prometheus = PrometheusServer(tmp_path)
    query_log = tmp_path / "queries.log"
    recorders: list[Recorder] = []
    stacks: list[Stack] = []
    try:
        prometheus.scrape({"prometheus": ("/metrics", [f"127.0.0.1:{prometheus.port}"])}, query_log)
        url = f"{etcd.url}/shop/checkout"
        push(
            tmp_path / "plain.yaml", PLAIN.replace("WEIGHT_STABLE", "100").replace("WEIGHT_CANARY", "0"), url
        )
        for i in range(3):
            recorders.append(Recorder(prometheus.url).start())
            admin = free_port()
            replica = tmp_path / f"r{i}"
            replica.mkdir()
            args = ["--replica-id", f"r{i}", "--etcd-cache", str(replica / "cache")]
            args += ["--envoy-admin", f"127.0.0.1:{admin}", "--rollout-poll", "0.25"]
            args += ["--http-listen", "127.0.0.1:0", "--prometheus", recorders[i].url]
            stacks.append(Stack(url, ENVOY_CONFIG, replica, envoy_admin_port=admin, sidecar_args=args))
        yield Fleet(etcd, url, prometheus, query_log, recorders, stacks)
    finally:
        for stack in stacks:
            stack.stop()
        for recorder in recorders:
            recorder.stop()
        prometheus.stop()
        etcd.stop()


def push(path: Path, text: str, url: str) -> None:
    path.write_text(text)
    run = cli("push", str(path), url, "--yes")
    assert run.returncode == 0, run.stderr


def test_only_the_leader_queries_and_a_new_leader_takes_over(fleet: Fleet, tmp_path: Path) -> None:
    everyone = [0, 1, 2]
    lead = fleet.leader(everyone)
    push(tmp_path / "rollout.yaml", ROLLOUT, fleet.url)
    wait_for(lambda: len(fleet.recorders[lead].queries) >= 3, 30, "the leader's queries")
    passed = wait_for(lambda: (c := fleet.check(lead))["outcome"] == "pass" and c, 15, "the check to pass")
    assert passed["value"] == 1  # Prometheus' own answer, through the leader's address
    followers = [i for i in everyone if i != lead]
    for i in followers:
        assert fleet.recorders[i].queries == []
        shown = fleet.check(i)
        assert (shown["outcome"], shown["value"]) == (NOT_QUERIED, None), shown
        assert "leader" in shown["reason"]
    # what reached Prometheus is what the leader sent: the query, its lane filled in
    sent = 'sum(up{job="prometheus",instance!="canary"})'
    wait_for(
        lambda: sent.replace(" ", "") in [q.replace(" ", "") for q in fleet.logged_queries()], 10, "the log"
    )
    assert all("canary" in q for q in fleet.logged_queries())

    killed = fleet.stacks[lead].sidecar
    assert killed is not None
    killed.kill()
    asked_before = len(fleet.recorders[lead].queries)
    successor = fleet.leader(followers)
    wait_for(lambda: len(fleet.recorders[successor].queries) >= 3, 30, "the new leader's queries")
    wait_for(lambda: fleet.check(successor)["outcome"] == "pass", 15, "the new leader's check")
    (still_follower,) = [i for i in followers if i != successor]
    assert fleet.recorders[still_follower].queries == []
    assert fleet.check(still_follower)["outcome"] == NOT_QUERIED
    assert len(fleet.recorders[lead].queries) == asked_before  # the killed replica asks no more
