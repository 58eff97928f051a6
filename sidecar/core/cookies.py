"""Sticky keys for visitors without one: a split's `when_key_missing: {assign: {cookie: ...}}`.

A request that reaches such a split with none of its keys gets a new random key, is bucketed
by it like any key, and carries it on to the backend in its `cookie` header; the response
sets the cookie (HttpOnly, with the rule's attributes), so the visitor's next requests are
bucketed by the same key and stay in one lane while the weights ramp.

The cookie is a key, not a credential: any value of the shape the sidecar issues (KEY_CHARS)
is a key, like a user id in a header; anything else (too short, too long, other characters)
counts as missing, and the visitor gets a new key and a new cookie, never an error. A forced
lane still needs a trusted caller (sidecar.core.steering).

Pure: the random key is drawn at the edge (`Request.draw_key`, the transports pass
`secrets.token_urlsafe`); without one (`explain`, tests) the key is derived from the
request itself, so the answer is the same each time.
"""

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MIN_KEY_CHARS = 22  # 22 URL-safe base64 characters: 132 bits; an issued key has at least 122 random
MAX_KEY_CHARS = 64
KEY_CHARS = re.compile(rf"[A-Za-z0-9_-]{{{MIN_KEY_CHARS},{MAX_KEY_CHARS}}}")
KEY_BYTES = 16  # what the edge draws: secrets.token_urlsafe(16), 22 characters, 128 random bits
# RFC 6265 cookie-name (an RFC 9110 token); the rules file's pattern (schema.py)
COOKIE_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$"
# A cookie path: starts with `/`, no control character, space or `;` (RFC 6265 5.2.4)
COOKIE_PATH_PATTERN = r"^/[!-:<-~]{0,255}$"
DEFAULT_MAX_AGE = 30 * 86400
MAX_MAX_AGE = 400 * 86400  # browsers cap Max-Age at 400 days (RFC 6265bis 5.5)
SAME_SITE = {"lax": "Lax", "strict": "Strict", "none": "None"}
_DURATION = re.compile(r"([0-9]+)(s|m|h|d)")  # ASCII digits, whole units
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SEPARATORS = re.compile("[;,]")  # between a cookie header's pairs (cookie_pairs)


@dataclass(frozen=True, slots=True)
class CookieSpec:
    """The cookie a split issues to a visitor without a key."""

    name: str
    max_age: int = DEFAULT_MAX_AGE  # seconds
    secure: bool = True
    same_site: str = "Lax"
    path: str = "/"

    @property
    def source(self) -> str:
        """Its key source label, as the rules file writes it (`cookie:NAME`)."""
        return f"cookie:{self.name}"

    def set_cookie(self, key: str) -> str:
        """The `Set-Cookie` value that gives the visitor `key`."""
        parts = [f"{self.name}={key}", f"Max-Age={self.max_age}", f"Path={self.path}", "HttpOnly"]
        if self.secure:
            parts.append("Secure")
        parts.append(f"SameSite={self.same_site}")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Issued:
    """A key issued to one request: the cookie's name, the key, the Set-Cookie value."""

    name: str
    key: str
    set_cookie: str


def parse_max_age(value: object) -> int:
    """`30d`, `12h`, `90m`, `3600s` or an integer of seconds -> seconds; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration (e.g. 30d, 12h, 90m, 3600s, or seconds)")
    if not 0 < seconds <= MAX_MAX_AGE:
        raise ValueError(f"must be longer than 0 and at most 400d (browsers cap it there), got {value!r}")
    return seconds


def assign_problems(form: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, problem) of an `assign` form whose structure the schema has checked."""
    found = []
    if "max_age" in form:
        try:
            parse_max_age(form["max_age"])
        except ValueError as error:
            found.append(("max_age", str(error)))
    secure = form.get("secure", True)
    if form.get("same_site") == "none" and not secure:
        found.append(("same_site", "`same_site: none` needs `secure: true` (browsers drop the cookie)"))
    name = str(form["cookie"])
    if name.lower().startswith(("__secure-", "__host-")) and not secure:
        found.append(("secure", f"a cookie named {name!r} needs `secure: true` (browsers drop it)"))
    if name.lower().startswith("__host-") and form.get("path", "/") != "/":
        found.append(("path", f"a cookie named {name!r} needs `path: /` (browsers drop it)"))
    return found


def cookie_spec(form: Mapping[str, Any]) -> CookieSpec:
    """The CookieSpec of a valid `assign` form."""
    return CookieSpec(
        name=str(form["cookie"]),
        max_age=parse_max_age(form.get("max_age", DEFAULT_MAX_AGE)),
        secure=bool(form.get("secure", True)),
        same_site=SAME_SITE[str(form.get("same_site", "lax"))],
        path=str(form.get("path", "/")),
    )


def well_formed(value: str | None) -> str | None:
    """`value` when it is a key of the shape the sidecar issues, else None (missing)."""
    if value is None or not KEY_CHARS.fullmatch(value):
        return None
    return value


def derived_key(headers: Mapping[str, str], path: str) -> str:
    """A key derived from the request (what `explain` shows: the same answer each time)."""
    digest = hashlib.sha256(repr((sorted(headers.items()), path)).encode("utf-8", "surrogatepass"))
    return base64.urlsafe_b64encode(digest.digest()[:KEY_BYTES]).rstrip(b"=").decode()


def cookie_pairs(header: str) -> list[str]:
    """The pairs of a `cookie` header, trimmed, empty ones dropped. Both `;` and `,` separate
    them: RFC 6265's cookie-octet excludes `,`, and Envoy's ext_authz hands on an HTTP/1.1
    client's repeated `cookie` headers joined with `,` (`theme=dark,gs_key=K`), where ext_proc
    and the Lua see each header: split so, every mode reads the same pairs."""
    return [pair for piece in _SEPARATORS.split(header) if (pair := piece.strip())]


def canonical_cookie_header(header: str) -> str:
    """The `cookie` header as every mode reads it: its pairs joined with `; `."""
    return "; ".join(cookie_pairs(header))


def with_cookie(header: str, name: str, key: str) -> str:
    """The request's `cookie` header with `name=key` in place of any value it had (every pair
    of that name, wherever it sits)."""
    kept = [pair for pair in cookie_pairs(header) if pair.partition("=")[0].strip() != name]
    return "; ".join([*kept, f"{name}={key}"])
