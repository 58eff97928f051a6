"""Host conditions (`match.host`), read as Envoy reads virtual host `domains`.

A pattern is an exact host (`api.example.com`), a suffix wildcard (`*.example.com`,
`*-api.example.com`), a prefix wildcard (`api.*`, `api-*`) or `*` (any host). A wildcard
never matches the empty string (`*.example.com` does not match `example.com`). Matching is
case-insensitive. The request's port is ignored unless the pattern names one
(`api.example.com:8443` matches only that port). The host comes from `:authority`, which
Envoy fills from HTTP/1's `Host` and HTTP/2's `:authority` alike.
"""

from collections.abc import Callable, Sequence

HOST_FORMS = "an exact host, `*.suffix`, `prefix.*` or `*`"


def host_problem(pattern: str) -> str | None:
    """Why `pattern` is not a host pattern (for validation), or None."""
    if pattern == "*":
        return None
    if not pattern or pattern.strip() != pattern or any(c in pattern for c in " /?#@"):
        return f"not a host pattern: {HOST_FORMS}"
    stars = pattern.count("*")
    if stars > 1 or (stars == 1 and not (pattern.startswith("*") or pattern.endswith("*"))):
        return f"a wildcard must be the first or last character ({HOST_FORMS})"
    host, port = split_port(pattern)
    if port is not None and not (port.isascii() and port.isdecimal()):
        return f"the port {port!r} is not a number"
    if not host.strip("*"):
        return f"not a host pattern: {HOST_FORMS}"
    return None


def split_port(authority: str) -> tuple[str, str | None]:
    """`host:port` -> (host, port); an IPv6 literal keeps its brackets; no port -> None."""
    if authority.startswith("["):
        end = authority.find("]")
        if end != -1 and authority[end + 1 : end + 2] == ":":
            return authority[: end + 1], authority[end + 2 :]
        return authority, None
    host, colon, port = authority.rpartition(":")
    if colon and ":" not in host:
        return host, port
    return authority, None


KNOWN_HOSTS = 1024  # per matcher: authorities remembered with their result (then cleared)
KNOWN_HOST_LENGTH = 256


def host_matcher(patterns: Sequence[str]) -> Callable[[str | None], bool]:
    """`matches(authority)`: whether the request's `:authority` matches any pattern (which
    `host_problem` accepted). No authority matches nothing, `*` included."""
    exact: set[str] = set()
    with_port: set[str] = set()
    suffixes: list[tuple[str, bool]] = []  # (suffix, whether it names a port)
    prefixes: list[str] = []
    any_host = False
    for pattern in (p.lower() for p in patterns):
        if pattern == "*":
            any_host = True
        elif pattern.startswith("*"):
            suffixes.append((pattern[1:], split_port(pattern[1:])[1] is not None))
        elif pattern.endswith("*"):
            prefixes.append(pattern[:-1])
        elif split_port(pattern)[1] is not None:
            with_port.add(pattern)
        else:
            exact.add(pattern)

    known: dict[str, bool] = {}  # clients repeat a few hosts: each is matched once

    def matches(authority: str | None) -> bool:
        if not authority:
            return False
        result = known.get(authority)
        if result is None:
            result = matches_uncached(authority)
            if len(authority) <= KNOWN_HOST_LENGTH:
                if len(known) >= KNOWN_HOSTS:
                    known.clear()
                known[authority] = result
        return result

    def matches_uncached(authority: str) -> bool:
        if any_host:
            return True
        authority = authority.lower()
        host = split_port(authority)[0]
        if host in exact or authority in with_port:
            return True
        for suffix, names_port in suffixes:
            subject = authority if names_port else host
            if len(subject) > len(suffix) and subject.endswith(suffix):
                return True
        return any(len(host) > len(prefix) and host.startswith(prefix) for prefix in prefixes)

    return matches
