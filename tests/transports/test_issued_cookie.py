"""An issued key's cookie through every transport with real protos, its metric, explain, the
decision log replay and `diff`."""

import asyncio
from typing import Any

import orjson
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from prometheus_client import CollectorRegistry

from sidecar.admin.api import admin_pb2 as pb
from sidecar.admin.client import explain_result
from sidecar.admin.servicer import AdminServicer
from sidecar.core.diff import compare, synthetic_requests
from sidecar.core.request import Request
from sidecar.ops.metrics import Metrics
from sidecar.sources.file import RulesFile
from sidecar.sources.state_file import StateFile
from sidecar.table.decider import Decider
from sidecar.table.holder import TableHolder
from sidecar.table.reload import Reloader
from sidecar.transports.explain import compare_logged, explain_local, headers_message
from sidecar.transports.ext_authz import AuthorizationServicer
from sidecar.transports.ext_proc import ExtProcServicer
from sidecar.transports.http_check import answer_bytes
from tests.helpers import table_from_rules

KEY = "Q" * 22


def rules(canary: int = 50) -> list[dict[str, Any]]:
    return [
        {
            "name": "web",
            "split": {
                "key": ["header:x-user-id"],
                "to": [
                    {"cluster": "stable", "weight": 100 - canary},
                    {"cluster": "canary", "weight": canary},
                ],
                "when_key_missing": {"assign": {"cookie": "gs", "secure": False}},
            },
        }
    ]


def decider(metrics: Metrics | None = None) -> Decider:
    return Decider(
        TableHolder(table_from_rules(rules())), metrics or Metrics(CollectorRegistry()), draw_key=lambda: KEY
    )


def test_ext_proc_asks_for_the_response_headers_only_when_it_issues_a_key() -> None:
    servicer = ExtProcServicer(decider())
    later: dict[str, bytes] = {}
    fresh = ep.ProcessingResponse.FromString(
        servicer.answer(headers_message("GET", "/", [("a", "1")]), later) or b""
    )
    assert fresh.mode_override.response_header_mode == fresh.mode_override.SEND
    upstream = {
        h.header.key: h.header.raw_value for h in fresh.request_headers.response.header_mutation.set_headers
    }
    assert upstream["cookie"] == f"gs={KEY}".encode()
    response = ep.ProcessingRequest(response_headers=ep.HttpHeaders())
    added = ep.ProcessingResponse.FromString(servicer.answer(response, later) or b"")
    (header,) = added.response_headers.response.header_mutation.set_headers
    assert header.header.key == "set-cookie" and header.header.raw_value.startswith(f"gs={KEY}; ".encode())
    assert header.append_action == header.APPEND_IF_EXISTS_OR_ADD  # beside the backend's own cookies
    assert later == {}
    back = headers_message("GET", "/", [], cookies=[("gs", KEY)])
    again = ep.ProcessingResponse.FromString(servicer.answer(back, later) or b"")
    assert not again.HasField("mode_override") and later == {}


def test_ext_authz_adds_the_cookie_to_the_clients_response() -> None:
    check = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    method="GET", path="/", headers={"a": "1"}
                )
            )
        )
    )
    response, decision = AuthorizationServicer(decider()).check(check)
    assert decision.issued is not None
    added = [(h.header.key, h.header.value) for h in response.ok_response.response_headers_to_add]
    assert added == [("set-cookie", decision.issued.set_cookie)]
    upstream = {h.header.key: h.header.value for h in response.ok_response.headers}
    assert upstream["cookie"] == f"gs={KEY}"


def test_the_http_fast_path_answers_the_cookie_and_the_metric_counts_the_key() -> None:
    metrics = Metrics(CollectorRegistry())
    steering = decider(metrics).steer_input("ext_authz_http", lambda: {}, lambda h: Request(h))
    answer = answer_bytes(steering)
    assert f"set-cookie: gs={KEY}; Max-Age=2592000; Path=/; HttpOnly; SameSite=Lax\r\n".encode() in answer
    assert f"cookie: gs={KEY}\r\n".encode() in answer
    labels = {"rule": "web", "cluster": steering.decision.cluster}
    assert metrics.registry.get_sample_value("graysteer_issued_keys_total", labels) == 1


def test_explain_is_deterministic_and_shows_the_cookie(tmp_path: Any) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        orjson.dumps(
            {"version": 1, "clusters": ["stable", "canary"], "default": "stable", "rules": rules()}
        ).decode()
    )
    first = explain_local(str(path), "GET", "/", [("a", "1")])
    assert first == explain_local(str(path), "GET", "/", [("a", "1")])
    assert first["issued_cookie"] == "gs" and first["response_headers"]["set-cookie"].startswith("gs=")  # type: ignore[index]
    line = orjson.dumps({"decision": {**first, "cluster": "elsewhere", "bucket": 99}}).decode()
    assert compare_logged(line, first)["same"]  # a new visitor's lane is random: not compared


def test_diff_counts_new_keys_with_the_random_draws_and_compares_returning_visitors() -> None:
    old, new = table_from_rules(rules(10)), table_from_rules(rules(20))
    requests = synthetic_requests([old, new], 200)
    report = compare(old, new, requests)
    assert report.requests > 0 and not report.backwards  # returning visitors, keyed by their cookie
    assert report.moved_requests > 0
    fresh = compare(old, new, [Request({})])
    assert (fresh.random, fresh.requests) == (1, 0)


def test_explain_through_the_admin_api_shows_the_cookie_as_local_explain(tmp_path: Any) -> None:
    """`explain --admin` (the admin API's Explain) answers what local `explain` answers,
    the issued cookie and its set-cookie included; and for a visitor with a key, neither."""
    path = tmp_path / "rules.yaml"
    document = {"version": 1, "clusters": ["stable", "canary"], "default": "stable", "rules": rules()}
    path.write_text(orjson.dumps(document).decode())

    async def build() -> AdminServicer:
        metrics = Metrics(CollectorRegistry())
        return AdminServicer(Reloader(RulesFile(path), metrics, StateFile(tmp_path / "state.json")))

    servicer = asyncio.run(build())
    for headers, cookies in (([("a", "1")], []), ([("x-user-id", "u1")], []), ([], [("gs", KEY)])):
        local = explain_local(str(path), "GET", "/", headers, cookies)
        request = pb.ExplainRequest(
            method="GET",
            path="/",
            headers=[pb.Pair(name=n, value=v) for n, v in headers],
            cookies=[pb.Pair(name=n, value=v) for n, v in cookies],
        )
        answered = explain_result(servicer.explain(request), "admin")
        assert answered == {**local, "source": "admin"}, (headers, cookies)
        assert (answered["issued_cookie"] == "gs") == (not cookies and headers == [("a", "1")])
