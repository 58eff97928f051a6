"""What WatchTable watchers cost the serving loop: `python -m benchmarks.admin_watchers
[--rules 300] [--changes 30] [--watchers 0,16] [--rounds 5]`.

Runs the admin servicer on a real Reloader (a rules file of `--rules` header rules and one
split: about 150 bytes of table status per rule) in this process, and a probe task on the
same event loop that sleeps 1 ms in a loop and records the longest gap between its wake-ups:
how long the loop, which in `serve` also runs the transports, could not answer anything.
A child process opens the watchers (half read every event, half read the first table and
then never again, on a channel without BDP probing so their flow-control window stays at
64 KiB), then `--changes` weight changes are applied one after another. Prints, per number
of watchers, the median over the rounds of the longest gap and of the 99th-percentile gap
during the burst. The rounds are interleaved; compare the rows of one run.
"""

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from sidecar.admin.api import admin_pb2 as pb
from sidecar.admin.api import admin_pb2_grpc as pb_grpc
from sidecar.admin.servicer import AdminServicer
from sidecar.ops.metrics import Metrics
from sidecar.sources.file import RulesFile
from sidecar.sources.state_file import StateFile
from sidecar.table.reload import Reloader


def rules(route_rules: int) -> str:
    """A split rule `ramp` after `route_rules` header rules (about 150 bytes of status each)."""
    lines = ["version: 1", "clusters: [stable, canary]", "default: stable", "rules:"]
    for i in range(route_rules):
        lines += [
            f"  - name: header-{i}",
            f"    match: {{headers: {{x-h{i}: {'v' * 100}}}}}",
            "    route: canary",
        ]
    lines += [
        "  - name: ramp",
        "    split:",
        "      key: [header:x-user-id]",
        "      to: [{cluster: stable, weight: 90}, {cluster: canary, weight: 10}]",
    ]
    return "\n".join(lines) + "\n"


async def watch(address: str, count: int) -> None:
    """The child: `count` watchers, half reading every event, half stalled after the first."""
    reading = grpc.aio.insecure_channel(address)
    stalled = grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
    calls = [
        pb_grpc.AdminStub(reading if i % 2 == 0 else stalled).WatchTable(pb.WatchTableRequest())
        for i in range(count)
    ]
    for call in calls:
        await call.read()
    print("ready", flush=True)

    async def drain(call: grpc.aio.UnaryStreamCall) -> None:
        while await call.read() is not grpc.aio.EOF:
            pass

    await asyncio.gather(*(drain(c) for i, c in enumerate(calls) if i % 2 == 0))


async def measure(workdir: Path, route_rules: int, changes: int, watchers: int) -> dict[str, float]:
    """The probe's gaps during a burst of `changes` weight changes with `watchers` open."""
    path = workdir / "rules.yaml"
    path.write_text(rules(route_rules))
    reloader = Reloader(
        RulesFile(path), Metrics(CollectorRegistry()), StateFile(workdir / f"state-{watchers}.json")
    )
    server = grpc.aio.server()
    pb_grpc.add_AdminServicer_to_server(AdminServicer(reloader), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    child = None
    if watchers:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.admin_watchers",
            "--watch",
            f"127.0.0.1:{port}",
            str(watchers),
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None
        if (await asyncio.wait_for(child.stdout.readline(), 60)).strip() != b"ready":
            raise RuntimeError("the watchers did not start")
    gaps: list[float] = []
    probing = True

    async def probe() -> None:
        last = time.perf_counter()
        while probing:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    prober = asyncio.create_task(probe())
    await reloader.set_weights("ramp", {"canary": 10})  # warm up
    await asyncio.sleep(0.2)
    gaps.clear()
    for change in range(changes):
        await reloader.set_weights("ramp", {"canary": 11 + change})
    await asyncio.sleep(0.5)  # the watchers' sends that follow the last change
    probing = False
    await prober
    if child is not None:
        child.kill()
        await child.wait()
    await server.stop(0)
    ms = sorted(g * 1000 for g in gaps)
    return {
        "watchers": watchers,
        "max_gap_ms": round(ms[-1], 1),
        "p99_gap_ms": round(ms[int(len(ms) * 0.99)], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=300)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--watchers", default="0,16", help="comma-separated counts to measure")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--watch", nargs=2, metavar=("ADDRESS", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.watch:
        asyncio.run(watch(args.watch[0], int(args.watch[1])))
        return 0
    counts = [int(c) for c in args.watchers.split(",")]
    runs: dict[int, list[dict[str, float]]] = {count: [] for count in counts}
    with tempfile.TemporaryDirectory(prefix="graysteer-watchers-") as tmp:
        for _ in range(args.rounds):  # interleaved: a noisy moment hits every count alike
            for count in counts:
                runs[count].append(asyncio.run(measure(Path(tmp), args.rules, args.changes, count)))
    for count, results in runs.items():
        medians = {key: statistics.median(r[key] for r in results) for key in ("max_gap_ms", "p99_gap_ms")}
        every = ", ".join(str(r["max_gap_ms"]) for r in results)
        print(
            f"{count:5d} watchers, {args.rules} rules, {args.changes} changes: longest stall "
            f"{medians['max_gap_ms']:.1f} ms (median of {args.rounds}: {every}), "
            f"p99 gap {medians['p99_gap_ms']:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
