"""Where the sidecar's CPU goes under load: `python -m benchmarks.profile [--seconds 8]`.

Starts Envoy (envoy/envoy.yaml), the sidecar and the direct_response upstreams, drives 32
connections with wrk, samples the sidecar with py-spy (PyPI), and reports the share of
samples whose innermost Python frame is graysteer's code, versus everything else (grpcio's
Cython callbacks and poller thread, asyncio, the interpreter)."""

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.scenarios import SCENARIOS, backends_config, front_envoy
from benchmarks.wrk import ensure_wrk, lua_script, run
from sidecar.dev.devstack import Envoy, wait_for


def summarize(raw: str) -> dict[str, float]:
    """py-spy raw output (`frame;frame;... count` per line) -> shares of samples."""
    total = 0
    ours = 0
    by_function: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        inner = next((f for f in reversed(frames) if "sidecar/" in f), None)
        if inner is not None and "sidecar/cli.py" not in inner and "__main__" not in inner:
            ours += samples
            by_function[inner.split(" (")[0]] += samples
    shares = {"samples": float(total), "graysteer_code": round(ours / total, 3) if total else 0.0}
    shares.update({f"  {name}": round(n / total, 3) for name, n in by_function.most_common(8)})
    return shares


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    wrk = ensure_wrk()
    py_spy = Path(sys.executable).parent / "py-spy"
    scenario = next(s for s in SCENARIOS if s.key == "b")
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
        )
        try:
            wait_for(
                lambda: envoy.stats().get("cluster.graysteer.membership_healthy") == 1,
                20,
                "the sidecar to be healthy",
            )
            script = lua_script(workdir / "b.lua", {}, vary_user=True)
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
