"""Small builders shared by the tests."""

import textwrap
from typing import Any

import yaml

from sidecar.core import Request, Table, compile_table


def table_from_yaml(text: str, version: str = "test") -> Table:
    return compile_table(yaml.safe_load(textwrap.dedent(text)), version, "rules.yaml")


def table_from_rules(
    rules: list[dict[str, Any]],
    clusters: tuple[str, ...] = ("stable", "canary"),
    default: str = "stable",
    **top: Any,
) -> Table:
    doc = {"version": 1, "clusters": list(clusters), "default": default, "rules": rules, **top}
    return compile_table(doc, "test", "rules.yaml")


def request(path: str = "/", method: str = "GET", **headers: str) -> Request:
    """Headers as keyword arguments: x_user_id='7' -> x-user-id: 7."""
    return Request({k.replace("_", "-"): v for k, v in headers.items()}, method, path)
