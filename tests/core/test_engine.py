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


def test_a_long_chain_is_compiled_a_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile() holds the GIL for its whole text: a reload in a thread compiling 4,000 rules
    at once stopped the serving loop for 0.2 s. No call may take more than CHUNK_RULES rules."""
    sizes: list[int] = []
    real_compile = compile

    def counting(text: str, *args: Any) -> Any:
        sizes.append(text.count("return _k"))  # one per route rule (a Decision constant)
        return real_compile(text, *args)

    monkeypatch.setattr(chain_module, "compile", counting, raising=False)
    count = 2 * chain_module.CHUNK_RULES + 5
    rules = [
        {"name": f"r{i}", "match": {"path": {"prefix": f"/p{i}/"}}, "route": "canary"} for i in range(count)
    ]
    table = table_from_rules(rules)
    engine = Engine(table)
    assert engine.generated
    # three chunks of `decide`, its chain calling them (with the default), `denied`
    assert sizes == [chain_module.CHUNK_RULES, chain_module.CHUNK_RULES, 5, 1, 0]
    for i in (0, chain_module.CHUNK_RULES, count - 1, count):
        probe = request(path=f"/p{i}/x")
        assert engine.decide(probe) == table.decide(probe)


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
