"""A bounded soak under mixed hostile traffic: `python -m benchmarks.soak [--minutes 3]`.

Envoy (the shipped config of each transport) + `graysteer serve` + the two sample backends on
loopback; 4 client threads send, in turn, ordinary requests and hostile ones: unique 48 KiB
baggage, thousands of distinct and malformed lanes from a trusted caller, oversized and
malformed header values, walk-around paths, deny paths. Every 15 s it samples the sidecar's
resident memory, threads and open file descriptors (from /proc), and prints them with the
request counts; at the end, the growth from the first sample after warm-up to the last.
"""

import argparse
import http.client
import itertools
import os
import random
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from sidecar.dev.devstack import Stack

REPO = Path(__file__).parents[1]
CONFIGS = {
    "ext_proc": REPO / "envoy" / "envoy.yaml",
    "ext_authz_http": REPO / "envoy" / "ext_authz_http.yaml",
}
RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    trust: {plaintext: true, override_headers: [x-canary]}   # every caller trusted: lanes honoured
    coloring:
      lanes: {stable: stable, canary: canary}
    rules:
      - name: block-admin
        match: {path: {prefix: /admin}}
        deny: {status: 403, reason: internal}
      - name: ramp
        split:
          key: [header:x-user-id]
          to: [{cluster: stable, weight: 90}, {cluster: canary, weight: 10}]
    """)


def hostile(i: int) -> tuple[str, dict[str, str]]:
    kind = i % 8
    if kind == 0:
        return "/", {"baggage": f"t={i}," + ",".join(f"k{j}={'v' * 40}" for j in range(1100))}  # ~48 KiB
    if kind == 1:
        return "/", {"x-graysteer-lane": f"lane-{i}"}  # a new lane every time
    if kind == 2:
        return "/", {"x-graysteer-lane": random.choice(["stable, canary", "x" * 7000, "a;b=c"])}
    if kind == 3:
        return "/", {"x-user-id": "u" * 20000}
    if kind == 4:
        return random.choice(["//admin", "/%61dmin", "/api/../admin", "/admin/x"]), {}
    if kind == 5:
        return "/", {"x-forwarded-client-cert": "URI=spiffe://example.org/" + "a" * 3000, "baggage": "=;,"}
    return f"/p{i % 50}", {"x-user-id": f"user-{i}"}


def sidecar_usage(pid: int) -> tuple[float, int, int]:
    """(resident MiB, threads, open file descriptors) of one process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    rss_mib = int(fields["VmRSS"].split()[0]) / 1024
    return rss_mib, int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd"))


def soak(mode: str, seconds: float, sample_every: float = 15.0) -> None:
    counts = {"sent": 0, "2xx": 0, "4xx": 0, "5xx": 0, "errors": 0}
    lock = threading.Lock()
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="graysteer-soak-") as tmp:
        rules = Path(tmp) / "rules.yaml"
        rules.write_text(RULES)
        with Stack(rules, CONFIGS[mode], Path(tmp)) as stack:
            assert stack.sidecar is not None
            pid = stack.sidecar.popen.pid
            numbers = itertools.count()

            def client() -> None:
                connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
                while not stop.is_set():
                    path, headers = hostile(next(numbers))
                    try:
                        connection.request("GET", path, headers=headers)
                        response = connection.getresponse()
                        response.read()
                        key = f"{response.status // 100}xx"
                    except (OSError, http.client.HTTPException):
                        key = "errors"
                        connection.close()
                        connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
                    with lock:
                        counts["sent"] += 1
                        counts[key] = counts.get(key, 0) + 1

            threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
            for thread in threads:
                thread.start()
            started = time.monotonic()
            samples = []
            print(f"{mode}: seconds  rss_MiB  threads  fds  requests  2xx  4xx  5xx  errors", flush=True)
            while time.monotonic() - started < seconds:
                time.sleep(sample_every)
                rss, nthreads, fds = sidecar_usage(pid)
                samples.append((rss, nthreads, fds))
                print(
                    f"{mode}: {time.monotonic() - started:7.0f}  {rss:7.1f}  {nthreads:7d}  {fds:3d}  "
                    f"{counts['sent']:8d}  {counts['2xx']:4d}  {counts['4xx']:4d}  {counts['5xx']:4d}  "
                    f"{counts['errors']:6d}",
                    flush=True,
                )
            stop.set()
            for thread in threads:
                thread.join(15)
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    print(
        f"{mode}: after warm-up, rss {first[0]:.1f} -> {last[0]:.1f} MiB, threads {first[1]} -> {last[1]}, "
        f"fds {first[2]} -> {last[2]}; {counts['sent']} requests, {counts['5xx']} 5xx, "
        f"{counts['errors']} errors",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="per transport (default 3)")
    parser.add_argument("--mode", choices=[*CONFIGS, "both"], default="both")
    args = parser.parse_args()
    for mode in CONFIGS if args.mode == "both" else [args.mode]:
        soak(mode, args.minutes * 60)


if __name__ == "__main__":
    main()
