"""A real Envoy running a generated Lua decision filter, and what it decided per request.

After the decision filter, an observer Lua filter (tests only) answers every request itself
with what the decision left: the steered headers, the decision's dynamic metadata, the
mark for the sidecar, or the deny answer the decision filter already sent. One Envoy
answers thousands of requests without backends; `OBSERVED` lists what is reported.
"""

import asyncio
import http.client
import json
import ssl
import threading
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from sidecar.contract import LUA_FILTER_NAME, LUA_NAMES, XDS_CLUSTER
from sidecar.core import NO_IDENTITY, Identity, Request, Table, compile_table, decision_fields, steer
from sidecar.core.request import add_header
from sidecar.core.steering import steered_headers
from sidecar.dev.devstack import Envoy
from sidecar.envoyconf.generate import SDS_NODE, EnvoyOptions, bootstrap_document
from sidecar.ops.metrics import Metrics
from sidecar.ops.request_metrics import steering_events
from sidecar.transports.ecds import EcdsServicer, TableAsLua, filter_config
from sidecar.transports.ecds import add_to_server as add_ecds
from sidecar.transports.http_check import MTLS_UNNAMED

T = TypeVar("T")

NAMES = LUA_NAMES

OBSERVER = r"""
local function quote(s)
  return '"' .. s:gsub('[%c"\\\128-\255]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
end
function envoy_on_request(handle)
  local md = handle:streamInfo():dynamicMetadata()
  local out = {}
  local mark = md:get("graysteer")
  if mark and mark["undecided"] then out[#out + 1] = '"undecided": true' end
  if mark and mark["lua_error"] then out[#out + 1] = '"lua_error": true' end
  local filed = md:get("graysteer.request")
  if filed and filed["in"] then out[#out + 1] = '"inputs": ' .. quote(filed["in"]) end
  if filed and filed["events"] then out[#out + 1] = '"events": ' .. quote(filed["events"]) end
  local fields = md:get("envoy.filters.http.ext_authz") or {}
  local parts = {}
  for k, v in pairs(fields) do parts[#parts + 1] = quote(k) .. ": " .. quote(tostring(v)) end
  out[#out + 1] = '"metadata": {' .. table.concat(parts, ", ") .. "}"
  local headers = {}
  for k, v in pairs(handle:headers()) do headers[#headers + 1] = quote(k) .. ": " .. quote(v) end
  out[#out + 1] = '"headers": {' .. table.concat(headers, ", ") .. "}"
  handle:respond({[":status"] = "200", ["x-observed"] = "{" .. table.concat(out, ", ") .. "}"}, "")
end
"""


def _lua_filter(name: str, source: str) -> dict[str, Any]:
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": source},
        },
    }


def served_lua(source: str) -> dict[str, Any]:
    """The decision filter holding `source` exactly as the sidecar serves it over ECDS."""
    config = filter_config(source)
    return {"name": config.name, "typed_config": dict(json_format.MessageToDict(config.typed_config))}


def bootstrap(
    decision_filter: Mapping[str, Any],
    clusters: Sequence[Mapping[str, Any]] = (),
    tls_dir: Path | None = None,
) -> dict[str, Any]:
    """Envoy with `decision_filter` then the observer, listening on a free port; with
    `tls_dir` (ca.pem, server.pem, server.key) it requires a client certificate."""
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "ingress",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 599}}],
                }
            ]
        },
        "http_filters": [
            dict(decision_filter),
            _lua_filter("observer", OBSERVER),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    listener = {
        "name": "ingress",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }
    if tls_dir is not None:
        listener["filter_chains"][0]["transport_socket"] = _tls_socket(tls_dir)
    return {
        "node": {"id": SDS_NODE.id, "cluster": SDS_NODE.cluster},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [listener], "clusters": list(clusters)},
    }


def _tls_socket(directory: Path) -> dict[str, Any]:
    context = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(directory / "server.pem")},
                    "private_key": {"filename": str(directory / "server.key")},
                }
            ],
            "validation_context": {"trusted_ca": {"filename": str(directory / "ca.pem")}},
        },
    }
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def static_lua(source: str) -> dict[str, Any]:
    return served_lua(source)


class Observed:
    """What the decision filter did to one request."""

    def __init__(self, status: int, body: bytes, observed: str | None) -> None:
        self.status = status
        if observed is not None:
            report = json.loads(observed)
            self.denied = False
            self.undecided = bool(report.get("undecided"))
            self.lua_error = bool(report.get("lua_error"))
            self.metadata: dict[str, str] = {
                k.removeprefix(NAMES.key_prefix): v for k, v in report["metadata"].items()
            }
            self.headers: dict[str, str] = report["headers"]
            self.inputs: str | None = report.get("inputs")  # filed for the log and shadow
            self.events: str | None = report.get("events")  # filed when one happens
        else:  # the decision filter answered (a deny)
            self.denied, self.undecided, self.lua_error = True, False, False
            self.metadata, self.headers, self.inputs, self.events = {}, {}, None, None
            self.body = body.decode()


