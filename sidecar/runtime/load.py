"""Read a rules file from disk and compile it (the only place that parses YAML)."""

import hashlib
from pathlib import Path

import yaml

from sidecar.core import Problem, RulesError, Table, compile_table


def config_version(content: bytes) -> str:
    """The config version: a short, stable hash of the file's bytes."""
    return hashlib.sha256(content).hexdigest()[:12]


def parse_rules(content: bytes, source: str) -> Table:
    """Parse and compile rules from bytes; RulesError names `source` on any problem."""
    try:
        document = yaml.safe_load(content.decode("utf-8-sig"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "document"
        reason = getattr(error, "problem", None) or str(error)
        raise RulesError(source, [Problem(where, f"invalid YAML: {reason}")]) from error
    except UnicodeDecodeError as error:
        raise RulesError(source, [Problem("document", f"not UTF-8 text: {error}")]) from error
    return compile_table(document, config_version(content), source)


def load_rules(path: str | Path) -> Table:
    """Read and compile a rules file; RulesError (also for an unreadable file) names it."""
    source = str(path)
    try:
        content = Path(path).read_bytes()
    except OSError as error:
        raise RulesError(source, [Problem("file", f"cannot read: {error.strerror or error}")]) from error
    return parse_rules(content, source)
