"""The admin API servicer (graysteer.admin.v1.Admin): status, explain, weights, changes."""

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import timestamp_pb2
from prometheus_client import CollectorRegistry

from sidecar.admin.api import admin_pb2 as pb
from sidecar.admin.api import admin_pb2_grpc as pb_grpc
from sidecar.core import Decision, decision_fields
from sidecar.core.overrides import split_weights
from sidecar.core.state import StateError
from sidecar.ops.metrics import Metrics
from sidecar.sources.state_file import StateConflict
from sidecar.table.decider import Decider
from sidecar.table.holder import TableHolder
from sidecar.table.reload import DrivenByRollout, Loaded, Reloader, ReloadResult
from sidecar.table.shadow import Shadow, shadow_of
from sidecar.transports.explain import Peer, headers_message
from sidecar.transports.ext_proc import ExtProcServicer

if TYPE_CHECKING:
    from sidecar.rollouts.controller import RolloutController
    from sidecar.stats.bypass import BypassMonitor
    from sidecar.stats.clusters import TrafficSource

# WatchTable streams one process serves at once. A watcher is an operator's terminal or a
# dashboard following one sidecar: 16 leaves room for every person and tool following one
# pod. Each costs a stream, a subscription holding one change, and a send of the whole
# table per change on the loop the transports share (about 0.08 ms each, measured with
# benchmarks/admin_watchers.py): 16 add a millisecond or two to a change, 1,000 would add
# close to 100 ms, and Envoy gives a check 250 ms.
MAX_WATCHERS = 16
# The span of the live traffic rates: long enough to smooth one-second reads, short enough
# that a step of a rollout shows within seconds.
TRAFFIC_SECONDS = 5.0

_OUTCOMES = {
    "loaded": pb.ReloadResult.LOADED,
    "unchanged": pb.ReloadResult.UNCHANGED,
    "invalid": pb.ReloadResult.INVALID,
    "missing": pb.ReloadResult.MISSING,
}


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _weights(weights: dict[str, int] | None) -> list[pb.WeightEntry]:
    return [pb.WeightEntry(cluster=c, weight=w) for c, w in (weights or {}).items()]


def reload_result(result: ReloadResult | None) -> pb.ReloadResult:
    if result is None:
        return pb.ReloadResult()
    return pb.ReloadResult(
        outcome=_OUTCOMES[result.outcome.value],
        trigger=result.trigger,
        error=result.error,
        version=result.version,
        at=_timestamp(result.at),
    )


def rollout_statuses(controller: "RolloutController | None") -> list[pb.RolloutStatus]:
    if controller is None:
        return []
    return [
        pb.RolloutStatus(
            rule=r["rule"],
            phase=r["phase"],
            step=r["step"],
            canary_weight=r["canary_weight"],
            reason=r["reason"],
            verdict=r["verdict"],
            report_json=json.dumps(r),
            waiting=(r.get("waiting") or {}).get("on", ""),
        )
        for r in controller.report()
    ]


def envoy_bypass(monitor: "BypassMonitor | None") -> pb.EnvoyBypass:
    """What this process knows of requests Envoy sent on without a decision."""
    if monitor is None:
        return pb.EnvoyBypass(watching=False)
    report = monitor.report()
    message = pb.EnvoyBypass(
        watching=True,
        envoy_admin=report["envoy_admin"],
        poll_seconds=report["poll_seconds"],
        stats_readable=report["stats_readable"],
        error=report["error"],
        modes=[pb.BypassCount(**mode) for mode in report["modes"]],
    )
    if report["last_read"] is not None:
        message.last_read.CopyFrom(_timestamp(report["last_read"]))
    if report["ready_max_ratio"] is not None:
        message.ready_max_ratio = report["ready_max_ratio"]
    return message


def traffic_message(source: "TrafficSource | None", now: float | None = None) -> pb.Traffic:
    """Each upstream cluster's responses per second over the last TRAFFIC_SECONDS."""
    if source is None:
        return pb.Traffic(watching=False)
    rates = source.cluster_rates(TRAFFIC_SECONDS, time.time() if now is None else now)
    return pb.Traffic(
        watching=True,
        source=source.label,
        problem=source.problem() or "",
        seconds=TRAFFIC_SECONDS,
        clusters=[
            pb.ClusterTraffic(
                cluster=cluster, requests_per_second=rate.requests_per_second, error_ratio=rate.error_ratio
            )
            for cluster, rate in sorted(rates.items())
        ],
    )


