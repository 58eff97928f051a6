"""The live page's backend: read-only by default; rollout actions only with --http-actions,
only for a caller the admin API's own gate accepts, only with the page's CSRF header and a
JSON body; explain open on loopback only. A real reloader, controller and admin servicer, on
a real event loop of their own (as the sidecar's), called as the operator endpoint calls it."""

import asyncio
import http.client
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from sidecar.admin.client import explain_result
from sidecar.admin.security import AdminAuth, AdminGate
from sidecar.admin.servicer import AdminServicer
from sidecar.admin.web import CSRF_HEADER, Access, LivePage, header_lines, parse_form
from sidecar.dev.devstack import Sidecar
from sidecar.ops.metrics import Metrics
from sidecar.ops.operator_http import Request
from sidecar.rollouts.controller import RolloutController
from sidecar.sources.file import RulesFile
from sidecar.sources.state_file import StateFile
from sidecar.table.reload import Reloader
from tests.admin.test_security import OPS, WEB
from tests.ops.test_view import RULES
from tests.tls import make_ca, make_leaf, write_pair

TOKEN = "s3cret"
POST = {CSRF_HEADER: "1", "content-type": "application/json"}


@pytest.fixture()
def servicer(tmp_path: Path) -> Iterator[tuple[AdminServicer, asyncio.AbstractEventLoop]]:
    """A servicer whose controller and reloader live on a loop running in a thread."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def build() -> AdminServicer:
        metrics = Metrics(CollectorRegistry())
        reloader = Reloader(RulesFile(rules), metrics, StateFile(tmp_path / "state.json"))
        return AdminServicer(reloader, RolloutController(reloader, metrics, None, 1.0))

    try:
        yield asyncio.run_coroutine_threadsafe(build(), loop).result(10), loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def page(
    servicer: tuple[AdminServicer, asyncio.AbstractEventLoop],
    tmp_path: Path,
    actions: bool = True,
    local: bool = True,
    authenticated: bool = True,
) -> LivePage:
    gate = None
    if authenticated:
        token = tmp_path / "token"
        token.write_text(TOKEN)
        token.chmod(0o600)
        gate = AdminGate(AdminAuth(token_file=str(token)))
    return LivePage(servicer[0], servicer[1], Access(actions, local, gate, "token" if authenticated else ""))


def call(
    live: LivePage, method: str, path: str, headers: dict[str, str], body: Any = None
) -> tuple[int, Any]:
    answer = live(Request(method, path, headers, json.dumps(body).encode() if body is not None else b""))
    assert answer is not None
    return answer


def test_the_view_is_the_view_model_and_says_what_a_caller_may_do(servicer: Any, tmp_path: Path) -> None:
    status, shown = call(page(servicer, tmp_path, actions=False), "GET", "/ui/view", {})
    assert status == 200
    assert [s["rule"] for s in shown["splits"]] == ["ramp", "other"]
    assert shown["rollouts"][0]["status"] == "progressing: started"
    assert shown["access"]["actions"] is False and shown["access"]["explain"] is True
    assert "read-only" in shown["access"]["note"]
    assert page(servicer, tmp_path)(Request("GET", "/rollouts")) is None  # not the page's


@pytest.mark.parametrize(
    ("headers", "status", "says"),
    [
        ({}, 403, f"a POST must carry the header {CSRF_HEADER}"),
        ({CSRF_HEADER: "1", "content-type": "text/plain"}, 415, "body must be JSON"),
        ({**POST}, 401, "a valid admin bearer token is required"),
        ({**POST, "authorization": "Bearer wrong"}, 401, "a valid admin bearer token is required"),
    ],
)
def test_an_action_needs_the_csrf_header_json_and_the_admin_token(
    servicer: Any, tmp_path: Path, headers: dict[str, str], status: int, says: str
) -> None:
    answer = call(page(servicer, tmp_path), "POST", "/ui/rollouts/ramp/abort", headers, {})
    assert answer[0] == status and says in answer[1]["error"]
    assert servicer[0].controller.report()[0]["phase"] == "progressing"  # nothing happened


def test_an_authenticated_action_goes_through_the_controller_as_the_admin_rpc(
    servicer: Any, tmp_path: Path
) -> None:
    live = page(servicer, tmp_path)
    authorized = {**POST, "authorization": f"Bearer {TOKEN}"}
    status, report = call(live, "POST", "/ui/rollouts/ramp/pause", authorized, {})
    assert (status, report["phase"], report["reason"]) == (200, "paused", "paused by an operator")
    status, refused = call(live, "POST", "/ui/rollouts/ramp/pause", authorized, {})
    assert (status, refused["error"]) == (
        400,
        "cannot pause a rollout that is paused",
    )  # the controller's word
    assert call(live, "POST", "/ui/rollouts/ramp/explode", authorized, {})[0] == 400
    assert call(live, "POST", "/ui/rollouts/nothing/abort", authorized, {})[0] == 400
    status, report = call(live, "POST", "/ui/rollouts/ramp/abort", authorized, {})
    assert (status, report["phase"], report["canary_weight"]) == (200, "aborted", 0)


def test_read_only_by_default_even_for_an_authenticated_caller(servicer: Any, tmp_path: Path) -> None:
    live = page(servicer, tmp_path, actions=False)
    status, refused = call(
        live, "POST", "/ui/rollouts/ramp/abort", {**POST, "authorization": f"Bearer {TOKEN}"}, {}
    )
    assert (status, refused["error"]) == (
        403,
        "read-only endpoint: rollout actions need serve --http-actions",
    )


def test_explain_answers_what_graysteer_explain_answers(servicer: Any, tmp_path: Path) -> None:
    form = {
        "method": "get",
        "path": "/checkout?x=1",
        "headers": "x-canary: 1\n\nu: 42",
        "listener_port": "8080",
    }
    status, shown = call(page(servicer, tmp_path, actions=False), "POST", "/ui/explain", POST, form)
    assert status == 200
    expected = explain_result(servicer[0].explain(parse_form(json.dumps(form).encode())), "x")
    assert {**shown, "source": "x"} == expected
    assert (shown["cluster"], shown["rule"]) == ("canary", "pin")


def test_explain_away_from_loopback_needs_the_admin_authentication(servicer: Any, tmp_path: Path) -> None:
    remote = page(servicer, tmp_path, actions=False, local=False)
    assert call(remote, "POST", "/ui/explain", POST, {"path": "/"})[0] == 401
    authorized = {**POST, "authorization": f"Bearer {TOKEN}"}
    assert call(remote, "POST", "/ui/explain", authorized, {"path": "/"})[0] == 200
    unauthenticated = page(servicer, tmp_path, actions=False, local=False, authenticated=False)
    status, refused = call(unauthenticated, "POST", "/ui/explain", POST, {"path": "/"})
    assert status == 403 and "not on loopback" in refused["error"]
    assert call(unauthenticated, "GET", "/ui/view", {})[1]["access"]["explain"] is False


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{", "the form is not JSON"),
        (b"[]", "the form must be a JSON object"),
        (b'{"path": 7}', "path must be a string"),
        (
            b'{"headers": "x: 1\\nno colon here"}',
            "header line 2: expected 'Name: value', got 'no colon here'",
        ),
        (b'{"listener_port": "99999"}', "listener_port must be a port number"),
    ],
)
def test_a_bad_form_is_a_specific_400(body: bytes, says: str) -> None:
    with pytest.raises(Exception) as refused:
        parse_form(body)
    assert getattr(refused.value, "status", None) == 400 and says in str(refused.value)


def test_header_lines_are_read_as_explain_reads_its_headers() -> None:
    assert header_lines("X-Time: 12:30\n\nx-user-id:  7 \n") == [("x-time", "12:30"), ("x-user-id", "7")]
    assert parse_form(b'{"host": "shop.example.com"}').headers[0].name == ":authority"  # as --host


def test_with_client_certificates_the_endpoint_is_https_and_acts_only_for_an_allowed_one(
    tmp_path: Path,
) -> None:
    """--http-actions with --admin-tls-*: HTTPS with the admin certificate; a client
    certificate is asked for, not required (Prometheus and the probes have none), and only
    one on --admin-allow may act. A real sidecar process, real TLS."""
    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    write_pair(tmp_path, "server", make_leaf(ca, "sidecar", dns=["localhost"], ips=["127.0.0.1"]))
    write_pair(tmp_path, "ops", make_leaf(ca, "ops", uris=[OPS]))
    write_pair(tmp_path, "web", make_leaf(ca, "web", uris=[WEB]))
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    tls = [
        f"--admin-tls-{part}={tmp_path / name}"
        for part, name in (("cert", "server.pem"), ("key", "server.key"), ("ca", "ca.pem"))
    ]
    sidecar = Sidecar(rules, tmp_path, [*tls, "--admin-allow", OPS, "--http-actions"])
    try:
        assert "/readyz on https://" in sidecar.log_text()

        def https(path: str, client: str | None, method: str = "GET") -> tuple[int, dict[str, Any] | str]:
            context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            if client:
                context.load_cert_chain(tmp_path / f"{client}.pem", tmp_path / f"{client}.key")
            connection = http.client.HTTPSConnection("127.0.0.1", sidecar.http, context=context, timeout=10)
            try:
                connection.request(method, path, body=b"{}" if method == "POST" else None, headers=POST)
                response = connection.getresponse()
                text = response.read().decode()
                return response.status, json.loads(text) if text.startswith("{") else text
            finally:
                connection.close()

        status, metrics = https("/metrics", None)
        assert status == 200 and "graysteer_rollout_step" in str(metrics)  # no certificate needed to read
        for client in (None, "web"):
            status, refused = https("/ui/rollouts/ramp/abort", client, "POST")
            assert (status, refused) == (
                403,
                {"error": "this client certificate is not on the admin allow-list"},
            )
        status, report = https("/ui/rollouts/ramp/abort", "ops", "POST")
        assert status == 200 and isinstance(report, dict) and report["phase"] == "aborted"
    finally:
        sidecar.stop()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (
            '{"listener_port": "\u0661\u0665\u0660\u0660\u0661"}'.encode(),
            "listener_port must be a port number",
        ),
        ('{"listener_port": "\u00b2"}'.encode(), "listener_port must be a port number"),
        (b'{"listener_port": "' + b"9" * 5000 + b'"}', "listener_port must be a port number"),
        (b'{"listener_port": true}', "listener_port must be a port number"),
        (b'{"path": "/\\ud800"}', "the form is not JSON"),
        (b'{"headers": "x-a: \\udc00"}', "the form is not JSON"),
        (b'{"path": "/\xed\xa0\x80"}', "the form is not JSON"),  # a surrogate in raw bytes
        (b"[" * 5000 + b"]" * 5000, "the form is not JSON"),
    ],
)
def test_digits_of_other_scripts_surrogates_and_depth_are_400s(body: bytes, says: str) -> None:
    test_a_bad_form_is_a_specific_400(body, says)


HOSTILE = [
    "\u00b2",
    "\u0661\u0662",
    "\ud800",
    "x\udfff",
    "\x00",
    "\r\n",
    "x: 1\nx: \x7f",
    "9" * 6000,
    "0",
    "65536",
]
FORM_TEXT = st.sampled_from(HOSTILE) | st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
FORM_VALUE = FORM_TEXT | st.integers() | st.floats() | st.booleans() | st.none() | st.lists(st.integers())
FIELDS = ["method", "path", "host", "headers", "uri_san", "dns_san", "listener_port", "x"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    form=st.fixed_dictionaries({}, optional=dict.fromkeys(FIELDS, FORM_VALUE)),
    raw=st.binary(max_size=64),
)
def test_no_form_input_is_answered_but_200_or_a_400(
    servicer: Any, tmp_path: Path, form: Any, raw: bytes
) -> None:
    live = page(servicer, tmp_path)
    body = json.dumps(form).encode()  # ensure_ascii: lone surrogates travel as \\ud800 escapes
    for sent in (body, raw):
        answer = live(Request("POST", "/ui/explain", POST, sent))
        assert answer is not None and answer[0] in (200, 400), (sent, answer)
        if answer[0] == 400:
            assert isinstance(answer[1], dict) and "Traceback" not in str(answer[1])
