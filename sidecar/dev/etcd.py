"""A real etcd server on loopback for the fleet tests, the convergence benchmark and local
trials: Debian's `etcd-server` (etcd 3.4), installed with apt-get when missing (as root);
one member, or a cluster of several (`EtcdCluster`). Keys are written and read through the
sidecar's own etcd client (no `etcdctl`, which is another Debian package; a move of the
cluster's leader is etcd's Maintenance.MoveLeader through the same client)."""

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from aetcd import rpc

from sidecar.dev.processes import Process, ensure_tool, free_port, wait_for
from sidecar.sources.etcd_client import EtcdAddress, EtcdClient, EtcdMember, EtcdTls

T = TypeVar("T")


class Etcd:
    """One etcd member on free loopback ports, its data in `workdir`; restartable on the same
    ports and data (an outage, then recovery). With `tls_dir` (ca.pem, server.pem,
    server.key) clients speak TLS and must present a certificate signed by that CA. Clients
    reach it on `host` (any loopback address: 127.0.0.2 gives a member an address, and so a
    server certificate, of its own); its peers on 127.0.0.1."""

    def __init__(
        self,
        workdir: Path,
        name: str = "etcd",
        tls_dir: Path | None = None,
        start: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        self.binary = ensure_tool("etcd", "etcd-server")
        self.workdir = workdir
        self.name = name
        self.tls_dir = tls_dir
        self.host = host
        self.port = free_port()
        self.peer_port = free_port()
        self.process: Process | None = None
        self.initial_cluster = f"{name}={self.peer_url}"  # the members at the cluster's creation
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"etcd://{self.host}:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, wait: bool = True) -> None:
        """Start (again, after stop() or kill(): same ports, same data); `wait` until it serves."""
        client = f"{'https' if self.tls_dir else 'http'}://{self.host}:{self.port}"
        peer = self.peer_url
        tls = (
            [
                "--cert-file",
                str(self.tls_dir / "server.pem"),
                "--key-file",
                str(self.tls_dir / "server.key"),
                "--trusted-ca-file",
                str(self.tls_dir / "ca.pem"),
                "--client-cert-auth",
            ]
            if self.tls_dir
            else []
        )
        self.process = Process(
            self.name,
            [
                self.binary,
                "--name",
                self.name,
                "--data-dir",
                str(self.workdir / f"{self.name}.data"),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                self.initial_cluster,
                *tls,
            ],
            self.workdir / f"{self.name}.log",
        )
        if wait:
            self.wait_serving()

    def wait_serving(self) -> None:
        assert self.process is not None
        process = self.process
        wait_for(lambda: "ready to serve client requests" in process.log_text(), 20, f"{self.name} to serve")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def kill(self) -> None:
        """SIGKILL: the member is gone at once, its connections reset, nothing flushed."""
        if self.process is not None:
            self.process.kill()
            self.process.stop()
            self.process = None

    # -- keys, as an operator (or an attacker with write access) would put them ---------------

    def _call(self, work: Callable[[EtcdClient], Awaitable[T]]) -> T:
        async def run() -> T:
            async with EtcdClient(EtcdAddress((EtcdMember(self.host, self.port),), "/")) as client:
                return await asyncio.wait_for(work(client), 10)

        return asyncio.run(run())

    def put(self, key: str, value: bytes | str, lease_ttl: int | None = None) -> int:
        """Write `key` (optionally bound to a new lease of `lease_ttl` seconds, left to
        expire); returns etcd's revision of the write."""
        data = value.encode() if isinstance(value, str) else value

        async def put(client: EtcdClient) -> int:
            lease = await client.lease(lease_ttl) if lease_ttl else None
            return int((await client.put(key.encode(), data, lease=lease)).header.revision)

        return self._call(put)

    def get(self, key: str) -> bytes | None:
        async def get(client: EtcdClient) -> bytes | None:
            found = await client.get(key.encode())
            return None if found is None else bytes(found.value)

        return self._call(get)

    def delete(self, key: str) -> None:
        async def delete(client: EtcdClient) -> None:
            await client.delete(key.encode())

        self._call(delete)


class EtcdCluster:
    """`size` etcd members on loopback forming one cluster (--initial-cluster), started
    together; each member restartable on its ports and data. With `hosts`, member i serves
    its clients on hosts[i]; with `tls_dirs`, over TLS with the files of tls_dirs[i] (see
    Etcd), and the cluster's own calls (`key_version`, `leader`...) present `client_tls`."""

    def __init__(
        self,
        workdir: Path,
        size: int = 3,
        hosts: Sequence[str] | None = None,
        tls_dirs: Sequence[Path] | None = None,
        client_tls: EtcdTls | None = None,
    ) -> None:
        self.client_tls = client_tls
        self.members = [
            Etcd(
                workdir,
                f"etcd{i}",
                tls_dir=tls_dirs[i] if tls_dirs else None,
                start=False,
                host=hosts[i] if hosts else "127.0.0.1",
            )
            for i in range(size)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial
            member.start(wait=False)
        for member in self.members:  # a member serves once a quorum has elected a leader
            member.wait_serving()

    def url(self, ports: list[int] | None = None) -> str:
        """etcd://HOST1:P1,...: the members' client addresses (or 127.0.0.1 on `ports`, e.g.
        proxies')."""
        if ports is not None:
            return "etcd://" + ",".join(f"127.0.0.1:{port}" for port in ports)
        return "etcd://" + ",".join(str(EtcdMember(m.host, m.port)) for m in self.members)

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def _call(self, work: Callable[[EtcdClient], Awaitable[T]]) -> T:
        live = [EtcdMember(m.host, m.port) for m in self.members if m.process is not None]

        async def run() -> T:
            async with EtcdClient(EtcdAddress(tuple(live), "/"), self.client_tls) as client:
                return await asyncio.wait_for(work(client), 10)

        return asyncio.run(run())

    def key_version(self, key: str) -> int:
        """How many times `key` was written since it was created (etcd's version; 0: none)."""

        async def version(client: EtcdClient) -> int:
            found = await client.get(key.encode())
            return 0 if found is None else int(found.version)

        return self._call(version)

    def leader(self) -> int:
        """The index of the member that leads the cluster now."""

        async def ask(client: EtcdClient) -> int:
            status = await client.status()
            ids = await self._member_ids(client)
            assert status.leader is not None, "the cluster has no leader"
            return ids.index(status.leader.id)

        return self._call(ask)

    async def _member_ids(self, client: EtcdClient) -> list[int]:
        """Each member's id, in self.members' order (matched by client port)."""
        by_port = {}
        async for member in client.members():
            for url in member.client_urls:
                by_port[int(url.rsplit(":", 1)[1])] = member.id
        return [by_port[m.port] for m in self.members]

    def move_leader(self, to: int) -> None:
        """etcd's Maintenance.MoveLeader, sent to the leader: member `to` leads next."""
        leader = self.leader()

        async def move(_: EtcdClient) -> None:
            chosen = self.members[leader]
            address = EtcdAddress((EtcdMember(chosen.host, chosen.port),), "/")
            async with EtcdClient(address, self.client_tls) as client:
                ids = await self._member_ids(client)
                await client.connect()
                await client.maintenancestub.MoveLeader(rpc.MoveLeaderRequest(targetID=ids[to]), timeout=10)

        self._call(move)
