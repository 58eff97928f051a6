"""The rules file's regexes: RE2, compiled as Envoy compiles `safe_regex` (`compile_regex`),
so that a pattern means the same in the sidecar as in Envoy and matching takes linear time."""

import functools
from collections.abc import Callable
from typing import Any

import re2

MAX_PROGRAM_SIZE = 100  # Envoy's default `re2.max_program_size.error_level`; larger is refused


def _envoy_options() -> Any:
    """RE2's defaults without error logging: Envoy's `RE2::Quiet` (UTF-8, Perl-like syntax,
    case-sensitive, leftmost-first)."""
    if not hasattr(re2, "Options"):
        raise ImportError("the `re2` module in use is not google-re2's: install google-re2")
    options = re2.Options()
    options.log_errors = False
    return options


_OPTIONS = _envoy_options()


def _require_re2_itself() -> None:
    """Refuse to run on a module named `re2` that is not google-re2's binding. Some (pyre2,
    fb-re2) silently fall back to Python's backtracking `re` for what RE2 refuses, which would
    bring the ReDoS back and change what patterns mean. google-re2 (checked up to 1.1) has no
    fallback: every pattern goes to the C++ RE2, and a backreference is an error."""
    try:
        re2.compile(r"(a)\1", _OPTIONS)
    except re2.error:
        return
    raise ImportError("the `re2` module in use falls back to Python's re: install google-re2")


_require_re2_itself()


class RegexError(ValueError):
    """A pattern Envoy's `safe_regex` would refuse."""


FullMatch = Callable[[str], bool]


@functools.lru_cache(maxsize=4096)
def compile_regex(pattern: str) -> FullMatch:
    """`pattern` as Envoy's `safe_regex` compiles it, as a test of a WHOLE value (Envoy
    full-matches header values and paths). Raises RegexError for what Envoy refuses: invalid
    RE2 (backreferences, lookaround, ...) and programs larger than MAX_PROGRAM_SIZE.
    Compiled once per pattern (the test is pure): validation, the table and its generated
    engine (sidecar.core.chain) ask for the same patterns on every reload."""
    try:
        compiled = re2.compile(pattern, _OPTIONS)
    except re2.error as error:
        reason = error.args[0] if error.args else error
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(
            f"not valid RE2 syntax ({reason}); the rules file's regexes are RE2, "
            "as Envoy's safe_regex: no backreferences, lookaround or \\Z"
        ) from None
    if compiled.programsize > MAX_PROGRAM_SIZE:
        raise RegexError(
            f"too complex: RE2 program size {compiled.programsize} > "
            f"{MAX_PROGRAM_SIZE}, the limit of Envoy's safe_regex "
            "(re2.max_program_size.error_level); simplify it"
        )
    fullmatch = compiled.fullmatch
    return lambda text: fullmatch(text) is not None


def regex_problem(pattern: str) -> str | None:
    """Why Envoy would refuse `pattern`, or None."""
    try:
        compile_regex(pattern)
    except RegexError as error:
        return f"invalid regex {pattern!r}: {error}"
    return None
