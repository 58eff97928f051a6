"""The JSON Schema validator for the documents Graysteer reads, with whole-string patterns.

JSON Schema's `pattern` is an ECMA-262 regular expression, in which `$` matches only at the
end of the text. jsonschema runs it with Python's `re.search`, in which `$` also matches
before a final newline, so `^[a-z-]+$` took `"x-route-cluster\\n"` (a YAML `|` block adds
that newline): a header name with a bare LF reached Envoy. Here `$` outside a character
class means `\\Z`, as the published schema (docs/rules.schema.json) means it for every other
JSON Schema tool.
"""

import re
from collections.abc import Iterator
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators


def whole_string(pattern: str) -> str:
    """`pattern` with each end-of-text `$` (not escaped, not in a class) made `\\Z`."""
    out, in_class, index = [], False, 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            out.append(pattern[index : index + 2])
            index += 2
            continue
        if in_class:
            in_class = char != "]" or pattern[index - 1] == "["
        elif char == "[":
            in_class = True
            if pattern[index + 1 : index + 2] == "^":
                out.append("[^")
                index += 2
                if pattern[index : index + 1] == "]":  # a leading ] is a literal
                    out.append("]")
                    index += 1
                continue
        elif char == "$":
            char = r"\Z"
        out.append(char)
        index += 1
    return "".join(out)


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(whole_string(pattern))


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _compiled(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


Validator = validators.extend(Draft202012Validator, {"pattern": _pattern})  # type: ignore[no-untyped-call]
