"""The front Envoy's instructions per request, by scenario, counted under callgrind:
`python -m benchmarks.envoy_instructions [--only a,l] [--seconds 15]`.

On a shared machine throughput ratios move by tens of percent between rounds; an
instruction count does not (repeats agree within 1-3%). Each scenario's front Envoy
(`--concurrency 1`) runs under `valgrind --tool=callgrind` with instrumentation off until it
has served a warm-up; then its instructions are counted over an idle interval and over
`--seconds` of wrk load (8 connections), and the idle rate is taken off the loaded count
(timers, health checks, stats flushes). Instructions in the kernel are not counted.
Needs valgrind (installed from Debian when missing).
"""

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.scenarios import SCENARIOS, Scenario, backends_config, front_envoy
from benchmarks.wrk import ensure_wrk, lua_script, run
from sidecar.dev.devstack import Envoy
from sidecar.dev.processes import ensure_tool

IDLE_SECONDS = 4.0
START_TIMEOUT = 120.0  # Envoy starts slowly under valgrind


def totals(path: Path) -> int:
    """The instruction total of one callgrind dump."""
    for line in path.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise ValueError(f"no totals in {path}")


def measure(scenario: Scenario, upstreams: dict[str, int], seconds: float, workdir: Path) -> float:
    """Instructions per request of `scenario`'s front Envoy."""
    valgrind, control = ensure_tool("valgrind", "valgrind"), ensure_tool("callgrind_control", "valgrind")
    out = workdir / f"callgrind.{scenario.key}.{time.monotonic_ns()}"
    wrapper = [valgrind, "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes"]
    wrapper.append(f"--callgrind-out-file={out}")
    sidecar = scenario.start_sidecar(workdir)
    try:
        ports: list[int] = getattr(sidecar, "ports", [])
        xds_port = getattr(sidecar, "xds_port", 0)
        envoy = front_envoy(scenario, ports, upstreams, workdir, xds_port, wrapper, START_TIMEOUT)
        try:
            wrk, pid = ensure_wrk(), str(envoy.process.popen.pid)
            script = lua_script(workdir / f"{scenario.key}.lua", scenario.headers, scenario.vary_user)
            run(wrk, envoy.port, 4, 6, script)  # warm-up, LuaJIT's traces included

            def callgrind(*args: str) -> None:
                subprocess.run([control, *args, pid], check=True, capture_output=True)

            callgrind("-i", "on")
            time.sleep(IDLE_SECONDS)
            callgrind("-d")  # dump 1: idle
            before = envoy.stats()["http.ingress.downstream_rq_completed"]
            callgrind("-z")
            started = time.monotonic()
            run(wrk, envoy.port, 8, seconds, script)
            loaded_seconds = time.monotonic() - started
            callgrind("-d")  # dump 2: loaded
            requests = envoy.stats()["http.ingress.downstream_rq_completed"] - before
        finally:
            envoy.stop()
    finally:
        if sidecar is not None:
            sidecar.stop()
    idle_rate = totals(Path(f"{out}.1")) / IDLE_SECONDS
    return (totals(Path(f"{out}.2")) - idle_rate * loaded_seconds) / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="a,l", help="comma-separated scenario keys (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds of load (default %(default)s)")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if s.key in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="graysteer-instructions-") as tmp:
        workdir = Path(tmp)
        backends = Envoy(backends_config(), workdir, name="backends")
        try:
            upstreams = {"stable": backends.ports["stable"], "canary": backends.ports["canary"]}
            counted = {s.key: measure(s, upstreams, args.seconds, workdir) for s in chosen}
        finally:
            backends.stop()
    native = counted.get("a")
    for scenario in chosen:
        ratio = f"  native/this {native / counted[scenario.key]:.2f}" if native else ""
        print(f"({scenario.key}) {counted[scenario.key] / 1000:.1f} k instructions per request{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
