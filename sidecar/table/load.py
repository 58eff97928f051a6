"""Read a rules file from disk and compile it (the only place that parses YAML).

Bounded, because a rules file can come from anyone who can write to a ConfigMap: a regular
file (a symlink to one is fine, as Kubernetes mounts them; a device or a FIFO is refused
before it is opened) of at most MAX_FILE_BYTES, whose YAML expands to at most MAX_NODES
values (anchors and aliases counted as often as they are used) nested at most MAX_DEPTH deep.
"""

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from sidecar.core import Problem, RulesError, Table, compile_table
from sidecar.core.validate import problems

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64


class FileProblem(OSError):
    """A file that is not read at all: not a regular file, or too large."""


def read_regular_file(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; FileProblem (an OSError) else.
    Checked before opening, so a FIFO or a device never blocks or streams forever."""
    info = os.stat(path)  # follows symlinks
    if not stat.S_ISREG(info.st_mode):
        raise FileProblem(f"not a regular file ({stat.filemode(info.st_mode)})")
    if info.st_size > limit:
        raise FileProblem(f"{info.st_size} bytes, over the limit of {limit}")
    with open(path, "rb") as handle:
        content = handle.read(limit + 1)
    if len(content) > limit:  # grew while being read
        raise FileProblem(f"over the limit of {limit} bytes")
    return content


def config_version(content: bytes) -> str:
    """The config version: a short, stable hash of the file's bytes."""
    return hashlib.sha256(content).hexdigest()[:12]


def _expanded_size(value: Any, depth: int, seen: dict[int, int]) -> int:
    """How many values `value` stands for once every alias is expanded (shared containers are
    counted at each use, computed once each); ValueError past MAX_DEPTH or MAX_NODES."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    if not isinstance(value, dict | list):
        return 1
    known = seen.get(id(value))
    if known is not None:
        return known
    children = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
    size = 1
    for child in children:
        size += _expanded_size(child, depth + 1, seen)
        if size > MAX_NODES:
            raise ValueError(
                f"expands to more than {MAX_NODES} values (anchors and aliases counted at each use)"
            )
    seen[id(value)] = size
    return size


def parse_rules(content: bytes, source: str) -> Table:
    """Parse and compile rules from bytes; RulesError names `source` on any problem."""
    return compile_table(read_document(content, source), config_version(content), source, validated=True)


def read_document(content: bytes, source: str) -> dict[str, Any]:
    """The rules document in `content`, parsed and validated (every problem found, not only
    the first); RulesError names `source` on any problem. Pure in its inputs and result, so
    it can run in another process (sidecar.table.documents)."""
    try:
        document = yaml.safe_load(content.decode("utf-8-sig"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "document"
        reason = getattr(error, "problem", None) or str(error)
        raise RulesError(source, [Problem(where, f"invalid YAML: {reason}")]) from error
    except UnicodeDecodeError as error:
        raise RulesError(source, [Problem("document", f"not UTF-8 text: {error}")]) from error
    except RecursionError:
        raise RulesError(source, [Problem("document", f"nested more than {MAX_DEPTH} levels deep")]) from None
    try:
        _expanded_size(document, 0, {})
    except ValueError as error:
        raise RulesError(source, [Problem("document", str(error))]) from None
    found = problems(document)
    if found:
        raise RulesError(source, found)
    return document  # type: ignore[no-any-return]


def load_rules(path: str | Path) -> Table:
    """Read and compile a rules file; RulesError (also for an unreadable file) names it."""
    source = str(path)
    try:
        content = read_regular_file(path, MAX_FILE_BYTES)
    except OSError as error:
        raise RulesError(source, [Problem("file", f"cannot read: {error.strerror or error}")]) from error
    return parse_rules(content, source)


# What makes a table costly (see docs/operations.md, "Large tables"): a request is matched
# against the rules in order, so deciding grows with the rules before the one that matches,
# and reading a document grows with its size.
LARGE_TABLE_RULES = 500
LARGE_DOCUMENT_BYTES = 256 * 1024


def size_warning(table: Table, size: int) -> str | None:
    """A warning for a table large enough to cost noticeably per request or per reload."""
    if len(table.rules) < LARGE_TABLE_RULES and size < LARGE_DOCUMENT_BYTES:
        return None
    return (
        f"warning: {len(table.rules)} rules in {size // 1024} KiB: a request tries the rules in "
        "order until one matches, so one that matches late or not at all costs time in proportion "
        "(1,000 header-regex rules: about 3 ms per request on a 2-core machine), and each reload "
        'reads the whole document; see docs/operations.md, "Large tables"'
    )
