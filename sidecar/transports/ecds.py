"""The table as Lua, served to Envoy over ECDS (`serve --xds-listen`; `envoy-config --mode
envoy_decides` points Envoy's Lua filter here).

One `TableAsLua` follows the served table (sidecar.table.reload's subscription: reloads,
set-weight, rollout steps, ramp-downs, fleet pushes all swap the table through it) and
generates its Lua (sidecar.core.lua_table) off the serving loop, once per table version; a
generation that fails keeps the last good filter, logged and counted. Every Envoy keeps one
ExtensionConfigDiscoveryService stream (state of the world): it gets the current filter as
soon as it asks, and each new version as soon as it exists. Envoy acknowledges a version by
asking again with its nonce; a refusal (NACK: `error_detail` set) is logged and counted, and
Envoy keeps the last filter it accepted, as it does while the sidecar is away.
"""

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.extension.v3 import config_discovery_pb2_grpc as ecds_grpc
from google.protobuf import any_pb2, wrappers_pb2

from sidecar.contract import LUA_FILTER_NAME, LUA_NAMES
from sidecar.core import Table
from sidecar.core.lua_table import lua_source
from sidecar.ops.metrics import Metrics
from sidecar.table.reload import Reloader

log = logging.getLogger("graysteer.ecds")

TYPE_URL = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"


def filter_config(source: str) -> extension_pb2.TypedExtensionConfig:
    """The Lua filter holding `source`, as ECDS serves it.

    `clear_route_cache: false`: by default Envoy's Lua filter clears the route cache on every
    header it changes (a request decided here changes three to five); the generated code
    changes them all, then clears the cache once itself (`clearRouteCache()`), so the router
    matches the route again once, after the last change."""
    lua = lua_pb2.Lua(
        default_source_code=base_pb2.DataSource(inline_string=source),
        clear_route_cache=wrappers_pb2.BoolValue(value=False),
    )
    packed = any_pb2.Any()
    packed.Pack(lua)
    return extension_pb2.TypedExtensionConfig(name=LUA_FILTER_NAME, typed_config=packed)


def _nothing(table: Table) -> Sequence[str]:
    return ()


