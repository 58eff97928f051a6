"""The rules and the runtime state from etcd, kept in memory by a watch, cached on disk.

`EtcdSource` reads PREFIX/rules, PREFIX/rules.next (the shadow table's, when there is one)
and PREFIX/state once, then watches the three keys and asks the reloader to look again on
every change: a push, a `set-weight` or a rollout step made
through any replica reaches every replica within the watch's latency. The reloader reads
the values from memory (`rules` is a RulesSource, `state` a StateStore), so validation and
the keep-the-last-good-table rule are exactly those of a rules file: a corrupt or invalid
document in etcd is refused and counted, and the table served stays.

State writes are transactions that compare the key's revision with the one this replica
last read: two operators racing through two replicas cannot produce a state that neither
wrote (the loser gets StateConflict, and the watch brings the winner's state).

etcd unavailable: the served table stays; `connected` is false (metrics, /healthz,
`status`), state writes are refused, and the source reconnects with backoff (with the TLS
files as they are then: rotated client certificates are used), reads both keys again and
reloads. Every table served is also written to a local cache directory
(rules and state, atomically), so a replica restarted during an outage starts from it.
"""

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import aetcd

from sidecar.ops.metrics import Metrics
from sidecar.sources.etcd_client import ETCD_ERRORS, EtcdAddress, EtcdClient, EtcdTls, member_failed
from sidecar.sources.state_file import (
    MAX_STATE_BYTES,
    StateConflict,
    atomic_write,
    parse_state,
    present,
    state_bytes,
)
from sidecar.table.load import MAX_FILE_BYTES
from sidecar.table.reload import Loaded, Outcome, Reloader
from sidecar.tlsfiles import TlsReloads

log = logging.getLogger("graysteer.etcd")

START_TIMEOUT_SECONDS = 5.0
BACKOFF_SECONDS = (0.2, 0.5, 1.0)  # then every second


class _Value:
    """One key's latest value in memory, and its etcd mod revision (0: no such key)."""

    def __init__(self, label: str, limit: int) -> None:
        self.label = label
        self.name = label.rsplit("/", 1)[-1]  # the key under the prefix: rules, rules.next, state
        self.limit = limit
        self.value: bytes | None = None
        self.revision = 0
        self.seen = 0  # the last revision of the key read or delivered by a watch

    def set(self, value: bytes | None, revision: int) -> None:
        if revision >= self.revision or value is None:
            self.value, self.revision = value, revision


class EtcdRules(_Value):
    """The rules document in etcd, as a RulesSource."""

    def read(self) -> bytes:
        if self.value is None:
            raise FileNotFoundError(2, "no rules document in etcd (push one: graysteer push RULES URL)")
        if len(self.value) > self.limit:
            raise OSError(27, f"larger than {self.limit} bytes")
        return self.value


class EtcdState(_Value):
    """The runtime state in etcd, as a StateStore (compare-and-swap writes)."""

    def __init__(self, label: str, source: "EtcdSource") -> None:
        super().__init__(label, MAX_STATE_BYTES)
        self.source = source
        self.existed = False  # read or written by this replica: from then on, no key is removed

    def read_bytes(self) -> bytes:
        """b"" when there is no key; StateError when its value is empty, StateRemoved when the
        key is gone after this replica saw it (state_file.present); parse() refuses one over
        the limit."""
        raw = present(self.value, self.label, self.existed)
        self.existed = self.existed or bool(raw)
        return raw

    def parse(self, raw: bytes) -> dict[str, Any]:
        return parse_state(raw, self.label)

    def load(self) -> dict[str, Any]:
        return self.parse(self.read_bytes())

    async def save(self, state: dict[str, Any]) -> None:
        if not self.source.connected:
            raise OSError(
                f"etcd is unreachable ({self.source.address}): the state cannot change until it is back"
            )
        client = self.source.client
        key = self.source.address.state_key
        payload = state_bytes(state)
        read_at = self.revision
        try:
            succeeded, responses = await client.transaction(
                compare=[client.transactions.mod(key) == read_at],
                success=[client.transactions.put(key, payload)],
                failure=[client.transactions.get(key)],
            )
        except ETCD_ERRORS as error:
            raise OSError(f"etcd write failed: {error}") from error
        held = responses[0][0] if not succeeded and responses and responses[0] else None
        if held is not None and bytes(held[0]) == payload and held[1].mod_revision > read_at:
            # Our write, applied by a member whose answer was lost, then tried again on the
            # next member (EtcdClient): the key holds what we wrote, so it is done.
            self.set(payload, int(held[1].mod_revision))
            self.existed = True
            return
        if not succeeded:
            now = held[1].mod_revision if held is not None else 0
            raise StateConflict(
                f"the state in etcd changed (revision {now}) since this replica read it (revision "
                f"{read_at}), by another replica or operator: not applied; check and retry"
            )
        self.set(payload, int(responses[0].response_put.header.revision))
        self.existed = True

    async def restore(self, raw: bytes) -> bool:
        """Put `raw` (the state last read) back where the key was removed, only while there is
        no key (a replica that restored or wrote one first wins): True when written."""
        if not self.source.connected:
            return False
        client, key = self.source.client, self.source.address.state_key
        try:
            succeeded, responses = await client.transaction(
                compare=[client.transactions.create(key) == 0],
                success=[client.transactions.put(key, raw)],
                failure=[],
            )
        except ETCD_ERRORS as error:
            raise OSError(f"etcd write failed: {error}") from error
        if succeeded:
            self.set(raw, int(responses[0].response_put.header.revision))
        return bool(succeeded)


