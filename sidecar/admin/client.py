"""CLI side of the admin API: `graysteer status`, `set-weight`, `explain --admin`."""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from sidecar.admin.api import admin_pb2 as pb
from sidecar.admin.api import admin_pb2_grpc as pb_grpc
from sidecar.admin.security import ClientAuth
from sidecar.core.model import DECISION_FIELDS
from sidecar.ops import view, view_rollout

if TYPE_CHECKING:
    from sidecar.transports.explain import Peer

TIMEOUT_SECONDS = 10


class AdminError(Exception):
    """The admin API refused a call or could not be reached; the message says which."""


NO_AUTH = ClientAuth()


def _call(address: str, method: str, request: Any, auth: ClientAuth) -> Any:
    with auth.channel(address) as channel:
        stub = pb_grpc.AdminStub(channel)
        try:
            return getattr(stub, method)(request, timeout=TIMEOUT_SECONDS, metadata=auth.metadata())
        except grpc.RpcError as error:
            raise admin_error(address, error) from None


def admin_error(address: str, error: grpc.RpcError) -> AdminError:
    """What a failed call says, as one line."""
    code = error.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return AdminError(f"admin API at {address} is not reachable ({code.name}: {error.details()})")
    return AdminError(f"{error.details()} ({code.name})")


class StatusReader:
    """Reads a sidecar's status again and again over one channel (`status --watch`), each
    read bounded by `timeout` so that a screen never waits long on a sidecar that hangs."""

    def __init__(self, address: str, auth: ClientAuth = NO_AUTH, timeout: float = 3.0) -> None:
        self.address, self.auth, self.timeout = address, auth, timeout
        self.channel = auth.channel(address)
        self.stub = pb_grpc.AdminStub(self.channel)

    def read(self) -> dict[str, Any]:
        try:
            return as_dict(
                self.stub.GetTable(pb.GetTableRequest(), timeout=self.timeout, metadata=self.auth.metadata())
            )
        except grpc.RpcError as error:
            raise admin_error(self.address, error) from None

    def close(self) -> None:
        self.channel.close()


