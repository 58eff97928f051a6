"""Micro-benchmark of the pure decision function on a realistic table (~50 rules, 3 splits,
one mirrored; header, path, identity, version-range, host and gRPC matches), with an empty
table as the same-run baseline: the reference (`Table.decide`, `steer`) and the engine that
serves it (sidecar.core.engine), and `steer` on examples/rules.yaml (coloring)."""

import timeit
from pathlib import Path
from typing import Any

from sidecar.core import Identity, Request, Table, compile_table, steer
from sidecar.core.engine import Engine
from sidecar.table.load import load_rules

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rules.yaml"  # with coloring


def realistic_document() -> dict[str, Any]:
    rules: list[dict[str, Any]] = [
        {
            "name": "admin-needs-identity",
            "match": {"path": {"prefix": "/admin"}, "identity": {"absent": True}},
            "deny": {"status": 403},
        },
        {"name": "force-canary", "match": {"headers": {"x-canary": "1"}}, "route": "canary"},
        {"name": "qa", "match": {"identity": {"glob": "spiffe://example.org/ns/qa/*"}}, "route": "canary"},
        # Evaluated for every sample request, none matching it:
        {
            "name": "old-clients",
            "match": {"headers": {"x-client-version": {"semver": "<2.0.0 || ~2.3"}}},
            "route": "v2",
        },
        {"name": "beta-hosts", "match": {"host": ["beta.*", "*.beta.example.org"]}, "route": "canary"},
        {
            "name": "cart-grpc",
            "match": {"grpc": {"service": "shop.v1.Cart", "method": "Get"}},
            "route": "canary",
        },
    ]
    for i in range(41):  # per-tenant and per-feature routes, none matching the sample traffic
        match: dict[str, Any] = {"headers": {"x-tenant": f"tenant-{i}"}}
        if i % 3 == 0:
            match["path"] = {"prefix": f"/feature-{i}/"}
        if i % 4 == 0:
            match["headers"]["x-user-tier"] = {"regex": f"beta-{i}-[0-9]+"}
        if i % 5 == 0:
            match["identity"] = {"trust_domain": f"tenant{i}.example.org"}
        rules.append({"name": f"tenant-{i}", "match": match, "route": "v2"})
    for name, key, path in (
        ("search-ramp", "header:x-user-id", "/search"),
        ("cart-ramp", "cookie:uid", "/cart"),
        ("checkout-ramp", "header:x-user-id", "/"),
    ):
        rules.append(
            {
                "name": name,
                "match": {"path": {"prefix": path}},
                "split": {
                    "key": [key, "query:gray_id"],
                    "to": [{"cluster": "stable", "weight": 90}, {"cluster": "canary", "weight": 10}],
                },
                **({"mirror": {"cluster": "v2", "percent": 5}} if name == "checkout-ramp" else {}),
            }
        )
    return {
        "version": 1,
        "clusters": ["stable", "canary", "v2"],
        "default": "stable",
        "trust": {"identities": [{"glob": "spiffe://example.org/ns/qa/*"}], "override_headers": ["x-canary"]},
        "coloring": {"lanes": {"stable": "stable", "canary": "canary", "v2": "v2"}},
        "rules": rules,
    }


def sample_requests() -> list[Request]:
    web = Identity.from_sans(True, ("spiffe://example.org/ns/prod/sa/web",))
    headers = {
        ":method": "GET",
        ":authority": "shop.example.org",
        "user-agent": "bench/1.0",
        "accept": "*/*",
        "x-request-id": "5f0c",
        "x-client-version": "3.1.0",
        "traceparent": "00-ab-cd-01",
    }
    return [
        Request(
            {**headers, "x-user-id": f"user-{i}", "cookie": f"uid=u{i}; theme=dark"},
            "GET",
            "/checkout/step-2?x=1",
            web,
        )
        for i in range(200)
    ]


def _per_call_us(function: Any, table: Table, requests: list[Request], repeat: int = 5) -> float:
    def loop() -> None:
        for request in requests:
            function(table, request)

    best = min(timeit.repeat(loop, number=20, repeat=repeat))
    return best / (20 * len(requests)) * 1e6


def micro_benchmark() -> dict[str, Any]:
    document = realistic_document()
    table = compile_table(document, "bench", "bench")
    empty = compile_table({"version": 1, "clusters": ["stable"], "default": "stable"}, "e", "e")
    requests = sample_requests()

    def fresh(function: Any) -> Any:  # steer may rewrite request.headers: copy per call
        def call(t: Table, r: Request) -> Any:
            return function(t, Request(r.headers, r.method, r.path + "?" + r.query, r.identity))

        return call

    engine = Engine(table)
    example = load_rules(EXAMPLE)
    example_engine = Engine(example)
    example_requests = [
        Request({":method": "GET", ":path": "/checkout", "x-user-id": f"user-{i}"}, "GET", "/checkout")
        for i in range(len(requests))
    ]
    return {
        "rules": len(document["rules"]),
        "splits": sum("split" in r for r in document["rules"]),
        # like for like: each measurement has its empty-table baseline in the same run
        "decide_us": round(_per_call_us(Table.decide, table, requests), 3),
        "decide_empty_table_us": round(_per_call_us(Table.decide, empty, requests), 3),
        "steer_us": round(_per_call_us(fresh(steer), table, requests), 3),
        "steer_empty_table_us": round(_per_call_us(fresh(steer), empty, requests), 3),
        # as served: the table's generated engine (sidecar.core.engine)
        "served_decide_us": round(_per_call_us(lambda _, r: engine.decide(r), table, requests), 3),
        "served_steer_us": round(_per_call_us(fresh(lambda _, r: engine.steer(r)), table, requests), 3),
        "example_steer_us": round(_per_call_us(fresh(steer), example, example_requests), 3),
        "served_example_steer_us": round(
            _per_call_us(fresh(lambda _, r: example_engine.steer(r)), example, example_requests), 3
        ),
    }


if __name__ == "__main__":
    print(micro_benchmark())
