"""Semantic-version ranges, as npm writes them, for the `semver` header condition.

`x-api-version: {semver: "^1.2"}` matches a request whose header holds a version in the
range. The grammar and meaning are npm's (node-semver), through PyPI `node-semver`, a port
checked in the tests against node-semver's own range fixtures:
- `^1.2.3` is `>=1.2.3 <2.0.0` (`^0.2.3` is `>=0.2.3 <0.3.0`), `~1.2.3` is `>=1.2.3 <1.3.0`,
  `2.x` / `2.*` / `2` is `>=2.0.0 <3.0.0`, `*` is any version; `>=`, `>`, `<`, `<=`, `=`;
  `1.2.3 - 2.3.4` (inclusive); comparators joined by spaces must all hold, and `||` joins
  alternatives.
- SemVer 2.0 precedence. A pre-release version (`2.3.1-beta.1`) matches only a range with
  a comparator that names the same major.minor.patch with a pre-release
  (`>=2.3.1-beta.0`), as npm does without `includePrerelease`; build metadata is ignored.
- A leading `v` is accepted in versions and ranges (`v1.9.0`).
- A header value that is not a version never matches; `steer` counts it
  (`malformed_version`). A range that does not parse is refused when the rules load.

Matching is cached per range for short values: clients announce a handful of versions, and
a parse costs several microseconds. The cache is bounded in entries and value length.
"""

from collections.abc import Callable

import nodesemver

MAX_VERSION_LENGTH = 256  # longer header values are not versions worth parsing
_CACHE_ENTRIES = 1024
_CACHED_LENGTH = 64


def range_problem(text: str) -> str | None:
    """Why `text` is not a range (for validation), or None."""
    if not text.strip():
        return "an empty range; write `*` for any version"
    try:
        nodesemver.make_range(text, False)
    except (ValueError, TypeError) as error:
        return f"not a version range: {error}"
    return None


_known_versions: dict[str, bool] = {}


def is_version(value: str) -> bool:
    """Whether a header value is a version (cached as `range_matcher` caches matches)."""
    known = _known_versions.get(value)
    if known is None:
        known = _version(value) is not None
        _remember(_known_versions, value, known)
    return known


def _remember(cache: dict[str, bool], value: str, result: bool) -> None:
    if len(value) <= _CACHED_LENGTH:
        if len(cache) >= _CACHE_ENTRIES:
            cache.clear()
        cache[value] = result


def _version(value: str) -> "nodesemver.SemVer | None":
    if len(value) > MAX_VERSION_LENGTH:
        return None
    try:
        return nodesemver.make_semver(value.strip(), False)
    except (ValueError, TypeError):
        return None


def range_matcher(text: str) -> Callable[[str], bool]:
    """`matches(value)`: whether the header value is a version in the range `text` (which
    `range_problem` accepted)."""
    compiled = nodesemver.make_range(text, False)
    cache: dict[str, bool] = {}

    def matches(value: str) -> bool:
        known = cache.get(value)
        if known is not None:
            return known
        version = _version(value)
        result = version is not None and bool(compiled.test(version))
        _remember(cache, value, result)
        return result

    return matches