def as_dict(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


def status(address: str, auth: ClientAuth = NO_AUTH) -> dict[str, Any]:
    return as_dict(_call(address, "GetTable", pb.GetTableRequest(), auth))


def rollout(address: str, rule: str, action: str, auth: ClientAuth = NO_AUTH) -> dict[str, Any]:
    return as_dict(_call(address, "Rollout", pb.RolloutRequest(rule=rule, action=action), auth))


def set_weights(
    address: str, rule: str, weights: dict[str, int], auth: ClientAuth = NO_AUTH
) -> dict[str, Any]:
    return as_dict(_call(address, "SetWeights", pb.SetWeightsRequest(rule=rule, weights=weights), auth))


def explain(
    address: str,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    cookies: Sequence[tuple[str, str]],
    params: Sequence[tuple[str, str]],
    peer: "Peer",
    auth: ClientAuth = NO_AUTH,
) -> dict[str, Any]:
    def pairs(items: Sequence[tuple[str, str]]) -> list[pb.Pair]:
        return [pb.Pair(name=n, value=v) for n, v in items]

    request = pb.ExplainRequest(
        method=method,
        path=path,
        headers=pairs(headers),
        cookies=pairs(cookies),
        query=pairs(params),
        uri_san=peer.uri_san,
        dns_san=peer.dns_san,
    )
    if peer.listener_port is not None:
        request.listener_port = peer.listener_port
    return explain_result(_call(address, "Explain", request, auth), f"admin {address}")


def explain_result(response: pb.ExplainResponse, source: str) -> dict[str, Any]:
    """What `graysteer explain` prints for an Explain answer (the live page shows the same)."""
    return {
        **_decision(response.decision),  # the fields decision_fields() sent
        "set_headers": {p.name: p.value for p in response.set_headers},
        "remove_headers": list(response.remove_headers),
        # as local `explain`: only when the client's response gets headers (an issued cookie)
        **(
            {"response_headers": {p.name: p.value for p in response.response_headers}}
            if response.response_headers
            else {}
        ),
        "source": source,
        **({"shadow": _decision(response.shadow)} if response.HasField("shadow") else {}),
    }


def _decision(message: pb.Decision) -> dict[str, Any]:
    decided = json_format.MessageToDict(message, preserving_proto_field_name=True)
    if "bucket" in decided:  # proto3 JSON writes 64-bit integers as strings
        decided["bucket"] = int(decided["bucket"])
    return {name: decided.get(name) for name in DECISION_FIELDS}


def format_status(table: dict[str, Any]) -> str:
    """A human-readable status report."""
    last = table.get("last_reload") or {}
    lines = [
        f"rules:    {table['source']}",
        f"version:  {table['version']} (file {table['file_version']})",
        f"loaded:   {table.get('loaded_at', '?')}",
        f"last reload: {str(last.get('outcome', '?')).lower()} ({last.get('trigger', '?')}) at "
        f"{last.get('at', '?')}; failed reloads so far: {table.get('reload_failures', 0)}",
    ]
    if last.get("error"):
        lines.append("last error:")
        lines.extend(f"  {line}" for line in last["error"].splitlines())
    lines.append(f"default:  {table['default_cluster']}   clusters: {', '.join(table['clusters'])}")
    lines.append(f"state file: {table['state_file']}")
    lines.extend(format_bypass(table.get("envoy_bypass")))
    shadow = view.shadow_view(table.get("shadow") or {})
    if shadow is not None:
        lines.append(f"shadow table: {shadow['note']}")
        lines.extend(f"  {move['shown']}" for move in shadow["moves"])
    for rollout in table.get("rollouts") or []:
        lines.append(
            f"rollout {rollout['rule']}: {rollout['phase']}, step {rollout['step']}, "
            f"canary weight {rollout['canary_weight']}; analysis {rollout['verdict']}; "
            f"{rollout['reason']}"
        )
        report = view_rollout.report_of(rollout)
        lines.extend(f"  {wait}" for wait in view_rollout.waits_view(report))
        lines.extend(f"  {metric['line']}" for metric in view_rollout.metrics_view(report))
    lines.append("rules:")
    for rule in table["rules"]:
        if rule["action"] == "route":
            lines.append(f"  {rule['name']:<24} route -> {rule['route']}")
        elif rule["action"] == "deny":
            lines.append(f"  {rule['name']:<24} deny {rule['deny_status']}: {rule['deny_reason']}")
        else:
            weights = " ".join(f"{w['cluster']}={w['weight']}" for w in rule["weights"])
            note = ""
            if rule["weights_overridden"]:
                file_weights = " ".join(f"{w['cluster']}={w['weight']}" for w in rule["file_weights"])
                note = f"   (runtime override; file says {file_weights})"
            lines.append(f"  {rule['name']:<24} split {weights}{note}")
    return "\n".join(lines)


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if part else "0%"


def format_bypass(bypass: dict[str, Any] | None) -> list[str]:
    """Requests Envoy sent on without a decision, as `graysteer status` lines."""
    if not bypass or not bypass.get("watching"):
        return [
            "envoy bypass: not read by this process (serve --envoy-admin HOST:PORT; with "
            "--workers, worker 0 reads it)"
        ]
    head = (
        f"envoy bypass: reading Envoy's stats at {bypass['envoy_admin']} every {bypass['poll_seconds']:g}s; "
    )
    head += (
        f"last read {bypass.get('last_read', '?')}"
        if bypass["stats_readable"]
        else f"CANNOT READ THEM: {bypass['error']}"
    )
    lines = [head]
    limit = bypass.get("ready_max_ratio")
    for mode in bypass.get("modes") or []:
        # uint64 fields arrive as strings in proto3 JSON. Envoy counts a request when it
        # arrives and bypasses it up to message_timeout later, so a read can fall in between:
        # the requests shown are at least the bypassed ones.
        total, recent = int(mode["bypassed_requests"]), int(mode["window_bypassed"])
        requests = max(int(mode["requests"]), total)
        recent_requests = max(int(mode["window_requests"]), recent)
        lines.append(
            f"  {mode['mode']}: {total} of {requests} requests sent on without a decision "
            f"({_share(total, requests)}) since the sidecar began reading; last window "
            f"{recent} of {recent_requests} ({_share(recent, recent_requests)})"
            + (f"; /readyz limit {limit:.1%}" if limit is not None else "")
        )
    if bypass["stats_readable"] and not bypass.get("modes"):
        lines.append("  no ext_proc or ext_authz filter in Envoy's stats")
    return lines
