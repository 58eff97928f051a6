"""Requests Envoy sent on without a decision from the sidecar, read from Envoy's own counters.

Envoy fails open (`failure_mode_allow: true`): when the sidecar is away, has no healthy host,
is slower than `message_timeout`, fails the gRPC stream or answers out of turn, the request
goes on to the default route and the sidecar never hears of it. Envoy counts each such
request exactly once, in the filter's `failure_mode_allowed` counter:

- ext_proc (source/extensions/filters/http/ext_proc/ext_proc.cc): `onMessageTimeout` adds
  1 to `message_timeouts` and, failing open, 1 to `failure_mode_allowed`; `onGrpcError`
  (also called synchronously from `openStream` when the cluster has no healthy host) adds 1
  to `streams_failed` and, failing open, 1 to `failure_mode_allowed`, but returns early once
  processing is complete, so a stream that errors after its timeout is not counted twice;
  a spurious message, failing open, adds 1 to `failure_mode_allowed`. `message_timeouts`
  and `streams_failed` name causes, not more requests: only `failure_mode_allowed` is summed.
- ext_authz (ext_authz.cc, `onComplete`, `CheckStatus::Error`): `error` and, failing open,
  `failure_mode_allowed`. Envoy also charges `cluster.<upstream>.ext_authz.*` for the same
  request; only the `http.<stat_prefix>.ext_authz.*` copy is read here.

The ratio's denominator is `http.<stat_prefix>.downstream_rq_total` of each connection
manager that runs the filter. ext_proc's `streams_started` would miss exactly the requests
of interest: Envoy starts no stream when the sidecar cluster has no healthy host.

Counters are turned into increases between two reads the way Prometheus' `increase()` does:
the first read is the baseline, a counter that went down (or an Envoy whose `server.uptime`
went down) restarted from zero, and a series that appears counts in full.
"""

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import Metric

from sidecar.ops.metrics import Metrics

log = logging.getLogger("graysteer.bypass")


# Envoy stat names (not Prometheus names) the bypass count needs, for /stats?filter=.
STATS_FILTER = (
    r"^http\..*\.(ext_proc|ext_authz)\..*failure_mode_allowed$"
    r"|^http\..*\.downstream_rq_total$|^server\.uptime$"
)

# A filter's own stat_prefix lands inside the ext_proc name (…_ext_proc_<prefix>_…) and in a
# label for ext_authz (envoy_ext_authz_prefix); the parser appends _total to counters.
_BYPASSED = re.compile(r"envoy_http_(ext_proc|ext_authz)_(?:\w+_)?failure_mode_allowed(_total)?")
_REQUESTS = "envoy_http_downstream_rq_total"
_UPTIME = "envoy_server_uptime"
_HCM = "envoy_http_conn_manager_prefix"

Series = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and sorted labels


@dataclass(frozen=True)
class ModeCounts:
    """Cumulative counters of one filter at one moment."""

    bypassed: Mapping[Series, float]  # each failure_mode_allowed series
    requests: Mapping[str, float]  # downstream_rq_total per connection manager running the filter


@dataclass(frozen=True)
class EnvoyCounts:
    """What one read of Envoy's stats says about bypassed requests."""

    modes: Mapping[str, ModeCounts]
    uptime: float | None  # server.uptime (seconds): going down means Envoy restarted


def parse_counts(families: Iterable[Metric]) -> EnvoyCounts:
    """Envoy's Prometheus metric families -> bypass counters per mode."""
    bypassed: dict[str, dict[Series, float]] = {}
    hcms: dict[str, set[str]] = {}
    requests: dict[str, float] = {}
    uptime = None
    for family in families:
        for sample in family.samples:
            if sample.name == _UPTIME:
                uptime = sample.value
            elif sample.name == _REQUESTS and _HCM in sample.labels:
                requests[sample.labels[_HCM]] = sample.value
            elif (match := _BYPASSED.fullmatch(sample.name)) and _HCM in sample.labels:
                mode = match.group(1)
                series = (sample.name, tuple(sorted(sample.labels.items())))
                bypassed.setdefault(mode, {})[series] = sample.value
                hcms.setdefault(mode, set()).add(sample.labels[_HCM])
    return EnvoyCounts(
        {
            mode: ModeCounts(series, {h: requests.get(h, 0.0) for h in hcms[mode]})
            for mode, series in bypassed.items()
        },
        uptime,
    )


@dataclass(frozen=True)
class ModeWindow:
    """One filter's requests between two reads."""

    bypassed: float = 0.0
    requests: float = 0.0

    @property
    def ratio(self) -> float:
        """The share sent on without a decision; 0 without traffic. Both counters are read
        at once but bumped at different moments of a request, so the ratio is capped at 1."""
        return self.bypassed / max(self.requests, self.bypassed) if self.bypassed else 0.0

    def __add__(self, other: "ModeWindow") -> "ModeWindow":
        return ModeWindow(self.bypassed + other.bypassed, self.requests + other.requests)