def table_status(
    reloader: Reloader,
    loaded: Loaded | None = None,
    controller: "RolloutController | None" = None,
    bypass: "BypassMonitor | None" = None,
    traffic: "TrafficSource | None" = None,
) -> pb.TableStatus:
    loaded = loaded or reloader.loaded
    table = loaded.table
    matches = {entry["name"]: entry.get("match") or {} for entry in table.document.get("rules") or []}  # type: ignore[attr-defined]
    rules = []
    for rule in table.rules:  # the compiled rules, as they decide
        info = pb.RuleInfo(name=rule.name, match_json=json.dumps(matches.get(rule.name, {}), sort_keys=True))
        if rule.split is not None:
            split = rule.split
            info.action = "split"
            info.weights.extend(_weights(dict(zip(split.clusters, split.weights, strict=True))))
            info.file_weights.extend(_weights(split_weights(loaded.document, rule.name)))
            info.weights_overridden = rule.name in loaded.overrides
            info.key_sources.extend(source for source, _ in split.keys)
            info.seed = split.seed
        elif rule.route is not None and rule.route.deny_status is not None:
            info.action = "deny"
            info.deny_status = rule.route.deny_status
            info.deny_reason = rule.route.deny_reason or ""
        elif rule.route is not None:
            info.action, info.route = "route", rule.route.cluster
        rules.append(info)
    return pb.TableStatus(
        version=table.version,
        file_version=loaded.file_version,
        source=table.source,
        clusters=list(table.clusters),
        default_cluster=table.default,
        routing_header=table.routing_header,
        rules=rules,
        last_reload=reload_result(reloader.last_result),
        loaded_at=_timestamp(loaded.loaded_at),
        state_file=reloader.state.label,
        reload_failures=reloader.failures,
        rollouts=rollout_statuses(controller),
        envoy_bypass=envoy_bypass(bypass),
        traffic=traffic_message(traffic),
        shadow=shadow_message(shadow_of(reloader)),
    )


def shadow_message(shadow: Shadow | None) -> pb.Shadow:
    if shadow is None:
        return pb.Shadow()
    status = shadow.status()
    return pb.Shadow(
        following=True,
        source=status.source,
        version=status.version,
        error=status.error,
        loaded_at=_timestamp(status.loaded_at) if status.loaded_at else None,
        live_version=status.live_version,
        requests=status.requests,
        differing=status.differing,
        seen=status.seen,
        sample_ratio=status.sample_ratio,
        decision_seconds=status.decision_seconds,
        budget_seconds=status.budget_seconds,
        moves=[
            pb.ShadowMove(rule=rule, cluster=cluster, shadow_cluster=other, requests=count)
            for rule, cluster, other, count in status.top
        ],
    )


