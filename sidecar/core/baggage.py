"""The W3C `baggage` header: set or remove one member, preserving every other member.

Members are kept as written (including ones this module cannot parse), except members with
control characters, which no HTTP header may carry: they are dropped, never echoed back to
Envoy in a header value. Only the member with our key is replaced or removed. Limits are
the W3C Baggage spec's propagation minimums: 64 list members and 8192 bytes; a member that
would exceed them is not added (the color header still carries the lane).
"""

MAX_MEMBERS = 64
MAX_BYTES = 8192


_CONTROL = {chr(c) for c in range(32) if c != 9} | {"\x7f"}  # tab is whitespace in a header value


def _members(header: str) -> list[str]:
    return [m.strip() for m in header.split(",") if m.strip() and _CONTROL.isdisjoint(m)]


def _key(member: str) -> str:
    return member.partition("=")[0].strip()


def well_formed(header: str) -> bool:
    """Every list member has the `key=value` form and no control character (empty headers
    are well formed)."""
    return _CONTROL.isdisjoint(header) and all(_key(m) and "=" in m for m in _members(header))


def member_value(header: str, key: str) -> str | None:
    """The value of `key` in a baggage header (properties after `;` dropped), or None."""
    for member in _members(header):
        if _key(member) == key:
            value = member.partition("=")[2].partition(";")[0].strip()
            return value or None
    return None


def without_member(header: str, key: str) -> str:
    """The header with `key`'s member removed ("" when nothing is left)."""
    return ",".join(m for m in _members(header) if _key(m) != key)


def with_member(header: str, key: str, value: str) -> tuple[str, bool]:
    """The header with `key=value` replacing any member of that key; (header, added).
    When adding would pass the size limits the member is left out: (header without it, False)."""
    kept = [m for m in _members(header) if _key(m) != key]
    candidate = ",".join([*kept, f"{key}={value}"])
    if len(kept) + 1 > MAX_MEMBERS or len(candidate.encode()) > MAX_BYTES:
        return ",".join(kept), False
    return candidate, True
