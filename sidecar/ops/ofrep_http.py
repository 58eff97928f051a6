"""OpenFeature remote evaluation (OFREP) over the operator endpoint (`serve --http-listen`):
the HTTP edge of sidecar.core.ofrep, which maps OFREP onto the table.

- POST /ofrep/v1/evaluate/flags/{key}: one flag. 200 with the evaluation; 404 FLAG_NOT_FOUND;
  400 with PARSE_ERROR, INVALID_CONTEXT, TARGETING_KEY_MISSING or GENERAL.
- POST /ofrep/v1/evaluate/flags: every flag, each a success or a failure, with an ETag
  (sidecar.core.ofrep.etag: the table, its runtime weights and rollout steps, and the
  context); a request whose If-None-Match holds it (or is `*`) is answered 304 with no body,
  `/ofrep/v1/evaluate/flags/` (a trailing slash) is the same request. 400 when
  the body or the context cannot be read.

Bodies are read by orjson, which refuses lone surrogates and nesting past 1,024 levels (the
operator endpoint bounds their size); the context is checked again by the core. With a token
(`serve --ofrep-token-file`), every request must carry `authorization: Bearer TOKEN` (401
otherwise): a read-only credential, for applications, apart from the admin API's. Without
one, OFREP answers only on a loopback endpoint (403 elsewhere), as the live page's explain.
"""

from collections.abc import Callable
from urllib.parse import unquote

import orjson

from sidecar.core.engine import Engine
from sidecar.core.ofrep import Failure, OfrepError, etag, evaluate, evaluate_all, read_context
from sidecar.ops.operator_http import Answer, Request

SINGLE = "/ofrep/v1/evaluate/flags/"
BULK = "/ofrep/v1/evaluate/flags"
JSON = "application/json"
_STATUS = {OfrepError.FLAG_NOT_FOUND: 404}  # every other error code is a bad request (400)


def _json(status: int, document: object, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    return status, orjson.dumps(document) + b"\n", JSON, headers


class OfrepEndpoint:
    """Answers every request under /ofrep/ (an operator endpoint `ofrep` handler).

    `engine` gives the serving engine of the current table (read once per request);
    `authorized` tells whether a request's Authorization header carries the token, or is
    None when no token is configured; then `open_without_token` says whether to answer."""

    def __init__(
        self,
        engine: Callable[[], Engine],
        authorized: Callable[[str | None], bool] | None,
        open_without_token: bool,
    ) -> None:
        self.engine, self.authorized, self.open = engine, authorized, open_without_token

    def __call__(self, request: Request) -> Answer:
        path = request.path
        if path not in (BULK, BULK + "/") and not path.startswith(SINGLE):
            return _json(404, {"errorDetails": f"not found: POST {BULK} or {SINGLE}{{key}}"})
        if request.method != "POST":
            return _json(405, {"errorDetails": "OFREP evaluations are POST requests"}, (("allow", "POST"),))
        refused = self._refusal(request.headers.get("authorization"))
        if refused is not None:
            return refused
        key = None if path in (BULK, BULK + "/") else unquote(path[len(SINGLE) :])
        try:
            context = read_context(_parse(request.body))
        except Failure as failure:
            return _json(400, failure.answer(key))
        engine = self.engine()  # the current table, read once
        if key is None:
            return self._bulk(engine, context, request.headers.get("if-none-match", ""))
        try:
            return _json(200, evaluate(engine, key, context))
        except Failure as failure:
            return _json(_STATUS.get(failure.code, 400), failure.answer(key))

    def _refusal(self, authorization: str | None) -> Answer | None:
        if self.authorized is not None:
            if self.authorized(authorization):
                return None
            return _json(401, {"errorDetails": "OFREP needs 'authorization: Bearer TOKEN'"})
        if self.open:
            return None
        return _json(403, {"errorDetails": "OFREP on a non-loopback endpoint needs serve --ofrep-token-file"})

    def _bulk(self, engine: Engine, context: object, if_none_match: str) -> Answer:
        assert isinstance(context, dict)
        tag = etag(engine.table, context)
        if if_none_match.strip() == "*" or tag in _tags(if_none_match):  # `*`: any current answer
            return 304, b"", JSON, (("etag", tag),)
        flags = evaluate_all(engine, context)
        return _json(200, {"flags": flags, "metadata": {"version": engine.table.version}}, (("etag", tag),))


def _parse(body: bytes) -> object:
    """The decoded body; Failure(PARSE_ERROR) when it is not JSON orjson reads."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise Failure(OfrepError.PARSE_ERROR, f"the body is not JSON: {error}") from None


def _tags(header: str) -> set[str]:
    """The entity tags of an If-None-Match header, a weak one as its strong form (RFC 9110
    13.1.2: If-None-Match compares weakly)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}
