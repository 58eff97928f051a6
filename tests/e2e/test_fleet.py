"""A fleet of three sidecars, each behind its own Envoy, sharing one etcd prefix (a real
etcd): pushes and weight changes reach every replica within a second, an invalid document
is refused everywhere, an etcd outage changes nothing that is served, one leader runs the
rollouts on the whole fleet's traffic, and a new leader continues a rollout when the old
one is killed."""

import json
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.admin import client as admin_client
from sidecar.dev.devstack import Stack
from sidecar.dev.etcd import Etcd
from sidecar.dev.load import BackgroundLoad
from sidecar.dev.processes import free_port, wait_for
from sidecar.table.load import config_version
from tests.e2e.conftest import ENVOY_CONFIG

PLAIN = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: checkout
        split:
          key: [header:x-user-id]
          to: [{cluster: stable, weight: WEIGHT_STABLE}, {cluster: canary, weight: WEIGHT_CANARY}]
    """)
ROLLOUT = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: checkout
        split:
          key: [header:x-user-id]
          to: [{cluster: stable, weight: 100}, {cluster: canary, weight: 0}]
        rollout:
          canary: canary
          steps: STEPS
          analysis: {window: 3s, min_requests: 20, max_error_rate: 0.1}
          on_failure: rollback
    """)


@dataclass
class Fleet:
    etcd: Etcd
    url: str
    stacks: list[Stack]
    workdir: Path

    def readyz(self, i: int) -> dict:
        sidecar = self.stacks[i].sidecar
        assert sidecar is not None
        return json.loads(sidecar.http_get("/readyz")[1])

    def versions(self) -> list[str]:
        return [self.readyz(i)["version"] for i in range(len(self.stacks))]

    def metric(self, i: int, pattern: str) -> float:
        sidecar = self.stacks[i].sidecar
        assert sidecar is not None
        found = re.search("^" + pattern + r" ([0-9.e+-]+)$", sidecar.http_get("/metrics")[1], re.M)
        return float(found.group(1)) if found else 0.0

    def push(self, text: str) -> str:
        path = self.workdir / f"push-{time.monotonic_ns()}.yaml"
        path.write_text(text)
        run = cli("push", str(path), self.url, "--yes")  # these tests move traffic on purpose
        assert run.returncode == 0, run.stderr
        return config_version(text.encode())

    def fleet_status(self) -> dict:
        run = cli("status", "--fleet", self.url, "--json")
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    def leader(self) -> int:
        lead = wait_for(lambda: self.fleet_status()["leader"], 10, "a leader")
        return int(lead.removeprefix("r"))

    def rollout(self, i: int) -> dict:
        sidecar = self.stacks[i].sidecar
        assert sidecar is not None
        return json.loads(sidecar.http_get("/rollouts/checkout")[1])


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60, check=False
    )


def converged(fleet: Fleet, file_version: str, timeout: float = 5.0) -> float:
    """Seconds until every replica serves `file_version` (polled every 10 ms)."""
    started = time.monotonic()
    wait_for(
        lambda: all(v.startswith(file_version) for v in fleet.versions()),
        timeout,
        f"every replica at {file_version}",
    )
    return time.monotonic() - started


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    etcd = Etcd(workdir)
    url = f"{etcd.url}/shop/checkout"
    stacks: list[Stack] = []
    try:
        first = Fleet(etcd, url, stacks, workdir)
        first.push(PLAIN.replace("WEIGHT_STABLE", "90").replace("WEIGHT_CANARY", "10"))
        for i in range(3):
            admin = free_port()
            replica = workdir / f"r{i}"
            replica.mkdir()
            stacks.append(
                Stack(
                    url,
                    ENVOY_CONFIG,
                    replica,
                    envoy_admin_port=admin,
                    sidecar_args=[
                        "--replica-id",
                        f"r{i}",
                        "--etcd-cache",
                        str(replica / "cache"),
                        "--envoy-admin",
                        f"127.0.0.1:{admin}",
                        "--rollout-poll",
                        "0.25",
                        "--http-listen",
                        "127.0.0.1:0",
                    ],
                )
            )
        yield first
    finally:
        for stack in stacks:
            stack.stop()
        etcd.stop()


