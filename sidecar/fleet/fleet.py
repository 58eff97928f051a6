"""One service's replicas as a fleet, through etcd: who they are, who leads, what they see.

Every replica holds an etcd lease (LEASE_TTL_SECONDS, refreshed every PUBLISH_SECONDS) and
publishes under it, at PREFIX/replicas/<id>, its record: the version it serves, whether it
follows etcd, and the cumulative responses per cluster its own Envoy reports. A replica that
dies stops refreshing; etcd deletes its record with the lease.

Leader election: the first replica to create PREFIX/leader (a transaction that succeeds
only while the key does not exist) bound to its lease leads. Only the leader's rollout
controller advances or aborts; it judges the fleet's traffic: every replica's published
cluster counts, each turned into a window on its own and summed (`FleetClusters`). When the leader
dies, its lease expires, the key goes with it, and another replica wins the next campaign
(within LEASE_TTL_SECONDS + PUBLISH_SECONDS); it continues from the stored rollout state,
never restarting the rollout. A leader that cannot refresh its lease stops leading at the
moment its lease could have expired, measured from before its last refresh was sent, so
two replicas never lead at once. Only a leader key bound to a lease counts: one written
without a lease (by hand) would never expire, and is removed.

Every replica reads every record on each beat (not only the leader), so each shows the
fleet's analysis and a new leader starts with a full window. A record that does not pass
`ReplicaRecord.from_bytes` is left out and counted (graysteer_fleet_records_refused_total).
"""

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from aetcd import rpc

from sidecar.core.rollout import ClusterWindow
from sidecar.fleet.replicas import RecordError, ReplicaRecord
from sidecar.ops.metrics import Metrics
from sidecar.sources.etcd_client import (
    ETCD_ERRORS,
    REQUEST_TIMEOUT_SECONDS,
    EtcdAddress,
    EtcdClient,
    EtcdMember,
    EtcdTls,
    failure_reason,
)
from sidecar.stats.clusters import ClusterCounts, ClusterHistory, ClusterRate, add_rates, as_window
from sidecar.table.load import config_version

log = logging.getLogger("graysteer.fleet")

LEASE_TTL_SECONDS = 3
PUBLISH_SECONDS = 1.0
MAX_REPLICAS = 1000  # records read per beat; more under the prefix are refused


class FleetClusters:
    """Every replica's snapshots; a cluster's window is the sum of each replica's own."""

    label = "every replica's Envoy"

    def __init__(self, keep_seconds: float = 600.0, stale_after: float = 3 * PUBLISH_SECONDS) -> None:
        self.keep_seconds = keep_seconds
        self.stale_after = stale_after
        self.replicas: dict[str, ClusterHistory] = {}
        self._last_at: dict[str, float] = {}
        self.read_at: float | None = None  # monotonic: the last successful read of the records

    def problem(self) -> str | None:
        """Why the fleet's windows cannot be trusted now: its records were not read lately."""
        if self.read_at is None:
            return "the fleet's replica records have not been read yet"
        age = time.monotonic() - self.read_at
        if age > self.stale_after:
            return f"the fleet's replica records were last read {age:.0f} s ago (etcd unreachable?)"
        return None

    def record(self, replica: str, at: float, counts: dict[str, ClusterCounts]) -> None:
        if self._last_at.get(replica) == at:
            return  # not republished since the last read
        if not counts:
            # No counts: a replica that has not read its Envoy yet (a sidecar just restarted
            # beside a running Envoy), or whose Envoy has answered nothing. As a snapshot it
            # would be the window's baseline, and the next record's cumulative counts (Envoy's
            # whole history) would count as traffic inside the window: a burst of old errors
            # that rolls a healthy canary back. The first counts a replica publishes are its
            # baseline instead (the first second of a new Envoy's traffic is not counted).
            return
        self._last_at[replica] = at
        self.replicas.setdefault(replica, ClusterHistory(self.keep_seconds)).record(at, counts)

    def forget_except(self, replicas: set[str], now: float) -> None:
        """Drop replicas gone for longer than the longest window (their traffic no longer counts)."""
        for replica in list(self.replicas):
            history = self.replicas[replica]
            if replica not in replicas and (
                not history.snapshots or now - history.snapshots[-1][0] > self.keep_seconds
            ):
                del self.replicas[replica]
                self._last_at.pop(replica, None)

    def cluster_window(self, cluster: str, seconds: float, now: float) -> ClusterWindow:
        total: ClusterCounts | None = None
        for history in self.replicas.values():
            part = history.cluster_delta(cluster, seconds, now)
            if part is None:
                continue
            if total is None:
                total = part
            elif part.bounds == total.bounds:
                total = ClusterCounts(
                    total.requests + part.requests,
                    total.errors + part.errors,
                    total.bounds,
                    tuple(a + b for a, b in zip(total.buckets, part.buckets, strict=True)),
                )
            else:  # another histogram layout: its counts count, its latencies cannot be merged
                total = ClusterCounts(
                    total.requests + part.requests, total.errors + part.errors, total.bounds, total.buckets
                )
        return as_window(total)

    def cluster_rates(self, seconds: float, now: float) -> dict[str, ClusterRate]:
        """The fleet's responses per second: the sum of each replica's own rates."""
        total: dict[str, ClusterRate] = {}
        for history in self.replicas.values():
            add_rates(total, history.cluster_rates(seconds, now))
        return total


