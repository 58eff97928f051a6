"""Where the sidecar's CPU goes under load: `python -m benchmarks.profile [--scenario b|d|h|l|l50]`.

Starts the scenario's front Envoy (b: envoy/envoy.yaml, d: gRPC ext_authz, h: ext_authz over
HTTP, l and l50: Envoy deciding, the sidecar reading its access log stream), the sidecar and
the direct_response upstreams, drives 32 connections with wrk, samples the sidecar with
py-spy (PyPI), and reports the share of samples with graysteer's code on the stack, by
function, and the innermost frames of all samples (grpcio's Cython callbacks and poller
thread, httptools, asyncio, the interpreter)."""

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.scenarios import SCENARIOS, backends_config, front_envoy
from benchmarks.wrk import ensure_wrk, lua_script, run
from sidecar.dev.devstack import Envoy
from sidecar.dev.processes import wait_for

PROFILED = ("b", "d", "h", "l", "l50")  # graysteer itself on each transport; l: the access log stream


def summarize(raw: str) -> dict[str, float]:
    """py-spy raw output (`frame;frame;... count` per line) -> shares of samples: those with
    graysteer's code on the stack (by its innermost graysteer frame), and by innermost frame."""
    total = 0
    ours = 0
    by_function: collections.Counter[str] = collections.Counter()
    innermost: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        innermost[frames[-1]] += samples
        inner = next((f for f in reversed(frames) if "sidecar/" in f), None)
        if inner is not None and "sidecar/cli.py" not in inner and "__main__" not in inner:
            ours += samples
            by_function[inner.split(" (")[0]] += samples
    shares = {"samples": float(total), "graysteer_code": round(ours / total, 3) if total else 0.0}
    shares.update({f"  {name}": round(n / total, 3) for name, n in by_function.most_common(8)})
    shares["innermost frames"] = float(sum(n for _, n in innermost.most_common(10)) / total) if total else 0.0
    shares.update({f"  {frame[:70]}": round(n / total, 3) for frame, n in innermost.most_common(10)})
    return shares


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--scenario", choices=PROFILED, default="b")
    args = parser.parse_args()
    wrk = ensure_wrk()
    py_spy = Path(sys.executable).parent / "py-spy"
    scenario = next(s for s in SCENARIOS if s.key == args.scenario)
    with tempfile.TemporaryDirectory(prefix="graysteer-profile-") as tmp:
        workdir = Path(tmp)
        backends = Envoy(backends_config(), workdir, name="backends")
        sidecar = scenario.start_sidecar(workdir)
        assert sidecar is not None
        envoy = front_envoy(
            scenario,
            sidecar.ports,
            {
                "stable": backends.ports["stable"],  # type: ignore[attr-defined]
                "canary": backends.ports["canary"],
            },
            workdir,
            getattr(sidecar, "xds_port", 0),
        )
        try:
            wait_for(
                lambda: envoy.stats().get("cluster.graysteer.membership_healthy") == 1,
                20,
                "the sidecar to be healthy",
            )
            script = lua_script(workdir / f"{scenario.key}.lua", {}, vary_user=True)
            output = workdir / "profile.txt"
            spy = subprocess.Popen(
                [
                    str(py_spy),
                    "record",
                    "--pid",
                    str(sidecar.popen.pid),
                    "--duration",
                    str(args.seconds),
                    "--format",
                    "raw",
                    "--output",
                    str(output),
                    "--rate",
                    "200",
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            run(wrk, envoy.port, 32, args.seconds, script)
            spy.wait(timeout=60)
            for name, value in summarize(output.read_text()).items():
                print(f"{name:<48} {value}")
        finally:
            envoy.stop()
            sidecar.stop()
            backends.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
