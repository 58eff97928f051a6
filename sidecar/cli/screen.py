"""The live view (sidecar.ops.view) drawn for a terminal with `rich`: the strings are the
view's own, placed in tables and panels and coloured by what they say."""

from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sidecar.ops.view_text import STEP_MARKS

PHASE_STYLES = {
    "progressing": "cyan",
    "paused": "yellow",
    "promoted": "green",
    "aborted": "bold red",
    "ramping_down": "bold yellow",
}
CHECK_STYLES = {"ok": "green", "over": "bold red", "no data": "yellow", "no limit": "dim"}
STEP_STYLES = {"done": "green", "current": "bold cyan", "pending": "dim"}


def render(view: Mapping[str, Any]) -> RenderableType:
    """The whole screen."""
    parts: list[RenderableType] = [_header(view)]
    parts += [Text(f"! {problem}", style="bold red") for problem in view["problems"]]
    if view["fleet"] is not None:
        parts.append(_fleet(view["fleet"]))
    if view["splits"]:
        parts.append(_splits(view["splits"]))
    parts += [_rollout(rollout) for rollout in view["rollouts"]]
    if view["traffic"] is not None:
        parts.append(_traffic(view["traffic"], view["bypass"]))
    parts.append(Text("Ctrl-C to quit", style="dim"))
    return Group(*parts)


def _header(view: Mapping[str, Any]) -> RenderableType:
    text = Text("graysteer", style="bold")
    table = view["table"]
    if table is not None:
        text.append(
            f"  rules {table['source']}  version {table['version']}  default {table['default_cluster']}"
        )
        text.append(f"\nlast reload {table['last_reload']}", style="dim")
        if table["reload_error"]:
            text.append(f"\nlast reload failed: {table['reload_error'].splitlines()[0]}", style="red")
    text.append(f"   {view['at']}", style="dim")
    return text


def _fleet(fleet: Mapping[str, Any]) -> RenderableType:
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    table.add_column("replica")
    table.add_column("")
    for replica in fleet["replicas"]:
        style = "bold" if replica["leader"] else ("yellow" if replica["flags"] else "")
        table.add_row(Text(replica["id"], style=style), Text(replica["shown"], style=style))
    if not fleet["replicas"]:
        table.add_row("no live replica", "")
    for refused in fleet["refused"]:
        table.add_row(Text("refused", style="red"), Text(refused))
    title = f"fleet {fleet['address']}: rules version {fleet['rules_version']}, leader {fleet['leader']}"
    return Panel(table, title=Text(title), title_align="left")


def _splits(splits: list[Mapping[str, Any]]) -> RenderableType:
    table = Table(box=None, show_header=False, pad_edge=False)
    for _ in range(4):
        table.add_column()
    for split in splits:
        table.add_row(Text(split["rule"], style="bold"), "", "", Text(split["note"], style="dim"))
        for cluster in split["clusters"]:
            table.add_row(
                "", Text(cluster["cluster"]), Text(cluster["bar"], style="magenta"), Text(cluster["shown"])
            )
    return Panel(table, title="splits", title_align="left")


def _rollout(rollout: Mapping[str, Any]) -> RenderableType:
    lines: list[RenderableType] = [
        Text(rollout["status"], style=PHASE_STYLES.get(rollout["phase"], "bold")),
        Text(f"{rollout['step_shown']}, {rollout['weight_shown']}"),
        Text(rollout["verdict_shown"], style="red" if rollout["verdict"] == "breach" else ""),
    ]
    if rollout["state_problem"]:
        lines.append(Text(rollout["state_problem"], style="bold red"))
    lines += [Text(wait, style="bold magenta") for wait in rollout["waits"]]
    lines += [Text(detail, style="yellow") for detail in rollout["details"]]
    steps = Table(box=None, show_header=False, pad_edge=False)
    for _ in range(3):
        steps.add_column()
    for step in rollout["steps"]:
        style = STEP_STYLES[step["place"]]
        steps.add_row(
            Text(STEP_MARKS[step["place"]], style=style),
            Text(f"step {step['number']}  weight {step['weight']}", style=style),
            Text(step["note"], style=style),
        )
    checks = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("cluster", "responses", "error rate", "vs baseline", "p99"):
        checks.add_column(column)
    for cluster in rollout["clusters"]:
        by_name = {c["name"].split(" ")[0]: c for c in cluster["checks"]}
        cells = [_check(by_name.get(name)) for name in ("error", "vs", "p99")]
        checks.add_row(
            Text(f"{cluster['cluster']} ({cluster['role']})"), Text(cluster["requests_shown"]), *cells
        )
    metrics = [
        Text(m["line"], style=METRIC_STYLES.get(m["state"], "") if not m["dry_run"] else "dim")
        for m in rollout["metrics"]
    ]
    return Panel(
        Group(*lines, steps, checks, *metrics), title=Text(f"rollout {rollout['rule']}"), title_align="left"
    )


METRIC_STYLES = {"ok": "green", "over": "bold red", "no data": "yellow"}


def _check(check: Mapping[str, Any] | None) -> Text:
    if check is None:
        return Text("")
    text = check["shown"] + (f" / max {check['limit_shown']}" if check["limit"] is not None else "")
    return Text(text, style=CHECK_STYLES.get(check["state"], ""))


def _traffic(traffic: Mapping[str, Any], bypass: Mapping[str, Any] | None) -> RenderableType:
    table = Table(box=None, show_header=False, pad_edge=False)
    for _ in range(3):
        table.add_column()
    for cluster in traffic["clusters"]:
        table.add_row(Text(cluster["cluster"]), Text(cluster["bar"], style="blue"), Text(cluster["shown"]))
    parts: list[RenderableType] = [Text(traffic["note"], style="dim"), table]
    if bypass is not None:
        parts.append(Text("envoy bypass: " + (bypass["note"] or ""), style="dim"))
        parts += [Text(f"  {m['mode']}: {m['shown']}") for m in bypass["modes"]]
    return Panel(Group(*parts), title="requests per cluster", title_align="left")
