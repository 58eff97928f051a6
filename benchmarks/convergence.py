"""How fast a fleet converges: `python -m benchmarks.convergence [--replicas 3] [--changes 20]`.

Starts a real etcd (Debian's etcd-server, installed when missing) and N `graysteer serve
--config etcd://...` processes on loopback, then pushes `--changes` rules documents (each a
different split weight) and, for each, measures the time from the start of the write until
every replica's /readyz reports the new version (each polled every 2 ms). Prints the median
and the maximum, and writes benchmarks/results/convergence.json. A second series does the
same for `set-weight` through one replica's admin API.
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from sidecar.admin import client as admin_client
from sidecar.dev.devstack import Sidecar
from sidecar.dev.etcd import Etcd
from sidecar.sources.etcd_client import EtcdAddress, EtcdClient
from sidecar.table.load import config_version

RESULTS = Path(__file__).parent / "results" / "convergence.json"
RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: checkout
        split:
          key: [header:x-user-id]
          to: [{cluster: stable, weight: STABLE}, {cluster: canary, weight: CANARY}]
    """)


def served(replica: Sidecar) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{replica.http}/readyz", timeout=2) as answer:
        return str(json.loads(answer.read())["version"])


def wait_all(replicas: list[Sidecar], done: Callable[[str], bool], started: float) -> float:
    pending = list(replicas)
    while pending:
        pending = [r for r in pending if not done(served(r))]
        if pending:
            if time.monotonic() - started > 10:
                raise TimeoutError("a replica did not converge within 10 s")
            time.sleep(0.002)
    return time.monotonic() - started


def serving(version: str) -> Callable[[str], bool]:
    return lambda served: served.startswith(version)


def moved_from(before: str) -> Callable[[str], bool]:
    return lambda served: served != before


def summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"changes": len(ms), "median_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="graysteer-convergence-") as tmp:
        workdir = Path(tmp)
        etcd = Etcd(workdir)
        address = EtcdAddress.parse(f"{etcd.url}/bench/checkout")
        replicas: list[Sidecar] = []
        try:
            asyncio.run(put(address, RULES.replace("STABLE", "100").replace("CANARY", "0")))
            for i in range(args.replicas):
                replicas.append(
                    Sidecar(
                        str(address),
                        workdir,
                        [
                            "--replica-id",
                            f"r{i}",
                            "--etcd-cache",
                            str(workdir / f"cache-{i}"),
                            "--http-listen",
                            "127.0.0.1:0",
                        ],
                        name=f"r{i}",
                    )
                )
            pushes = []
            for change in range(1, args.changes + 1):
                text = RULES.replace("STABLE", str(100 - change)).replace("CANARY", str(change))
                version = config_version(text.encode())
                started = time.monotonic()
                asyncio.run(put(address, text))
                pushes.append(wait_all(replicas, serving(version), started))
            weights = []
            for change in range(1, args.changes + 1):
                before = served(replicas[0])
                started = time.monotonic()
                admin_client.set_weights(
                    replicas[change % len(replicas)].admin, "checkout", {"canary": 50 + change}
                )
                weights.append(wait_all(replicas, moved_from(before), started))
        finally:
            for replica in replicas:
                replica.stop()
            etcd.stop()
    report = {
        "replicas": args.replicas,
        "push": summary(pushes),
        "set_weight": summary(weights),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


async def put(address: EtcdAddress, text: str) -> None:
    async with EtcdClient(address) as client:
        await client.put(address.rules_key, text.encode())


if __name__ == "__main__":
    raise SystemExit(main())
