"""Fail when a function or method is longer than the house limit (scripts/check).

    python scripts/function_length.py [--max LINES] PATH...

A function's length runs from its `def` line (decorators not counted) to its last line,
docstring, comments and blank lines inside it included: what a reader has to hold. Nested
functions count inside the function that holds them and are checked on their own too.
"""

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

MAX_LINES = 80


def long_functions(source: str, limit: int) -> Iterator[tuple[int, str, int]]:
    """(line, qualified name, length) of every function in `source` over `limit` lines."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[int, str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                if length > limit:
                    yield child.lineno, name, length
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(ast.parse(source), "")


def python_files(paths: list[str]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=MAX_LINES, help="lines allowed (default %(default)s)")
    parser.add_argument("paths", nargs="+", help="files or directories")
    args = parser.parse_args(argv)
    found = 0
    for path in python_files(args.paths):
        for line, name, length in long_functions(path.read_text(encoding="utf-8"), args.max):
            print(f"{path}:{line}: {name} is {length} lines long (at most {args.max})")
            found += 1
    if found:
        print(f"{found} function(s) over {args.max} lines: give each a shape that reads", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
