"""The etcd rules source and state store against a real etcd (Debian's etcd-server, installed
when missing): reads, watches, refusals, compare-and-swap writes, outages and the cache."""

import asyncio
import itertools
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.dev.etcd import Etcd
from sidecar.ops.metrics import Metrics
from sidecar.sources.etcd import EtcdSource
from sidecar.sources.etcd_client import EtcdAddress, EtcdClient
from sidecar.sources.state_file import StateConflict
from sidecar.table.load import config_version, parse_rules
from sidecar.table.reload import Outcome, Reloader

RULES = b"""version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: ramp
    split:
      key: [header:x-user-id]
      to: [{cluster: stable, weight: 90}, {cluster: canary, weight: 10}]
"""
_prefixes = itertools.count()
TENANTS = b"".join(
    b"  - {name: tenant-%d, match: {headers: {x-tenant: {regex: 't-%d-[a-z]+'}}}, route: canary}\n" % (i, i)
    for i in range(300)
)


@pytest.fixture
def address(etcd: Etcd) -> EtcdAddress:
    return EtcdAddress.parse(f"{etcd.url}/test/{next(_prefixes)}")


async def put(address: EtcdAddress, key: bytes, value: bytes) -> None:
    async with EtcdClient(address) as client:
        await client.put(key, value)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def following(
    address: EtcdAddress, cache: Path, work: Callable[[EtcdSource, Reloader], Awaitable[Any]]
) -> Any:
    """Start a source + reloader, follow etcd while `work` runs, then stop."""
    metrics = Metrics(CollectorRegistry())
    source = EtcdSource(address, None, cache, metrics)
    await source.start()
    reloader = Reloader(source.rules, metrics, source.state)
    stop = asyncio.Event()
    task = asyncio.create_task(source.follow(reloader, stop))
    try:
        return await work(source, reloader)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await source.close()


def test_a_push_reaches_the_served_table_within_a_second(address: EtcdAddress, tmp_path: Path) -> None:
    async def main() -> None:
        await put(address, address.rules_key, RULES)

        async def work(source: EtcdSource, reloader: Reloader) -> None:
            first = reloader.table.version
            assert reloader.table.source == f"{address}/rules" and source.connected
            await put(address, address.rules_key, RULES.replace(b"weight: 10", b"weight: 11"))
            took = await until(lambda: reloader.table.version != first, 1.0, "the pushed table")
            assert took < 1.0
            assert reloader.table.rules[0].split is not None and reloader.table.rules[0].split.weights == (
                90,
                11,
            )

        await following(address, tmp_path, work)

    asyncio.run(main())


def test_an_invalid_document_in_etcd_is_refused_counted_and_the_table_stays(
    address: EtcdAddress, tmp_path: Path
) -> None:
    async def main() -> None:
        await put(address, address.rules_key, RULES)

        async def work(source: EtcdSource, reloader: Reloader) -> None:
            served = reloader.table.version
            queue = reloader.subscribe()
            await put(address, address.rules_key, b"version: 1\nclusters: [a]\ndefault: nowhere\n")
            _, result = await asyncio.wait_for(queue.get(), 2)
            assert result.outcome is Outcome.INVALID and "unknown cluster 'nowhere'" in result.error
            await put(address, address.rules_key, b"{{{ not yaml")
            _, result = await asyncio.wait_for(queue.get(), 2)
            assert result.outcome is Outcome.INVALID
            assert reloader.table.version == served and reloader.failures == 2
            reloads = reloader.metrics.registry.get_sample_value(
                "graysteer_reloads_total", {"result": "invalid"}
            )
            assert reloads == 2

        await following(address, tmp_path, work)

    asyncio.run(main())


def test_the_local_cache_holds_only_what_loaded(address: EtcdAddress, tmp_path: Path) -> None:
    """A valid push then an invalid one 5 ms later: the cache keeps the table that loaded (it
    used to keep the latest value seen, and a replica restarted from it then exited)."""
    cached = tmp_path / "rules.yaml"

    async def main() -> None:
        await put(address, address.rules_key, RULES)

        async def work(source: EtcdSource, reloader: Reloader) -> None:
            async with EtcdClient(address) as client:
                for round in range(15):
                    # large enough that the refused value arrives while this one is compiled
                    valid = RULES.replace(b"weight: 10", f"weight: {11 + round}".encode()) + TENANTS
                    await client.put(address.rules_key, valid)
                    await asyncio.sleep(0.005)
                    await client.put(address.rules_key, b"{{{ not yaml, round %d" % round)
                    await until(lambda: reloader.failures == round + 1, 3, "the refusal")  # noqa: B023
                    served = reloader.loaded.file_version
                    await until(
                        lambda: cached.exists() and config_version(cached.read_bytes()) == served,  # noqa: B023
                        3,
                        "the cache to hold what is served",
                    )
                    await asyncio.sleep(0.05)  # a late write of the refused value would land here
                    assert parse_rules(cached.read_bytes(), "cache").version == served

        await following(address, tmp_path, work)

    asyncio.run(main())


