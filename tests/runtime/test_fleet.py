"""The fleet: lanes summed over replicas (pure), and the leader election on a real etcd."""

import asyncio
import itertools
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sidecar.dev.etcd import Etcd
from sidecar.runtime.etcd import EtcdAddress, EtcdClient
from sidecar.runtime.fleet import Fleet, FleetLanes, lanes_from_json, lanes_to_json, members
from sidecar.runtime.metrics import Metrics
from sidecar.runtime.rollouts import LaneCounts

BOUNDS = (10.0, 100.0, float("inf"))


def counts(requests: float, errors: float, fast: float) -> LaneCounts:
    """`fast` of the requests under 10 ms, the rest under 100 ms."""
    return LaneCounts(requests, errors, BOUNDS, (fast, requests, requests))


def test_a_lane_window_sums_each_replicas_own_window() -> None:
    lanes = FleetLanes()
    lanes.record("a", 100.0, {"canary": counts(1000, 0, 1000)})
    lanes.record("b", 100.0, {"canary": counts(50, 0, 50)})
    lanes.record("a", 110.0, {"canary": counts(1100, 1, 1100)})  # +100 requests, 1 error
    lanes.record("b", 110.0, {"canary": counts(80, 20, 50)})  # +30 requests, 20 errors, all slow
    window = lanes.lane_window("canary", 30, 110.0)
    assert (window.requests, window.errors) == (130, 21)
    assert window.p99_ms is not None and window.p99_ms > 10  # b's slow answers are in the fleet's p99


def test_a_restarted_replica_counts_from_zero_and_a_gone_one_is_forgotten() -> None:
    lanes = FleetLanes(keep_seconds=60)
    lanes.record("a", 100.0, {"canary": counts(500, 5, 500)})
    lanes.record("a", 105.0, {"canary": counts(40, 4, 40)})  # Envoy restarted: counters reset
    assert lanes.lane_window("canary", 30, 105.0).requests == 40
    lanes.forget_except(set(), 200.0)
    assert lanes.lane_window("canary", 30, 200.0).requests == 0


def test_published_lanes_round_trip_and_junk_is_skipped() -> None:
    lanes = {"canary": counts(10, 1, 9)}
    assert lanes_from_json(lanes_to_json(lanes)) == lanes
    assert (
        lanes_from_json(
            {
                "x": {"requests": "many"},
                "y": 3,
                "z": {"requests": 1, "errors": 0, "bounds": [1], "buckets": []},
            }
        )
        == {}
    )
    assert lanes_from_json("nonsense") == {}


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
            asyncio.create_task(f.run(s, lambda: {"version": "v1"}))
            for f, s in zip(fleets, stops, strict=True)
        ]
        await until(lambda: sum(f.leads() for f in fleets) == 1, 5)
        await asyncio.sleep(1.0)
        assert sum(f.leads() for f in fleets) == 1  # and it stays one
        first = next(i for i, f in enumerate(fleets) if f.leads())
        records = await members(clients[(first + 1) % 3], address)
        assert [r["id"] for r in records] == ["r0", "r1", "r2"] and all(r["version"] == "v1" for r in records)
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
        first = asyncio.create_task(twins[0].run(stops[0], dict))
        await until(twins[0].leads, 5)
        second = asyncio.create_task(twins[1].run(stops[1], dict))
        await asyncio.sleep(1.0)
        assert twins[0].leads() and not twins[1].leads()
        for stop in stops:
            stop.set()
        await asyncio.gather(first, second)
        for client in clients:
            await client.close()

    asyncio.run(main())
