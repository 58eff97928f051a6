"""`graysteer demo`: Envoy + sidecar + stable/canary backends on loopback, with traffic.

Sends a few hundred requests with varied users and headers, reports where they
went (per rule and cluster, from Envoy's access log, which records the rule the
sidecar put into dynamic metadata) and explains a few decisions.
"""

import collections
import contextlib
import re
import signal
import tempfile
import threading
from pathlib import Path

from sidecar.dev.devstack import Stack
from sidecar.dev.processes import wait_for
from sidecar.transports.explain import explain_local

_ACCESS_LOG = re.compile(r"\" (\d{3}) \S+ cluster=(\S+) rule=(\S+)")


def demo_traffic(total: int) -> list[tuple[str, dict[str, str], str]]:
    """(label, headers, path) for `total` requests: mostly split users, some overrides."""
    traffic: list[tuple[str, dict[str, str], str]] = []
    for i in range(total):
        kind = i % 10
        if kind == 0:
            traffic.append(("x-canary: 1", {"x-canary": "1"}, "/checkout"))
        elif kind == 1:
            traffic.append(("beta user on /api/", {"x-user-tier": "beta-2"}, "/api/cart"))
        elif kind == 2:
            traffic.append(("no user key", {}, "/checkout"))
        elif kind == 3:
            traffic.append(
                (
                    "client-sent x-route-cluster: canary",
                    {"x-route-cluster": "canary", "x-user-id": f"user-{i}"},
                    "/checkout",
                )
            )
        else:
            traffic.append(("user id header", {"x-user-id": f"user-{i}"}, "/checkout"))
    return traffic


def run_demo(rules: str, envoy_config: str, requests: int, keep_running: bool) -> int:
    for path in (rules, envoy_config):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found (run the demo from the repository root)")
    with (
        tempfile.TemporaryDirectory(prefix="graysteer-demo-") as tmp,
        Stack(rules, envoy_config, Path(tmp)) as stack,
    ):
        assert stack.sidecar is not None
        print(
            f"Envoy on 127.0.0.1:{stack.port} -> sidecar 127.0.0.1:{stack.sidecar.port} -> "
            + ", ".join(f"{n} 127.0.0.1:{b.port}" for n, b in stack.backends.items())
        )
        reached: collections.Counter[tuple[str, str]] = collections.Counter()
        client = stack.client()
        for label, headers, path in demo_traffic(requests):
            status, echo = client.get(path, headers)
            reached[(label, f"{status} {echo.get('backend', '?')}")] += 1
        client.close()

        print(f"\nSent {requests} requests. Where they landed, by kind of request:")
        for (label, where), count in sorted(reached.items()):
            print(f"  {label:<38} -> {where:<12} {count:>4}")

        assert stack.envoy is not None
        envoy_log = stack.envoy.process
        wait_for(lambda: len(_ACCESS_LOG.findall(envoy_log.log_text())) >= requests, 10, "Envoy's access log")
        by_rule = collections.Counter(
            (rule, cluster) for _, cluster, rule in _ACCESS_LOG.findall(envoy_log.log_text())
        )
        print("\nDecisions by rule and cluster (Envoy access log, rule from dynamic metadata):")
        for (rule, cluster), count in sorted(by_rule.items()):
            print(f"  rule={rule:<16} cluster={cluster:<8} {count:>4}")

        print("\nExplained decisions (graysteer explain, the serving code path):")
        for pairs, path in [
            ([("x-user-id", "user-7")], "/checkout"),
            ([("x-user-id", "user-12")], "/checkout"),
            ([("x-user-tier", "beta")], "/api/cart"),
            ([("x-canary", "1")], "/"),
        ]:
            d = explain_local(rules, "GET", path, pairs)
            shown = " ".join(f"{k}: {v}" for k, v in pairs)
            print(
                f"  {shown:<22} {path:<10} -> cluster={d['cluster']} rule={d['rule']} "
                f"bucket={d['bucket']} version={d['version']}"
            )

        if keep_running:
            print(f"\nRunning. Try: curl -H 'x-user-id: 42' http://127.0.0.1:{stack.port}/ (Ctrl-C to stop)")
            stopped = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stopped.set())
            with contextlib.suppress(KeyboardInterrupt):
                stopped.wait()
    print("\nStopped Envoy, the sidecar and the backends.")
    return 0
