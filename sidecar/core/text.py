"""Text that may reach a C extension: every string must be encodable as UTF-8.

A Python string can hold lone surrogates (U+D800..U+DFFF), which UTF-8 cannot encode. They
arrive from `"\\ud800"` escapes in YAML and in JSON read by the standard `json` module, and
from bytes that are not UTF-8 in command-line arguments (the interpreter decodes them with
`surrogateescape`). The C extensions that encode a string themselves fail on them: mmh3
crashes the process (SIGSEGV), re2 and orjson raise. So every source of text (rules
documents, state, log lines, command-line arguments) is checked with these functions before
what it holds reaches a table, a request or a hash.

Request headers cannot hold them: the transports decode header bytes with `header_text`,
which replaces each byte that is not part of valid UTF-8 with `!`, as Envoy does before it
puts a header into a gRPC message (ext_authz; `service_sanitize_non_utf8_strings`), so a
request with such bytes is decided alike in every mode (ext_proc gets the raw bytes).
"""

import codecs
from collections.abc import Iterator
from typing import Any

ENVOY_REPLACE = "graysteer.envoy-replace"  # the codec error handler header_text decodes with


def _bang(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "!" * (error.end - error.start), error.end


codecs.register_error(ENVOY_REPLACE, _bang)


def header_text(raw: bytes) -> str:
    """A header value's bytes as Envoy hands them to a gRPC service: UTF-8, each byte that is
    not part of valid UTF-8 read as `!`."""
    return raw.decode("utf-8", ENVOY_REPLACE)


Path = tuple[str | int, ...]


def is_encodable(text: str) -> bool:
    """Whether `text` can be encoded as UTF-8 (holds no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unencodable(value: Any, path: Path = ()) -> Iterator[tuple[Path, str]]:
    """(path, text) of every string in `value` (a decoded JSON or YAML document: mappings,
    lists, scalars), keys included, that cannot be encoded as UTF-8."""
    if isinstance(value, str):
        if not is_encodable(value):
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not is_encodable(key):
                yield path, key
            yield from unencodable(item, (*path, key if isinstance(key, str | int) else str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from unencodable(item, (*path, index))


def why_unencodable(text: str) -> str:
    """What is wrong with a string that is_encodable refuses: the first bad character and
    where it is."""
    for index, char in enumerate(text):
        if 0xD800 <= ord(char) <= 0xDFFF:
            return f"holds a lone surrogate U+{ord(char):04X} at character {index}, which is not UTF-8 text"
    return "is not UTF-8 text"


def check_encodable(text: str, what: str) -> str:
    """`text` itself, or ValueError naming `what` when it cannot be encoded as UTF-8."""
    if not is_encodable(text):
        raise ValueError(f"{what} {why_unencodable(text)}")
    return text
