"""One service's replicas as a fleet, through etcd: who they are, who leads, what they see.

Every replica holds an etcd lease (LEASE_TTL_SECONDS, refreshed every PUBLISH_SECONDS) and
publishes under it, at PREFIX/replicas/<id>, its record: the version it serves, whether it
follows etcd, and the cumulative responses per lane its own Envoy reports. A replica that
dies stops refreshing; etcd deletes its record with the lease.

Leader election: the first replica to create PREFIX/leader (a transaction that succeeds
only while the key does not exist) bound to its lease leads. Only the leader's rollout
controller advances or aborts; it judges the fleet's traffic: every replica's published
lane counts, each turned into a window on its own and summed (`FleetLanes`). When the leader
dies, its lease expires, the key goes with it, and another replica wins the next campaign
(within LEASE_TTL_SECONDS + PUBLISH_SECONDS); it continues from the stored rollout state,
never restarting the rollout. A leader that cannot refresh its lease stops leading at the
moment its lease could have expired, measured from before its last refresh was sent, so
two replicas never lead at once.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from sidecar.core.rollout import LaneWindow
from sidecar.runtime.etcd import ETCD_ERRORS, EtcdAddress, EtcdClient, EtcdTls
from sidecar.runtime.load import config_version
from sidecar.runtime.metrics import Metrics
from sidecar.runtime.rollouts import LaneCounts, LaneHistory, as_window

log = logging.getLogger("graysteer.fleet")

LEASE_TTL_SECONDS = 3
PUBLISH_SECONDS = 1.0


def lanes_to_json(lanes: dict[str, LaneCounts]) -> dict[str, Any]:
    return {
        cluster: {
            "requests": c.requests,
            "errors": c.errors,
            "bounds": list(c.bounds),
            "buckets": list(c.buckets),
        }
        for cluster, c in lanes.items()
    }


def lanes_from_json(data: Any) -> dict[str, LaneCounts]:
    """A replica's published lanes; anything malformed is left out (a replica of another
    version must not break the leader's analysis)."""
    lanes: dict[str, LaneCounts] = {}
    for cluster, c in (data or {}).items() if isinstance(data, dict) else ():
        try:
            bounds = tuple(float(b) for b in c["bounds"])
            buckets = tuple(float(b) for b in c["buckets"])
            if len(bounds) == len(buckets):
                lanes[str(cluster)] = LaneCounts(float(c["requests"]), float(c["errors"]), bounds, buckets)
        except (KeyError, TypeError, ValueError):
            continue
    return lanes


