"""Every pattern matches whole strings: JSON Schema's `pattern` has ECMA-262's `$` (end of the
text), which Python's re.search also takes before a final newline; and no regex in the package
ends in a bare `$` (fullmatch or `\\Z` instead)."""

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.checker import Validator, whole_string
from sidecar.core.schema import RULES_SCHEMA
from sidecar.core.state import STATE_SCHEMA
from sidecar.core.validate import problems

PACKAGE = Path(__file__).resolve().parents[2] / "sidecar"


@pytest.mark.parametrize(
    ("pattern", "whole"),
    [
        ("^a$", r"^a\Z"),
        (r"^[a-z$]+$", r"^[a-z$]+\Z"),  # a $ in a class is a dollar sign
        (r"^a\$", r"^a\$"),  # an escaped one too
        (r"^[^]$]x$", r"^[^]$]x\Z"),  # a leading ] in a class is part of it
        (r"^(a|b)$|^c$", r"^(a|b)\Z|^c\Z"),
        (r"^spiffe://", r"^spiffe://"),
    ],
)
def test_whole_string_makes_end_anchors_end_of_text(pattern: str, whole: str) -> None:
    assert whole_string(pattern) == whole


def patterns(schema: Any) -> Iterator[str]:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            else:
                yield from patterns(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from patterns(item)


PATTERNS = sorted(set(patterns(RULES_SCHEMA)) | set(patterns(STATE_SCHEMA)))


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p.endswith("$")])
@settings(max_examples=25)
@given(data=st.data())
def test_no_schema_pattern_takes_a_trailing_newline(pattern: str, data: st.DataObject) -> None:
    value = data.draw(st.from_regex(whole_string(pattern), fullmatch=True))
    validator = Validator({"type": "string", "pattern": pattern})
    assert validator.is_valid(value)
    assert not validator.is_valid(value + "\n")


@pytest.mark.parametrize(
    "field",
    [
        "routing_header: |\n  x-route-cluster\n",
        "mirror_header: |\n  x-mirror\n",
        "coloring:\n  header: |\n    x-lane\n  lanes: {stable: stable}\n",
        "rules:\n  - {name: 'r\\n', route: stable}\n",
        "rules:\n  - {name: r, split: {key: ['identity\\n'], to: [{cluster: stable, weight: 1}]}}\n",
        "rules:\n  - {name: r, match: {headers: {'x-a\\n': '1'}}, route: stable}\n",
        "rules:\n  - {name: r, match: {grpc: {service: 'a.B\\n'}}, route: stable}\n",
    ],
)
def test_a_name_with_a_trailing_newline_is_refused(field: str) -> None:
    document = yaml.safe_load("version: 1\nclusters: [stable]\ndefault: stable\n" + field)
    found = problems(document)
    assert found and "\\n" in str(found[0]), found


def regex_literals(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, pattern) of each string literal given first to a function of `re`."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "re"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def test_no_regex_in_the_package_ends_in_a_bare_dollar() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {pattern!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, pattern in regex_literals(ast.parse(path.read_text()))
        if whole_string(pattern) != pattern
    ]
    assert found == [], "use fullmatch or \\Z: $ also matches before a final newline"
