"""What a large table costs: per request (deciding walks the rules in order) and per reload
(reading the document), with the serving loop's longest stall while a reload runs.

    .venv/bin/python -m benchmarks.table_size [--sizes 10,100,1000,4000]

For each size: a document of N per-tenant header-regex rules (the shape a hostile-testing
report used: 4,001 rules in 580 KB) plus a split; the reload through the Reloader with the
document read in the child process (the default over 128 KiB) and in a thread (the old
path), while a probe task on the event loop records its longest gap between 1 ms sleeps;
and the decision time of a request that matches the first rule and of one that matches
none (every rule tried), by the reference walk (`Table.decide`) and as served (the table's
generated code, sidecar.core.engine). Results: a Markdown table on stdout and
benchmarks/results/table_size.json.
"""

import argparse
import asyncio
import shutil
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks.report import save_rows
from sidecar.core import Request
from sidecar.ops.metrics import Metrics
from sidecar.sources.file import RulesFile
from sidecar.sources.state_file import StateFile
from sidecar.table.documents import DocumentReader
from sidecar.table.reload import Reloader

RESULTS = Path(__file__).parent / "results" / "table_size.json"


def document(rules: int) -> bytes:
    lines = ["version: 1", "clusters: [stable, canary]", "default: stable", "rules:"]
    for i in range(rules):
        lines += [
            f"  - name: tenant-{i:05d}",
            f'    match: {{headers: {{x-tenant: {{regex: "^tenant-{i:05d}-[a-z]+(-[0-9]{{1,4}})?$"}}}}, '
            f'path: {{prefix: "/api/v{i % 7}/"}}}}',
            "    route: canary",
        ]
    lines += [
        "  - name: ramp",
        "    split: {key: [header:x-user-id],",
        "            to: [{cluster: stable, weight: 90}, {cluster: canary, weight: 10}]}",
    ]
    return ("\n".join(lines) + "\n").encode()


def decide_us(decide: Callable[[Request], object], headers: dict[str, str], path: str) -> float:
    request = Request(headers, "GET", path)
    runs = timeit.repeat(lambda: decide(request), number=200, repeat=5)
    return min(runs) / 200 * 1e6


async def reload_with_probe(reloader: Reloader, rules: Path, content: bytes) -> tuple[float, float]:
    """(seconds the reload took, the longest gap the loop saw while it ran, in ms)."""
    gaps: list[float] = []
    done = False

    async def probe() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.05)
    rules.write_bytes(content)
    started = time.perf_counter()
    result = await reloader.reload("bench")
    took = time.perf_counter() - started
    done = True
    await task
    assert result.outcome.value == "loaded", result.error
    return took, max(gaps) * 1000


def measure(rules_count: int, workdir: Path) -> dict[str, Any]:
    content = document(rules_count)
    row: dict[str, Any] = {"rules": rules_count + 1, "kib": round(len(content) / 1024)}
    for where, offload in (("child", 0), ("thread", 1 << 40)):
        rules = workdir / f"rules-{where}.yaml"
        rules.write_bytes(document(1))
        reloader = Reloader(
            RulesFile(rules),
            Metrics(CollectorRegistry()),
            StateFile(workdir / f"state-{where}.json"),
            DocumentReader(offload_bytes=offload),
        )
        try:
            if where == "child":  # start the child before measuring (a one-time cost)
                reloader.reader.read(document(1), "warm-up")
            took, stall = asyncio.run(reload_with_probe(reloader, rules, content))
            row[f"reload_{where}_s"] = round(took, 2)
            row[f"stall_{where}_ms"] = round(stall, 1)
            table, served = reloader.table, reloader.holder.engine  # served: the table's engine
        finally:
            reloader.close()
    first, none = ({"x-tenant": "tenant-00000-abc"}, "/api/v0/x"), ({"x-tenant": "nobody"}, "/x")
    row["served_generated"] = served.generated
    for label, decide in (("", table.decide), ("served_", served.decide)):
        row[f"{label}decide_first_us"] = round(decide_us(decide, *first), 1)
        row[f"{label}decide_none_us"] = round(decide_us(decide, *none), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,4000")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="graysteer-table-size-"))
    try:
        rows = [measure(int(n), workdir) for n in args.sizes.split(",")]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    columns = {  # heading: the row's key
        "rules": "rules",
        "KiB": "kib",
        "reload (child) s": "reload_child_s",
        "longest stall (child) ms": "stall_child_ms",
        "reload (thread) s": "reload_thread_s",
        "longest stall (thread) ms": "stall_thread_ms",
        "decide, first rule µs": "decide_first_us",
        "decide, no rule µs": "decide_none_us",
        "served: first rule µs": "served_decide_first_us",
        "served: no rule µs": "served_decide_none_us",
    }
    save_rows(RESULTS, list(columns), rows, lambda r: [r[key] for key in columns.values()])


if __name__ == "__main__":
    main()
