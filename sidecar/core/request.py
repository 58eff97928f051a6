"""The view of one HTTP request that the decision engine reads.

Adapters (ext_proc, ext_authz, the explain CLI) build it; the engine never sees a
protobuf. Cookies and query parameters are parsed lazily, only when a split key
asks for them, and at most once per request.
"""

from collections.abc import Callable, Mapping
from urllib.parse import parse_qsl

from sidecar.core.cookies import canonical_cookie_header, cookie_pairs, derived_key
from sidecar.core.identity import NO_IDENTITY, Identity

DEFAULT_AUTHORITY = "graysteer.local"  # a described request's authority when it names none (explain, OFREP)


class Request:
    """Lower-cased header names -> values, plus method, path and query string."""

    __slots__ = (
        "_cookies",
        "_params",
        "draw_key",
        "headers",
        "identity",
        "listener_port",
        "method",
        "path",
        "query",
    )

    def __init__(
        self,
        headers: Mapping[str, str],
        method: str = "GET",
        path: str = "/",
        identity: Identity = NO_IDENTITY,
        listener_port: int | None = None,
    ) -> None:
        cookie = headers.get("cookie")
        if cookie is not None and (canonical := canonical_cookie_header(cookie)) != cookie:
            # read in one form in every mode, however the client's headers were joined (cookies.py)
            headers = {**headers, "cookie": canonical}
        self.headers = headers
        self.identity = identity
        self.listener_port = listener_port
        self.method = method.upper()
        self.path, _, self.query = path.partition("?")
        self._cookies: dict[str, str] | None = None
        self._params: dict[str, str] | None = None
        # Draws a new random key for a visitor without one (sidecar.core.cookies): set at the
        # edge; None (explain, tests) derives the key from the request.
        self.draw_key: Callable[[], str] | None = None

    @classmethod
    def from_headers(
        cls, headers: Mapping[str, str], identity: Identity = NO_IDENTITY, listener_port: int | None = None
    ) -> "Request":
        """Build from an HTTP/2-style header map carrying `:method` and `:path`."""
        return cls(headers, headers.get(":method", "GET"), headers.get(":path", "/"), identity, listener_port)

    def seen_as(self, headers: Mapping[str, str], identity: Identity) -> "Request":
        """This request with other headers (an untrusted caller's, stripped) or identity
        (from XFCC): a new view, this one unchanged. Parsed query parameters are shared."""
        if headers is self.headers and identity is self.identity:
            return self
        other = Request.__new__(Request)
        other.headers, other.identity, other.listener_port = headers, identity, self.listener_port
        other.method, other.path, other.query = self.method, self.path, self.query
        other._cookies = self._cookies if headers is self.headers else None
        other._params = self._params
        other.draw_key = self.draw_key
        return other

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def cookie(self, name: str) -> str | None:
        if self._cookies is None:
            self._cookies = parse_cookies(self.headers.get("cookie", ""))
        return self._cookies.get(name)

    def new_key(self) -> str:
        """A new key for this visitor: drawn by `draw_key`, else derived from the request."""
        if self.draw_key is not None:
            return self.draw_key()
        return derived_key(self.headers, f"{self.path}?{self.query}")

    def query_param(self, name: str) -> str | None:
        if self._params is None:
            # The first occurrence of a parameter wins, as for a repeated cookie.
            self._params = {}
            for key, value in parse_qsl(self.query, keep_blank_values=True):
                self._params.setdefault(key, value)
        return self._params.get(name)


def parse_cookies(header: str) -> dict[str, str]:
    """Parse a Cookie header (`a=1; b=2`, `,` separating too) leniently: malformed pairs are
    skipped, the first of a repeated name wins."""
    cookies: dict[str, str] = {}
    for pair in cookie_pairs(header):
        name, sep, value = pair.partition("=")
        name = name.strip()
        if sep and name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            cookies.setdefault(name, value)
    return cookies


def add_header(headers: dict[str, str], name: str, value: str) -> None:
    """Add a (lower-case) header to `headers`, joining a repeated one as HTTP allows: `,`
    between values, `; ` between cookies (RFC 9110 5.3, RFC 6265 5.4)."""
    if name in headers:
        value = headers[name] + ("; " if name == "cookie" else ",") + value
    headers[name] = value
