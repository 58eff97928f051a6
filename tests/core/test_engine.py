"""The serving engine itself: what it generates from hostile rule texts, when it leaves a table
to the reference walk, and the engines built ahead by a reload. (That it answers as the
reference does is tests/core/test_engine_differential.py and every core test run twice.)"""

import copy
import dataclasses
from typing import Any

import pytest

from sidecar.core import chain as chain_module
from sidecar.core import steer
from sidecar.core.engine import Engine, engine_for, prepare
from tests.helpers import request, table_from_rules

HOSTILE = ["'); import os; os.exit(3) #", '"\\\n{}', "\\x00\\'", "a'b\"c"]


@pytest.mark.parametrize("text", HOSTILE)
def test_rule_texts_are_data_in_the_generated_code_never_code(text: str) -> None:
    rules = [
        {"name": f"exact{i}", "match": {"headers": {"x-t": text + str(i)}}, "route": "canary"}
        for i in range(5)
    ] + [
        {
            "name": "prefix",
            "match": {"headers": {"x-p": {"prefix": text}}, "path": {"exact": text}},
            "route": "canary",
        },
        {
            "name": "split",
            "split": {
                "key": ["header:x-u", "cookie:" + "c", "query:q"],
                "seed": text,
                "to": [{"cluster": "stable", "weight": 1}],
            },
        },
    ]
    table = table_from_rules(rules)
    engine = Engine(table)
    assert engine.generated
    assert engine.decide(request(x_t=text + "3")).rule == "exact3"
    assert engine.decide(request(text, x_p=text + "!")).rule == "prefix"
    assert engine.decide(request(x_p=text)).rule == "split"


def test_a_table_whose_rules_do_not_line_up_with_its_document_is_walked_by_the_reference() -> None:
    table = table_from_rules([{"name": "a", "match": {"headers": {"x-a": "1"}}, "route": "canary"}])
    edited = dataclasses.replace(table, rules=())  # no longer the document's rules
    engine = Engine(edited)
    assert not engine.generated and engine.error is None
    assert engine.decide(request(x_a="1")) == edited.decide(request(x_a="1"))
    assert engine.steer(request(x_a="1")) == steer(edited, request(x_a="1"))


def test_tables_over_the_size_limit_are_walked_by_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain_module, "MAX_GENERATED_RULES", 2)
    rules = [{"name": f"r{i}", "match": {"headers": {"x-a": str(i)}}, "route": "canary"} for i in range(3)]
    assert not Engine(table_from_rules(rules)).generated
    assert Engine(table_from_rules(rules[:2])).generated


def _wide_rule(conditions: int) -> dict[str, Any]:
    headers = {f"x-h{i:05d}": f"v{i}" for i in range(conditions)}
    return {"name": "wide", "match": {"headers": headers}, "route": "canary"}


def _wide_split(sources: int) -> dict[str, Any]:
    split = {
        "key": [f"header:x-k{i:05d}" for i in range(sources)],
        "to": [{"cluster": "canary", "weight": 1}],
    }
    return {"name": "wide-split", "split": split}


def _long_values(count: int, length: int) -> list[dict[str, Any]]:
    """An index run of exact-header rules whose values are long (written as literals)."""
    return [
        {"name": f"long{i}", "match": {"headers": {"x-t": f"{i}" + "v" * length}}, "route": "canary"}
        for i in range(count)
    ]


SHAPES = {
    "a long chain": [
        {"name": f"r{i}", "match": {"path": {"prefix": f"/p{i}/"}}, "route": "canary"} for i in range(205)
    ],
    "one rule of 3,000 conditions": [_wide_rule(3000)],
    "one split of 3,000 key sources": [_wide_split(3000)],
    "long rules after a wide one": [
        _wide_rule(300),
        *(_wide_rule(60) | {"name": f"w{i}"} for i in range(40)),
    ],
    "long values in an index run": _long_values(8, 20_000),
    "a long regex and prefix": [
        {
            "name": "long",
            "match": {"headers": {"x-p": {"prefix": "p" * 50_000}}, "path": {"exact": "/" + "a" * 50_000}},
            "route": "canary",
        }
    ],
}


@pytest.mark.parametrize("rules", SHAPES.values(), ids=SHAPES.keys())
def test_what_one_compile_holds_is_bounded_by_size(
    rules: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """compile() holds the GIL for its whole text: a reload in a thread compiling 4,000 rules
    at once stopped the serving loop for 0.2 s, one rule of 45,000 exact-header conditions
    for 0.7 s, one split of 30,000 key sources for 1 s. Whatever the rules' shape, no call is
    given more than MAX_COMPILE_CHARS, and the engine still answers as the reference."""
    sizes: list[int] = []
    real_compile = compile

    def measuring(text: str, *args: Any) -> Any:
        sizes.append(len(text))
        return real_compile(text, *args)

    monkeypatch.setattr(chain_module, "compile", measuring, raising=False)
    table = table_from_rules(rules)
    engine = Engine(table)
    assert engine.generated
    assert sizes and max(sizes) <= chain_module.MAX_COMPILE_CHARS
    probes = [request(), request(path="/p0/x"), request(path="/p204/x"), request(x_t="7" + "v" * 20_000)]
    probes += [request(**{f"x_h{i:05d}": f"v{i}" for i in range(n)}) for n in (60, 300, 3000)]
    probes += [request(x_k02999="u1"), request(x_k00000="u2", x_k00001="u3"), request(x_p="p" * 50_000)]
    for probe in probes:
        assert engine.decide(probe) == table.decide(probe)
        assert engine.steer(probe) == steer(table, probe)


def test_a_failing_generator_leaves_the_table_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(table: object) -> None:
        raise RuntimeError("generator bug")

    monkeypatch.setattr("sidecar.core.engine.generate", broken)
    table = table_from_rules([{"name": "a", "route": "canary"}])
    engine = Engine(table)
    assert not engine.generated and engine.error is not None and "generator bug" in engine.error
    assert engine.steer(request()) == steer(table, request())


def test_an_engine_built_ahead_is_handed_out_once_for_its_own_table() -> None:
    table = table_from_rules([{"name": "a", "route": "canary"}])
    other = table_from_rules([{"name": "a", "route": "canary"}])  # equal, not the same table
    built = prepare(table)
    assert engine_for(other) is not built
    assert engine_for(table) is built
    again = engine_for(table)  # taken already: a new one
    assert again is not built and again.table is table


@pytest.mark.parametrize(
    "edit",
    [
        lambda rule: rule.update(enabled=False),  # a rule field the generator does not know
        lambda rule: rule["match"].update(query={"q": "1"}),  # a match form it does not know
        lambda rule: rule["match"]["headers"].update({"x-b": {"suffix": "z"}}),  # a header form
        lambda rule: rule["match"].update(path={"suffix": "/z"}),  # a path form
    ],
)
def test_rules_the_generator_does_not_know_are_walked_by_the_reference(edit: Any) -> None:
    """A form added to the rules file later must never be generated as if it were absent."""
    table = table_from_rules([{"name": "a", "match": {"headers": {"x-a": "1"}}, "route": "canary"}])
    assert Engine(table).generated
    document = copy.deepcopy(table.document)
    edit(document["rules"][0])
    assert not Engine(dataclasses.replace(table, document=document)).generated
