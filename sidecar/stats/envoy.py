"""Reading one Envoy's admin statistics: one request per poll (`/stats/prometheus`, filtered
to what is used), off the event loop, fed to every observer: the clusters' history for the
rollout analysis, and the bypass count (sidecar.stats.bypass).

Envoy's own per-cluster statistics cost nothing per request, unlike reading every response
in the ext_proc response phase (a second gRPC message per request; see
benchmarks/README.md, scenario (c)).
"""

import asyncio
import contextlib
import http.client
import logging
import time
import urllib.parse
from collections.abc import Callable, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.stats.bypass import STATS_FILTER as BYPASS_STATS_FILTER
from sidecar.stats.clusters import ClusterHistory, cluster_counts

log = logging.getLogger("graysteer.stats")

# Envoy stat names read on each poll: each cluster's responses, and what bypass.py needs.
STATS_FILTER = r"cluster\..*\.upstream_rq_|" + BYPASS_STATS_FILTER

Observer = Callable[[float, "list[Metric] | None", str], None]


class EnvoyStats(ClusterHistory):
    """Polls one Envoy admin endpoint, keeps a bounded ring of its clusters' snapshots, and
    gives every read to its observers (each poll, whatever the rules say)."""

    def __init__(
        self,
        admin: tuple[str, int],
        keep_seconds: float,
        poll_seconds: float = 1.0,
        observers: Sequence[Observer] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(keep_seconds)
        self.admin = admin
        self.label = f"Envoy at {admin[0]}:{admin[1]}"
        self.poll_seconds = poll_seconds
        self.observers = tuple(observers)
        self.clock = clock
        self.readable: bool | None = None  # None before the first read
        self.error = ""

    def problem(self) -> str | None:
        if self.readable is False:
            return f"Envoy's stats at {self.admin[0]}:{self.admin[1]} cannot be read ({self.error})"
        return None

    def fetch(self) -> str:
        connection = http.client.HTTPConnection(*self.admin, timeout=2)
        try:
            connection.request("GET", "/stats/prometheus?filter=" + urllib.parse.quote(STATS_FILTER, safe=""))
            response = connection.getresponse()
            body = response.read().decode()
            if response.status != 200:
                raise OSError(f"HTTP {response.status} from /stats/prometheus: {body[:200]}")
            return body
        finally:
            connection.close()

    def read(self) -> list[Metric]:
        """Fetch and parse (blocking: run it in a thread)."""
        return list(text_string_to_metric_families(self.fetch()))

    async def poll(self, now: float) -> tuple[list[Metric] | None, str]:
        """One read, off the event loop: (families, "") and the clusters recorded, or (None, why).
        A failure is logged when reading stops working, not on every poll."""
        try:
            families = await asyncio.to_thread(self.read)
            self.record(now, cluster_counts(families))
        except (OSError, ValueError) as error:
            if self.readable is not False:
                log.warning("cannot read Envoy stats from %s:%d: %s", *self.admin, error)
            self.readable = False
            self.error = str(error) or type(error).__name__
            return None, self.error
        if self.readable is False:
            log.info("reading Envoy stats from %s:%d again", *self.admin)
        self.readable = True
        return families, ""

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every `poll_seconds` until `stop`, giving each read to every observer."""
        while not stop.is_set():
            now = self.clock()
            families, error = await self.poll(now)
            for observe in self.observers:
                try:
                    observe(now, families, error)
                except Exception:  # an observer's bug must not stop the polling
                    log.exception("an observer of Envoy's stats failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_seconds)