class ActionRefused(Exception):
    """A rollout action refused: the gRPC status code and the message that say why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def decision_message(decision: Decision) -> pb.Decision:
    fields = pb.Decision.DESCRIPTOR.fields_by_name
    return pb.Decision(**{k: v for k, v in decision_fields(decision).items() if k in fields})


class AdminServicer(pb_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(
        self,
        reloader: Reloader,
        controller: "RolloutController | None" = None,
        bypass: "BypassMonitor | None" = None,
        traffic: "TrafficSource | None" = None,
    ) -> None:
        self.reloader = reloader
        self.controller = controller
        self.bypass = bypass
        self.traffic = traffic
        # The serving code path on the served table, with metrics of its own so that
        # explained requests are not counted as traffic.
        # draw_key None: a visitor's new key derived from the request, the same answer each time
        self.explainer = ExtProcServicer(
            Decider(reloader.holder, Metrics(CollectorRegistry()), draw_key=None)
        )
        self.shadow_table = TableHolder(reloader.table)  # the shadow table's, for each explain
        self.shadow_explainer = ExtProcServicer(
            Decider(self.shadow_table, Metrics(CollectorRegistry()), draw_key=None)
        )
        self._watchers = 0  # WatchTable streams open
        self._event: tuple[tuple[Loaded, ReloadResult], pb.TableEvent] | None = None  # the last change's

    async def GetTable(self, request: pb.GetTableRequest, context: Any) -> pb.TableStatus:
        return self.status()

    def status(self, loaded: Loaded | None = None) -> pb.TableStatus:
        """The table served (or `loaded`), with everything this process knows around it."""
        return table_status(self.reloader, loaded, self.controller, self.bypass, self.traffic)

    async def Explain(self, request: pb.ExplainRequest, context: Any) -> pb.ExplainResponse:
        return self.explain(request)

    def explain(self, request: pb.ExplainRequest) -> pb.ExplainResponse:
        """The decision for a described request, through the serving code path (the admin
        API's Explain and the live page's explain form)."""
        peer = Peer(
            request.uri_san,
            request.dns_san,
            request.listener_port if request.HasField("listener_port") else None,
        )
        message = headers_message(
            request.method or "GET",
            request.path or "/",
            [(h.name, h.value) for h in request.headers],
            [(c.name, c.value) for c in request.cookies],
            [(q.name, q.value) for q in request.query],
            peer,
        )
        response, decision = self.explainer.on_request_headers(message)
        mutation = response.request_headers.response.header_mutation
        explained = pb.ExplainResponse(
            decision=decision_message(decision),
            set_headers=[
                pb.Pair(name=h.header.key, value=h.header.raw_value.decode()) for h in mutation.set_headers
            ],
            remove_headers=list(mutation.remove_headers),
        )
        if decision.issued is not None:  # what the client's response gets besides the backend's
            explained.response_headers.add(name="set-cookie", value=decision.issued.set_cookie)
        shadow = shadow_of(self.reloader)
        if shadow is not None and shadow.engine is not None:
            self.shadow_table.engine = shadow.engine  # its own engine: built once, when it loaded
            explained.shadow.CopyFrom(decision_message(self.shadow_explainer.on_request_headers(message)[1]))
        return explained

    async def SetWeights(self, request: pb.SetWeightsRequest, context: Any) -> pb.TableStatus:
        try:
            loaded = await self.reloader.set_weights(request.rule, dict(request.weights))
        except DrivenByRollout as error:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"{error}{self._rollout_now(request.rule)}"
            )
        except StateError as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"weights not changed: {error}")
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except StateConflict as error:
            await context.abort(grpc.StatusCode.ABORTED, f"weights not changed: {error}")
        except OSError as error:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"weights not changed: cannot write the state to {self.reloader.state.label}: {error}",
            )
        return self.status(loaded)

    def _rollout_now(self, rule: str) -> str:
        """Where the rule's rollout is, for a refusal message."""
        found = [r for r in (self.controller.report() if self.controller else []) if r["rule"] == rule]
        if not found:
            return ""
        r = found[0]
        return f" (now {r['phase']}, step {r['step']}, canary weight {r['canary_weight']})"

    async def Rollout(self, request: pb.RolloutRequest, context: Any) -> pb.RolloutStatus:
        try:
            return await self.act(request.rule, request.action)
        except ActionRefused as refused:
            await context.abort(refused.code, refused.message)
            raise  # abort raises; never reached

    async def act(self, rule: str, action: str) -> pb.RolloutStatus:
        """promote / pause / resume / abort a rule's rollout through the controller (the admin
        API's Rollout and the live page's buttons); ActionRefused says why not."""
        if self.controller is None:
            raise ActionRefused(grpc.StatusCode.FAILED_PRECONDITION, "no rollout controller here")
        try:
            await self.controller.action(rule, action)
        except StateError as error:
            raise ActionRefused(
                grpc.StatusCode.FAILED_PRECONDITION, f"rollout not changed: {error}"
            ) from None
        except ValueError as error:
            raise ActionRefused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        except StateConflict as error:
            raise ActionRefused(grpc.StatusCode.ABORTED, f"rollout not changed: {error}") from None
        except OSError as error:
            raise ActionRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"rollout not changed: cannot write the state to {self.reloader.state.label}: {error}",
            ) from None
        (status,) = [s for s in rollout_statuses(self.controller) if s.rule == rule]
        return status

    async def WatchTable(self, request: pb.WatchTableRequest, context: Any) -> AsyncIterator[pb.TableEvent]:
        """The current table, then the newest change each time one happened since the last
        message was sent: a watcher that reads slowly skips to the newest table, never
        queues a backlog."""
        if self._watchers >= MAX_WATCHERS:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_WATCHERS} WatchTable streams are open on this process, the most it serves: "
                "close one, or poll GetTable",
            )
        self._watchers += 1
        gauge = self.reloader.metrics.admin_watchers
        gauge.inc()
        queue = self.reloader.subscribe()
        try:
            yield pb.TableEvent(
                table=self.status(),
                result=reload_result(self.reloader.last_result),
            )
            while True:
                yield self._table_event(await queue.get())
        finally:
            self.reloader.unsubscribe(queue)
            self._watchers -= 1
            gauge.dec()

    def _table_event(self, change: tuple[Loaded, ReloadResult]) -> pb.TableEvent:
        """The event of a change, built once however many watchers send it: the whole table's
        status is the costly part, and building it on the serving loop once per watcher
        would stall every transport for as long as all of them take."""
        if self._event is None or self._event[0] is not change:
            loaded, result = change
            event = pb.TableEvent(
                table=self.status(loaded),
                result=reload_result(result),
            )
            self._event = (change, event)
        return self._event[1]
