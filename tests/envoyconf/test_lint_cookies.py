"""`graysteer check --envoy` for rules that issue a key in a cookie: each mode's generated
config lets the cookie out, and each way of holding it back is found with its fix."""

from collections.abc import Callable
from typing import Any

import pytest

from sidecar.envoyconf.generate import MODES, EnvoyOptions, bootstrap_document
from sidecar.envoyconf.lint import check
from tests.helpers import table_from_yaml

RULES = """\
version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: web
    split:
      key: [header:x-user-id]
      to: [{cluster: stable, weight: 90}, {cluster: canary, weight: 10}]
      when_key_missing: {assign: {cookie: gs}}
"""
TABLE = table_from_yaml(RULES)
Config = Any


def manager(config: Config) -> Config:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def sidecar_filter(config: Config) -> Config:
    return next(
        f["typed_config"]
        for f in manager(config)["http_filters"]
        if f.get("name") in ("envoy.filters.http.ext_proc", "envoy.filters.http.ext_authz")
    )


def findings(mode: str, change: Callable[[Config], None] = lambda _: None) -> list[str]:
    config = bootstrap_document(TABLE, EnvoyOptions(mode=mode))
    change(config)
    return [str(f) for f in check(TABLE, config)]


@pytest.mark.parametrize("mode", MODES)
def test_every_generated_mode_lets_the_cookie_out(mode: str) -> None:
    assert findings(mode) == []


def no_override(config: Config) -> None:
    del sidecar_filter(config)["allow_mode_override"]


def another_override(config: Config) -> None:
    sidecar_filter(config)["allowed_override_modes"] = [
        {"response_header_mode": "SEND", "response_body_mode": "BUFFERED"}
    ]


def every_response(config: Config) -> None:
    no_override(config)
    sidecar_filter(config)["processing_mode"]["response_header_mode"] = "SEND"


def no_set_cookie(config: Config) -> None:
    del sidecar_filter(config)["http_service"]["authorization_response"]["allowed_client_headers_on_success"]


def no_cookie_upstream(config: Config) -> None:
    response = sidecar_filter(config)["http_service"]["authorization_response"]
    patterns = response["allowed_upstream_headers"]["patterns"]
    response["allowed_upstream_headers"]["patterns"] = [p for p in patterns if p != {"exact": "cookie"}]


def no_request_id(config: Config) -> None:
    manager(config)["generate_request_id"] = False


@pytest.mark.parametrize(
    ("mode", "change", "expected"),
    [
        ("ext_proc", no_override, "ext_proc does not allow mode_override"),
        ("ext_proc", another_override, "does not list the sidecar's mode in allowed_override_modes"),
        ("ext_authz_http", no_set_cookie, "allowed_client_headers_on_success"),
        ("envoy_decides", no_set_cookie, "allowed_client_headers_on_success"),
        ("ext_authz_http", no_cookie_upstream, "the backend never sees the key issued to a new visitor"),
        ("envoy_decides", no_request_id, "does not generate x-request-id"),
    ],
)
def test_a_config_that_holds_the_cookie_back_is_found(
    mode: str, change: Callable[[Config], None], expected: str
) -> None:
    found = findings(mode, change)
    assert len(found) == 1 and expected in found[0], found


def test_sending_every_response_needs_no_override() -> None:
    assert findings("ext_proc", every_response) == []


def test_rules_without_a_cookie_ask_nothing_of_envoy() -> None:
    table = table_from_yaml(
        RULES.replace("when_key_missing: {assign: {cookie: gs}}", "when_key_missing: stable")
    )
    config = bootstrap_document(table, EnvoyOptions(mode="ext_proc"))
    no_override(config)
    assert check(table, config) == []
