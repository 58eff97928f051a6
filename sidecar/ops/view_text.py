"""The live view (sidecar.ops.view) as plain lines: what `status --watch` prints where
stdout is no terminal (a pipe, a log), and the text a test can read. Pure."""

from collections.abc import Mapping
from typing import Any

STEP_MARKS = {"done": "[x]", "current": "[>]", "pending": "[ ]"}


def lines(view: Mapping[str, Any]) -> list[str]:
    """Every part of the view, one fact per line, in the order the screens draw them."""
    out = [f"graysteer at {view['at']}"]
    out += [f"! {problem}" for problem in view["problems"]]
    if view["fleet"] is not None:
        out += fleet_lines(view["fleet"])
    table = view["table"]
    if table is not None:
        out.append(
            f"rules {table['source']} version {table['version']}; default {table['default_cluster']}; "
            f"last reload {table['last_reload']}"
        )
        if table["reload_error"]:
            out.append(f"! last reload failed: {table['reload_error'].splitlines()[0]}")
    for split in view["splits"]:
        out.append(f"split {split['rule']}" + (f" ({split['note']})" if split["note"] else ""))
        out += [f"  {c['cluster']:<16} {c['bar']} {c['shown']}" for c in split["clusters"]]
    for rollout in view["rollouts"]:
        out += rollout_lines(rollout)
    for name in ("traffic", "bypass"):
        part = view[name]
        if part is None:
            continue
        title = "requests per cluster" if name == "traffic" else "envoy bypass"
        out.append(f"{title}: {part['note']}" if part["note"] else f"{title}:")
        if name == "traffic":
            out += [f"  {c['cluster']:<16} {c['bar']} {c['shown']}" for c in part["clusters"]]
        else:
            out += [f"  {m['mode']}: {m['shown']}" for m in part["modes"]]
    shadow = view.get("shadow")
    if shadow is not None:
        out.append(f"shadow table: {shadow['note']}")
        out += [f"  {move['shown']}" for move in shadow["moves"]]
    return out


def rollout_lines(rollout: Mapping[str, Any]) -> list[str]:
    out = [
        f"rollout {rollout['rule']}: {rollout['status']}",
        f"  {rollout['step_shown']}, {rollout['weight_shown']}; {rollout['verdict_shown']}",
    ]
    if rollout["state_problem"]:
        out.append(f"  ! {rollout['state_problem']}")
    out += [f"  {wait}" for wait in rollout["waits"]]
    out += [f"  {detail}" for detail in rollout["details"]]
    for step in rollout["steps"]:
        out.append(
            f"  {STEP_MARKS[step['place']]} step {step['number']}: weight {step['weight']} ({step['note']})"
        )
    for cluster in rollout["clusters"]:
        checks = "; ".join(
            f"{c['name']} {c['shown']}"
            + (f" (max {c['limit_shown']}, {c['state']})" if c["limit"] is not None else "")
            for c in cluster["checks"]
        )
        out.append(f"  {cluster['role']} {cluster['cluster']}: {cluster['requests_shown']}; {checks}")
    out += [f"  {metric['line']}" for metric in rollout["metrics"]]
    return out


def fleet_lines(fleet: Mapping[str, Any]) -> list[str]:
    out = [f"fleet {fleet['address']}: rules version {fleet['rules_version']}, leader {fleet['leader']}"]
    out += [f"  {r['id']}: {r['shown']}" for r in fleet["replicas"]]
    if not fleet["replicas"]:
        out.append("  no live replica")
    out += [f"  refused record {refused}" for refused in fleet["refused"]]
    return out
