"""How long building a table's serving engine holds the GIL in one piece: the longest gap a
thread that needs the GIL sees while `Engine(table)` generates and compiles the table's code.

    .venv/bin/python -m benchmarks.compile_stall

Documents (all valid and within the rules file's limits): one rule with 45,000 exact-header
conditions, one split with 30,000 key sources, 4,000 per-tenant regex rules, and 100 rules
with 400 exact-header conditions each. A heartbeat thread sleeps 1 ms at a time and records
its longest gap: a serving loop waiting for the GIL sees the same stall (a fast-path check
that arrives during it waits that long). Results: a Markdown table on stdout and
benchmarks/results/compile_stall.json.
"""

import json
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.report import save_rows
from sidecar.core import compile_table
from sidecar.core.engine import Engine

RESULTS = Path(__file__).parent / "results" / "compile_stall.json"


def base() -> dict[str, Any]:
    return {"version": 1, "clusters": ["stable", "canary"], "default": "stable"}


def wide_rule(conditions: int) -> dict[str, Any]:
    headers = {f"x-h{i:05d}": f"v{i}" for i in range(conditions)}
    return {**base(), "rules": [{"name": "wide", "match": {"headers": headers}, "route": "canary"}]}


def wide_split(sources: int) -> dict[str, Any]:
    split = {
        "key": [f"header:x-k{i:05d}" for i in range(sources)],
        "to": [{"cluster": "stable", "weight": 90}, {"cluster": "canary", "weight": 10}],
    }
    return {**base(), "rules": [{"name": "wide", "split": split}]}


def tenants(rules: int) -> dict[str, Any]:
    return {
        **base(),
        "rules": [
            {
                "name": f"tenant-{i:05d}",
                "match": {
                    "headers": {"x-tenant": {"regex": f"^tenant-{i:05d}-[a-z]+(-[0-9]{{1,4}})?$"}},
                    "path": {"prefix": f"/api/v{i % 7}/"},
                },
                "route": "canary",
            }
            for i in range(rules)
        ],
    }


def many_wide(rules: int, conditions: int) -> dict[str, Any]:
    return {
        **base(),
        "rules": [
            {
                "name": f"r{r}",
                "match": {"headers": {f"x-h{i:04d}": f"v{r}-{i}" for i in range(conditions)}},
                "route": "canary",
            }
            for r in range(rules)
        ],
    }


def longest_gap_ms(work: Any) -> tuple[float, float]:
    """(seconds `work()` took, the longest gap in ms a 1 ms heartbeat thread saw meanwhile)."""
    gaps: list[float] = []
    done = threading.Event()

    def heartbeat() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=heartbeat)
    thread.start()
    time.sleep(0.02)
    started = time.perf_counter()
    work()
    took = time.perf_counter() - started
    done.set()
    thread.join()
    return took, max(gaps) * 1000


def busy_python() -> None:
    """Plain Python work for as long as a large build: the floor of the gap (the GIL's switch
    interval and the machine's other load), what any work in a reload thread costs."""
    total = 0
    for i in range(3_000_000):
        total += i


def build(document: dict[str, Any]) -> dict[str, Any]:
    table = compile_table(document, "bench", "bench")
    engines: list[Engine] = []
    took, gap = longest_gap_ms(lambda: engines.append(Engine(table)))
    return {
        "kib": round(len(json.dumps(document)) / 1024),
        "generated": engines[0].generated,
        "build_s": round(took, 2),
        "longest_gap_ms": round(gap, 1),
    }


def main() -> None:
    cases = {
        "1 rule, 45,000 exact headers": wide_rule(45_000),
        "1 split, 30,000 key sources": wide_split(30_000),
        "4,000 tenant regex rules": tenants(4_000),
        "100 rules x 400 exact headers": many_wide(100, 400),
    }
    rows = [{"document": label, **build(document)} for label, document in cases.items()]
    took, gap = longest_gap_ms(busy_python)
    rows.append(
        {
            "document": "(floor: plain Python work)",
            "kib": 0,
            "generated": False,
            "build_s": round(took, 2),
            "longest_gap_ms": round(gap, 1),
        }
    )
    save_rows(
        RESULTS,
        ["document", "KiB (JSON)", "generated", "engine build s", "longest GIL gap ms"],
        rows,
        lambda r: [r["document"], r["kib"], r["generated"], r["build_s"], r["longest_gap_ms"]],
    )


if __name__ == "__main__":
    main()
