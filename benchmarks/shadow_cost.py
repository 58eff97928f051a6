"""What a shadow table adds to each check: the mean time of `Decider.steer_input` with a
small live table and a shadow table of N per-tenant rules, deciding every request
(`--shadow-sample 1`, what every shadow did before it had a budget) and within the default
budget (`--shadow-budget 0.05`).

    .venv/bin/python -m benchmarks.shadow_cost [--sizes 0,1000,4900]

Requests are of users that match no tenant (each walks the whole shadow table: the worst
case, and the one the issue measured). Results: a Markdown table on stdout and
benchmarks/results/shadow_cost.json.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks.report import save_rows
from benchmarks.table_size import document
from sidecar.core import Request
from sidecar.core.cost import DEFAULT_SHADOW_BUDGET_MS
from sidecar.ops.metrics import Metrics
from sidecar.sources.file import RulesFile
from sidecar.sources.state_file import StateFile
from sidecar.table.decider import Decider
from sidecar.table.reload import Reloader
from sidecar.table.shadow import Shadow

RESULTS = Path(__file__).parent / "results" / "shadow_cost.json"
REQUESTS = 2000


def build(headers: dict[str, str]) -> Request:
    return Request(headers, "GET", "/x")


def check_ms(workdir: Path, rules: int, sample: float | None) -> tuple[float, float]:
    """(mean ms per check, the share of requests the shadow decided)."""
    live, upcoming = workdir / "rules.yaml", workdir / "next.yaml"
    live.write_bytes(document(0))
    upcoming.write_bytes(document(rules))
    metrics = Metrics(CollectorRegistry())
    state = StateFile(workdir / "state.json")
    budget = DEFAULT_SHADOW_BUDGET_MS / 1000
    shadow = Shadow(RulesFile(upcoming), state, metrics, sample=sample, budget=budget)
    reloader = Reloader(RulesFile(live), metrics, state, shadow=shadow)
    try:
        decider = Decider(reloader.holder, metrics, shadow=shadow)
        headers = [{"x-tenant": "nobody", "x-user-id": f"u{i}"} for i in range(REQUESTS)]
        started = time.perf_counter()
        for h in headers:
            decider.steer_input("ext_authz_http", h.copy, build)
        took = time.perf_counter() - started
        return took / REQUESTS * 1000, shadow.status().requests / REQUESTS
    finally:
        reloader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1000,4900")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="graysteer-shadow-cost-"))
    rows: list[dict[str, Any]] = []
    try:
        for n in (int(x) for x in args.sizes.split(",")):
            every, _ = check_ms(workdir, n, 1.0)
            budgeted, share = check_ms(workdir, n, None)
            rows.append(
                {
                    "shadow_rules": n + 1,
                    "every_ms": round(every, 3),
                    "budget_ms": round(budgeted, 3),
                    "budget_share": round(share, 4),
                }
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    save_rows(
        RESULTS,
        ["shadow rules", "ms per check, every request", "ms per check, default budget", "share decided"],
        rows,
        lambda r: [r["shadow_rules"], r["every_ms"], r["budget_ms"], f"{r['budget_share']:.2%}"],
    )


if __name__ == "__main__":
    main()
