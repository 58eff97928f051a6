"""The live page's backend on the operator endpoint (`serve --http-listen`, /ui/...): the view,
the explain form and the rollout actions, each through the admin API's own code: the same
status (the view model of sidecar.ops.view), the same Explain, the same Rollout (the
controller's action), authenticated by the same AdminGate.

- GET /ui/view: the view, and what this caller may do (`access`). Read-only, like /rollouts.
- POST /ui/explain: the decision for a described request (what `graysteer explain` prints).
  Open on a loopback endpoint, as the admin API is there; elsewhere only to a caller the
  admin API's authentication accepts.
- POST /ui/rollouts/RULE/ACTION (promote, pause, resume, abort, approve): only with
  `serve --http-actions`, which needs the admin API's authentication (a bearer token file
  and/or client certificates on the allow-list), and only to a caller it accepts.

Every POST must carry the header CSRF_HEADER and a JSON body: the page's own fetch sends
them; a form or a script of another site cannot without a CORS preflight, which this
endpoint never answers. Work runs on the sidecar's own loop (`loop`), as an admin call does.
"""

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from cryptography import x509

from sidecar import values
from sidecar.admin.api import admin_pb2 as pb
from sidecar.admin.client import as_dict, explain_result
from sidecar.admin.security import UNAUTHENTICATED, AdminGate, certificate_identity
from sidecar.admin.servicer import ActionRefused, AdminServicer
from sidecar.core.actions import ACTIONS
from sidecar.core.identity import Identity
from sidecar.ops import view
from sidecar.ops.operator_http import Request

log = logging.getLogger("graysteer.http")

CSRF_HEADER = "x-graysteer-request"
WORK_TIMEOUT_SECONDS = 10.0
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
}


