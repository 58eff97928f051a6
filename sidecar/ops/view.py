"""The live view of a sidecar (and of its fleet), the one model every live screen draws:
`graysteer status --watch` in a terminal and the operator endpoint's /ui/ page.

A pure function from what the sidecar already reports (the admin API's TableStatus as JSON,
with each rollout's report; `status --fleet`'s replica list) to what is shown, texts
included: both screens place the same strings, so they cannot disagree. No I/O.

A rollout's part is sidecar.ops.view_rollout's.
"""

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sidecar.ops.view_rollout import report_of, rollout_view, seconds

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
        "shadow": None,
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
    view["shadow"] = shadow_view(status.get("shadow") or {})
    return view


def _sample_note(shadow: Mapping[str, Any]) -> str:
    """Which requests the counts are of: the shadow decides a sample (sidecar.table.shadow)."""
    seen, ratio = int(shadow.get("seen") or 0), float(shadow.get("sample_ratio") or 0.0)
    cost_ms, budget_ms = (
        float(shadow.get("decision_seconds") or 0) * 1000,
        float(shadow.get("budget_seconds") or 0) * 1000,
    )
    why = f"within a budget of {budget_ms:g} ms per request" if budget_ms else "--shadow-sample"
    return (
        f"sampled from {seen} requests, now {ratio:.2%} of them ({why}; a shadow decision costs about "
        f"{cost_ms:.3f} ms)"
    )


def shadow_view(shadow: Mapping[str, Any]) -> dict[str, Any] | None:
    """The shadow table's disagreement with the served one (None when none is followed)."""
    if not shadow.get("following"):
        return None
    requests, differing = int(shadow.get("requests") or 0), int(shadow.get("differing") or 0)
    if not shadow.get("version"):
        note = f"none in {shadow.get('source', '?')}" + (
            f" ({shadow['error']})" if shadow.get("error") else ""
        )
    else:
        note = (
            f"version {shadow['version']} from {shadow.get('source', '?')}: {differing} of {requests} "
            f"requests decided differently ({_share(differing, requests)}) against served "
            f"version {shadow.get('live_version', '?')}"
        )
        note += "; " + _sample_note(shadow)
        if shadow.get("error"):
            note += f"; its next document was refused: {shadow['error'].splitlines()[0]}"
    moves = []
    for move in shadow.get("moves") or []:
        count = int(move["requests"])
        shown = f"{move['rule']}: {move['cluster']} -> {move['shadow_cluster']}: {count}"
        moves.append(
            {
                "rule": move["rule"],
                "cluster": move["cluster"],
                "shadow_cluster": move["shadow_cluster"],
                "requests": count,
                "shown": f"{shown} ({_share(count, requests)})",
            }
        )
    return {
        "version": shadow.get("version", ""),
        "requests": requests,
        "differing": differing,
        "rate": differing / requests if requests else 0.0,
        "seen": int(shadow.get("seen") or 0),
        "sample_ratio": float(shadow.get("sample_ratio") or 0.0),
        "note": note,
        "moves": moves,
    }


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
        "note": f"from {traffic.get('source', '?')}, last {seconds(float(traffic.get('seconds') or 0))}"
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
