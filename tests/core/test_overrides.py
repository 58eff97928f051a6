"""Runtime weight overrides: how a request resolves, and how they meet file edits."""

import pytest

from sidecar.core.overrides import WeightOverride, reconcile, resolve_weights, split_weights

DOC = {
    "version": 1,
    "clusters": ["stable", "canary", "v3"],
    "default": "stable",
    "rules": [
        {"name": "force", "route": "canary"},
        {
            "name": "ramp",
            "split": {
                "key": ["header:u"],
                "to": [{"cluster": "stable", "weight": 90}, {"cluster": "canary", "weight": 10}],
            },
        },
        {
            "name": "three",
            "split": {
                "key": ["header:u"],
                "to": [
                    {"cluster": "stable", "weight": 50},
                    {"cluster": "v3", "weight": 25},
                    {"cluster": "canary", "weight": 25},
                ],
            },
        },
    ],
}


@pytest.mark.parametrize(
    ("current", "requested", "expected"),
    [
        ({"stable": 90, "canary": 10}, {"canary": 20}, {"stable": 80, "canary": 20}),
        ({"stable": 90, "canary": 10}, {"canary": 100}, {"stable": 0, "canary": 100}),
        ({"stable": 90, "canary": 10}, {"stable": 1, "canary": 1}, {"stable": 1, "canary": 1}),
        ({"a": 50, "b": 25, "c": 25}, {"c": 40}, {"a": 50, "b": 25, "c": 40}),  # two unnamed: kept
        ({"a": 50, "b": 25, "c": 25}, {"b": 0, "c": 40}, {"a": 60, "b": 0, "c": 40}),
    ],
)
def test_resolve_weights(current: dict, requested: dict, expected: dict) -> None:
    assert resolve_weights(current, requested) == expected


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        ({"cnary": 20}, "unknown cluster(s) cnary"),
        ({"canary": 120}, "exceed the split's total 100"),
        ({}, "no weights given"),
        ({"stable": 0, "canary": 0}, "total weight must be greater than 0"),
        ({"canary": -1}, "weights must be integers >= 0"),
    ],
)
def test_resolve_weights_refusals(requested: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_weights({"stable": 90, "canary": 10}, requested)


def override(rule: str = "ramp", weights: dict | None = None, base: dict | None = None) -> WeightOverride:
    return WeightOverride(rule, weights or {"stable": 70, "canary": 30}, base or {"stable": 90, "canary": 10})


def test_override_applies_while_the_file_keeps_the_base_weights() -> None:
    effective, kept, dropped = reconcile(DOC, {"ramp": override()})
    assert split_weights(effective, "ramp") == {"stable": 70, "canary": 30}
    assert list(kept) == ["ramp"] and dropped == {}
    assert split_weights(DOC, "ramp") == {"stable": 90, "canary": 10}  # input not modified


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda d: d["rules"][1]["split"]["to"][1].update(weight=15), "changed this rule's weights"),
        (lambda d: d["rules"].pop(1), "no longer a split"),
        (lambda d: d["rules"].__setitem__(1, {"name": "ramp", "route": "stable"}), "no longer a split"),
        (lambda d: d["rules"][1]["split"]["to"][1].update(cluster="v3"), "clusters changed"),
    ],
)
def test_file_edits_of_the_rule_win(edit, why: str) -> None:  # type: ignore[no-untyped-def]
    import copy

    doc = copy.deepcopy(DOC)
    edit(doc)
    _, kept, dropped = reconcile(doc, {"ramp": override()})
    assert kept == {}
    assert why in dropped["ramp"]


def test_unrelated_file_edits_keep_the_override() -> None:
    import copy

    doc = copy.deepcopy(DOC)
    doc["rules"][0]["route"] = "stable"
    doc["rules"][2]["split"]["to"][0]["weight"] = 10
    effective, kept, _ = reconcile(doc, {"ramp": override()})
    assert split_weights(effective, "ramp") == {"stable": 70, "canary": 30}
    assert list(kept) == ["ramp"]


def test_override_json_round_trip_and_validation() -> None:
    o = override()
    assert WeightOverride.from_json("ramp", o.to_json()) == o
    with pytest.raises(ValueError):
        WeightOverride.from_json("ramp", {"weights": {"a": -1}, "base": {"a": 1}})
