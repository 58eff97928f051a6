"""The Lua filter as ECDS serves it (sidecar.transports.ecds.filter_config)."""

from envoy.extensions.filters.http.lua.v3 import lua_pb2

from sidecar.contract import LUA_FILTER_NAME
from sidecar.transports.ecds import filter_config


def test_the_served_filter_clears_the_route_cache_only_where_the_lua_asks() -> None:
    # Envoy's default clears it on every header the Lua changes; the generated code clears
    # it once, after its last change (tests/e2e/test_envoy_decides.py routes by it).
    config = filter_config("function envoy_on_request(handle) end")
    lua = lua_pb2.Lua()
    assert config.name == LUA_FILTER_NAME and config.typed_config.Unpack(lua)
    assert lua.HasField("clear_route_cache") and lua.clear_route_cache.value is False
    assert lua.default_source_code.inline_string == "function envoy_on_request(handle) end"