class Refused(Exception):
    """An answer other than 200: its HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Access:
    """What the endpoint lets callers do beyond reading."""

    actions: bool  # serve --http-actions (the options refuse it without authentication)
    explain_open: bool  # a loopback endpoint: explain without credentials, as the admin API there
    gate: AdminGate | None  # the admin API's authentication, when configured
    credentials: str  # what the page asks for: "token", "certificate", "token and certificate", ""


class LivePage:
    """Answers the page's requests (an operator endpoint `extra`): None for other paths."""

    def __init__(
        self,
        servicer: AdminServicer,
        loop: asyncio.AbstractEventLoop,
        access: Access,
        fleet: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.servicer, self.loop, self.access, self.fleet = servicer, loop, access, fleet

    def __call__(self, request: Request) -> tuple[int, object] | None:
        parts = request.path.strip("/").split("/")
        if parts[0] != "ui" or len(parts) < 2:
            return None
        try:
            if request.method == "GET" and parts[1:] == ["view"]:
                return 200, self.view()
            if request.method == "POST" and parts[1:] == ["explain"]:
                self._check_post(request)
                if not self.access.explain_open:
                    self._authenticate(request)
                return 200, self._on_loop(self._explain(parse_form(request.body)))
            if request.method == "POST" and len(parts) == 4 and parts[1] == "rollouts":
                return 200, self._act(request, parts[2], parts[3])
        except Refused as refused:
            return refused.status, {"error": refused.message}
        return None

    def view(self) -> dict[str, Any]:
        """The view (from the status the admin API sends) and what callers may do."""
        fleet = self.fleet() if self.fleet is not None else None
        shown = view.build(as_dict(self.servicer.status()), fleet, (), time.time())
        a = self.access
        shown["access"] = {
            "actions": a.actions,
            "explain": a.explain_open or a.gate is not None,
            "credentials": a.credentials if (a.actions or not a.explain_open) else "",
            "note": (
                f"actions need the admin {a.credentials}"
                if a.actions
                else "read-only (serve --http-actions, with the admin API's authentication, adds actions)"
            ),
        }
        return shown

    def _act(self, request: Request, rule: str, action: str) -> dict[str, Any]:
        self._check_post(request)
        if not self.access.actions:
            raise Refused(403, "read-only endpoint: rollout actions need serve --http-actions")
        self._authenticate(request)
        if action not in ACTIONS:
            raise Refused(400, f"unknown action {action!r} ({', '.join(ACTIONS)})")
        log.info("rollout %s %s requested on the live page", action, rule)
        status: pb.RolloutStatus = self._on_loop(self.servicer.act(rule, action))
        report: dict[str, Any] = json.loads(status.report_json)
        return report

    async def _explain(self, request: pb.ExplainRequest) -> dict[str, Any]:
        return explain_result(self.servicer.explain(request), "the operator endpoint's live page")

    def _on_loop(self, work: Any) -> Any:
        """Run a coroutine on the sidecar's loop and wait for it (bounded)."""
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        try:
            return future.result(WORK_TIMEOUT_SECONDS)
        except ActionRefused as refused:
            raise Refused(_HTTP_STATUS.get(refused.code, 409), refused.message) from None
        except TimeoutError:
            future.cancel()
            raise Refused(503, f"the sidecar did not answer within {WORK_TIMEOUT_SECONDS:.0f} s") from None

    def _check_post(self, request: Request) -> None:
        if request.headers.get(CSRF_HEADER) != "1":
            raise Refused(403, f"a POST must carry the header {CSRF_HEADER}: 1 (the page sends it)")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise Refused(415, "a POST's body must be JSON (content-type: application/json)")

    def _authenticate(self, request: Request) -> None:
        gate = self.access.gate
        if gate is None:
            raise Refused(403, "this endpoint is not on loopback and the admin API has no authentication")
        refused = gate.refusal(request.headers.get("authorization"), lambda: peer(request))
        if refused is not None:
            raise Refused(401 if refused[0] == UNAUTHENTICATED else 403, refused[1])


def peer(request: Request) -> Identity:
    """The identity of the client certificate the endpoint's TLS verified, if any."""
    if request.peer_certificate is None:
        return Identity()
    return certificate_identity(x509.load_der_x509_certificate(request.peer_certificate))


def parse_form(body: bytes) -> pb.ExplainRequest:
    """The explain form (JSON: method, path, host, headers as "Name: value" lines, uri_san,
    dns_san, listener_port: the flags of `graysteer explain`) as the admin API's
    ExplainRequest; Refused(400) says what is wrong."""
    try:  # orjson: UTF-8 only, no lone surrogate (a "\\ud800" escape), a bounded depth
        form = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise Refused(400, f"the form is not JSON: {error}") from None
    if not isinstance(form, dict):
        raise Refused(400, "the form must be a JSON object")
    texts = {name: form.get(name, "") for name in ("method", "path", "host", "headers", "uri_san", "dns_san")}
    for name, value in texts.items():
        if not isinstance(value, str):
            raise Refused(400, f"{name} must be a string")
    headers = header_lines(texts["headers"])
    if texts["host"].strip():  # as `explain --host`
        headers.append((":authority", texts["host"].strip()))
    request = pb.ExplainRequest(
        method=texts["method"].strip() or "GET",
        path=texts["path"].strip() or "/",
        headers=[pb.Pair(name=n, value=v) for n, v in headers],
        uri_san=texts["uri_san"].strip(),
        dns_san=texts["dns_san"].strip(),
    )
    port = form.get("listener_port")
    if port not in (None, ""):
        digits = str(port) if isinstance(port, int | str) and not isinstance(port, bool) else ""
        if not (len(digits) <= 5 and values.is_ascii_number(digits) and 0 < int(digits) < 65536):
            raise Refused(400, f"listener_port must be a port number (ASCII digits, 1-65535), not {port!r}")
        request.listener_port = int(digits)
    return request


def header_lines(text: str) -> list[tuple[str, str]]:
    """ "Name: value" lines (blank lines skipped), each read as `graysteer explain -H` reads
    one; Refused(400) names a bad line."""
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                pairs.append(values.header(line))
            except ValueError as error:
                raise Refused(400, f"header line {number}: {error}") from None
    return pairs