class EtcdSource:
    def __init__(
        self,
        address: EtcdAddress,
        tls: EtcdTls | None,
        cache_dir: Path,
        metrics: Metrics,
        reloads: TlsReloads | None = None,
    ) -> None:
        self.address = address
        self.metrics = metrics
        self.client = EtcdClient(address, tls, reloads)
        self.rules = EtcdRules(f"{address}/rules", MAX_FILE_BYTES)
        self.next_rules = EtcdRules(f"{address}/rules.next", MAX_FILE_BYTES)  # a shadow table
        self.state = EtcdState(f"{address}/state", self)
        self.cache_dir = cache_dir
        self.connected = False
        self.disconnected_since: float | None = time.time()
        self.from_cache = False
        self._revision = 0  # the store revision the values were read or last changed at
        self._reread = False  # read the keys again: the history since _revision was compacted
        self._watch_generation = 0  # the client's channel the watches run on
        self._failures = 0  # in a row, since the watches last ran
        self.watching = False  # the watches run: every change reaches this replica
        self.client.on_failover = metrics.etcd_failovers.inc

    # -- start: etcd, else the local cache -----------------------------------------------------

    async def start(self) -> None:
        """Read both keys from etcd; when it cannot be reached, from the local cache (an
        OSError names both when neither has rules)."""
        try:
            await asyncio.wait_for(self._read_all(), START_TIMEOUT_SECONDS)
            return
        except ETCD_ERRORS as error:
            reason = str(error) or type(error).__name__
        cached = self._read_cache()
        if cached is None:
            raise OSError(
                f"{self.address}: etcd unreachable ({reason}) and no local cache in {self.cache_dir}"
            )
        rules, state = cached
        self.rules.set(rules, 0)
        self.state.set(state or None, 0)  # the cache holds b"" for no state
        self.from_cache = True
        log.warning("etcd unreachable (%s): starting from the local cache in %s", reason, self.cache_dir)

    async def _read_all(self) -> None:
        """Both keys at one store revision (one range read), from which the watch goes on."""
        targets = self._targets()
        keys = [key for _, key in targets]
        found = await self.client.get_range(min(keys), max(keys) + b"\0")
        values = {bytes(kv.key): kv for kv in found.kvs if bytes(kv.key) in keys}
        for target, key in targets:
            kv = values.get(key)
            target.value = None if kv is None else bytes(kv.value)
            target.revision = 0 if kv is None else int(kv.mod_revision)
            if target.revision > target.seen:
                target.seen = target.revision
                self.metrics.etcd_changes.labels(target.name).inc()
        self._revision = int(found.header.revision)
        self._mark(True)

    def use_cache(self) -> bool:
        """Serve the cached rules and state instead of etcd's (which could not be served at
        start-up); False when there is no cache. Following etcd goes on: the next valid
        change wins."""
        cached = self._read_cache()
        if cached is None:
            return False
        self.rules.value, self.state.value = cached[0], cached[1] or None
        self.from_cache = True
        return True

    # -- follow: watch both keys, reconnect on failure ------------------------------------------

    async def follow(self, reloader: Reloader, stop: asyncio.Event) -> None:
        """Follow etcd until `stop`; reload on every change; keep the cache current."""
        cache = asyncio.create_task(self._keep_cache(reloader, stop))
        try:
            while not stop.is_set():
                try:
                    if self._revision == 0 or self._reread:
                        await self._read_all()
                        if self.from_cache:
                            log.info("etcd reachable: following %s", self.address)
                            self.from_cache = False
                        self._reread = False
                        await reloader.reload("etcd", force=True)
                    await self._follow(reloader, stop)
                except aetcd.RevisionCompactedError as error:
                    # The changes since the last revision seen are gone from etcd's history:
                    # read the keys as they are now (the latest value of each is what counts).
                    log.warning("etcd %s: %s; reading the keys again", self.address, error)
                    self._reread = True
                except ETCD_ERRORS as error:
                    await self._after_failure(error, stop)
        finally:
            cache.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cache

    async def _after_failure(self, error: BaseException, stop: asyncio.Event) -> None:
        """A watch ended or could not be made. A watch that was running moves at once to the
        next member (resumed from the last revision seen, so nothing is missed or seen
        twice); else etcd is unreachable: serve the last table, retry with backoff."""
        failures, self._failures = self._failures, self._failures + 1
        if failures == 0 and self.connected and member_failed(error):
            self.client.fail_over(self._watch_generation, error)
            return
        if self.connected:
            log.error("etcd at %s lost (%s): serving the last table; retrying", self.address, error)
        self._mark(False)
        if await self.client.renew():
            log.info("etcd TLS files changed: reconnecting to %s with them", self.address)
        delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)

    async def close(self) -> None:
        """Close the etcd client (after everything that uses it: the fleet shares it)."""
        with contextlib.suppress(Exception):
            await self.client.close()

    async def _follow(self, reloader: Reloader, stop: asyncio.Event) -> None:
        """Watch the keys from the revision after the last one seen, until `stop` or until a
        watch ends (raises)."""
        start = self._revision + 1
        watches: list[tuple[_Value, Any]] = []
        try:
            for target, key in self._targets():
                watches.append((target, await self.client.watch(key, start_revision=start)))
            self._watch_generation = self.client.generation
            if self._failures:
                log.info("etcd: following %s through member %s", self.address, self.client.member)
            self._failures = 0
            self._mark(True)
            self.watching = True
            await self._pump(watches, reloader, stop)
        finally:
            self.watching = False
            for _, watch in watches:
                with contextlib.suppress(Exception):
                    await watch.cancel()

    async def _pump(self, watches: list[tuple[_Value, Any]], reloader: Reloader, stop: asyncio.Event) -> None:
        changed = asyncio.Event()

        async def pump(target: _Value, watch: Any) -> None:
            async for event in watch:
                revision = int(event.kv.mod_revision)
                if revision <= target.seen:  # delivered before: never applied twice
                    self.metrics.etcd_changes_repeated.labels(target.name).inc()
                    continue
                target.seen = revision
                self.metrics.etcd_changes.labels(target.name).inc()
                value = None if event.kind == "DELETE" else bytes(event.kv.value)
                target.set(value, revision)
                self._revision = max(self._revision, revision)
                changed.set()

        pumps = [asyncio.create_task(pump(target, watch)) for target, watch in watches]
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                waiting = asyncio.create_task(changed.wait())
                done, _ = await asyncio.wait([waiting, stopping, *pumps], return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                for task in pumps:
                    if task in done:
                        task.result()  # the watch failed: raise to resume elsewhere
                        raise ConnectionError("etcd watch ended")
                if changed.is_set():
                    changed.clear()
                    await reloader.reload("etcd")
        finally:
            stopping.cancel()
            for task in pumps:
                task.cancel()

    def _targets(self) -> list[tuple[_Value, bytes]]:
        """The keys followed, each with where its latest value is kept."""
        return [
            (self.rules, self.address.rules_key),
            (self.next_rules, self.address.next_rules_key),
            (self.state, self.address.state_key),
        ]

    def _mark(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.disconnected_since = None if connected else time.time()
        self.metrics.source_connected.set(1 if connected else 0)

    def health(self) -> dict[str, object]:
        """For /healthz and `status`: whether changes can reach this replica, through which
        etcd member, and which members failed when last used."""
        return {
            "source": str(self.address),
            "connected": self.connected,
            "changes": "ready" if self.connected else "not ready: etcd unreachable, serving the last table",
            "disconnected_since": self.disconnected_since,
            "from_cache": self.from_cache,
            "etcd": self.client.members_report(),
        }

    # -- the local cache -----------------------------------------------------------------------

    async def _keep_cache(self, reloader: Reloader, stop: asyncio.Event) -> None:
        """Keep the cache at the table served: after every change, the inputs of the table
        that is served then (a refused change leaves it as it was; a subscriber sees only
        the newest change, so a load followed at once by a refusal is still written)."""
        queue = reloader.subscribe()
        written = None if self.from_cache else reloader.loaded  # started from etcd: cache it
        try:
            if written is not None:
                await asyncio.to_thread(self._write_cache, written)
            while not stop.is_set():
                served, result = await queue.get()
                if served is not written and result.trigger != "startup":
                    if result.outcome is Outcome.LOADED:
                        self.from_cache = False  # serving what etcd held
                    await asyncio.to_thread(self._write_cache, served)
                    written = served
        finally:
            reloader.unsubscribe(queue)

    def _write_cache(self, loaded: Loaded) -> None:
        """The rules and state a served table was built from (valid: they loaded)."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.cache_dir / "rules.yaml", loaded.rules_bytes)
            atomic_write(self.cache_dir / "state.json", loaded.state_bytes)
        except OSError as error:
            log.warning("cannot write the local cache in %s: %s", self.cache_dir, error)

    def _read_cache(self) -> tuple[bytes, bytes] | None:
        try:
            rules = (self.cache_dir / "rules.yaml").read_bytes()
        except OSError:
            return None
        try:
            state = (self.cache_dir / "state.json").read_bytes()
        except OSError:
            state = b""
        return rules, state


def default_cache_dir(address: EtcdAddress) -> Path:
    """~/.cache/graysteer/etcd/<host>_<port>[,<host>_<port>...]<prefix with / as _>."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    members = ",".join(f"{m.host}_{m.port}" for m in address.members)
    name = f"{members}{address.prefix}".replace("/", "_").replace(":", "_")
    return base / "graysteer" / "etcd" / name
