"""How fast Envoy decides with a new table: `python -m benchmarks.ecds_latency [--changes 20]`.

envoy_decides on loopback (Envoy, `graysteer serve --xds-listen`, two backends): for each
change, a `set-weight` through the admin API flips a split between 0/100 and 100/0, and the
time is taken from the start of the admin call until the first request Envoy decides with the
new weights (one client asking in a loop, each answer's backend read). The table is pushed to
Envoy over ECDS; Envoy compiles the new Lua and swaps it in. Prints the median and maximum,
and writes benchmarks/results/ecds_latency.json.
"""

import argparse
import json
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

from sidecar.admin import client as admin_client
from sidecar.dev.devstack import Stack
from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document
from sidecar.table.load import load_rules

RESULTS = Path(__file__).parent / "results" / "ecds_latency.json"
RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: checkout
        split:
          key: [header:x-user-id]
          to: [{cluster: stable, weight: 100}, {cluster: canary, weight: 0}]
    """)
DEADLINE = 10.0


def one_change(stack: Stack, admin: str, to: str) -> float:
    """Seconds from the admin call to the first request decided for `to`."""
    http = stack.client()
    weights = {"stable": 100, "canary": 0} if to == "stable" else {"stable": 0, "canary": 100}
    started = time.monotonic()
    admin_client.set_weights(admin, "checkout", weights)
    while time.monotonic() - started < DEADLINE:
        if http.get("/", {"x-user-id": "someone"})[1]["backend"] == to:
            return time.monotonic() - started
    raise TimeoutError(f"no request decided for {to} within {DEADLINE} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        rules = work / "rules.yaml"
        rules.write_text(RULES)
        config = bootstrap_document(load_rules(rules), EnvoyOptions(mode="envoy_decides"))
        with Stack(rules, config, work) as stack:
            assert stack.sidecar is not None
            admin = stack.sidecar.admin
            seconds = [
                one_change(stack, admin, "canary" if i % 2 == 0 else "stable") for i in range(args.changes)
            ]
    ms = sorted(1000 * s for s in seconds)
    result = {"changes": len(ms), "median_ms": round(statistics.median(ms), 1), "max_ms": round(ms[-1], 1)}
    print(
        "admin set-weight -> first request Envoy decides with it: "
        f"median {result['median_ms']} ms, max {result['max_ms']} ms over {len(ms)} changes"
    )
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
