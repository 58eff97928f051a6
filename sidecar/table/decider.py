"""Deciding a request safely: the current table (sidecar.table.holder), the fallback on
failure, the counting, the time each transport spends, and the decision log.

Shared by every transport (ext_proc, ext_authz over gRPC and HTTP, explain) so that they all
take the same path.
"""

import logging
import secrets
from collections.abc import Callable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING

from sidecar.core import Decision, ErrorCode, Request, Steering, Table
from sidecar.core.cookies import KEY_BYTES
from sidecar.core.steering import fallback
from sidecar.ops.metrics import Metrics
from sidecar.table.holder import TableHolder

if TYPE_CHECKING:
    from sidecar.ops.decision_log import DecisionLog
    from sidecar.table.shadow import Shadow

log = logging.getLogger("graysteer.decide")


def fresh_key() -> str:
    """A new visitor key (sidecar.core.cookies): 128 random bits, URL-safe base64."""
    return secrets.token_urlsafe(KEY_BYTES)


class Decider:
    """Decides requests against the current table; never raises."""

    def __init__(
        self,
        holder: TableHolder,
        metrics: Metrics,
        log: "DecisionLog | None" = None,
        shadow: "Shadow | None" = None,
        draw_key: Callable[[], str] | None = fresh_key,
    ) -> None:
        self.holder = holder
        # new visitor keys: random; None (explain) derives them from the request, the same each time
        self.draw_key = draw_key
        self.metrics = metrics
        self.log = log  # serve --decision-log: sampled decisions, written off the serving path
        self.shadow = shadow  # --shadow-config or rules.next: the next rules, decided beside
        self._logged_reasons: set[str] = set()

    def steer_input(
        self,
        transport: str,
        read_headers: Callable[[], dict[str, str]],
        build: Callable[[dict[str, str]], Request],
    ) -> Steering:
        """Every transport's one way in: the current table read once, the headers read from
        the transport's message, the request built from them, then steered; the time it took
        counted for `transport` (graysteer_request_duration_seconds), the decision offered to
        the decision log. A failure while reading or building is an adapter error, answered
        with the fallback (the untrusted headers still removed when the headers could be
        read): never an exception."""
        started = perf_counter()
        engine = self.holder.engine  # the current table, read once
        headers = None
        try:
            headers = read_headers()
            request = build(headers)
            request.draw_key = self.draw_key
        except Exception as error:  # a malformed message: answer as for an untrusted caller
            steering = self.fallback(engine.table, ErrorCode.ADAPTER, error, headers)
            self.metrics.observe_request(transport, perf_counter() - started)
            return steering
        deciding = perf_counter()
        try:
            steering = engine.steer(request)
        except Exception as error:  # a bug or input the engine cannot handle: fail to default
            steering = self.fallback(engine.table, ErrorCode.ENGINE, error, request.headers)
        decided = perf_counter()
        if self.shadow is not None or self.log is not None:
            differing = self.shadow_decision(request, steering.decision)
            if self.log is not None:
                self.log.offer(transport, request, steering, engine.table, differing)
            finished = perf_counter()
        else:
            finished = decided
        # once per request of every transport: the decision and the transport's time in one call
        self.metrics.count_request(transport, steering, decided - deciding, finished - started)
        return steering

    def shadow_decision(self, request: Request, live: Decision) -> Decision | None:
        """Decide `request` with the shadow table too, when there is one and the request is in
        its sample, and count the pair;
        the shadow decision when it differs from `live`, else None. Never raises: a shadow
        table that cannot decide a request is counted, and the request served as decided."""
        shadow = self.shadow
        if shadow is None or (engine := shadow.engine) is None or not shadow.take():
            return None  # no shadow, or this request is not in its sample
        started = perf_counter()
        issued = live.issued
        if issued is not None:  # the shadow table buckets the visitor by the key issued live
            request.draw_key = lambda: issued.key
        try:
            decision = engine.steer(request).decision
        except Exception:
            self.metrics.count_event("shadow_failed")
            return None
        return decision if shadow.record(live, decision, perf_counter() - started) else None

    def fallback(
        self, table: Table, code: ErrorCode, error: BaseException, headers: Mapping[str, str] | None
    ) -> Steering:
        """The one answer to a request that could not be decided, for every transport (see
        core `fallback`): counted and logged, the caller treated as untrusted."""
        return fallback(table, self.failed(table, code, error), headers)

    def failed(self, table: Table, code: ErrorCode, error: BaseException) -> Decision:
        """Count a failure by its code; log it with its traceback the first time each kind
        (code and exception class) is seen."""
        self.metrics.count_error(code)
        kind = f"{code}:{type(error).__name__}"
        if kind not in self._logged_reasons:
            self._logged_reasons.add(kind)
            log.error(
                "deciding failed (%s, %s); routing to default %r; later failures of this "
                "kind are only counted",
                code,
                type(error).__name__,
                table.default,
                exc_info=error,
            )
        return table.fallback(code)
