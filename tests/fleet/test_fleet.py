"""The fleet: clusters' counts summed over replicas (pure), the records, and the leader
election on a real etcd."""

import asyncio
import itertools
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sidecar.dev.etcd import Etcd
from sidecar.fleet.fleet import Fleet, FleetClusters, leader, members
from sidecar.fleet.replicas import ReplicaRecord
from sidecar.ops.metrics import Metrics
from sidecar.sources.etcd_client import EtcdAddress, EtcdClient
from sidecar.stats.clusters import ClusterCounts

BOUNDS = (10.0, 100.0, float("inf"))


def counts(requests: float, errors: float, fast: float) -> ClusterCounts:
    """`fast` of the requests under 10 ms, the rest under 100 ms."""
    return ClusterCounts(requests, errors, BOUNDS, (fast, requests, requests))


def test_a_cluster_window_sums_each_replicas_own_window() -> None:
    clusters = FleetClusters()
    clusters.record("a", 100.0, {"canary": counts(1000, 0, 1000)})
    clusters.record("b", 100.0, {"canary": counts(50, 0, 50)})
    clusters.record("a", 110.0, {"canary": counts(1100, 1, 1100)})  # +100 requests, 1 error
    clusters.record("b", 110.0, {"canary": counts(80, 20, 50)})  # +30 requests, 20 errors, all slow
    window = clusters.cluster_window("canary", 30, 110.0)
    assert (window.requests, window.errors) == (130, 21)
    assert window.p99_ms is not None and window.p99_ms > 10  # b's slow answers are in the fleet's p99


def test_the_fleets_rate_per_cluster_is_the_sum_of_each_replicas_own() -> None:
    clusters = FleetClusters()
    clusters.record("a", 100.0, {"canary": counts(1000, 0, 1000)})
    clusters.record("a", 102.0, {"canary": counts(1100, 10, 1100)})  # 50/s, 10% errors
    clusters.record("b", 101.0, {"canary": counts(50, 0, 50)})
    clusters.record("b", 102.0, {"canary": counts(80, 0, 80)})  # 30/s
    rate = clusters.cluster_rates(5, 102.5)["canary"]
    assert rate.requests_per_second == 80.0
    assert rate.error_ratio == 5.0 / 80  # 50/s x 10% of 80/s


def test_a_restarted_replica_counts_from_zero_and_a_gone_one_is_forgotten() -> None:
    clusters = FleetClusters(keep_seconds=60)
    clusters.record("a", 100.0, {"canary": counts(500, 5, 500)})
    clusters.record("a", 105.0, {"canary": counts(40, 4, 40)})  # Envoy restarted: counters reset
    assert clusters.cluster_window("canary", 30, 105.0).requests == 40
    clusters.forget_except(set(), 200.0)
    assert clusters.cluster_window("canary", 30, 200.0).requests == 0


def test_a_replica_that_stopped_publishing_adds_nothing_to_a_window() -> None:
    """Its last snapshot is older than the window: no traffic of it lies in the window (it
    used to count its whole cumulative counts as the window's)."""
    clusters = FleetClusters()
    clusters.record("gone", 100.0, {"canary": counts(5000, 2500, 5000)})
    clusters.record("live", 115.0, {"canary": counts(100, 0, 100)})
    clusters.record("live", 140.0, {"canary": counts(200, 0, 200)})
    window = clusters.cluster_window("canary", 30, 140.0)
    assert (window.requests, window.errors) == (100, 0)


def test_a_replica_that_published_no_counts_yet_adds_no_old_traffic_to_a_window() -> None:
    """A sidecar restarted beside a running Envoy publishes before it has read the Envoy (no
    counts), then Envoy's cumulative counts: old errors must not land in the window as new
    (they aborted a healthy rollout in the fleet e2e test)."""
    clusters = FleetClusters()
    clusters.record("a", 100.0, {"canary": counts(300, 100, 300)})  # before the sidecar restarted
    clusters.record("a", 110.0, {})  # restarted: its Envoy not read yet
    clusters.record("a", 111.0, {"canary": counts(310, 100, 310)})  # +10 requests, no error
    clusters.record("a", 112.0, {"canary": counts(320, 100, 320)})  # +10 requests, no error
    window = clusters.cluster_window("canary", 3, 112.0)
    assert (window.requests, window.errors) == (10, 0)
    assert clusters.cluster_rates(3, 112.0)["canary"].error_ratio == 0.0


# ---- the election, on a real etcd ---------------------------------------------------------------

_prefixes = itertools.count()


