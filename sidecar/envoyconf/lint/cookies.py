"""Checks that an issued key's cookie reaches the client (`when_key_missing: {assign: ...}`),
in each way Envoy can call the sidecar or decide itself."""

from collections.abc import Iterator
from typing import Any

from sidecar.core import Table
from sidecar.envoyconf.lint.common import EXT_PROC, Finding, matches_any
from sidecar.envoyconf.lint.decides import ecds_lua

# What the sidecar's mode_override asks for (sidecar.transports.ext_proc.RESPONSE_HEADERS_MODE),
# each field with Envoy's default where the config leaves it out.
COOKIE_MODE = {
    "request_header_mode": "SEND",
    "response_header_mode": "SEND",
    "request_body_mode": "NONE",
    "response_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP",
}
_MODE_DEFAULTS = {name: ("NONE" if "body" in name else "DEFAULT") for name in COOKIE_MODE}


def check_cookies(table: Table, hcm: dict[str, Any], filters: list[dict[str, Any]]) -> Iterator[Finding]:
    """The filters that call the sidecar, and the Lua, must let an issued cookie out."""
    if not table.assigns:
        return
    names = ", ".join(spec.name for spec in table.assigns)
    stat = hcm.get("stat_prefix", "?")
    for config in filters:
        if config.get("@type") == EXT_PROC:
            yield from _ext_proc(config, names)
        elif "http_service" in config:
            response = config["http_service"].get("authorization_response") or {}
            if not matches_any(response.get("allowed_client_headers_on_success"), "set-cookie"):
                yield Finding(
                    f"ext_authz does not pass the sidecar's set-cookie to the client on success: the "
                    f"key issued to a visitor without one (cookie {names}) is never stored, so every "
                    "request of theirs is a new visitor, in a lane drawn anew",
                    "add {exact: set-cookie} to authorization_response.allowed_client_headers_on_success",
                )
    if ecds_lua(hcm) is not None and hcm.get("generate_request_id") is False:
        yield Finding(
            f"listener {stat!r} does not generate x-request-id: the Lua draws a new visitor's key "
            f"(cookie {names}) from it, so it leaves every new visitor to the sidecar",
            "remove generate_request_id: false",
        )


def _ext_proc(config: dict[str, Any], names: str) -> Iterator[Finding]:
    mode = config.get("processing_mode") or {}
    if mode.get("response_header_mode") == "SEND":
        return  # every response's headers are sent: no override needed
    problem = None
    if not config.get("allow_mode_override"):
        problem = "does not allow mode_override"
    else:
        allowed = config.get("allowed_override_modes") or []
        if allowed and not any(_is_cookie_mode(m) for m in allowed):
            problem = "does not list the sidecar's mode in allowed_override_modes"
    if problem:
        yield Finding(
            f"ext_proc {problem}: a request issued a new key cannot ask for its response "
            f"headers, so the cookie ({names}) never reaches the client and every request of a new "
            "visitor draws a lane anew",
            "set allow_mode_override: true and allowed_override_modes: [{request_header_mode: SEND, "
            "response_header_mode: SEND, request_trailer_mode: SKIP, response_trailer_mode: SKIP}] "
            "(`graysteer envoy-config`)",
        )


def _is_cookie_mode(mode: dict[str, Any]) -> bool:
    """Whether an allowed override is the sidecar's (Envoy compares all but request headers)."""
    return all(
        mode.get(name, _MODE_DEFAULTS[name]) == value
        for name, value in COOKIE_MODE.items()
        if name != "request_header_mode"
    )
