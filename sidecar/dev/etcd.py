"""A real etcd server on loopback for the fleet tests, the convergence benchmark and local
trials: Debian's `etcd-server` (etcd 3.4), installed with apt-get when missing (as root).
Keys are written and read through the sidecar's own etcd client (no `etcdctl`, which is
another Debian package)."""

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from sidecar.dev.processes import Process, ensure_tool, free_port, wait_for
from sidecar.sources.etcd_client import EtcdAddress, EtcdClient

T = TypeVar("T")


class Etcd:
    """One etcd member on free loopback ports, its data in `workdir`; restartable on the same
    ports and data (an outage, then recovery). With `tls_dir` (ca.pem, server.pem,
    server.key) clients speak TLS and must present a certificate signed by that CA."""

    def __init__(self, workdir: Path, name: str = "etcd", tls_dir: Path | None = None) -> None:
        self.binary = ensure_tool("etcd", "etcd-server")
        self.workdir = workdir
        self.name = name
        self.tls_dir = tls_dir
        self.port = free_port()
        self.peer_port = free_port()
        self.process: Process | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.port}"

    def start(self) -> None:
        client = f"{'https' if self.tls_dir else 'http'}://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
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
        process = self.process = Process(
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
                f"{self.name}={peer}",
                *tls,
            ],
            self.workdir / f"{self.name}.log",
        )
        wait_for(lambda: "ready to serve client requests" in process.log_text(), 20, f"{self.name} to serve")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    # -- keys, as an operator (or an attacker with write access) would put them ---------------

    def _call(self, work: Callable[[EtcdClient], Awaitable[T]]) -> T:
        async def run() -> T:
            async with EtcdClient(EtcdAddress("127.0.0.1", self.port, "/")) as client:
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
