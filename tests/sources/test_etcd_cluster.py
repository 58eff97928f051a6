"""The client over a real three-member etcd cluster on loopback, each member behind a proxy
that can black-hole it: a member killed or black-holed is left for another, calls go on,
a watch resumes from the last revision seen (none missed, none twice), the members down
are reported."""

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sidecar.dev.etcd import EtcdCluster
from sidecar.ops.metrics import Metrics
from sidecar.sources.etcd import EtcdSource
from sidecar.sources.etcd_client import EtcdAddress, EtcdClient, EtcdMember
from sidecar.table.reload import Reloader
from tests.blackhole import BlackHoleProxy
from tests.sources.test_etcd import RULES, until

_prefixes = itertools.count()


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.etcd = EtcdCluster(workdir)
        self.proxies = [BlackHoleProxy(member.port) for member in self.etcd.members]

    def address(self) -> EtcdAddress:
        """The members through their proxies, under a prefix of its own."""
        url = self.etcd.url([proxy.port for proxy in self.proxies])
        return EtcdAddress.parse(f"{url}/cluster/{next(_prefixes)}")

    def index(self, member: EtcdMember) -> int:
        return [proxy.port for proxy in self.proxies].index(member.port)

    def heal(self) -> None:
        """Every proxy forwarding, every member running (restarted on its data)."""
        for proxy in self.proxies:
            proxy.forward()
        for member in self.etcd.members:
            if member.process is None:
                member.start()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    made = Cluster(tmp_path_factory.mktemp("etcd-cluster"))
    try:
        yield made
    finally:
        for proxy in made.proxies:
            proxy.stop()
        made.etcd.stop()


@pytest.fixture
def healed(cluster: Cluster) -> Iterator[Cluster]:
    yield cluster
    cluster.heal()


def test_calls_go_on_when_the_member_in_use_is_killed(healed: Cluster) -> None:
    async def main() -> None:
        address = healed.address()
        async with EtcdClient(address) as client:
            await client.put(address.rules_key, RULES)
            used = client.member
            await asyncio.to_thread(healed.etcd.members[healed.index(used)].kill)
            found = await asyncio.wait_for(client.get(address.rules_key), 10)
            assert found is not None and bytes(found.value) == RULES
            assert client.member != used
            report = client.members_report()
            assert report["member"] == str(client.member)
            # the killed one; others too when it led the cluster ("no leader" while they elect)
            assert str(used) in [m["member"] for m in report["members_down"]]

    asyncio.run(main())


def test_a_black_holed_member_is_left_for_another_within_the_deadline(healed: Cluster) -> None:
    async def main() -> None:
        address = healed.address()
        async with EtcdClient(address) as client:
            await client.put(address.rules_key, RULES)
            used = client.member
            healed.proxies[healed.index(used)].swallow()
            started = time.monotonic()
            revision = (await asyncio.wait_for(client.put(address.state_key, b"{}"), 10)).header.revision
            print(f"left the black-holed member in {time.monotonic() - started:.2f} s")
            assert revision > 0 and client.member != used
            assert str(used) in [m["member"] for m in client.members_report()["members_down"]]

    asyncio.run(main())


def test_a_call_whose_channel_another_failover_closes_goes_on_over_the_new_one(healed: Cluster) -> None:
    """grpc.aio ends a call on a closed channel with asyncio.CancelledError: a call in flight
    when another one moved the client must not end (it once ended a replica's fleet loop)."""

    async def main() -> None:
        address = healed.address()
        async with EtcdClient(address) as client:
            await client.put(address.rules_key, RULES)
            used = client.member
            healed.proxies[healed.index(used)].swallow()
            waiting = asyncio.create_task(client.get(address.rules_key))
            await asyncio.sleep(0.2)  # the get waits on the silent member
            assert client.fail_over(client.generation, ConnectionError("another call failed"))
            found = await asyncio.wait_for(waiting, 10)
            assert found is not None and bytes(found.value) == RULES and client.member != used

    asyncio.run(main())


def test_a_lease_is_kept_alive_through_a_black_holed_member(healed: Cluster) -> None:
    """The lease belongs to the cluster: its refresh, stuck on a silent member, is made on
    another within the lease's TTL."""

    async def main() -> None:
        address = healed.address()
        async with EtcdClient(address) as client:
            lease = await client.lease(3)
            await client.put(address.leader_key, b"me", lease=lease)
            used = client.member
            healed.proxies[healed.index(used)].swallow()
            for _ in range(3):  # the first on the silent member, the next ones elsewhere
                reply = await asyncio.wait_for(lease.refresh(), 10)
                assert reply is not None and reply.TTL > 0
            assert client.member != used
            found = await client.get(address.leader_key)
            assert found is not None and found.lease == lease.id

    asyncio.run(main())


def test_a_watch_on_a_black_holed_member_resumes_on_another_missing_and_repeating_nothing(
    healed: Cluster, tmp_path: Path
) -> None:
    """Only the watch uses the connection (no other call would notice): keepalive pings find
    the silent connection; the watch resumes on another member from the last revision seen."""

    async def main() -> None:
        address = healed.address()
        async with EtcdClient(address) as writer:
            await writer.put(address.rules_key, RULES)
        metrics = Metrics(CollectorRegistry())
        source = EtcdSource(address, None, tmp_path, metrics)
        await source.start()
        reloader = Reloader(source.rules, metrics, source.state)
        stop = asyncio.Event()
        task = asyncio.create_task(source.follow(reloader, stop))
        try:
            await until(lambda: source.watching, 5, "the watch")
            used = source.client.member
            healed.proxies[healed.index(used)].swallow()
            started = time.monotonic()
            written = await write_changes(address, count=20)
            await until(lambda: source.client.member != used, 30, "the watch to leave the member")
            print(f"the watch left the black-holed member in {time.monotonic() - started:.1f} s")
            await until(lambda: source.rules.value == written, 10, "the last change")
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            await source.close()
        seen = metrics.registry.get_sample_value("graysteer_etcd_changes_total", {"key": "rules"})
        repeated = metrics.registry.get_sample_value(
            "graysteer_etcd_changes_repeated_total", {"key": "rules"}
        )
        assert seen == 1 + 20  # the first read, then every change once
        assert repeated in (None, 0.0)
        assert source.connected or stop.is_set()

    asyncio.run(main())


async def write_changes(address: EtcdAddress, count: int) -> bytes:
    """`count` pushes of different rules, through a client of its own; the last one's bytes."""
    async with EtcdClient(address) as writer:
        for weight in range(count):
            content = RULES.replace(b"weight: 10", b"weight: %d" % (weight + 11)).replace(
                b"weight: 90", b"weight: %d" % (89 - weight)
            )
            await writer.put(address.rules_key, content)
    return content