@dataclass(frozen=True)
class Window:
    modes: Mapping[str, ModeWindow]
    restarted: bool = False  # Envoy restarted between the two reads


def _increase(old: Mapping[Any, float], new: Mapping[Any, float], restarted: bool) -> float:
    total = 0.0
    for key, value in new.items():
        before = old.get(key)
        total += value if restarted or before is None or value < before else value - before
    return total


def window(old: EnvoyCounts | None, new: EnvoyCounts) -> Window:
    """Bypassed and total requests per mode between two reads (the first read: none)."""
    if old is None:
        return Window({mode: ModeWindow() for mode in new.modes})
    restarted = old.uptime is not None and new.uptime is not None and new.uptime < old.uptime
    modes = {}
    for mode, counts in new.modes.items():
        before = old.modes.get(mode, ModeCounts({}, {}))
        modes[mode] = ModeWindow(
            _increase(before.bypassed, counts.bypassed, restarted),
            _increase(before.requests, counts.requests, restarted),
        )
    return Window(modes, restarted)


class BypassMonitor:
    """Turns each read of Envoy's stats into the bypass metrics, the status report and the
    ratio /readyz may act on. Fed by the Envoy stats poller (rollouts.EnvoyStats), off the
    request path."""

    def __init__(
        self, metrics: Metrics, envoy_admin: str, poll_seconds: float, ready_max_ratio: float | None = None
    ) -> None:
        self.metrics = metrics
        self.envoy_admin = envoy_admin
        self.poll_seconds = poll_seconds
        self.ready_max_ratio = ready_max_ratio
        self.last: EnvoyCounts | None = None
        self.window: Mapping[str, ModeWindow] = {}
        self.totals: dict[str, ModeWindow] = {}  # since this sidecar began reading
        self.readable = False
        self.error = "not read yet"
        self.read_at: float | None = None  # the last successful read (Unix time)
        self._episodes: dict[str, ModeWindow] = {}  # modes being bypassed now, for the log
        metrics.watch_envoy()

    def observe(self, now: float, families: Iterable[Metric] | None, error: str = "") -> None:
        """One read of Envoy's stats: its metric families, or None and why it failed."""
        if families is None:
            self.readable, self.error = False, error or "unreadable"
            self.metrics.show_envoy_stats_up(False)
            return
        counts = parse_counts(families)
        current = window(self.last, counts)
        if current.restarted:
            log.info("Envoy restarted (its uptime went down): counting its counters from zero")
        for mode, part in current.modes.items():
            self.totals[mode] = self.totals.get(mode, ModeWindow()) + part
            self.metrics.count_bypass(mode, part.bypassed, part.requests, part.ratio)
            self._log_episode(mode, part)
        self.last, self.window = counts, current.modes
        self.readable, self.error, self.read_at = True, "", now
        self.metrics.show_envoy_stats_up(True)

    def _log_episode(self, mode: str, part: ModeWindow) -> None:
        """One line when Envoy starts sending requests on without a decision, one when it
        stops (with the episode's count): not one per read."""
        episode = self._episodes.get(mode)
        if part.bypassed and episode is None:
            log.warning(
                "Envoy is sending requests on without a decision from the sidecar "
                "(%s failure_mode_allowed): %d of %d since the last read",
                mode,
                part.bypassed,
                part.requests,
            )
            self._episodes[mode] = part
        elif part.bypassed and episode is not None:
            self._episodes[mode] = episode + part
        elif episode is not None and part.requests:  # traffic again, all of it decided
            log.info(
                "Envoy asks the sidecar again (%s): %d of %d requests went on without a decision meanwhile",
                mode,
                episode.bypassed,
                episode.requests,
            )
            del self._episodes[mode]

    def readiness_ratio(self) -> float | None:
        """The highest bypass ratio of the last window; None when unknown (not readable)."""
        if not self.readable:
            return None
        return max((part.ratio for part in self.window.values()), default=0.0)

    def report(self) -> dict[str, Any]:
        """Everything `graysteer status` shows about bypassed requests."""
        return {
            "envoy_admin": self.envoy_admin,
            "poll_seconds": self.poll_seconds,
            "stats_readable": self.readable,
            "error": self.error,
            "last_read": self.read_at,
            "ready_max_ratio": self.ready_max_ratio,
            "modes": [
                {
                    "mode": mode,
                    "bypassed_requests": int(total.bypassed),
                    "requests": int(total.requests),
                    "window_bypassed": int(self.window.get(mode, ModeWindow()).bypassed),
                    "window_requests": int(self.window.get(mode, ModeWindow()).requests),
                    "window_ratio": self.window.get(mode, ModeWindow()).ratio,
                }
                for mode, total in sorted(self.totals.items())
            ],
        }
