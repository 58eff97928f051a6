"""etcd v3 for a fleet of sidecars: the address form, TLS, the client, and the keys.

One prefix holds one service's fleet, and is the unit of isolation between services
(grant each service's sidecars an etcd role on its prefix alone):

    PREFIX/rules             the rules document, as `graysteer push` wrote it
    PREFIX/rules.next        the next rules, decided beside the live ones as a shadow table
                             (`graysteer push --next`; sidecar.table.shadow)
    PREFIX/state             runtime weights and rollout states (the state file's format)
    PREFIX/leader            the replica whose rollout controller acts (bound to its lease)
    PREFIX/replicas/<id>     each replica's record: served version, lanes (bound to its lease)

The client is PyPI `aetcd`: asyncio on grpc.aio (the gRPC runtime the sidecar already
serves with, on the same event loop), etcd's v3 gRPC API with watches, leases and
transactions, maintained (1.0 in 2026, protobuf 5+ stubs). Its connect() offers no TLS, so
`EtcdClient` opens the channel itself when a CA is given; everything else is aetcd's.

The TLS files are read again when they change (sidecar.tlsfiles): a connection uses the files
as they were when it was opened (TLS authenticates at the handshake only, so a live one is
not cut), and after a lost connection `renew()` reopens the channel with the changed files.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import aetcd
import grpc
from aetcd import rpc, watcher

from sidecar.tlsfiles import TlsFiles, TlsPem, TlsReloads

# What etcd is unreachable looks like through aetcd (and plain grpc.aio errors it lets by);
# OSError covers ConnectionError, TimeoutError covers asyncio's.
ETCD_ERRORS = (aetcd.ClientError, grpc.RpcError, OSError, TimeoutError)
REQUEST_TIMEOUT_SECONDS = 5
# gRPC's own reconnect backoff grows to 120 s (1 s, x1.6, with jitter): after a 10 s outage
# a channel would try again up to ~6 s after etcd is back. Cap it at 1 s: a replica follows
# etcd again (changes, the lead, rollout holds) within about a second of its return.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
}

_ADDRESS = re.compile(r"etcd://(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?P<port>[0-9]{1,5})(?P<prefix>/[^\s]*)")


@dataclass(frozen=True)
class EtcdAddress:
    """`etcd://HOST:PORT/PREFIX`: one etcd endpoint (a Service or VIP in front of the
    cluster, or a local `etcd grpc-proxy`) and the prefix of one service's fleet."""

    host: str
    port: int
    prefix: str  # without the trailing slash, e.g. /graysteer/checkout

    @classmethod
    def parse(cls, url: str) -> "EtcdAddress":
        found = _ADDRESS.fullmatch(url)
        if not found or not 0 < int(found["port"]) <= 65535:
            raise ValueError(
                "expected etcd://HOST:PORT/PREFIX (e.g. etcd://127.0.0.1:2379/graysteer/checkout), "
                f"got {url!r}"
            )
        prefix = found["prefix"].rstrip("/")
        if not prefix or "//" in prefix:
            raise ValueError(f"{url!r}: the prefix must name the service, e.g. /graysteer/checkout")
        return cls(found["host"].strip("[]"), int(found["port"]), prefix)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"etcd://{host}:{self.port}{self.prefix}"

    def key(self, name: str) -> bytes:
        return f"{self.prefix}/{name}".encode()

    @property
    def rules_key(self) -> bytes:
        return self.key("rules")

    @property
    def next_rules_key(self) -> bytes:
        return self.key("rules.next")

    @property
    def state_key(self) -> bytes:
        return self.key("state")

    @property
    def leader_key(self) -> bytes:
        return self.key("leader")

    @property
    def replicas_prefix(self) -> bytes:
        return self.key("replicas/")


def is_etcd(config: str) -> bool:
    return config.startswith("etcd://")


@dataclass(frozen=True)
class EtcdTls:
    """TLS to etcd: the CA that signed etcd's server certificate, and this client's
    certificate and key when etcd requires client certificates (--client-cert-auth)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def files(self, reloads: TlsReloads | None = None) -> TlsFiles:
        """The files, read and checked now (OSError or ValueError naming the file)."""
        try:
            return TlsFiles("etcd", self.ca, self.cert, self.key, reloads)
        except OSError as error:
            raise OSError(f"etcd TLS: cannot read {error.filename}: {error.strerror}") from error
        except ValueError as error:
            raise ValueError(f"etcd TLS: {error}") from error


class EtcdClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client, with TLS when `tls` is given."""

    def __init__(
        self, address: EtcdAddress, tls: EtcdTls | None = None, reloads: TlsReloads | None = None
    ) -> None:
        super().__init__(address.host, address.port, timeout=REQUEST_TIMEOUT_SECONDS, options=CHANNEL_OPTIONS)
        self.address = address
        self.tls = tls.files(reloads) if tls is not None else None
        self._opened_with: TlsPem | None = None  # the files the channel was opened with

    async def connect(self) -> None:
        if self.tls is None or self._connected.is_set():
            await super().connect()
            return
        # aetcd's connect() with a secure channel: the same stubs and watcher.
        pem = self.tls.current()
        credentials = grpc.ssl_channel_credentials(pem.ca, pem.key, pem.chain)
        self.channel = rpc.secure_channel(
            f"{self._host}:{self._port}", credentials, options=self._options.items()
        )
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=None)
        self._opened_with = pem
        self._connected.set()

    async def renew(self) -> bool:
        """Call after a lost connection: when the TLS files changed (and load) since the channel
        was opened, close it, so that the next call connects with them. True when it did.
        (The channel's own reconnects would keep presenting the old certificate.)"""
        if self.tls is None or not self._connected.is_set() or self.tls.current() is self._opened_with:
            return False
        await self.close()
        return True


async def push_rules(
    address: EtcdAddress, tls: EtcdTls | None, content: bytes, key: bytes | None = None
) -> int:
    """Write a (validated) rules document (to PREFIX/rules unless `key` says otherwise);
    returns etcd's revision of the write."""
    async with EtcdClient(address, tls) as client:
        response = await client.put(key or address.rules_key, content)
        return int(response.header.revision)


async def delete_key(address: EtcdAddress, tls: EtcdTls | None, key: bytes) -> bool:
    """Delete one key; True when it existed."""
    async with EtcdClient(address, tls) as client:
        return bool(await client.delete(key))
