"""Ratios, the Markdown table, the README section and the chart of a benchmark run."""

import json
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def save_rows(
    path: Path,
    columns: Sequence[str],
    rows: list[dict[str, Any]],
    cells: Callable[[dict[str, Any]], Sequence[object]],
) -> None:
    """Print `rows` as a Markdown table (`cells` gives a row's values, in `columns`' order) and
    keep them in `path` as JSON, with the day they were measured."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in cells(row)) + " |")
    path.write_text(json.dumps({"measured": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")


def one_line(s: dict[str, Any]) -> str:
    return " | ".join(
        f"{c}: {s[c]['rps']:.0f} req/s p50 {s[c]['p50_ms']:.2f} ms p99 {s[c]['p99_ms']:.2f} ms "
        f"cpu/req {_cpu(s[c])} errors {s[c]['errors']}"
        + (
            f" worker shares {s[c]['worker_cpu_shares']}"
            if len(s[c].get("worker_cpu_shares") or []) > 1
            else ""
        )
        for c in ("c1", "c32")
    )


def median(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """One scenario's rounds -> the median of every number (errors: the total)."""
    merged: dict[str, Any] = {
        "key": outcomes[0]["key"],
        "title": outcomes[0]["title"],
        "floor": outcomes[0].get("floor"),
        "failure_mode_allowed": sum(o["failure_mode_allowed"] for o in outcomes),
    }
    for level in ("c1", "c32"):
        merged[level] = {}
        for name, value in outcomes[0][level].items():
            values = [o[level][name] for o in outcomes]
            if isinstance(value, list):  # per-worker shares: every round's, as measured
                merged[level][name] = values
                continue
            merged[level][name] = (
                None if value is None else sum(values) if name == "errors" else statistics.median(values)
            )
        merged[level]["rounds"] = [o[level]["sidecar_cpu_ms_per_request"] for o in outcomes]
    return merged


def _cpu(m: dict[str, Any]) -> str:
    return "-" if m["sidecar_cpu_ms_per_request"] is None else f"{m['sidecar_cpu_ms_per_request']:.3f} ms"


def add_ratios(results: dict[str, Any]) -> None:
    """Throughput at 32 connections relative to (a) and to the floor of the scenario's
    transport ((e) for gRPC, (h0) for HTTP); CPU per request relative to that floor."""
    by_key = {s["key"]: s for s in results["scenarios"]}
    native = by_key.get("a")
    for s in results["scenarios"]:
        floor = by_key.get(s.get("floor") or "")
        ratios: dict[str, float | None] = {}
        if native:
            ratios["rps_vs_native"] = round(s["c32"]["rps"] / native["c32"]["rps"], 3)
            ratios["added_p50_ms_at_1_conn"] = round(s["c1"]["p50_ms"] - native["c1"]["p50_ms"], 3)
        if floor:
            ratios["rps_vs_floor"] = round(s["c32"]["rps"] / floor["c32"]["rps"], 3)
            cpu, floor_cpu = (
                s["c32"]["sidecar_cpu_ms_per_request"],
                floor["c32"]["sidecar_cpu_ms_per_request"],
            )
            ratios["cpu_vs_floor"] = round(cpu / floor_cpu, 3) if cpu and floor_cpu else None
        s["ratios"] = ratios


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python "
        f"{m['python']}, grpcio {m['grpcio']}, Envoy {m['envoy']}; "
        f"{results['seconds_per_measurement']:.0f} s per measurement, {results['rounds']} rounds "
        "interleaved, medians shown (errors: total); wrk, one thread. Both Envoys, wrk and the "
        "sidecar share the machine's cores.",
        "",
        "| scenario | req/s @1 | p50 @1 | p99 @1 | sidecar CPU ms/req @1 | req/s @32 | p50 @32 | "
        "p99 @32 | sidecar CPU ms/req @32 | errors | added p50 @1 vs (a) | req/s vs (a) | floor | "
        "req/s vs floor | CPU vs floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["scenarios"]:
        c1, c32, r = s["c1"], s["c32"], s.get("ratios", {})
        lines.append(
            f"| ({s['key']}) {s['title']} | {c1['rps']:.0f} | {c1['p50_ms']:.2f} ms | "
            f"{c1['p99_ms']:.2f} ms | {_cpu(c1)} | {c32['rps']:.0f} | {c32['p50_ms']:.2f} ms | "
            f"{c32['p99_ms']:.2f} ms | {_cpu(c32)} | "
            f"{c1['errors'] + c32['errors']} | {_ms(r.get('added_p50_ms_at_1_conn'))} | "
            f"{_ratio(r.get('rps_vs_native'))} | {'(' + s['floor'] + ')' if s.get('floor') else '-'} | "
            f"{_ratio(r.get('rps_vs_floor'))} | {_ratio(r.get('cpu_vs_floor'))} |"
        )
    micro = results.get("decision_micro_benchmark")
    if micro:
        lines += [
            "",
            f"Decision function on a realistic table ({micro['rules']} rules, "
            f"{micro['splits']} splits; header, path and identity matches): "
            f"**{micro['decide_us']:.2f} µs** per `Table.decide` (empty table: "
            f"{micro['decide_empty_table_us']:.2f} µs); **{micro['steer_us']:.2f} µs** per "
            f"`steer` (trust, lanes, rules, headers; it includes building the request "
            f"view) (empty table: {micro['steer_empty_table_us']:.2f} µs). As served (the "
            f"table's generated engine): **{micro['served_decide_us']:.2f} µs** per decide, "
            f"**{micro['served_steer_us']:.2f} µs** per steer. `steer` on `examples/rules.yaml` "
            f"(coloring): {micro['example_steer_us']:.2f} µs reference, "
            f"**{micro['served_example_steer_us']:.2f} µs** served.",
        ]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_readme(path: Path, table: str) -> None:
    text = path.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    path.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = results["scenarios"]
    labels = [f"({s['key']})" for s in scenarios]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(labels, [s["c32"]["rps"] for s in scenarios], color="#4c72b0")
    left.set_title("requests/s at 32 connections")
    cpu = [s["c32"]["sidecar_cpu_ms_per_request"] or 0 for s in scenarios]
    right.bar(labels, cpu, color="#dd8452")
    right.set_title("sidecar CPU ms per request (32 connections)")
    caption = "; ".join(f"({s['key']}) {s['title']}" for s in scenarios)
    figure.text(0.01, 0.01, "\n".join(textwrap.wrap(caption, 170)), fontsize=7, va="bottom")
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=110)
