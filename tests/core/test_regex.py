"""The rules' regexes are RE2 as Envoy's safe_regex: same syntax, same limits, whole values."""

import pytest

from sidecar.core.regex import MAX_PROGRAM_SIZE, RegexError, compile_regex


def test_regexes_are_real_re2_never_python_re() -> None:
    # A module named `re2` that fell back to Python's `re` would accept these.
    for pattern in (r"(a)\1", "(?=a)", "(?<=a)b", "(?!a)", r"a\Z", "a++"):
        with pytest.raises(RegexError, match="RE2"):
            compile_regex(pattern)
    # RE2 semantics, not Python's: \d is ASCII only, `$` does not match before a final newline
    assert not compile_regex(r"b\d+")("b\u0663")  # ARABIC-INDIC DIGIT THREE: Python's \d matches
    assert not compile_regex("a$\n")("a\n")  # Python's `$` also matches before a final newline


def test_program_size_limit_is_envoys() -> None:
    assert MAX_PROGRAM_SIZE == 100
    assert compile_regex("a{96}")("a" * 96)  # program size 100: allowed
    with pytest.raises(RegexError, match=r"program size 101 > 100"):
        compile_regex("a{97}")
    with pytest.raises(RegexError, match=r"program size 1004 > 100"):
        compile_regex("a{1000}")


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("b[0-9]+", "b12", True),
        ("b[0-9]+", "b12x", False),  # the whole value, as Envoy
        ("b[0-9]+", "xb12", False),
        ("(?i)beta", "BeTa", True),
        ("é+", "éé", True),  # UTF-8, as Envoy's RE2
    ],
)
def test_regexes_match_the_whole_value(pattern: str, text: str, expected: bool) -> None:
    assert compile_regex(pattern)(text) is expected