class Fleet:
    def __init__(
        self,
        client: EtcdClient,
        address: EtcdAddress,
        replica_id: str,
        metrics: Metrics,
        ttl: int = LEASE_TTL_SECONDS,
        every: float = PUBLISH_SECONDS,
    ) -> None:
        self.client = client
        self.address = address
        self.replica_id = replica_id
        self.metrics = metrics
        self.ttl = ttl
        self.every = every
        self.clusters = FleetClusters()
        self._leading = False
        self._lease_deadline = 0.0  # monotonic: our lease may have expired after this
        self._poked = asyncio.Event()
        self._refused_logged: set[str] = set()
        # as of the last beat, for the live page: every record, those refused, who leads
        self.records: list[ReplicaRecord] = []
        self.refused: list[tuple[str, str]] = []
        self.leader_id: str | None = None

    def report(self, rules_version: str) -> dict[str, Any]:
        """The fleet as of this replica's last beat (`status --fleet`'s report)."""
        return fleet_report(
            self.address, rules_version, self.leader_id, self.records, self.refused, time.time()
        )

    def poke(self) -> None:
        """Publish the record now (the served table changed), not at the next beat."""
        self._poked.set()

    def leads(self) -> bool:
        return self._leading and time.monotonic() < self._lease_deadline

    async def run(self, stop: asyncio.Event, record: Callable[[], ReplicaRecord]) -> None:
        """Hold a lease, publish `record()` under it, campaign, and gather every replica's
        counts, every `every` seconds until `stop`; then give up the lease."""
        lease = None
        while not stop.is_set():
            try:
                if lease is None:
                    lease = await self.client.lease(self.ttl)
                    self._lease_deadline = time.monotonic() + self.ttl
                sent = time.monotonic()
                reply = await lease.refresh()
                if reply is None or reply.TTL <= 0:
                    raise ConnectionError("lease expired")
                self._lease_deadline = sent + self.ttl
                mine = dataclasses.replace(
                    record(),
                    id=self.replica_id,
                    leader=self.leads(),
                    at=time.time(),
                    etcd_member=str(self.client.member),
                    etcd_down=tuple(str(m) for m in sorted(self.client.down)),
                )
                await self.client.put(
                    self.address.key(f"replicas/{self.replica_id}"), mine.to_bytes(), lease=lease
                )
                await self._campaign(lease)
                await self._gather()
            except ETCD_ERRORS as error:
                if self._leading:
                    log.error("lost the fleet's lead (%s): rollouts wait for the next leader", error)
                self._set_leading(False)
                lease = None
            await self._pause(stop)
        if lease is not None:  # hand the lead over at once instead of after the TTL
            with contextlib.suppress(*ETCD_ERRORS):
                await asyncio.wait_for(lease.revoke(), 2)
        self._set_leading(False)

    async def _pause(self, stop: asyncio.Event) -> None:
        """Until the next beat, an early publish, or `stop`."""
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._poked.wait())]
        try:
            await asyncio.wait(waits, timeout=self.every, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self._poked.clear()

    async def _campaign(self, lease: Any) -> None:
        key = self.address.leader_key
        me = self.replica_id.encode()
        won, responses = await self.client.transaction(
            compare=[self.client.transactions.create(key) == 0],
            success=[self.client.transactions.put(key, me, lease=lease)],
            failure=[self.client.transactions.get(key)],
        )
        # Ours only when bound to this lease: a key left by an earlier process with the same
        # replica id (or a second process misconfigured with it) is not a lead.
        held = responses[0][0][1] if not won and responses and responses[0] else None
        if held is not None and not held.lease:
            await self._remove_unleased(held)
        self._set_leading(won or (held is not None and bytes(held.value) == me and held.lease == lease.id))
        if won:
            self.leader_id = self.replica_id
        elif held is not None and held.lease:
            self.leader_id = bytes(held.value).decode(errors="replace")
        else:
            self.leader_id = None

    async def _remove_unleased(self, held: Any) -> None:
        """A leader key without a lease never expires and would block every election: delete
        it (if nobody changed it since it was read); the next beat campaigns."""
        key = self.address.leader_key
        removed, _ = await self.client.transaction(
            compare=[self.client.transactions.mod(key) == held.mod_revision],
            success=[self.client.transactions.delete(key)],
            failure=[],
        )
        if removed:
            log.warning(
                "removed a leader key bound to no lease (%r): only a replica's lease-bound key leads",
                bytes(held.value)[:64],
            )
            self._poked.set()  # campaign at once

    def _set_leading(self, leading: bool) -> None:
        if leading and not self._leading:
            log.info("replica %s leads the fleet's rollouts", self.replica_id)
        self._leading = leading
        self.metrics.fleet_leader.set(1 if leading else 0)

    async def _gather(self) -> None:
        now = time.time()
        records, refused = await members(self.client, self.address)
        for key, why in refused:
            self.metrics.fleet_records_refused.inc()
            if key not in self._refused_logged and len(self._refused_logged) < 1000:
                self._refused_logged.add(key)
                log.error(
                    "ignoring the replica record %s: %s (later refusals of it are counted only)", key, why
                )
        self.records, self.refused = records, refused
        for record in records:
            self.clusters.record(record.id, record.at, record.clusters)
        self.clusters.forget_except({r.id for r in records}, now)
        self.clusters.read_at = time.monotonic()


async def members(
    client: EtcdClient, address: EtcdAddress
) -> tuple[list[ReplicaRecord], list[tuple[str, str]]]:
    """Every live replica's record, by id, and the (key, reason) of each refused one."""
    found = await client.get_prefix(address.replicas_prefix)
    records, refused = [], []
    for kv in found.kvs[MAX_REPLICAS:]:
        refused.append((bytes(kv.key).decode(errors="replace")[:300], f"more than {MAX_REPLICAS} records"))
    for kv in found.kvs[:MAX_REPLICAS]:
        key = bytes(kv.key).decode(errors="replace")[:300]
        try:
            records.append(ReplicaRecord.from_bytes(bytes(kv.value)))
        except RecordError as error:
            refused.append((key, str(error)[:300]))
    return sorted(records, key=lambda r: r.id), refused


async def leader(client: EtcdClient, address: EtcdAddress) -> str | None:
    """The leading replica's id; None when there is none (a key bound to no lease leads
    nothing: the replicas remove it)."""
    got = await client.get(address.leader_key)
    if got is None or not got.lease:
        return None
    return bytes(got.value).decode(errors="replace")


async def fleet_status(address: EtcdAddress, tls: "EtcdTls | None") -> dict[str, Any]:
    """`graysteer status --fleet`: every live replica and the leader, from etcd, and each
    etcd member as this command reaches it."""
    probes = asyncio.gather(*(probe_member(address, member, tls) for member in address.members))
    async with EtcdClient(address, tls) as client:
        replicas, refused = await members(client, address)
        lead = await leader(client, address)
        rules = await client.get(address.rules_key)
    rules_version = config_version(bytes(rules.value)) if rules is not None else None
    report = fleet_report(address, rules_version, lead, replicas, refused, time.time())
    report["etcd_members"] = await probes
    return report


async def probe_member(address: EtcdAddress, member: EtcdMember, tls: "EtcdTls | None") -> dict[str, Any]:
    """One member's Maintenance.Status, within REQUEST_TIMEOUT_SECONDS: whether it answers,
    and whether it leads the etcd cluster (raft's leader, not the fleet's)."""
    client = EtcdClient(dataclasses.replace(address, members=(member,)), tls)
    try:
        await client.connect()
        status = await client.maintenancestub.Status(rpc.StatusRequest(), timeout=REQUEST_TIMEOUT_SECONDS)
        leads = status.leader != 0 and status.leader == status.header.member_id
        return {"member": str(member), "up": True, "etcd_leader": leads, "error": None}
    except ETCD_ERRORS as error:
        return {
            "member": str(member),
            "up": False,
            "etcd_leader": False,
            "error": failure_reason(error, member),
        }
    finally:
        await client.close()


def fleet_report(
    address: EtcdAddress,
    rules_version: str | None,
    lead: str | None,
    replicas: list[ReplicaRecord],
    refused: list[tuple[str, str]],
    now: float,
) -> dict[str, Any]:
    """What `status --fleet` shows, from etcd (the CLI) or a replica's last beat (the live page)."""
    return {
        "fleet": str(address),
        "rules_version": rules_version,
        "leader": lead,
        "replicas": [
            {
                "id": r.id,
                "version": r.version,
                "file_version": r.file_version,
                "ready": r.ready,
                "source_connected": r.source_connected,
                "leader": r.id == lead,
                "seen_seconds_ago": round(now - r.at, 1),
                "etcd_member": r.etcd_member,
                "etcd_down": list(r.etcd_down),
            }
            for r in replicas
        ],
        "refused_records": [{"key": key, "reason": why} for key, why in refused],
    }


def format_fleet(report: dict[str, Any]) -> str:
    lines = [f"fleet {report['fleet']}: rules version {report['rules_version']}, leader {report['leader']}"]
    for r in report["replicas"]:
        current = r["file_version"] == report["rules_version"]
        lines.append(
            f"  {r['id']}: serving {r['version']}{'' if current else ' (not the pushed version)'}"
            f"{' [leader]' if r['leader'] else ''}{'' if r['ready'] else ' [not ready]'}"
            f"{'' if r['source_connected'] else ' [etcd unreachable]'}, seen {r['seen_seconds_ago']} s ago"
            f"{_etcd_view(r)}"
        )
    if not report["replicas"]:
        lines.append("  no live replica")
    for m in report.get("etcd_members", []):
        state = ("up, the etcd leader" if m["etcd_leader"] else "up") if m["up"] else f"DOWN: {m['error']}"
        lines.append(f"  etcd member {m['member']}: {state}")
    for refused in report.get("refused_records", []):
        lines.append(f"  refused record {refused['key']}: {refused['reason']}")
    return "\n".join(lines) + "\n"


def _etcd_view(replica: dict[str, Any]) -> str:
    """ ", via etcd member M (down: A, B)" as the replica last saw its etcd members."""
    if not replica.get("etcd_member"):
        return ""
    down = replica.get("etcd_down") or []
    return f", via etcd member {replica['etcd_member']}" + (f" (down: {', '.join(down)})" if down else "")
