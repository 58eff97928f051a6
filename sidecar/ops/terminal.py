"""Text from elsewhere made safe to show on a terminal. Replica ids, versions, key names and
the leader value come from etcd (anyone who may write the fleet's prefix writes them), and a
sidecar's status carries rule names, webhook answers and error messages: printed raw, an
escape sequence in one clears the screen, moves the cursor to draw fake text, or sets the
window title; a bidi override reorders what is shown.

Every character that is not printable (str.isprintable: the C0 and C1 controls, DEL, the
format characters such as bidi overrides and isolates and zero-width ones, line and
paragraph separators, surrogates, private-use and unassigned code points) is shown as its
Python escape (`\\x1b`, `\\u202e`), visibly. Pure.
"""

from collections.abc import Mapping
from typing import Any


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shown(text: str) -> str:
    """`text` with every non-printable character escaped (a newline too: one field, one line)."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def shown_lines(text: str) -> str:
    """Lines of text (a report, an error message) with each line's characters escaped as by
    `shown`, the newlines between them kept."""
    return "\n".join(shown(line) for line in text.split("\n"))


def shown_tree(value: Any) -> Any:
    """A JSON-like value (a report read from etcd or a sidecar) with every string in it, keys
    included, escaped as by `shown`."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, Mapping):
        return {shown_tree(key): shown_tree(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [shown_tree(item) for item in value]
    return value
