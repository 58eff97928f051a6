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
transactions, maintained (1.0 in 2026, protobuf 5+ stubs). It talks to one address and its
connect() offers no TLS, so `EtcdClient` opens the channel itself, to one member of the
cluster at a time (sidecar.sources.etcd_address), and moves to the next when that one fails.

Why a member list tried in turn rather than gRPC's own balancing over several addresses (an
`ipv4:a,b,c` target with pick_first or round_robin): gRPC's resolvers take only IP addresses
in such a list (no host names, and TLS would check every member against one name), a channel
does not say which address it uses (a replica must: /readyz, `status --fleet`), and its
balancing knows only connections, not etcd's answers: a member that is connected but has no
leader ("etcdserver: no leader"), or black-holed with its connection still open, stays
picked. Here the etcd answer (or its absence within the deadline) moves the client.

The TLS files are read again when they change (sidecar.tlsfiles): a connection uses the files
as they were when it was opened (TLS authenticates at the handshake only, so a live one is
not cut), and after a lost connection `renew()` reopens the channel with the changed files.
"""

import asyncio
import contextlib
import functools
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc, watcher

from sidecar.sources.etcd_address import MAX_MEMBERS, EtcdAddress, EtcdMember, is_etcd
from sidecar.tlsfiles import TlsFiles, TlsPem, TlsReloads

__all__ = ["MAX_MEMBERS", "EtcdAddress", "EtcdClient", "EtcdMember", "EtcdTls", "is_etcd"]

log = logging.getLogger("graysteer.etcd")
T = TypeVar("T")

# What etcd is unreachable looks like through aetcd (and plain grpc.aio errors it lets by);
# OSError covers ConnectionError, TimeoutError covers asyncio's.
ETCD_ERRORS = (aetcd.ClientError, grpc.RpcError, OSError, TimeoutError)
# Each call's deadline on one member. A member that does not answer within it (down,
# partitioned, black-holed) is left for the next, and the call is tried there, and so on for
# CALL_BUDGET_SECONDS. One second is far above a healthy etcd's answer (ms, an fsync for a
# write) and short enough that a replica's lease (3 s, refreshed every second) outlives one
# member's loss: the refresh times out after 1 s, the next member renews it.
REQUEST_TIMEOUT_SECONDS = 1
# How long a call goes on trying members. An etcd election after its leader's loss takes
# about a second (etcd's election timeout), during which every member answers "no leader"
# at once: trying each member once would give up within milliseconds.
CALL_BUDGET_SECONDS = 3.0
ROUND_PAUSE_SECONDS = 0.2  # after every member failed once in a row
# gRPC's own reconnect backoff grows to 120 s (1 s, x1.6, with jitter): after a 10 s outage
# a channel would try again up to ~6 s after etcd is back. Cap it at 1 s: a replica follows
# etcd again (changes, the lead, rollout holds) within about a second of its return.
# Keepalive pings find a connection that is open but answers nothing (a partition, a dead
# host behind a still-open NAT entry) while only a watch is open on it: every 6 s, given up
# after 3 s (the ping's answer is awaited grpc.http2.ping_timeout_ms: without it a watch on a
# black-holed connection was still waiting after 40 s). etcd closes connections that ping more
# often than every 5 s (--grpc-keepalive-min-time, "too many pings"): 6 s keeps clear of it
# (checked against etcd 3.4: no GOAWAY). Pings go on without data (a quiet watch sends none),
# never without a call (etcd refuses those too). A replica's fleet beat (a call every second, each with its
# deadline) usually finds a silent member sooner; keepalive covers a watch alone.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 6_000,
    "grpc.keepalive_timeout_ms": 3_000,
    "grpc.http2.ping_timeout_ms": 3_000,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.keepalive_permit_without_calls": 0,
}
# A watch is ended by the member when it loses the cluster's leader (it would otherwise
# stay open and silent on the minority side of a partition), as clientv3's WithRequireLeader.
WATCH_METADATA = (("hasleader", "true"),)
# etcd's own errors of a member without a working leader (a proposal that timed out inside
# the member) come as UNKNOWN with Go's context error as their text.
MEMBER_UNKNOWNS = frozenset({"context deadline exceeded", "context canceled"})
# (and INTERNAL "Stream removed ...": gRPC's word for a stream its connection lost, e.g. reset
# by the member with a protocol error, seen while a member restarted)
# gRPC codes that say "this member, not this request": another member may answer.
MEMBER_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


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


def member_failed(error: BaseException) -> bool:
    """Whether `error` says the member failed (down, refusing, not answering in time, without
    a leader), rather than that etcd refused the request itself (a permission, an argument)."""
    if isinstance(
        error, aetcd.ConnectionFailedError | aetcd.ConnectionTimeoutError | aetcd.WatchTimeoutError
    ):
        return True
    cause = error.__cause__ if isinstance(error, aetcd.ClientError) else error
    if isinstance(cause, grpc.aio.AioRpcError):
        code, details = cause.code(), cause.details() or ""
        return (
            code in MEMBER_CODES
            or (code == grpc.StatusCode.UNKNOWN and details in MEMBER_UNKNOWNS)
            or (code == grpc.StatusCode.INTERNAL and details.startswith("Stream removed"))
        )
    return isinstance(error, OSError | TimeoutError)


# gRPC's preamble of a connection that failed, before its reason: "failed to connect to all
# addresses; last error: UNKNOWN: ipv4:127.0.0.3:2379: " (the member is named beside it anyway)
_CONNECT_PREAMBLE = re.compile(r"failed to connect to all addresses; last error: [A-Z_]+: (?:\S*?: )?")
# gRPC's (BoringSSL's) words for a member whose certificate this client refused
_NOT_VERIFIED = re.compile(r"CERTIFICATE_VERIFY_FAILED(?:: ([^:]+))?")
_NOT_ITS_NAME = "Hostname Verification Check failed"
MAX_REASON = 200


def failure_reason(error: BaseException, member: EtcdMember) -> str:
    """Why `member` failed, for /readyz, `status --fleet` and the log: gRPC's text without its
    preamble; a certificate refused at the TLS handshake said in plain words (gRPC's text for
    it runs past the length kept, and names neither the CA nor the address checked)."""
    cause = error.__cause__ if isinstance(error, aetcd.ClientError) else error
    text = cause.details() if isinstance(cause, grpc.aio.AioRpcError) else str(error)
    text = _CONNECT_PREAMBLE.sub("", text or type(error).__name__, count=1)
    if _NOT_ITS_NAME in text:
        return (
            f"TLS: the member's certificate is not for its address {member.host} "
            "(not among its subject alternative names): refused"
        )
    refused = _NOT_VERIFIED.search(text)
    if refused:
        why = (refused.group(1) or "not verified").strip()
        return f"TLS: the member's certificate is not signed by the etcd CA (--etcd-ca): {why}: refused"
    return text[:MAX_REASON]


@dataclass(frozen=True)
class MemberDown:
    """A member that failed when last used: when (wall clock), and why."""

    since: float
    reason: str


def _with_failover(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(method)
    async def call(self: "EtcdClient", *args: Any, **kwargs: Any) -> T:
        return await self.failing_over(lambda: method(self, *args, **kwargs))

    return call


class EtcdClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client over the members of one cluster, with TLS when `tls` is given.

    One channel, to one member at a time (chosen at random at first, so that a fleet's
    replicas spread over the cluster). A call that fails because of the member (refused,
    reset, no answer within REQUEST_TIMEOUT_SECONDS, "no leader") marks it down, moves the
    client to the next member and is tried there, for up to CALL_BUDGET_SECONDS. Watches
    cannot be retried from here (their events are the
    caller's): they end, and the caller resumes them from its last revision (`fail_over`
    when it was the watch that failed). Members marked down are tried last, and are
    cleared as soon as they answer.

    Writes retried this way may have been applied by the member that did not answer: every
    write the sidecar makes is a compare-and-swap or idempotent (see the callers)."""

    def __init__(
        self, address: EtcdAddress, tls: EtcdTls | None = None, reloads: TlsReloads | None = None
    ) -> None:
        first = address.members[0]
        super().__init__(first.host, first.port, timeout=REQUEST_TIMEOUT_SECONDS, options=CHANNEL_OPTIONS)
        self.address = address
        self.endpoints = address.members  # not `members`: aetcd's method lists the cluster's
        self.tls = tls.files(reloads) if tls is not None else None
        self._opened_with: TlsPem | None = None  # the files the channel was opened with
        self._index = random.randrange(len(self.endpoints))
        self.generation = 0  # counts the channels opened: a failure on an older one is stale
        self.down: dict[EtcdMember, MemberDown] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.on_failover: Callable[[], None] | None = None  # counts them (metrics)

    @property
    def member(self) -> EtcdMember:
        """The member this client talks to (or will, at its next call)."""
        return self.endpoints[self._index]

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        member = self.member
        target = (
            f"{member.host}:{member.port}" if ":" not in member.host else f"[{member.host}]:{member.port}"
        )
        if self.tls is None:
            self.channel = rpc.insecure_channel(target, options=self._options.items())
        else:
            pem = self.tls.current()
            credentials = grpc.ssl_channel_credentials(pem.ca, pem.key, pem.chain)
            self.channel = rpc.secure_channel(target, credentials, options=self._options.items())
            self._opened_with = pem
        # aetcd's connect() with our channel: the same stubs and watcher.
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=WATCH_METADATA
        )
        self.generation += 1
        self._connected.set()

    async def failing_over(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, moved to the next member and tried again while members fail, for up to
        CALL_BUDGET_SECONDS (then the last member's error). After every member failed once in
        a row (most likely an election: each answers "no leader" at once), a short pause."""
        budget = time.monotonic() + CALL_BUDGET_SECONDS
        failed = 0
        while True:
            await self.connect()
            generation, member = self.generation, self.member
            try:
                result = await call()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this task is being cancelled (a shutdown): not etcd's doing
                # grpc.aio raises CancelledError in a call whose channel was closed under it
                # (another call's failover closed it): the call goes on over the new channel.
                error: BaseException = ConnectionError(f"etcd member {member}: the channel was closed")
            except ETCD_ERRORS as raised:
                if not member_failed(raised):
                    raise
                error = raised
            else:
                self.down.pop(member, None)
                return result
            self.fail_over(generation, error)
            failed += 1
            if time.monotonic() >= budget:
                raise error
            if failed % len(self.endpoints) == 0:
                await asyncio.sleep(ROUND_PAUSE_SECONDS)

    def fail_over(self, generation: int, error: BaseException) -> bool:
        """The member of channel `generation` failed: mark it down and move to the next member
        (the one down the longest ago, else the next in the list). Nothing when the client
        already moved since (a call on the old channel ending with it). True when it moved."""
        if generation != self.generation or not self._connected.is_set():
            return False
        failed = self.member
        reason = failure_reason(error, failed)
        self.down[failed] = MemberDown(time.time(), reason)
        n = len(self.endpoints)
        candidates = [(self._index + step) % n for step in range(1, n + 1)]
        self._index = min(
            candidates,
            key=lambda i: self.down[self.endpoints[i]].since if self.endpoints[i] in self.down else 0.0,
        )
        if n > 1:
            log.warning("etcd member %s failed (%s): moving to %s", failed, reason, self.member)
            if self.on_failover is not None:
                self.on_failover()
        self._drop_channel()
        return True

    def _drop_channel(self) -> None:
        """Forget the channel (the next call opens one to `member`) and close it in the
        background: a call in flight on it ends (and is tried again on the new one)."""
        channel, watches = self.channel, self._watcher
        self._init_channel_attrs()
        self._connected.clear()

        async def close() -> None:
            with contextlib.suppress(Exception):
                if watches is not None:
                    await watches.shutdown()
                if channel is not None:
                    await channel.close()

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def members_report(self) -> dict[str, Any]:
        """For /readyz, `status` and the replica's record: the member in use, those down."""
        now = time.time()
        return {
            "member": str(self.member),
            "members_down": [
                {"member": str(m), "down_seconds": round(now - d.since, 1), "reason": d.reason}
                for m, d in sorted(self.down.items())
                if m != self.member or len(self.endpoints) == 1
            ],
        }

    async def renew(self) -> bool:
        """Call after a lost connection: when the TLS files changed (and load) since the channel
        was opened, close it, so that the next call connects with them. True when it did.
        (The channel's own reconnects would keep presenting the old certificate.)"""
        if self.tls is None or not self._connected.is_set() or self.tls.current() is self._opened_with:
            return False
        self._drop_channel()
        return True

    async def close(self) -> None:
        await super().close()
        for task in list(self._closing):
            with contextlib.suppress(BaseException):
                await task

    get = _with_failover(aetcd.Client.get)
    get_prefix = _with_failover(aetcd.Client.get_prefix)
    get_range = _with_failover(aetcd.Client.get_range)
    put = _with_failover(aetcd.Client.put)
    delete = _with_failover(aetcd.Client.delete)
    transaction = _with_failover(aetcd.Client.transaction)
    lease = _with_failover(aetcd.Client.lease)
    revoke_lease = _with_failover(aetcd.Client.revoke_lease)
    refresh_lease = _with_failover(aetcd.Client.refresh_lease)
    status = _with_failover(aetcd.Client.status)
    watch = _with_failover(aetcd.Client.watch)  # creating it; its events are the caller's


async def push_rules(
    address: EtcdAddress, tls: EtcdTls | None, content: bytes, key: bytes | None = None
) -> int:
    """Write a (validated) rules document (to PREFIX/rules unless `key` says otherwise);
    returns etcd's revision of the write. A put only when the key does not hold `content`
    already: a write retried on another member after the first one's answer was lost (it
    may have been applied) is not written, and seen by the replicas, twice."""
    key = key or address.rules_key
    async with EtcdClient(address, tls) as client:
        same, responses = await client.transaction(
            compare=[client.transactions.value(key) == content],
            success=[client.transactions.get(key)],
            failure=[client.transactions.put(key, content)],
        )
        if same:
            return int(responses[0][0][1].mod_revision)
        return int(responses[0].response_put.header.revision)


async def delete_key(address: EtcdAddress, tls: EtcdTls | None, key: bytes) -> bool:
    """Delete one key; True when it existed."""
    async with EtcdClient(address, tls) as client:
        return bool(await client.delete(key))
