"""`graysteer check --envoy` on the front proxy where Envoy decides (envoy/envoy_decides.yaml):
the Lua filter over ECDS, its safe default, its cluster and the fast path behind it."""

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.envoyconf.lint import check
from sidecar.table.load import load_rules

REPO = Path(__file__).parents[2]
SHIPPED = yaml.safe_load((REPO / "envoy" / "envoy_decides.yaml").read_text())
TABLE = load_rules(REPO / "examples" / "rules.yaml")

Config = Any


def filters(config: Config) -> Config:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"
    ]


def discovery(config: Config) -> Config:
    return filters(config)[0]["config_discovery"]


def no_default(config: Config) -> None:
    discovery(config)["default_config"]["default_source_code"]["inline_string"] = (
        "function envoy_on_request(h) end"
    )


def warming(config: Config) -> None:
    del discovery(config)["apply_default_config_without_warming"]


def other_name(config: Config) -> None:
    filters(config)[0]["name"] = "lua"


def no_cluster(config: Config) -> None:
    config["static_resources"]["clusters"] = [
        c for c in config["static_resources"]["clusters"] if c["name"] != "graysteer_xds"
    ]


def http1_cluster(config: Config) -> None:
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "graysteer_xds":
            del cluster["typed_extension_protocol_options"]


def no_fallback(config: Config) -> None:
    del filters(config)[1]


def always_asks(config: Config) -> None:
    del filters(config)[1]["typed_config"]["filter_enabled_metadata"]


def test_the_shipped_config_is_clean() -> None:
    assert check(TABLE, SHIPPED) == []


@pytest.mark.parametrize(
    ("breakage", "found"),
    [
        (no_default, "before the first table"),
        (warming, "before the first table"),
        (other_name, "named 'lua'"),
        (no_cluster, "which does not exist"),
        (http1_cluster, "does not speak HTTP/2"),
        (no_fallback, "no fast-path ext_authz filter after the Lua filter"),
        (always_asks, "does not run exactly for the requests the Lua left undecided"),
    ],
)
def test_each_breakage_is_found(breakage: Callable[[Config], None], found: str) -> None:
    config = copy.deepcopy(SHIPPED)
    breakage(config)
    problems = [str(f) for f in check(TABLE, config)]
    assert any(found in p for p in problems), problems
