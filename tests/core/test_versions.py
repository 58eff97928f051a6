"""`semver` header conditions: npm's range semantics, checked against node-semver's own
range fixtures (tests/core/data/node_semver_ranges.json, converted from
npm/node-semver test/fixtures/range-{include,exclude}.js at the commit it names)."""

import json
from pathlib import Path

import pytest

from sidecar.core import steer
from sidecar.core.versions import is_version, range_matcher, range_problem
from tests.helpers import request, table_from_rules

CORPUS = json.loads((Path(__file__).parent / "data" / "node_semver_ranges.json").read_text())
# Our ranges are npm's defaults: no `loose`, no `includePrerelease` (those fixtures are skipped).
INCLUDE = [(r, v) for r, v, options in CORPUS["include"] if options is None]
EXCLUDE = [(r, v) for r, v, options in CORPUS["exclude"] if options is None]


def test_the_corpus_is_the_published_one() -> None:
    assert len(INCLUDE) > 80 and len(EXCLUDE) > 60  # 178 cases without options at the commit taken


@pytest.mark.parametrize(("spec", "version"), INCLUDE)
def test_node_semver_include_fixtures(spec: str, version: str) -> None:
    if not spec.strip():  # npm reads "" as "*"; a rules file must write "*" (refused, with that hint)
        assert range_problem(spec) is not None
        spec = "*"
    assert range_problem(spec) is None
    assert range_matcher(spec)(version)


@pytest.mark.parametrize(("spec", "version"), EXCLUDE)
def test_node_semver_exclude_fixtures(spec: str, version: object) -> None:
    if range_problem(spec) is not None and spec.strip():
        return  # refused when the rules load: nothing can match it
    matches = range_matcher(spec)
    assert not (isinstance(version, str) and matches(version))


@pytest.mark.parametrize(
    ("spec", "version", "expected"),
    [
        ("^1.2.3", "1.9.9", True),  # >=1.2.3 <2.0.0
        ("^1.2.3", "2.0.0", False),
        ("^0.2.3", "0.3.0", False),  # >=0.2.3 <0.3.0
        ("~1.2.3", "1.2.9", True),  # >=1.2.3 <1.3.0
        ("~1.2.3", "1.3.0", False),
        ("2.x", "2.99.1", True),
        ("2.x", "3.0.0", False),
        ("*", "0.0.1", True),
        (">=1.0.0 <1.5.0 || >=2.0.0", "1.7.0", False),  # spaces: AND; ||: OR
        (">=1.0.0 <1.5.0 || >=2.0.0", "2.1.0", True),
        ("^1.2.3", "v1.3.0", True),  # a leading v is accepted
        ("^v1.2.3", "1.3.0", True),
        ("^2.3.0", "2.3.1-beta.1", False),  # a pre-release only matches a range naming its tuple
        (">=2.3.1-beta.0", "2.3.1-beta.1", True),
        (">=2.3.1-beta.0", "2.3.2-beta.1", False),
        ("^1.2.3", "1.3.0+build.7", True),  # build metadata is ignored
        ("^1.2.3", "not-a-version", False),
        ("^1.2.3", "1.2", False),
        ("^1.2.3", "", False),
        ("^1.2.3", "1." * 200 + "0", False),
    ],
)
def test_range_semantics(spec: str, version: str, expected: bool) -> None:
    matches = range_matcher(spec)
    assert matches(version) is expected
    assert matches(version) is expected  # and the cached answer


def test_the_match_cache_is_bounded() -> None:
    matches = range_matcher("^1.0.0")
    for patch in range(5000):
        assert matches(f"1.0.{patch}")
    assert not matches("x" * 10_000)
    cache = matches.__closure__  # the cache is a closed-over dict
    assert cache is not None
    sizes = [len(cell.cell_contents) for cell in cache if isinstance(cell.cell_contents, dict)]
    assert sizes and max(sizes) <= 1024


API_RULES = [
    {"name": "v2-clients", "match": {"headers": {"X-Api-Version": {"semver": "^2.0.0"}}}, "route": "canary"}
]


def test_a_semver_condition_routes_and_a_non_version_is_counted_never_an_error() -> None:
    table = table_from_rules(API_RULES, trust={"plaintext": True})
    assert steer(table, request(x_api_version="2.4.1")).decision.rule == "v2-clients"
    assert steer(table, request(x_api_version="1.9.0")).decision.rule == "default"
    other = steer(table, request(x_api_version="latest"))
    assert other.decision.rule == "default" and other.malformed == ("version",)
    assert steer(table, request()).malformed == ()


def test_is_version() -> None:
    assert is_version("1.2.3") and is_version("v2.3.1-beta.1") and not is_version("1.2")