def test_state_writes_compare_revisions_and_reach_other_replicas(
    address: EtcdAddress, tmp_path: Path
) -> None:
    async def main() -> None:
        await put(address, address.rules_key, RULES)
        stale = EtcdSource(address, None, tmp_path / "stale", Metrics(CollectorRegistry()))
        await stale.start()  # reads the state now, then does not follow it

        async def replica_b(_: EtcdSource, b: Reloader) -> None:
            async def replica_a(_: EtcdSource, a: Reloader) -> None:
                await a.set_weights("ramp", {"canary": 30})
                await until(lambda: b.table.version == a.table.version, 1.0, "replica B to serve A's weights")
                assert "+o" in b.table.version

            await following(address, tmp_path / "a", replica_a)

        await following(address, tmp_path / "b", replica_b)
        with pytest.raises(StateConflict, match=r"changed .* since this replica read it"):
            await stale.state.save({"weight_overrides": {}})
        await stale.close()

    asyncio.run(main())


def test_an_emptied_or_deleted_state_key_is_not_read_as_no_state(
    address: EtcdAddress, tmp_path: Path
) -> None:
    """`etcdctl put PREFIX/state ""` is refused; `etcdctl del PREFIX/state` is written back."""

    async def work(_: EtcdSource, reloader: Reloader) -> None:
        await reloader.set_weights("ramp", {"canary": 30})
        served = reloader.table.version
        stored = reloader.loaded.state_bytes
        await put(address, address.state_key, b"")
        await until(lambda: reloader.last_result.outcome is Outcome.INVALID, 2.0, "the empty state refused")
        assert "empty" in reloader.last_result.error and reloader.table.version == served
        await put(address, address.state_key, stored)
        await until(lambda: reloader.last_result.outcome is Outcome.LOADED, 2.0, "the state back")
        async with EtcdClient(address) as client:
            await client.delete(address.state_key)
            deadline = time.monotonic() + 5.0  # the write-back follows the watch's delete event
            while (found := await client.get(address.state_key)) is None:
                assert time.monotonic() < deadline, "the deleted state was not written back"
                await asyncio.sleep(0.02)
            assert found.value == stored and reloader.state.value == stored
        assert reloader.table.version == served

    asyncio.run(put(address, address.rules_key, RULES))
    asyncio.run(following(address, tmp_path / "cache", work))


def test_an_outage_keeps_the_table_refuses_changes_and_catches_up(
    etcd: Etcd, address: EtcdAddress, tmp_path: Path
) -> None:
    async def main() -> None:
        await put(address, address.rules_key, RULES)

        async def work(source: EtcdSource, reloader: Reloader) -> None:
            served = reloader.table.version
            await asyncio.to_thread(etcd.stop)
            await until(lambda: not source.connected, 10, "the source to notice the outage")
            assert reloader.table.version == served
            assert source.health()["changes"].startswith("not ready")
            assert reloader.metrics.registry.get_sample_value("graysteer_source_connected") == 0
            with pytest.raises(OSError, match="etcd is unreachable"):
                await reloader.set_weights("ramp", {"canary": 50})
            assert reloader.table.version == served
            await asyncio.sleep(10)  # long enough for gRPC's own reconnect backoff to grow
            await asyncio.to_thread(etcd.start)
            took = await until(lambda: source.connected, 10, "the source to reconnect")
            # gRPC's default backoff (1 s, x1.6, up to 120 s) came back 5.7-7.8 s late here
            assert took < 3.0, f"reconnected {took:.1f} s after etcd was back"
            await put(address, address.rules_key, RULES.replace(b"weight: 10", b"weight: 12"))
            await until(lambda: reloader.table.version != served, 2, "the push after the outage")

        await following(address, tmp_path, work)

    asyncio.run(main())