class TableAsLua:
    """The served table's Lua filter, a new version for every table the reloader swaps in,
    and whenever what the Lua must file of each request changes (`capture`: the headers whose
    values it files for the decision log and the shadow table, sidecar.transports.envoy_decided)."""

    def __init__(self, metrics: Metrics, capture: Callable[[Table], Sequence[str]] = _nothing) -> None:
        self.metrics = metrics
        self.capture = capture
        self._table: Table | None = None  # the table of `config`
        self._captured: tuple[str, ...] = ()  # the headers `config` files
        self.table_version = ""
        self.version = ""  # what ECDS calls it: "<table version>.<sequence>"
        self.config: extension_pb2.TypedExtensionConfig | None = None
        self.decides = False  # whether the Lua decides (False: it leaves every request to the sidecar)
        self._sequence = itertools.count(1)
        self._changed = asyncio.Condition()

    async def update(self, table: Table) -> None:
        """Generate `table`'s filter (in a thread) and hand it to every stream."""
        try:
            captured = tuple(self.capture(table))
        except Exception:  # a bug: file nothing more rather than keep an old table
            log.exception("the inputs to file for table %s could not be listed", table.version)
            captured = ()
        if table is self._table and captured == self._captured:
            return
        try:
            generated = await asyncio.to_thread(lua_source, table, LUA_NAMES, captured)
        except Exception:  # a generator bug must not stop the served filter
            self.metrics.ecds_updates.labels("generation_failed").inc()
            log.exception(
                "the table %s could not be written as Lua; Envoy keeps %s", table.version, self.version
            )
            return
        self.config, self.decides = filter_config(generated.source), generated.decides
        self._table, self.table_version, self._captured = table, table.version, captured
        self.version = f"{table.version}.{next(self._sequence)}"
        if not generated.decides:
            log.warning(
                "table %s: its rules are not written as Lua; Envoy leaves every request to the sidecar",
                table.version,
            )
        async with self._changed:
            self._changed.notify_all()

    async def follow(self, reloader: Reloader) -> None:
        """Keep the filter the served table's (and the shadow table's inputs filed), from now
        until cancelled."""
        changes, shadow = reloader.subscribe(), reloader.watch_shadow()
        try:
            await self.update(reloader.table)
            while True:
                waits = {asyncio.ensure_future(changes.get()), asyncio.ensure_future(shadow.wait())}
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for wait in waits:
                        wait.cancel()
                shadow.clear()
                await self.update(reloader.table)
        finally:
            reloader.unsubscribe(changes)
            reloader.unwatch_shadow(shadow)

    async def next_version(self, after: str) -> tuple[str, extension_pb2.TypedExtensionConfig]:
        """The current (version, filter) once it is not `after`."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.config is not None and self.version != after)
        assert self.config is not None
        return self.version, self.config


class EcdsServicer(ecds_grpc.ExtensionConfigDiscoveryServiceServicer):  # type: ignore[misc]
    """ExtensionConfigDiscoveryService, state of the world: one stream per Envoy."""

    def __init__(self, feed: TableAsLua, metrics: Metrics) -> None:
        self.feed, self.metrics = feed, metrics
        self._nonces = itertools.count(1)

    async def StreamExtensionConfigs(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        sent: dict[str, str] = {}  # nonce -> version, of what this stream was sent
        responses: asyncio.Queue[discovery_pb2.DiscoveryResponse] = asyncio.Queue(maxsize=1)
        reader = asyncio.ensure_future(self._read(request_iterator, sent, responses))
        getter: asyncio.Future[discovery_pb2.DiscoveryResponse] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(responses.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    return  # Envoy closed its side
                yield getter.result()
        finally:
            for task in (reader, getter):
                if task is not None and not task.done():
                    task.cancel()

    async def _read(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        sent: dict[str, str],
        responses: "asyncio.Queue[discovery_pb2.DiscoveryResponse]",
    ) -> None:
        """Read Envoy's requests (the first subscribes; later ones ACK or NACK a version)
        while a task pushes each new version."""
        pusher: asyncio.Task[None] | None = None
        try:
            async for request in requests:
                if request.response_nonce in sent:
                    self._acknowledged(request, sent.pop(request.response_nonce))
                if pusher is None and LUA_FILTER_NAME in request.resource_names:
                    pusher = asyncio.ensure_future(self._push(request.version_info, sent, responses))
        finally:
            if pusher is not None:
                pusher.cancel()

    def _acknowledged(self, request: discovery_pb2.DiscoveryRequest, version: str) -> None:
        if request.HasField("error_detail"):
            self.metrics.ecds_updates.labels("rejected").inc()
            log.error(
                "Envoy %s refused the table as Lua %s (it keeps %s): %s",
                request.node.id or "?",
                version,
                request.version_info or "its default",
                request.error_detail.message,
            )
        else:
            self.metrics.ecds_updates.labels("acked").inc()
            log.info("Envoy %s applied the table as Lua %s", request.node.id or "?", version)

    async def _push(
        self, known: str, sent: dict[str, str], responses: "asyncio.Queue[discovery_pb2.DiscoveryResponse]"
    ) -> None:
        version = known  # what Envoy says it has (after a sidecar restart: its last good one)
        while True:
            version, config = await self.feed.next_version(version)
            nonce = str(next(self._nonces))
            sent[nonce] = version
            if len(sent) > 16:  # versions Envoy skipped without answering
                sent.pop(next(iter(sent)))
            packed = any_pb2.Any()
            packed.Pack(config)
            response = discovery_pb2.DiscoveryResponse(
                version_info=version, resources=[packed], type_url=TYPE_URL, nonce=nonce
            )
            await responses.put(response)
            self.metrics.ecds_updates.labels("sent").inc()


def add_to_server(servicer: EcdsServicer, server: grpc.aio.Server) -> None:
    ecds_grpc.add_ExtensionConfigDiscoveryServiceServicer_to_server(servicer, server)
