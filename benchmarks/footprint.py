"""What one fast-path check costs when the caches are cold, as they are under load: the
sidecar shares its cores with both Envoys and the load tool, which evict its code and data
between two checks. An in-process loop (benchmarks/check_path.py) keeps everything cached:
there graysteer's check costs about 7 µs more than the floor's, while end to end (h) costs
about 24 µs more sidecar CPU per request than (h0) (benchmarks/README.md).

Each check is fed to the protocol after the caches are flushed (4 MiB written with a 64-byte
stride), under valgrind's cachegrind with a per-core cache model (32 KiB L1i and L1d, a 1 MiB
L2 as the last level). Per check: instructions, first-level misses, and lines missed in L2
(code and data), which are each a trip to the shared L3 or memory. Four protocols, each fed
the same checks (benchmarks/check_path.py's, a new x-user-id each):

- floor: the floor of the HTTP transport (benchmarks/empty_http.py);
- http layer: graysteer's HTTP connection with a decider that answers one constant steering
  (parsing, limits, deadlines, the answer cache, the write);
- graysteer: the whole check on examples/rules.yaml (the table's generated engine);
- flush: the flush alone, subtracted from the others.

Each number is the difference between a run of 0 and one of --checks measured checks, both
after 2,000 unmeasured ones (every cache of the check filled: each bucket of the split
decided once), so start-up and warm-up cancel. Address randomization is off (setarch -R)
and PYTHONHASHSEED fixed: a number repeats within 2-3%. Needs valgrind (installed from
Debian when missing).
Run: python -m benchmarks.footprint [--checks 300] [--json]"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sidecar.dev.processes import ensure_tool

ROOT = Path(__file__).resolve().parent.parent
WARM = 2000  # checks before the measured ones, in both runs: every bucket of the split decided once
FLUSH_BYTES = 4 << 20
CACHES = ("--I1=32768,8,64", "--D1=32768,8,64", "--LL=1048576,16,64")
KINDS = ("flush", "floor", "http layer", "graysteer")


def protocol(kind: str) -> Callable[[bytes], None]:
    """`data_received` of the `kind` protocol, on a transport that drops its answers."""
    from prometheus_client import CollectorRegistry

    from benchmarks.check_path import EXAMPLE, _Transport
    from benchmarks.empty_http import Constant
    from sidecar.core import Steering
    from sidecar.ops.metrics import Metrics
    from sidecar.table.decider import Decider
    from sidecar.table.holder import TableHolder
    from sidecar.table.load import load_rules
    from sidecar.transports.authz_http import AuthzHttpServer

    if kind in ("floor", "flush"):
        floor = Constant()
        floor.connection_made(_Transport())
        return floor.data_received if kind == "floor" else lambda data: None
    table = load_rules(EXAMPLE)
    decider = Decider(TableHolder(table), Metrics(CollectorRegistry()))
    if kind == "http layer":
        constant = decider.holder.engine.steer(_request())

        class ConstantDecider(Decider):
            def steer_input(self, *_: Any) -> Steering:
                return constant

        decider = ConstantDecider(decider.holder, decider.metrics)
    server = AuthzHttpServer(decider, lambda: True)
    connection: Any = sys.modules[AuthzHttpServer.__module__]._Connection(server)
    connection.connection_made(_Transport())
    return connection.data_received  # type: ignore[no-any-return]


def _request() -> Any:
    from sidecar.core import Request

    return Request({"x-user-id": "user-0"}, "GET", "/checkout")


def child(kind: str, checks: int) -> None:
    """Feed WARM + `checks` checks, the caches flushed before each measured one."""
    from benchmarks.check_path import check_bytes

    feed = protocol(kind)
    data = [check_bytes(user) for user in range(WARM + checks)]
    for check in data[:WARM]:
        feed(check)
    flush = bytearray(FLUSH_BYTES)
    stride = b"\x01" * (FLUSH_BYTES // 64)
    for check in data[WARM:]:
        flush[::64] = stride
        feed(check)


def counted(kind: str, checks: int) -> dict[str, int]:
    """cachegrind's totals for one run of `child`."""
    valgrind, setarch = ensure_tool("valgrind", "valgrind"), ensure_tool("setarch", "util-linux")
    with tempfile.TemporaryDirectory(prefix="graysteer-footprint-") as tmp:
        out = Path(tmp) / "cachegrind.out"
        subprocess.run(
            [setarch, "-R", valgrind, "--tool=cachegrind", "--cache-sim=yes", *CACHES]
            + [f"--cachegrind-out-file={out}", sys.executable, "-m", "benchmarks.footprint"]
            + ["--child", kind, str(checks)],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            check=True,
            capture_output=True,
        )
        text = out.read_text()
    events = re.search(r"^events: (.*)$", text, re.M)
    summary = re.search(r"^summary: (.*)$", text, re.M)
    assert events and summary, "cachegrind wrote no summary"
    return dict(zip(events.group(1).split(), map(int, summary.group(1).split()), strict=True))


def per_check(kind: str, checks: int) -> dict[str, float]:
    with ThreadPoolExecutor(2) as pool:
        few, many = pool.map(lambda n: counted(kind, n), (0, checks))
    delta = {event: (many[event] - few[event]) / checks for event in many}
    return {
        "instructions": delta["Ir"],
        "l1_misses": delta["I1mr"] + delta["D1mr"] + delta["D1mw"],
        "l2_lines_code": delta["ILmr"],
        "l2_lines_data": delta["DLmr"] + delta["DLmw"],
    }


def measure(checks: int) -> dict[str, dict[str, float]]:
    raw = {kind: per_check(kind, checks) for kind in KINDS}
    flush = raw.pop("flush")
    return {kind: {k: round(v - flush[k], 1) for k, v in numbers.items()} for kind, numbers in raw.items()}


def table(result: dict[str, dict[str, float]]) -> str:
    lines = [
        "| per check, caches cold | instructions | L1 misses | L2 lines (code + data) | vs floor |",
        "|---|---|---|---|---|",
    ]
    floor = result["floor"]
    floor_lines = floor["l2_lines_code"] + floor["l2_lines_data"]
    for kind, n in result.items():
        l2 = n["l2_lines_code"] + n["l2_lines_data"]
        lines.append(
            f"| {kind} | {n['instructions']:,.0f} | {n['l1_misses']:,.0f} | {l2:,.0f}"
            f" ({n['l2_lines_code']:,.0f} + {n['l2_lines_data']:,.0f}) | {l2 / floor_lines:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checks", type=int, default=300, help="measured checks per run (default %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "CHECKS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    result = measure(args.checks)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
