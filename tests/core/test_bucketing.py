"""Bucketing invariants (hypothesis) and agreement with flagd's `fractional`."""

import json
import math
import os
import subprocess
import sys

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.bucketing import bucket, cumulative, entry_for

KEYS = [f"user-{i}" for i in range(100_000)]

weights_lists = st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=5).filter(
    lambda ws: sum(ws) > 0
)


def assign(seed: str, weights: list[int], keys: list[str]) -> list[int]:
    bounds = cumulative(weights)
    return [entry_for(bounds, bucket(seed, k, bounds[-1])) for k in keys]


def test_bucket_is_the_flagd_integer_formula() -> None:
    for seed, key, total in [("s", "k", 100), ("checkout-2026", "42", 7), ("", "é", 10_000)]:
        h = mmh3.hash((seed + key).encode("utf-8"), 0, signed=False)
        assert bucket(seed, key, total) == (h * total) >> 32
        assert 0 <= bucket(seed, key, total) < total


def test_entry_is_first_with_cumulative_weight_above_bucket() -> None:
    bounds = cumulative([90, 0, 10])
    assert bounds == (90, 90, 100)
    assert [entry_for(bounds, b) for b in (0, 89, 90, 99)] == [0, 0, 2, 2]


@settings(max_examples=25, deadline=None)
@given(weights=weights_lists, seed=st.text(max_size=12))
def test_each_entry_gets_its_weight_share(weights: list[int], seed: str) -> None:
    """Over 100k keys, each entry's share is within 5 standard deviations of its weight."""
    counts = [0] * len(weights)
    for index in assign(seed, weights, KEYS):
        counts[index] += 1
    total, n = sum(weights), len(KEYS)
    for weight, count in zip(weights, counts, strict=True):
        p = weight / total
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) <= 5 * sigma + 1, (weights, counts)


@settings(max_examples=40, deadline=None)
@given(
    weights=weights_lists,
    raise_by=st.integers(min_value=1, max_value=1000),
    lower_others=st.booleans(),
    seed=st.text(max_size=12),
)
def test_raising_the_last_weight_never_moves_its_users_out(
    weights: list[int], raise_by: int, lower_others: bool, seed: str
) -> None:
    keys = KEYS[:5000]
    before = assign(seed, weights, keys)
    after_weights = list(weights)
    after_weights[-1] += raise_by
    if lower_others and len(weights) > 1:  # a ramp: move weight from the others to the canary
        after_weights[0] = max(0, after_weights[0] - raise_by)
        if sum(after_weights) == 0:
            after_weights[-1] = 1
    after = assign(seed, after_weights, keys)
    last = len(weights) - 1
    moved_out = [k for k, b, a in zip(keys, before, after, strict=True) if b == last and a != last]
    assert moved_out == []


def test_same_key_same_bucket_in_a_new_process() -> None:
    keys = KEYS[:200]
    here = [bucket("seed-x", k, 1000) for k in keys]
    code = (
        "import json,sys; from sidecar.core.bucketing import bucket; "
        "print(json.dumps([bucket('seed-x', k, 1000) for k in json.loads(sys.stdin.read())]))"
    )
    for hash_seed in ("0", "12345"):  # Python's str hash randomisation must not matter
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(keys),
            text=True,
            capture_output=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        assert json.loads(out.stdout) == here


# OpenFeature flagd-testbed (evaluator/gherkin/fractional.feature, @fractional-v2 and
# @fractional-nested; flags from evaluator/flags/testkit-flags.json): the string flagd
# hashes (flag key + targeting key, or a custom bucketing value), the variants with their
# weights, and the variant flagd picks. The last five keys hash to 0, 1, 2^31-1, 2^31 and
# 2^32-1: the edges of the integer formula.
S4 = [("clubs", 25), ("diamonds", 25), ("hearts", 25), ("spades", 25)]
HALF = [("lower", 50), ("upper", 50)]
FLAGD_V2_VECTORS = [
    ("fractional-flagjack", S4, "hearts"),
    ("fractional-flagqueen", S4, "spades"),
    ("fractional-flagten", S4, "clubs"),
    ("fractional-flagnine", S4, "diamonds"),
    ("fractional-flag3", S4, "clubs"),
    ("fractional-flag-shorthandjon@company.com", [("heads", 1), ("tails", 1)], "heads"),
    ("fractional-flag-shorthandjane@company.com", [("heads", 1), ("tails", 1)], "tails"),
    ("shared-seedseven", S4, "hearts"),
    ("shared-seedeight", S4, "diamonds"),
    ("shared-seednine", S4, "clubs"),
    ("shared-seedtwo", S4, "spades"),
    ("jon@company.com", [("b0", 50), ("b1", 50)], "b0"),
    ("user1", [("b0", 50), ("b1", 50)], "b1"),
    ("jon@company.com", [("red", 100), ("blue", 10)], "red"),
    ("user1", [("red", 100), ("blue", 10)], "red"),
    ("jon@company.com", [("red", 0), ("blue", 10)], "blue"),
    ("ejOoVL", HALF, "lower"),
    ("bY9fO-", HALF, "lower"),
    ("SI7p-", HALF, "lower"),
    ("6LvT0", HALF, "upper"),
    ("ceQdGm", HALF, "upper"),
]


@pytest.mark.parametrize(("hashed", "variants", "expected"), FLAGD_V2_VECTORS)
def test_same_variant_as_flagd(hashed: str, variants: list[tuple[str, int]], expected: str) -> None:
    names = [name for name, _ in variants]
    assert names[assign("", [w for _, w in variants], [hashed])[0]] == expected


def test_seed_plus_key_is_what_flagd_hashes() -> None:
    """A rule with seed 'fractional-flag' and key 'jack' = flagd's flag key + targeting key."""
    weights = [w for _, w in S4]
    assert assign("fractional-flag", weights, ["jack"]) == assign("", weights, ["fractional-flagjack"])
