"""Property tests of loading: any document that fits the published JSON Schema either compiles
or is refused with located problems; any other document is refused the same way. Never a
traceback, whatever the document."""

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from sidecar.core import RulesError, Table, compile_table
from sidecar.core.schema import RULES_SCHEMA

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


def compiles_or_is_refused_with_located_problems(document: Any) -> Table | None:
    try:
        return compile_table(document, "v", "rules.yaml")
    except RulesError as error:
        assert error.problems, "refused without a reason"
        assert all(problem.where and problem.message for problem in error.problems)
        return None


@SETTINGS
@given(from_schema(RULES_SCHEMA))
def test_any_schema_valid_document_compiles_or_is_refused_with_reasons(document: dict[str, Any]) -> None:
    table = compiles_or_is_refused_with_located_problems(document)
    if table is not None:
        assert table.default in table.clusters
        assert {rule.name for rule in table.rules} == {r["name"] for r in document.get("rules") or []}


@SETTINGS
@given(JSON)
def test_any_other_document_is_refused_with_reasons(document: Any) -> None:
    compiles_or_is_refused_with_located_problems(document)