def test_a_push_reaches_every_replica_within_a_second(fleet: Fleet) -> None:
    version = fleet.push(PLAIN.replace("WEIGHT_STABLE", "80").replace("WEIGHT_CANARY", "20"))
    assert converged(fleet, version) < 1.0
    status = wait_for(
        lambda: (lambda s: {r["file_version"] for r in s["replicas"]} == {version} and s)(
            fleet.fleet_status()
        ),
        2,
        "status --fleet to show the version",
    )
    assert [r["id"] for r in status["replicas"]] == ["r0", "r1", "r2"] and status["rules_version"] == version
    assert sum(r["leader"] for r in status["replicas"]) == 1


def test_set_weight_through_one_replica_reaches_every_replica(fleet: Fleet) -> None:
    before = fleet.versions()[0]
    sidecar = fleet.stacks[1].sidecar
    assert sidecar is not None
    run = cli("set-weight", "checkout", "canary=35", "--admin", sidecar.admin)
    assert run.returncode == 0, run.stderr
    started = time.monotonic()
    wait_for(lambda: len(set(fleet.versions())) == 1 and fleet.versions()[0] != before, 5, "every replica")
    assert time.monotonic() - started < 1.0
    for i in range(3):
        assert fleet.metric(i, r'graysteer_split_weight\{cluster="canary",rule="checkout"\}') == 35


