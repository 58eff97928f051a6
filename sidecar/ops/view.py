"""The live view of a sidecar (and of its fleet), the one model every live screen draws:
`graysteer status --watch` in a terminal and the operator endpoint's /ui/ page.

A pure function from what the sidecar already reports (the admin API's TableStatus as JSON,
with each rollout's report; `status --fleet`'s replica list) to what is shown, texts
included: both screens place the same strings, so they cannot disagree. No I/O.

A rollout's phase and reason are shown as they come, its waits (an approval, its webhook
gates with their last answers, a ramp-down's progress) each on a line ("waits"), and any
field a report carries that this module does not know is listed under its rollout
("details"): a new kind of report field shows without a change here.
"""

import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

# The rollout report's fields drawn on their own; any other field is a detail.
_REPORT_FIELDS = {
    "rule",
    "phase",
    "step",
    "steps",
    "canary",
    "baseline",
    "canary_weight",
    "total_weight",
    "hold_remaining_seconds",
    "reason",
    "numbers",
    "verdict",
    "verdict_reason",
    "state_problem",
    "analysis",
    "step_plan",
    "waiting",
    "approval_needed",
    "approved_step",
    "gates",
    "on_failure",
    "ramp",
}
DONE, CURRENT, PENDING = "done", "current", "pending"  # a step's place in its rollout
OK, OVER, NO_DATA, NO_LIMIT = "ok", "over", "no data", "no limit"  # a value against its limit
BAR_WIDTH = 20


def build(
    status: Mapping[str, Any] | None,
    fleet: Mapping[str, Any] | None = None,
    problems: Sequence[str] = (),
    now: float = 0.0,
) -> dict[str, Any]:
    """The view: the sidecar's table, splits, rollouts, traffic and bypass (from `status`,
    None when it could not be read: `problems` say why), and the fleet's replicas."""
    view: dict[str, Any] = {
        "at": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "problems": list(problems),
        "table": None,
        "splits": [],
        "rollouts": [],
        "traffic": None,
        "bypass": None,
        "fleet": fleet_view(fleet) if fleet is not None else None,
    }
    if status is None:
        return view
    rollouts = [report_of(r) for r in status.get("rollouts") or []]
    driven = {r["rule"] for r in rollouts}
    view["table"] = table_view(status)
    view["splits"] = [split_view(rule, rule["name"] in driven) for rule in status.get("rules") or []]
    view["splits"] = [s for s in view["splits"] if s is not None]
    view["rollouts"] = [rollout_view(r) for r in rollouts]
    view["traffic"] = traffic_view(status.get("traffic") or {}, status.get("clusters") or [])
    view["bypass"] = bypass_view(status.get("envoy_bypass") or {})
    return view


def report_of(status: Mapping[str, Any]) -> dict[str, Any]:
    """A rollout's full report (its report_json), or the fields of its status message."""
    text = status.get("report_json")
    if text:
        report: dict[str, Any] = json.loads(text)
        return report
    return dict(status)


def table_view(status: Mapping[str, Any]) -> dict[str, Any]:
    last = status.get("last_reload") or {}
    outcome = str(last.get("outcome", "")).lower() or "?"
    return {
        "version": status.get("version", ""),
        "source": status.get("source", ""),
        "default_cluster": status.get("default_cluster", ""),
        "clusters": list(status.get("clusters") or []),
        "last_reload": f"{outcome} ({last.get('trigger', '?')}) at {_time(last.get('at'))}",
        "reload_error": last.get("error") or "",
        "reload_failures": int(status.get("reload_failures") or 0),
    }


def _time(stamp: object) -> str:
    """An RFC 3339 time from proto3 JSON, to the second ("2026-01-02T03:04:05.678Z" ->
    "2026-01-02 03:04:05Z")."""
    if not isinstance(stamp, str) or "T" not in stamp:
        return "?"
    return stamp.replace("T", " ").partition(".")[0].removesuffix("Z") + "Z"


