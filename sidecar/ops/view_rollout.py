"""A rollout's part of the live view (sidecar.ops.view): its steps (done, current with the
time left in its hold, to come), its analysis values against their thresholds per cluster,
and its waits (an approval, its webhook gates with their last answers, a ramp-down's
progress), each a line. Pure.

Any field a report carries that this module does not know is listed under its rollout
("details"): a new kind of report field shows without a change here.
"""

import json
import math
from collections.abc import Mapping
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
    "metrics",
}
DONE, CURRENT, PENDING = "done", "current", "pending"  # a step's place in its rollout
OK, OVER, NO_DATA, NO_LIMIT = "ok", "over", "no data", "no limit"  # a value against its limit


def report_of(status: Mapping[str, Any]) -> dict[str, Any]:
    """A rollout's full report (its report_json), or the fields of its status message."""
    text = status.get("report_json")
    if text:
        report: dict[str, Any] = json.loads(text)
        return report
    return dict(status)


def seconds(value: float) -> str:
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
            note = phase if left is None else f"{seconds(float(left))} left of {seconds(hold)}"
        else:
            note = f"hold {seconds(hold)}" if hold else "last"
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
    window = f"in {seconds(a.get('window_seconds') or 0)} (min {a.get('min_requests', '-')})"
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


def metrics_view(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each PromQL metric check's value (and the baseline's) against its threshold: ok, over,
    or no data with the reason (a dry-run check is marked: it never acts)."""
    out = []
    for metric in report.get("metrics") or []:
        value, base = metric.get("value"), metric.get("baseline_value")
        state = {"pass": OK, "breach": OVER}.get(metric.get("outcome", ""), NO_DATA)
        shown = "-" if value is None else f"{value:.4g}"
        if base is not None:
            shown += f" (baseline {base:.4g})"
        dry = " (dry run)" if metric.get("dry_run") else ""
        line = f"metric {metric.get('name')}{dry}: {shown} / {metric.get('threshold')}: {state}"
        if state == NO_DATA:
            line += f" ({metric.get('reason', '')})"
        out.append(
            {
                "name": metric.get("name", "?"),
                "value": value,
                "shown": shown,
                "threshold": metric.get("threshold", ""),
                "state": state,
                "dry_run": bool(metric.get("dry_run")),
                "reason": metric.get("reason", ""),
                "line": line,
            }
        )
    return out


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
        "metrics": metrics_view(report),
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
            f"{seconds(float(ramp['remaining_seconds']))} left of {seconds(float(ramp['seconds']))}"
        )
    return out