def test_a_restart_during_an_outage_starts_from_the_local_cache(
    etcd: Etcd, address: EtcdAddress, tmp_path: Path
) -> None:
    async def main() -> None:
        await put(address, address.rules_key, RULES)

        async def served(source: EtcdSource, reloader: Reloader) -> str:
            await until(lambda: (tmp_path / "rules.yaml").exists(), 2, "the cache")
            return reloader.table.version

        version = await following(address, tmp_path, served)
        await asyncio.to_thread(etcd.stop)
        try:
            source = EtcdSource(address, None, tmp_path, Metrics(CollectorRegistry()))
            await source.start()
            assert source.from_cache and not source.connected
            assert Reloader(source.rules, source.metrics, source.state).table.version == version
            with pytest.raises(OSError, match=r"etcd unreachable .* and no local cache"):
                await EtcdSource(address, None, tmp_path / "empty", source.metrics).start()
        finally:
            await asyncio.to_thread(etcd.start)

    asyncio.run(main())


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    """etcd with --client-cert-auth: push and follow with a client certificate; without
    one, or trusting another CA, a clear refusal."""
    from sidecar.sources.etcd_client import EtcdTls
    from tests.tls import make_ca, make_leaf, write_pair

    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    write_pair(tmp_path, "server", make_leaf(ca, "etcd", dns=["localhost"], ips=["127.0.0.1"]))
    write_pair(tmp_path, "client", make_leaf(ca, "graysteer"))
    other = make_ca("another CA")
    (tmp_path / "other-ca.pem").write_bytes(other.pem)
    server = Etcd(tmp_path, tls_dir=tmp_path)
    try:
        url = f"{server.url}/secure/checkout"
        rules = tmp_path / "rules.yaml"
        rules.write_bytes(RULES)
        flags = ["--etcd-ca", str(tmp_path / "ca.pem"), "--etcd-cert", str(tmp_path / "client.pem")]
        flags += ["--etcd-key", str(tmp_path / "client.key")]
        pushed = subprocess.run(
            [sys.executable, "-m", "sidecar", "push", str(rules), url, *flags],
            capture_output=True,
            text=True,
            check=False,
        )
        assert pushed.returncode == 0, pushed.stderr
        for refused in (flags[:2], ["--etcd-ca", str(tmp_path / "other-ca.pem"), *flags[2:]], []):
            run = subprocess.run(
                [sys.executable, "-m", "sidecar", "push", str(rules), url, *refused],
                capture_output=True,
                text=True,
                check=False,
            )
            assert run.returncode == 1 and "etcd unreachable or refused" in run.stderr, refused

        async def main() -> None:
            tls = EtcdTls(tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key")
            source = EtcdSource(EtcdAddress.parse(url), tls, tmp_path / "cache", Metrics(CollectorRegistry()))
            await source.start()
            assert source.connected and not source.from_cache
            assert source.rules.read() == RULES
            await source.close()

        asyncio.run(main())
    finally:
        server.stop()


def test_rotated_client_certificates_are_used_when_etcd_reconnects(tmp_path: Path) -> None:
    """The client's certificate and CA files are swapped (as a Kubernetes Secret volume is)
    while it follows etcd; etcd then restarts with a server certificate from the new CA,
    trusting only the new CA's clients: the source reconnects with the rotated files and a
    push reaches it, with no restart."""
    from sidecar.sources.etcd_client import EtcdTls
    from sidecar.tlsfiles import TlsReloads
    from tests.tls import make_ca, make_leaf, swap_directory, write_pair

    ca1, ca2 = make_ca("etcd CA 1"), make_ca("etcd CA 2")
    served = tmp_path / "etcd-tls"  # etcd's own files: ca.pem is the CA of its clients
    served.mkdir()

    def serve_etcd(ca: Any) -> None:
        (served / "ca.pem").write_bytes(ca.pem)
        write_pair(served, "server", make_leaf(ca, "etcd", dns=["localhost"], ips=["127.0.0.1"]))

    mounted = tmp_path / "client-tls"

    def mount(ca: Any, trusted: bytes) -> None:
        key, cert = make_leaf(ca, "graysteer")
        swap_directory(mounted, {"tls.key": key, "tls.crt": cert, "ca.crt": trusted})

    serve_etcd(ca1)
    mount(ca1, ca1.pem)
    server = Etcd(tmp_path, tls_dir=served)
    tls = EtcdTls(mounted / "ca.crt", mounted / "tls.crt", mounted / "tls.key")
    address = EtcdAddress.parse(f"{server.url}/rotating/checkout")

    async def push(weight: int) -> None:
        async with EtcdClient(address, tls) as client:
            await client.put(address.rules_key, RULES.replace(b"weight: 10", b"weight: %d" % weight))

    async def main() -> None:
        await push(10)
        registry = CollectorRegistry()
        source = EtcdSource(address, tls, tmp_path / "cache", Metrics(registry), TlsReloads(registry))
        await source.start()
        reloader = Reloader(source.rules, source.metrics, source.state)
        stop = asyncio.Event()
        task = asyncio.create_task(source.follow(reloader, stop))
        try:
            first = reloader.table.version
            mount(ca2, ca1.pem + ca2.pem)  # the new client certificate, and trust in the new CA
            await asyncio.to_thread(server.stop)
            serve_etcd(ca2)  # etcd moves to the new CA and retires the old one
            await asyncio.to_thread(server.start)
            await until(lambda: source.connected, 10, "the source to reconnect with the rotated files")
            await push(11)
            await until(lambda: reloader.table.version != first, 5, "the push after the rotation")
            loaded = {"use": "etcd", "outcome": "loaded"}
            assert registry.get_sample_value("graysteer_tls_reloads_total", loaded) == 1
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
            await source.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()
