"""The table as Lua, without Envoy: what is written into the source and what is left to the
sidecar. (Envoy runs the generated code in tests/e2e/test_lua_decisions.py.)"""

import re
from typing import Any

import pytest

from sidecar.core import compile_table
from sidecar.core.lua_table import (
    INPUTS_NAMESPACE,
    LuaNames,
    capture_inputs,
    lua_source,
    lua_string,
    mark_everything,
)

NAMES = LuaNames("ns", "x-d-", "graysteer", "undecided")
HOSTILE = [
    '"; os.exit(1) --',
    "]]; os.exit(1) --[[",
    '\\"\\n',
    "end end function envoy_on_request() end",
    "line\nbreak\r\x00zero",
    "ü-é-日本-\U0001f600",
    "%s%d%%",
]


def _decode(literal: str) -> str:
    """A Lua literal as `lua_string` writes it, read back (decimal escapes only)."""
    assert literal[0] == literal[-1] == '"'
    raw = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1))), literal[1:-1])
    return raw.encode("latin-1").decode("utf-8")


@pytest.mark.parametrize("text", HOSTILE)
def test_a_string_is_one_literal_of_printable_ascii(text: str) -> None:
    literal = lua_string(text)
    assert all(32 <= ord(c) < 127 for c in literal)
    assert '"' not in literal[1:-1] and re.fullmatch(r'"([^"\\]|\\\d{3})*"', literal)
    assert _decode(literal) == text


def _document(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"version": 1, "clusters": ["stable", "canary"], "default": "stable", "rules": rules}


def test_hostile_rule_texts_appear_only_escaped() -> None:
    rules = [{"name": "r0", "match": {"headers": {"x-a": text}}, "route": "canary"} for text in HOSTILE] + [
        {
            "name": "d",
            "match": {"path": {"prefix": HOSTILE[1]}},
            "deny": {"status": 403, "reason": HOSTILE[0]},
        },
        {
            "name": "s",
            "split": {"key": ["header:x-u"], "seed": HOSTILE[3], "to": [{"cluster": "stable", "weight": 1}]},
        },
    ]
    for i, rule in enumerate(rules):
        rule["name"] = f"r{i}"
    source = lua_source(compile_table(_document(rules), "v1", "rules.yaml"), NAMES)
    assert source.decides
    rest = source.source
    for text in HOSTILE:
        assert lua_string(text) in rest
        rest = rest.replace(lua_string(text), '""')
    assert not any(text in rest for text in HOSTILE)  # nowhere but inside its own literal


def test_a_table_the_generator_does_not_know_marks_every_request() -> None:
    table = compile_table(_document([{"name": "a", "route": "canary"}]), "v1", "rules.yaml")
    table.document["rules"] = []  # the document no longer lines up with the rules
    source = lua_source(table, NAMES)
    assert not source.decides and source.source == mark_everything(NAMES)
    assert 'set("graysteer", "undecided", true)' in source.source


def test_inputs_are_filed_only_when_asked_and_their_names_only_as_literals() -> None:
    table = compile_table(_document([{"name": "a", "route": "canary"}]), "v1", "rules.yaml")
    plain = lua_source(table, NAMES).source
    # the namespace is named once, for the steering events, never for the inputs
    assert plain.count(INPUTS_NAMESPACE) == 1 and '["events_ns"] = "graysteer.request"' in plain
    assert "local CAPTURE = nil" in plain
    names = ("x-user-id", *HOSTILE)
    filed = lua_source(table, NAMES, names).source
    assert lua_string(INPUTS_NAMESPACE) in filed and "local CAPTURE = nil" not in filed
    rest = filed
    for name in names:
        assert lua_string(name) in rest
        rest = rest.replace(lua_string(name), '""')
    assert not any(text in rest for text in HOSTILE)
    assert filed.replace(capture_inputs(names), capture_inputs(())) == plain  # nothing else changes


def test_the_steering_events_are_written_only_on_a_request_where_one_happens() -> None:
    table = compile_table(_document([{"name": "a", "route": "canary"}]), "v1", "rules.yaml")
    source = lua_source(table, NAMES).source
    writes = [line.strip() for line in source.splitlines() if "EVENTS_KEY," in line]
    assert len(writes) == 2 and all(
        w.startswith("if ev then md:set(EVENTS_NS, EVENTS_KEY, ev) end") for w in writes
    )