def bar(share: float, width: int = BAR_WIDTH) -> str:
    """A share as a bar of `width` cells: full blocks, then light shade."""
    filled = round(max(0.0, min(1.0, share)) * width)
    return "█" * filled + "░" * (width - filled)


def split_view(rule: Mapping[str, Any], rollout: bool) -> dict[str, Any] | None:
    if rule.get("action") != "split":
        return None
    weights = [(w["cluster"], int(w.get("weight") or 0)) for w in rule.get("weights") or []]
    total = sum(w for _, w in weights)
    file_weights = " ".join(f"{w['cluster']}={w.get('weight', 0)}" for w in rule.get("file_weights") or [])
    return {
        "rule": rule["name"],
        "rollout": rollout,
        "note": (
            "set by its rollout"
            if rollout
            else (f"runtime override (file: {file_weights})" if rule.get("weights_overridden") else "")
        ),
        "clusters": [
            {
                "cluster": cluster,
                "weight": weight,
                "share": weight / total if total else 0.0,
                "shown": f"{weight} ({weight / total:.0%})" if total else str(weight),
                "bar": bar(weight / total if total else 0.0),
            }
            for cluster, weight in weights
        ],
    }


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if value >= 10 or value == int(value) else f"{value:.1f}s"


def steps_view(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each step: done, the current one (with the time left in its hold), or to come."""
    plan = report.get("step_plan") or []
    at, phase = int(report.get("step", 0)), report.get("phase", "")
    out = []
    for index, step in enumerate(plan):
        place = DONE if index < at or phase == "promoted" else CURRENT if index == at else PENDING
        hold = float(step.get("hold_seconds") or 0)
        left = report.get("hold_remaining_seconds") if place == CURRENT else None
        waiting = (report.get("waiting") or {}).get("on")
        if place == DONE:
            note = "done"
        elif place == CURRENT and waiting:
            note = f"waiting for {waiting}"
        elif place == CURRENT:
            note = phase if left is None else f"{_seconds(float(left))} left of {_seconds(hold)}"
        else:
            note = f"hold {_seconds(hold)}" if hold else "last"
        if step.get("approve") and place != DONE and not waiting:
            note += ", then approval"
        out.append(
            {
                "number": index + 1,
                "weight": int(step.get("weight", 0)),
                "hold_seconds": hold,
                "place": place,
                "time_left": left,
                "note": note,
            }
        )
    return out


def _ratio(value: float | None) -> str:
    return "-" if value is None else ("inf" if math.isinf(value) else f"{value:.2%}")


def _check(
    name: str, value: float | None, limit: float | None, shown: str, limit_shown: str
) -> dict[str, Any]:
    if limit is None:
        state = NO_LIMIT
    elif value is None:
        state = NO_DATA
    else:
        state = OVER if value > limit else OK
    return {
        "name": name,
        "value": None if value is None or math.isinf(value) else value,
        "limit": limit,
        "shown": shown,
        "limit_shown": limit_shown if limit is not None else "-",
        "state": state,
    }


def checks_view(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The analysis' values against their thresholds, per cluster (the canary, and the
    baseline it is compared with)."""
    a = report.get("analysis") or {}
    canary, baseline = report.get("canary", "canary"), report.get("baseline", "stable")
    canary_rate, baseline_rate = a.get("canary_error_rate"), a.get("baseline_error_rate")
    vs: float | None = None
    if canary_rate is not None and baseline_rate is not None:
        vs = 0.0 if not canary_rate else (canary_rate / baseline_rate if baseline_rate else math.inf)
    vs_limit = a.get("max_error_rate_vs_stable")
    p99_limit = a.get("max_p99_ms")
    window = f"in {_seconds(a.get('window_seconds') or 0)} (min {a.get('min_requests', '-')})"
    rows = []
    for cluster, role, rate, p99, requests in (
        (canary, "canary", canary_rate, a.get("canary_p99_ms"), a.get("canary_requests")),
        (baseline, "baseline", baseline_rate, a.get("baseline_p99_ms"), a.get("baseline_requests")),
    ):
        checks = [
            _check(
                "error rate",
                rate,
                a.get("max_error_rate") if role == "canary" else None,
                _ratio(rate),
                _ratio(a.get("max_error_rate")),
            ),
            _check(
                "p99",
                p99,
                p99_limit if role == "canary" else None,
                "-" if p99 is None else f"{p99:.0f} ms",
                "-" if p99_limit is None else f"{p99_limit:.0f} ms",
            ),
        ]
        if role == "canary":
            checks.insert(
                1,
                _check(
                    f"vs {baseline}",
                    vs,
                    vs_limit,
                    "-" if vs is None else ("inf" if math.isinf(vs) else f"{vs:.2f}x"),
                    "-" if vs_limit is None else f"{vs_limit:g}x",
                ),
            )
        rows.append(
            {
                "cluster": cluster,
                "role": role,
                "requests": requests,
                "requests_shown": f"{requests if requests is not None else '-'} responses {window}",
                "checks": checks,
            }
        )
    return rows


def rollout_view(report: Mapping[str, Any]) -> dict[str, Any]:
    phase, reason = report.get("phase", "?"), report.get("reason", "")
    details = {
        key: value
        for key, value in report.items()
        if key not in _REPORT_FIELDS and value not in (None, "", [], {})
    }
    return {
        "rule": report.get("rule", "?"),
        "phase": phase,
        "status": f"{phase}: {reason}" if reason else phase,
        "canary": report.get("canary", ""),
        "baseline": report.get("baseline", ""),
        "canary_weight": report.get("canary_weight"),
        "weight_shown": f"canary weight {report.get('canary_weight')} of {report.get('total_weight')}",
        "step_shown": f"step {int(report.get('step', 0)) + 1} of {report.get('steps', '?')}",
        "verdict": report.get("verdict", ""),
        "verdict_shown": f"analysis {report.get('verdict', '?')}: {report.get('verdict_reason', '')}",
        "state_problem": report.get("state_problem") or "",
        "waiting": (report.get("waiting") or {}).get("on", ""),
        "can_approve": bool(report.get("approval_needed")),
        "waits": waits_view(report),
        "steps": steps_view(report),
        "clusters": checks_view(report),
        "details": [f"{key}: {value}" for key, value in sorted(details.items())],
    }


def waits_view(report: Mapping[str, Any]) -> list[str]:
    """What the rollout waits for, one line each: an approval, each webhook gate with its last
    answer, a ramp-down's progress."""
    rule, out = report.get("rule", "?"), []
    waiting = (report.get("waiting") or {}).get("on")
    if waiting == "approval":
        out.append(f"waiting for approval: graysteer rollout approve {rule}")
    elif report.get("approval_needed"):
        out.append(f"approval needed after the hold (may be given now: graysteer rollout approve {rule})")
    elif report.get("phase") == "progressing" and report.get("approved_step") == report.get("step"):
        out.append("this step is approved")
    for gate in report.get("gates") or []:
        last = gate.get("last")
        if gate.get("checking") and last is None:
            answer = "asking"
        elif last is not None:
            outcome = "passed" if last["passed"] else "not passed"
            answer = f"{outcome}: {last['detail']}, {last['seconds_ago']:g}s ago"
            answer += " (asking again)" if gate.get("checking") else ""
        else:
            answer = "not asked yet"
        flag = "waiting for it: " if waiting == "webhook" and gate.get("guards_next_move") else ""
        out.append(f"gate before {gate.get('before')} {gate.get('url')}: {flag}{answer}")
    ramp = report.get("ramp")
    if ramp:
        out.append(
            f"ramping down: canary weight {ramp['weight']} (from {ramp['from_weight']}) to 0, "
            f"{_seconds(float(ramp['remaining_seconds']))} left of {_seconds(float(ramp['seconds']))}"
        )
    return out


def traffic_view(traffic: Mapping[str, Any], clusters: Sequence[str]) -> dict[str, Any]:
    """Responses per second of each cluster of the table (Envoy's other clusters, such as
    the sidecar's own, are not steered traffic); not watched: said, never shown as 0."""
    if not traffic.get("watching"):
        return {
            "watching": False,
            "note": "not read by this process (serve --envoy-admin HOST:PORT)",
            "clusters": [],
        }
    rates = {c["cluster"]: c for c in traffic.get("clusters") or [] if c["cluster"] in clusters}
    top = max([float(c.get("requests_per_second") or 0) for c in rates.values()] + [0.0])
    rows = []
    for name in clusters:
        rate = rates.get(name) or {}
        rps = float(rate.get("requests_per_second") or 0)
        errors = float(rate.get("error_ratio") or 0)
        rows.append(
            {
                "cluster": name,
                "requests_per_second": rps,
                "error_ratio": errors,
                "shown": f"{rps:.1f}/s, {errors:.1%} 5xx",
                "bar": bar(rps / top if top else 0.0),
            }
        )
    problem = traffic.get("problem") or ""
    return {
        "watching": True,
        "note": f"from {traffic.get('source', '?')}, last {_seconds(float(traffic.get('seconds') or 0))}"
        + (f"; {problem}" if problem else ""),
        "clusters": rows,
    }


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if part and whole else "0%"


def bypass_view(bypass: Mapping[str, Any]) -> dict[str, Any]:
    """Requests Envoy sent on without a decision, per filter (uint64 fields arrive as
    strings in proto3 JSON)."""
    if not bypass.get("watching"):
        return {
            "watching": False,
            "note": "not read by this process (serve --envoy-admin HOST:PORT)",
            "modes": [],
        }
    if not bypass.get("stats_readable"):
        return {
            "watching": True,
            "note": f"cannot read Envoy's stats: {bypass.get('error', '')}",
            "modes": [],
        }
    modes = []
    for mode in bypass.get("modes") or []:
        recent, requests = int(mode.get("window_bypassed") or 0), int(mode.get("window_requests") or 0)
        total, all_requests = int(mode.get("bypassed_requests") or 0), int(mode.get("requests") or 0)
        requests, all_requests = max(requests, recent), max(all_requests, total)
        modes.append(
            {
                "mode": mode.get("mode", "?"),
                "ratio": recent / requests if requests else 0.0,
                "shown": f"{_share(recent, requests)} of the last read's {requests} requests; "
                f"{total} of {all_requests} ({_share(total, all_requests)}) in all",
            }
        )
    limit = bypass.get("ready_max_ratio")
    note = f"/readyz limit {limit:.1%}" if limit is not None else ""
    if not modes:
        note = "no ext_proc or ext_authz filter in Envoy's stats"
    return {"watching": True, "note": note, "modes": modes}


def fleet_view(report: Mapping[str, Any]) -> dict[str, Any]:
    """`status --fleet`'s report: each replica, the version it serves, the leader."""
    pushed = report.get("rules_version")
    replicas = []
    for r in report.get("replicas") or []:
        flags = [
            text
            for text, on in (
                ("leader", r.get("leader")),
                ("not ready", not r.get("ready", True)),
                ("etcd unreachable", not r.get("source_connected", True)),
                ("not the pushed version", r.get("file_version") != pushed),
            )
            if on
        ]
        replicas.append(
            {
                "id": r.get("id", "?"),
                "version": r.get("version", ""),
                "leader": bool(r.get("leader")),
                "current": r.get("file_version") == pushed,
                "flags": flags,
                "shown": f"serving {r.get('version', '?')}, seen {r.get('seen_seconds_ago', '?')} s ago"
                + (f" [{', '.join(flags)}]" if flags else ""),
            }
        )
    return {
        "address": report.get("fleet", ""),
        "leader": report.get("leader") or "none",
        "rules_version": pushed or "none",
        "replicas": replicas,
        "refused": [f"{x.get('key')}: {x.get('reason')}" for x in report.get("refused_records") or []],
    }