class FleetLanes:
    """Every replica's lane snapshots; a lane's window is the sum of each replica's own."""

    def __init__(self, keep_seconds: float = 600.0) -> None:
        self.keep_seconds = keep_seconds
        self.replicas: dict[str, LaneHistory] = {}
        self._last_at: dict[str, float] = {}

    def record(self, replica: str, at: float, lanes: dict[str, LaneCounts]) -> None:
        if self._last_at.get(replica) == at:
            return  # not republished since the last read
        self._last_at[replica] = at
        self.replicas.setdefault(replica, LaneHistory(self.keep_seconds)).record(at, lanes)

    def forget_except(self, replicas: set[str], now: float) -> None:
        """Drop replicas gone for longer than the longest window (their traffic no longer counts)."""
        for replica in list(self.replicas):
            history = self.replicas[replica]
            if replica not in replicas and (
                not history.snapshots or now - history.snapshots[-1][0] > self.keep_seconds
            ):
                del self.replicas[replica]
                self._last_at.pop(replica, None)

    def lane_window(self, lane: str, seconds: float, now: float) -> LaneWindow:
        total: LaneCounts | None = None
        for history in self.replicas.values():
            part = history.lane_delta(lane, seconds, now)
            if part is None:
                continue
            if total is None:
                total = part
            elif part.bounds == total.bounds:
                total = LaneCounts(
                    total.requests + part.requests,
                    total.errors + part.errors,
                    total.bounds,
                    tuple(a + b for a, b in zip(total.buckets, part.buckets, strict=True)),
                )
            else:  # another histogram layout: its counts count, its latencies cannot be merged
                total = LaneCounts(
                    total.requests + part.requests, total.errors + part.errors, total.bounds, total.buckets
                )
        return as_window(total)


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
        self.lanes = FleetLanes()
        self._leading = False
        self._lease_deadline = 0.0  # monotonic: our lease may have expired after this
        self._poked = asyncio.Event()

    def poke(self) -> None:
        """Publish the record now (the served table changed), not at the next beat."""
        self._poked.set()

    def leads(self) -> bool:
        return self._leading and time.monotonic() < self._lease_deadline

    async def run(self, stop: asyncio.Event, record: Callable[[], dict[str, Any]]) -> None:
        """Hold a lease, publish `record()` under it, campaign, and (leading) gather every
        replica's lanes, every `every` seconds until `stop`; then give up the lease."""
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
                info = {**record(), "id": self.replica_id, "leader": self.leads(), "at": time.time()}
                await self.client.put(
                    self.address.key(f"replicas/{self.replica_id}"), json.dumps(info).encode(), lease=lease
                )
                await self._campaign(lease)
                if self.leads():
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
        self._set_leading(won or (held is not None and bytes(held.value) == me and held.lease == lease.id))

    def _set_leading(self, leading: bool) -> None:
        if leading and not self._leading:
            log.info("replica %s leads the fleet's rollouts", self.replica_id)
        self._leading = leading
        self.metrics.fleet_leader.set(1 if leading else 0)

    async def _gather(self) -> None:
        now = time.time()
        seen = set()
        for replica in await members(self.client, self.address):
            name = str(replica.get("id", ""))
            seen.add(name)
            at = replica.get("at")
            if name and isinstance(at, int | float):
                self.lanes.record(name, float(at), lanes_from_json(replica.get("lanes")))
        self.lanes.forget_except(seen, now)


async def members(client: EtcdClient, address: EtcdAddress) -> list[dict[str, Any]]:
    """Every live replica's record (a malformed one is skipped), by id."""
    found = await client.get_prefix(address.replicas_prefix)
    out = []
    for kv in found.kvs:
        try:
            record = json.loads(kv.value)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return sorted(out, key=lambda r: str(r.get("id", "")))


async def leader(client: EtcdClient, address: EtcdAddress) -> str | None:
    got = await client.get(address.leader_key)
    return None if got is None else bytes(got.value).decode(errors="replace")


async def fleet_status(address: EtcdAddress, tls: "EtcdTls | None") -> dict[str, Any]:
    """`graysteer status --fleet`: every live replica and the leader, from etcd."""
    async with EtcdClient(address, tls) as client:
        replicas = await members(client, address)
        lead = await leader(client, address)
        rules = await client.get(address.rules_key)
    now = time.time()
    return {
        "fleet": str(address),
        "rules_version": config_version(bytes(rules.value)) if rules is not None else None,
        "leader": lead,
        "replicas": [
            {
                "id": r.get("id"),
                "version": r.get("version"),
                "file_version": r.get("file_version"),
                "ready": r.get("ready"),
                "source_connected": r.get("source_connected"),
                "leader": r.get("id") == lead,
                "seen_seconds_ago": round(now - r["at"], 1) if isinstance(r.get("at"), int | float) else None,
            }
            for r in replicas
        ],
    }


def format_fleet(report: dict[str, Any]) -> str:
    lines = [f"fleet {report['fleet']}: rules version {report['rules_version']}, leader {report['leader']}"]
    for r in report["replicas"]:
        current = r["file_version"] == report["rules_version"]
        lines.append(
            f"  {r['id']}: serving {r['version']}{'' if current else ' (not the pushed version)'}"
            f"{' [leader]' if r['leader'] else ''}{'' if r['ready'] else ' [not ready]'}"
            f"{'' if r['source_connected'] else ' [etcd unreachable]'}, seen {r['seen_seconds_ago']} s ago"
        )
    if not report["replicas"]:
        lines.append("  no live replica")
    return "\n".join(lines) + "\n"