class LuaEnvoy:
    """An Envoy running `config`, asked over one keep-alive connection."""

    def __init__(
        self, config: Mapping[str, Any], workdir: Path, context: ssl.SSLContext | None = None
    ) -> None:
        self.envoy = Envoy(config, workdir, name="lua-envoy")
        self._connection: http.client.HTTPConnection | None = None
        self.connect(context)

    def connect(self, context: ssl.SSLContext | None = None) -> http.client.HTTPConnection:
        """A new connection (with `context`, a TLS one) used by `ask` from now on."""
        if self._connection is not None:
            self._connection.close()
        if context is None:
            self._connection = http.client.HTTPConnection("127.0.0.1", self.envoy.port, timeout=10)
        else:
            self._connection = http.client.HTTPSConnection(
                "127.0.0.1", self.envoy.port, timeout=10, context=context
            )
        return self._connection

    def ask(self, method: str, path: str, headers: Sequence[tuple[str, str]]) -> Observed:
        connection = self._connection
        assert connection is not None
        connection.putrequest(method, path, skip_host=any(k.lower() == "host" for k, _ in headers))
        for name, value in headers:
            connection.putheader(name, value.encode("utf-8", "surrogateescape"))  # lone \udcXX: that byte
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
        return Observed(response.status, body, response.getheader("x-observed"))

    def stop(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self.envoy.stop()


def _bytes_text(text: str) -> str:
    """The observer writes each byte above 0x7f as its own \\u00XX: back to UTF-8 text."""
    return text.encode("latin-1").decode("utf-8", "replace")


def reference(
    table: Table,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    identity: Identity = NO_IDENTITY,
    listener_port: int | None = None,
) -> dict[str, Any]:
    """What the reference steering decides, in the terms `view` reports Envoy's answer."""
    merged: dict[str, str] = {}
    for name, value in headers:
        add_header(merged, name.lower(), value)
    merged[":authority"] = merged.pop("host", "localhost")
    merged[":method"], merged[":path"] = method, path
    steering = steer(table, Request(merged, method, path, identity, listener_port))
    decision = steering.decision
    if decision.deny_status is not None:
        status = decision.deny_status if decision.deny_status < 500 else 403
        return {"denied": status, "body": decision.deny_reason}
    fields = {k: str(v) for k, v in decision_fields(decision).items()}
    sent = {name.lower() for name, _ in headers}
    removed = sorted((set(steering.remove_headers) & sent) - {k for k, _ in steering.set_headers})
    events = list(steering_events(steering))
    if identity is MTLS_UNNAMED:
        events.append("malformed_xfcc")  # as the fast path counts it
    return {
        "set": dict(steering.set_headers),
        "removed": removed,
        "metadata": fields,
        "events": sorted(events),
    }


def view(table: Table, observed: Observed, headers: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Envoy's answer in `reference`'s terms (None when the Lua left the request to the sidecar)."""
    if observed.undecided:
        return {"undecided": True, "lua_error": observed.lua_error}
    if observed.denied:
        return {"denied": observed.status, "body": observed.body}
    received = {k: _bytes_text(v) for k, v in observed.headers.items()}
    names = steered_headers(table)
    metadata = {k.replace("-", "_"): _bytes_text(v) for k, v in observed.metadata.items()}
    sent = {name.lower() for name, _ in headers}
    removed = sorted(n for n in sent - {"host"} if n not in received)
    # the cookie header is steered only when a key is issued: else it is the client's, passed on
    passed = {"cookie": dict((name.lower(), value) for name, value in headers).get("cookie")}
    steered = {n: received[n] for n in names if n in received and received[n] != passed.get(n)}
    events = sorted(observed.events.split(",")) if observed.events is not None else []
    return {"set": steered, "removed": removed, "metadata": metadata, "events": events}


class EcdsServer:
    """The sidecar's ECDS service in this process (its own loop, in a thread): tests push
    tables to an Envoy whose decision filter is `ecds_filter(port)`."""

    def __init__(self) -> None:
        self.metrics = Metrics(CollectorRegistry())
        self.feed = TableAsLua(self.metrics)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server: grpc.aio.Server = self._run(self._start())

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(30)

    async def _start(self) -> grpc.aio.Server:
        server = grpc.aio.server()
        add_ecds(EcdsServicer(self.feed, self.metrics), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server

    def push(self, table: Table) -> str:
        """Serve `table`; the version Envoy will report once it applied it."""
        self._run(self.feed.update(table))
        return self.feed.version

    def count(self, result: str) -> float:
        return (
            self.metrics.registry.get_sample_value("graysteer_ecds_updates_total", {"result": result}) or 0.0
        )

    def stop(self) -> None:
        self._run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def ecds_filter(node_port: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The generated config's ECDS Lua filter, and its cluster pointed at `node_port`."""
    config = bootstrap_document(
        compile_table({"version": 1, "clusters": ["stable"], "default": "stable"}, "v0", "rules.yaml"),
        EnvoyOptions(mode="envoy_decides", xds=("127.0.0.1", node_port)),
    )
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    decision = next(f for f in manager["http_filters"] if f["name"] == LUA_FILTER_NAME)
    clusters = [c for c in config["static_resources"]["clusters"] if c["name"] == XDS_CLUSTER]
    return decision, clusters


def applied_version(envoy: Envoy) -> str:
    """The version of the Lua filter Envoy runs ("" before the first)."""
    return str(
        envoy.stats().get(f"extension_config_discovery.http_filter.{LUA_FILTER_NAME}.version_text", "")
    )