def test_racing_operators_leave_one_of_their_states_never_a_mix(fleet: Fleet) -> None:
    admins = [s.sidecar.admin for s in fleet.stacks if s.sidecar is not None]
    outcomes: dict[int, subprocess.CompletedProcess[str]] = {}

    def operator(i: int, weight: int) -> None:
        outcomes[weight] = cli("set-weight", "checkout", f"canary={weight}", "--admin", admins[i])

    threads = [threading.Thread(target=operator, args=(i, w)) for i, w in ((0, 40), (2, 60))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    succeeded = [w for w, run in outcomes.items() if run.returncode == 0]
    refused = [run.stderr for run in outcomes.values() if run.returncode != 0]
    assert succeeded and all("changed" in message and "retry" in message for message in refused)
    wait_for(lambda: len(set(fleet.versions())) == 1, 5, "the replicas to agree")
    served = {
        fleet.metric(i, r'graysteer_split_weight\{cluster="canary",rule="checkout"\}') for i in range(3)
    }
    assert len(served) == 1 and served.pop() in succeeded


def test_an_invalid_document_in_etcd_is_refused_everywhere_and_served_tables_stay(fleet: Fleet) -> None:
    served = fleet.versions()
    refused = [fleet.metric(i, r'graysteer_reloads_total\{result="invalid"\}') for i in range(3)]
    fleet.etcd.put("/shop/checkout/rules", "clusters: [oops")
    wait_for(
        lambda: all(
            fleet.metric(i, r'graysteer_reloads_total\{result="invalid"\}') > refused[i] for i in range(3)
        ),
        5,
        "every replica to refuse it",
    )
    assert fleet.versions() == served
    client = fleet.stacks[0].client()
    assert client.get("/", {"x-user-id": "u1"})[0] == 200


def test_an_etcd_outage_changes_nothing_served_and_the_fleet_catches_up(fleet: Fleet) -> None:
    served = fleet.versions()
    load = BackgroundLoad(fleet.stacks[0].port, {}, threads=2, vary_user=True)
    try:
        fleet.etcd.stop()
        wait_for(
            lambda: not any(fleet.readyz(i)["connected"] for i in range(3)), 15, "every replica to notice"
        )
        assert all(fleet.readyz(i)["changes"].startswith("not ready") for i in range(3))
        assert all(fleet.readyz(i)["ready"] for i in range(3))  # still serving decisions
        load.wait_for_more(200, "requests during the outage")
        assert fleet.versions() == served
        restarted = fleet.stacks[2].start_sidecar()  # a replica restarted during the outage
        assert fleet.readyz(2)["from_cache"] and fleet.readyz(2)["version"] == served[2]
        assert "starting from the local cache" in restarted.log_text()
        fleet.etcd.start()
        wait_for(
            lambda: all(fleet.readyz(i)["connected"] for i in range(3)), 15, "every replica to reconnect"
        )
        version = fleet.push(PLAIN.replace("WEIGHT_STABLE", "70").replace("WEIGHT_CANARY", "30"))
        assert converged(fleet, version) < 1.0
    finally:
        samples = list(load.samples)
        load.stop()
    assert samples and all(s.status == 200 and s.decided for s in samples)  # none failed, none bypassed


def test_a_rollout_failing_on_the_fleets_traffic_is_rolled_back_everywhere(fleet: Fleet) -> None:
    version = fleet.push(ROLLOUT.replace("STEPS", "[{weight: 50, hold: 60s}, {weight: 100}]"))
    converged(fleet, version)
    lead = fleet.leader()
    others = [i for i in range(3) if i != lead]
    wait_for(lambda: fleet.rollout(lead)["canary_weight"] == 50, 10, "the first step")
    for i in others:  # the canary fails only behind the other replicas: the leader's Envoy sees none of it
        fleet.stacks[i].backends["canary"].fail_rate = 0.5
    loads = [BackgroundLoad(fleet.stacks[i].port, {}, threads=2, vary_user=True) for i in others]
    try:
        wait_for(lambda: fleet.rollout(lead)["phase"] == "aborted", 20, "the leader to abort")
        report = fleet.rollout(lead)
        # judged on the other replicas' traffic: the leader's own Envoy had no canary errors
        assert report["numbers"]["canary_requests"] >= 20 and "error rate" in report["reason"]
        wait_for(
            lambda: all(
                fleet.metric(i, r'graysteer_split_weight\{cluster="canary",rule="checkout"\}') == 0
                for i in range(3)
            ),
            5,
            "every replica to roll back",
        )
        wait_for(lambda: all(fleet.rollout(i)["phase"] == "aborted" for i in range(3)), 2, "every /rollouts")
    finally:
        for load in loads:
            load.stop()
        for i in others:
            fleet.stacks[i].backends["canary"].fail_rate = 0.0


def test_a_new_leader_continues_a_rollout_when_the_leader_is_killed(fleet: Fleet) -> None:
    steps = "[{weight: 10, hold: 1s}, {weight: 20, hold: 3s}, {weight: 30, hold: 60s}]"
    time.sleep(3.5)  # past the analysis window: a failed canary's errors would abort this one too
    version = fleet.push(ROLLOUT.replace("STEPS", steps))
    converged(fleet, version)
    loads = [BackgroundLoad(stack.port, {}, threads=1, vary_user=True) for stack in fleet.stacks]
    try:
        lead = fleet.leader()
        wait_for(lambda: fleet.rollout(lead)["step"] >= 1, 20, "the second step")
        step = fleet.rollout(lead)["step"]
        killed = fleet.stacks[lead].sidecar
        assert killed is not None
        killed.kill()
        started = time.monotonic()
        survivors = [i for i in range(3) if i != lead]
        name = wait_for(  # a name, not an index: replica 0 would read as "not yet"
            lambda: next(
                (f"r{i}" for i in survivors if fleet.metric(i, "graysteer_fleet_leader") == 1), None
            ),
            10,
            "another leader",
        )
        successor = int(name.removeprefix("r"))
        takeover = time.monotonic() - started
        assert takeover < 6  # the lease's TTL (3 s) and one beat (1 s), polled every 10 ms
        assert fleet.fleet_status()["leader"] == f"r{successor}"
        seen = []
        wait_for(
            lambda: seen.append(fleet.rollout(successor)["step"]) or seen[-1] == 2, 20, "the rollout to go on"
        )
        assert min(seen) >= step  # continued from the stored state, never started again
        assert fleet.rollout(successor)["canary_weight"] == 30
    finally:
        for load in loads:
            load.stop()
        fleet.stacks[lead].start_sidecar()  # the killed replica comes back as a follower


def test_a_rollout_action_through_a_follower_reaches_the_leader_and_every_replica(fleet: Fleet) -> None:
    version = fleet.push(ROLLOUT.replace("STEPS", "[{weight: 10, hold: 60s}, {weight: 100}]"))
    converged(fleet, version)
    lead = fleet.leader()
    follower = next(i for i in range(3) if i != lead)
    seen: list[dict] = []
    try:
        wait_for(
            lambda: seen.append(fleet.rollout(lead)) or seen[-1]["canary_weight"] == 10, 20, "the first step"
        )
    except TimeoutError as timeout:
        raise AssertionError(f"r{lead} never showed the first step; last: {seen[-1:]}") from timeout
    sidecar = fleet.stacks[follower].sidecar
    assert sidecar is not None
    run = cli("rollout", "abort", "checkout", "--admin", sidecar.admin)
    assert run.returncode == 0, run.stderr
    wait_for(lambda: all(fleet.rollout(i)["phase"] == "aborted" for i in range(3)), 5, "every replica")
    wait_for(
        lambda: all(
            fleet.metric(i, r'graysteer_split_weight\{cluster="canary",rule="checkout"\}') == 0
            for i in range(3)
        ),
        5,
        "the canary pulled out everywhere",
    )
    time.sleep(1.0)
    assert fleet.rollout(lead)["phase"] == "aborted"  # the leader did not undo it


def test_a_replica_record_with_a_non_finite_number_is_refused_and_the_canary_still_rolled_back(
    fleet: Fleet,
) -> None:
    """A record with NaN under PREFIX/replicas/ used to make the leader's analysis raise on
    every tick: the rollout stayed on its step with a failing canary."""
    time.sleep(3.5)  # past the analysis window: an earlier test's errors must not count
    version = fleet.push(ROLLOUT.replace("STEPS", "[{weight: 50, hold: 60s}, {weight: 100}]"))
    converged(fleet, version)
    lead = fleet.leader()
    wait_for(lambda: fleet.rollout(lead)["canary_weight"] == 50, 10, "the first step")
    bad = '{"id": "evil", "at": 1, "lanes": {"canary": {"requests": NaN, "errors": 0, "bounds": [], '
    bad += '"buckets": []}}}'
    fleet.etcd.put("/shop/checkout/replicas/evil", bad)
    for stack in fleet.stacks:
        stack.backends["canary"].fail_rate = 0.5
    loads = [BackgroundLoad(stack.port, {}, threads=1, vary_user=True) for stack in fleet.stacks]
    try:
        wait_for(lambda: fleet.rollout(lead)["phase"] == "aborted", 20, "the leader to roll back")
        assert "error rate" in fleet.rollout(lead)["reason"]
        assert fleet.metric(lead, "graysteer_fleet_records_refused_total") >= 1
        status = fleet.fleet_status()
        assert [r["key"] for r in status["refused_records"]] == ["/shop/checkout/replicas/evil"]
        assert "evil" not in [r["id"] for r in status["replicas"]]
    finally:
        for load in loads:
            load.stop()
        for stack in fleet.stacks:
            stack.backends["canary"].fail_rate = 0.0
        fleet.etcd.delete("/shop/checkout/replicas/evil")


def test_a_corrupt_state_in_etcd_moves_no_traffic_and_set_weight_is_refused(fleet: Fleet) -> None:
    """An aborted rollout used to start again (0 -> 10 -> 20 ...) when PREFIX/state could not
    be read; and set-weight on a rollout rule reported success and was undone."""
    time.sleep(3.5)  # past the analysis window: an earlier test's errors must not count
    version = fleet.push(
        ROLLOUT.replace("STEPS", "[{weight: 10, hold: 1s}, {weight: 20, hold: 1s}, {weight: 100}]")
    )
    converged(fleet, version)
    lead = fleet.leader()
    follower = next(i for i in range(3) if i != lead)
    wait_for(lambda: fleet.rollout(lead)["canary_weight"] >= 10, 10, "the first step")
    admin = fleet.stacks[follower].sidecar.admin  # type: ignore[union-attr]
    assert cli("rollout", "abort", "checkout", "--admin", admin).returncode == 0

    def canary_weights() -> list[float]:
        return [
            fleet.metric(i, r'graysteer_split_weight\{cluster="canary",rule="checkout"\}') for i in range(3)
        ]

    wait_for(lambda: canary_weights() == [0, 0, 0], 5, "the canary pulled out everywhere")
    refused = cli("set-weight", "checkout", "canary=33", "--admin", admin)
    assert refused.returncode == 1 and "has a rollout" in refused.stderr and "aborted" in refused.stderr
    good = fleet.etcd.get("/shop/checkout/state")
    assert good is not None
    invalid = [fleet.metric(i, r'graysteer_reloads_total\{result="invalid"\}') for i in range(3)]
    fleet.etcd.put("/shop/checkout/state", "{garbage")
    try:
        wait_for(
            lambda: all(fleet.rollout(i)["state_problem"] for i in range(3)), 5, "every replica to notice"
        )
        assert all(
            fleet.metric(i, r'graysteer_reloads_total\{result="invalid"\}') > invalid[i] for i in range(3)
        )
        deadline = time.monotonic() + 3  # the old behaviour restarted the rollout within a second
        while time.monotonic() < deadline:
            assert canary_weights() == [0, 0, 0]
            assert all(fleet.rollout(i)["phase"] == "aborted" for i in range(3))
            time.sleep(0.2)
        assert fleet.stacks[lead].sidecar.http_get("/rollouts/checkout/check")[0] == 503  # type: ignore[union-attr]
    finally:
        fleet.etcd.put("/shop/checkout/state", good)
    wait_for(
        lambda: not any(fleet.rollout(i)["state_problem"] for i in range(3)), 5, "the state to read again"
    )
    assert canary_weights() == [0, 0, 0]


def test_workers_of_one_pod_are_replicas_of_the_fleet(fleet: Fleet) -> None:
    """`serve --workers 2`: each worker follows etcd as REPLICA-wN with a cache of its own."""
    from sidecar.dev.devstack import Sidecar

    url = f"{fleet.etcd.url}/shop/workers"
    pod = Fleet(fleet.etcd, url, [], fleet.workdir)
    version = pod.push(PLAIN.replace("WEIGHT_STABLE", "60").replace("WEIGHT_CANARY", "40"))
    cache = fleet.workdir / "pod-cache"
    sidecar = Sidecar(
        url, fleet.workdir, ["--workers", "2", "--replica-id", "pod", "--etcd-cache", str(cache)], name="pod"
    )
    try:
        status = wait_for(
            lambda: (lambda s: len(s["replicas"]) == 2 and s)(pod.fleet_status()), 10, "both workers"
        )
        assert [r["id"] for r in status["replicas"]] == ["pod-w0", "pod-w1"]
        assert {r["file_version"] for r in status["replicas"]} == {version}
        assert sum(r["leader"] for r in status["replicas"]) == 1
        wait_for(
            lambda: all((cache / f"worker-{i}" / "rules.yaml").exists() for i in range(2)), 5, "the caches"
        )
    finally:
        sidecar.stop()


def test_the_live_views_show_the_replicas_their_versions_and_the_leader(fleet: Fleet) -> None:
    """`status --fleet URL --watch` (plain lines: stdout is a pipe) and a replica's live page
    show the fleet as etcd holds it: every replica, the version it serves, the leader."""
    leader = f"r{fleet.leader()}"
    sidecar = fleet.stacks[1].sidecar
    assert sidecar is not None
    command = [
        sys.executable,
        "-m",
        "sidecar",
        "status",
        "--fleet",
        fleet.url,
        "--watch",
        "--admin",
        sidecar.admin,
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as view:
        assert view.stdout is not None
        try:
            block = []
            while (line := view.stdout.readline()).strip():  # the first view, up to its blank line
                block.append(line.rstrip("\n"))
        finally:
            view.send_signal(signal.SIGINT)
            assert view.wait(10) == 0
    text = "\n".join(block)
    assert f"fleet {fleet.url}: rules version " in text and f", leader {leader}" in text, text
    for replica in ("r0", "r1", "r2"):
        assert re.search(rf"^  {replica}: serving \S+, seen [0-9.]+ s ago", text, re.M), text
    assert re.search(rf"^  {leader}: .*\[leader", text, re.M), text
    assert "split checkout" in text  # the replica's own view, below the fleet's
    page = json.loads(sidecar.http_get("/ui/view")[1])
    assert page["fleet"]["leader"] == leader
    assert sorted(r["id"] for r in page["fleet"]["replicas"]) == ["r0", "r1", "r2"]


def test_a_shadow_table_pushed_to_the_fleet_is_decided_by_every_replica(fleet: Fleet) -> None:
    """`push --next` writes PREFIX/rules.next: every replica decides each request with it too,
    serves the live rules, and counts the differences; `drop-next` removes it everywhere."""
    url = f"{fleet.etcd.url}/shop/shadow"
    live = PLAIN.replace("WEIGHT_STABLE", "90").replace("WEIGHT_CANARY", "10")
    upcoming = fleet.workdir / "next.yaml"
    upcoming.write_text(PLAIN.replace("WEIGHT_STABLE", "50").replace("WEIGHT_CANARY", "50"))
    pod = Fleet(fleet.etcd, url, [], fleet.workdir)
    version = pod.push(live)
    stacks: list[Stack] = []
    try:
        for i in range(2):
            workdir = fleet.workdir / f"shadow-{i}"
            workdir.mkdir()
            # every request decided by the shadow too: the test compares the counts exactly
            cache = ["--replica-id", f"s{i}", "--etcd-cache", str(workdir / "cache"), "--shadow-sample", "1"]
            stacks.append(Stack(url, ENVOY_CONFIG, workdir, sidecar_args=cache))
        admins = [stack.sidecar.admin for stack in stacks if stack.sidecar is not None]
        run = cli("push", "--next", str(upcoming), url)
        assert run.returncode == 0 and "rules.next" in run.stdout, run.stderr
        shadow_version = config_version(upcoming.read_bytes())
        wait_for(
            lambda: all(admin_client.status(a)["shadow"].get("version") == shadow_version for a in admins),
            10,
            "every replica to follow rules.next",
        )
        clients = [stack.client() for stack in stacks]
        served: Counter[str] = Counter()
        for i in range(200):
            status, echo = clients[i % 2].get("/", {"x-user-id": f"user-{i}"})
            assert status == 200
            served[echo["backend"]] += 1
        assert all(admin_client.status(a)["version"].startswith(version) for a in admins)  # live stays
        assert served["canary"] < 50  # 10% of them, not the shadow's 50%
        counts = [admin_client.status(a)["shadow"] for a in admins]
        assert sum(int(c["requests"]) for c in counts) == 200
        moved = sum(int(c["differing"]) for c in counts)
        assert 40 < moved < 120  # the users with a bucket in [10, 50): about 40% of them
        run = cli("drop-next", url)
        assert run.returncode == 0 and "removed" in run.stdout, run.stderr
        wait_for(
            lambda: not any(admin_client.status(a)["shadow"].get("version") for a in admins),
            10,
            "every replica to drop the shadow",
        )
    finally:
        for stack in stacks:
            stack.stop()
