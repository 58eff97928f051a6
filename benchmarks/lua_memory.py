"""What the table as Lua costs Envoy in memory: `python -m benchmarks.lua_memory`.

For each table (the default filter before the first table, examples/rules.yaml, the 50-rule
realistic table, 4,000 rules), one Envoy worker runs the generated filter, and the filter
itself reports its Lua state's size after a full collection (`collectgarbage("count")`,
through a request header only this measurement's copy of the code answers); Envoy's own
heap (`/memory`, allocated) is read beside it. Envoy keeps one Lua state per worker.
"""

import http.client
import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.decide import realistic_document
from benchmarks.table_size import document
from sidecar.contract import LUA_NAMES
from sidecar.core import compile_table
from sidecar.core.lua_table import lua_source, mark_everything
from sidecar.dev.devstack import Envoy

REPO = Path(__file__).parents[1]
REPORT = (
    "function envoy_on_request(handle)\n"
    "  if handle:headers():get('x-lua-memory') then\n"
    "    collectgarbage('collect')\n"
    "    local kib = string.format('%d', collectgarbage('count'))\n"
    "    handle:respond({[':status'] = '200', ['x-kib'] = kib}, '')\n"
    "    return\n"
    "  end\n"
)
LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def bootstrap(source: str) -> dict[str, Any]:
    """One listener: the Lua filter, then a direct 200."""
    manager = {
        "@type": HCM,
        "stat_prefix": "ingress",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "graysteer.decide",
                "typed_config": {"@type": LUA, "default_source_code": {"inline_string": source}},
            },
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
        ],
    }
    listener = {
        "name": "ingress",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [listener]},
    }


def ask(port: int, headers: dict[str, str]) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/", headers=headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def measure(source: str, workdir: Path) -> dict[str, float]:
    reporting = source.replace("function envoy_on_request(handle)\n", REPORT, 1)
    assert reporting != source
    envoy = Envoy(bootstrap(reporting), workdir, name="lua-memory", concurrency=1)
    try:
        for i in range(20):
            ask(envoy.port, {"x-user-id": f"user-{i}"})
        kib = int(ask(envoy.port, {"x-lua-memory": "1"}).getheader("x-kib") or 0)
        allocated = int(json.loads(envoy.admin_get("/memory")[1])["allocated"])
    finally:
        envoy.stop()
    return {"lua_state_mib": round(kib / 1024, 2), "envoy_allocated_mib": round(allocated / 2**20, 1)}


def main() -> None:
    tables: dict[str, Any] = {
        "before the first table": None,
        "examples/rules.yaml": yaml.safe_load((REPO / "examples" / "rules.yaml").read_text()),
        "50 rules (realistic)": realistic_document(),
        "4,000 rules": yaml.safe_load(document(4000)),
    }
    with tempfile.TemporaryDirectory() as directory:
        for name, doc in tables.items():
            source = (
                mark_everything(LUA_NAMES)
                if doc is None
                else lua_source(compile_table(doc, "v1", "rules.yaml"), LUA_NAMES).source
            )
            found = measure(source, Path(directory))
            print(
                f"{name}: Lua state {found['lua_state_mib']} MiB per worker, "
                f"Envoy heap {found['envoy_allocated_mib']} MiB"
            )


if __name__ == "__main__":
    main()