async def until(condition: object, timeout: float) -> float:
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < timeout, "timed out"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_one_leader_and_another_takes_over_when_it_goes(etcd: Etcd, how: str, tmp_path: Path) -> None:
    address = EtcdAddress.parse(f"{etcd.url}/fleet/{next(_prefixes)}")

    async def main() -> None:
        clients = [EtcdClient(address) for _ in range(3)]
        fleets = [
            Fleet(c, address, f"r{i}", Metrics(CollectorRegistry()), every=0.2) for i, c in enumerate(clients)
        ]
        stops = [asyncio.Event() for _ in fleets]
        tasks = [
            asyncio.create_task(f.run(s, lambda: ReplicaRecord("", 0.0, version="v1")))
            for f, s in zip(fleets, stops, strict=True)
        ]
        await until(lambda: sum(f.leads() for f in fleets) == 1, 5)
        await asyncio.sleep(1.0)
        assert sum(f.leads() for f in fleets) == 1  # and it stays one
        first = next(i for i, f in enumerate(fleets) if f.leads())
        records, refused = await members(clients[(first + 1) % 3], address)
        assert [r.id for r in records] == ["r0", "r1", "r2"] and all(r.version == "v1" for r in records)
        assert not refused
        if how == "stopped":  # graceful: the lease is revoked, the lead passes at once
            stops[first].set()
            await tasks[first]
        else:  # killed: nothing is revoked; etcd expires the lease after its TTL
            tasks[first].cancel()
            await clients[first].close()
        took = await until(lambda: any(f.leads() for i, f in enumerate(fleets) if i != first), 8)
        assert took < (1.5 if how == "stopped" else fleets[0].ttl + 2)
        await asyncio.sleep(0.5)
        assert sum(f.leads() for i, f in enumerate(fleets) if i != first) == 1
        for i, (stop, task) in enumerate(zip(stops, tasks, strict=True)):
            if i != first:
                stop.set()
                await task
        for client in clients:
            await client.close()

    asyncio.run(main())


def test_a_second_process_with_the_same_replica_id_does_not_lead(etcd: Etcd) -> None:
    """The lead is the lease's, not the name's: a restarted or duplicated replica id waits."""
    address = EtcdAddress.parse(f"{etcd.url}/fleet/{next(_prefixes)}")

    async def main() -> None:
        clients = [EtcdClient(address) for _ in range(2)]
        twins = [Fleet(c, address, "same", Metrics(CollectorRegistry()), every=0.2) for c in clients]
        stops = [asyncio.Event() for _ in twins]
        first = asyncio.create_task(twins[0].run(stops[0], lambda: ReplicaRecord("", 0.0)))
        await until(twins[0].leads, 5)
        second = asyncio.create_task(twins[1].run(stops[1], lambda: ReplicaRecord("", 0.0)))
        await asyncio.sleep(1.0)
        assert twins[0].leads() and not twins[1].leads()
        for stop in stops:
            stop.set()
        await asyncio.gather(first, second)
        for client in clients:
            await client.close()

    asyncio.run(main())


def test_a_leader_key_bound_to_no_lease_is_removed_and_an_election_held(etcd: Etcd) -> None:
    """`put PREFIX/leader ghost` (no lease) would never expire: it must not block elections."""
    address = EtcdAddress.parse(f"{etcd.url}/fleet/{next(_prefixes)}")
    etcd.put(address.leader_key.decode(), "ghost")

    async def main() -> None:
        clients = [EtcdClient(address) for _ in range(2)]
        fleets = [
            Fleet(c, address, f"r{i}", Metrics(CollectorRegistry()), every=0.2) for i, c in enumerate(clients)
        ]
        stops = [asyncio.Event() for _ in fleets]
        tasks = [
            asyncio.create_task(f.run(s, lambda: ReplicaRecord("", 0.0)))
            for f, s in zip(fleets, stops, strict=True)
        ]
        await until(lambda: sum(f.leads() for f in fleets) == 1, 5)
        lead = await leader(clients[0], address)
        assert lead in ("r0", "r1")
        for stop in stops:
            stop.set()
        await asyncio.gather(*tasks)
        for client in clients:
            await client.close()

    asyncio.run(main())


def test_a_bad_record_is_left_out_counted_and_the_fleets_window_still_judged(etcd: Etcd) -> None:
    address = EtcdAddress.parse(f"{etcd.url}/fleet/{next(_prefixes)}")
    bad = b'{"id": "evil", "at": 1, "clusters": {"canary": {"requests": NaN, "errors": 0, "bounds": [], '
    bad += b'"buckets": []}}}'
    etcd.put(address.key("replicas/evil").decode(), bad)

    async def main() -> None:
        client = EtcdClient(address)
        metrics = Metrics(CollectorRegistry())
        fleet = Fleet(client, address, "r0", metrics, every=0.2)
        published = [counts(100, 0, 100), counts(200, 50, 200)]
        stop = asyncio.Event()
        task = asyncio.create_task(
            fleet.run(stop, lambda: ReplicaRecord("", 0.0, clusters={"canary": published[0]}))
        )
        await until(fleet.leads, 5)
        published[0] = published[1]
        await until(lambda: fleet.clusters.cluster_window("canary", 30, time.time()).errors == 50, 5)
        refused = metrics.registry.get_sample_value("graysteer_fleet_records_refused_total")
        assert refused is not None and refused >= 1
        assert fleet.clusters.problem() is None and "evil" not in fleet.clusters.replicas
        stop.set()
        await task
        await client.close()

    asyncio.run(main())
