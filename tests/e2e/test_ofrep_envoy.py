"""OpenFeature remote evaluation (OFREP) against a running sidecar, through the OpenFeature
Python SDK and its OFREP provider from PyPI: a user's lane is the lane the real Envoy routes
that user to, before and after the weights change."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

from sidecar.cli import main
from sidecar.core.ofrep import TABLE_FLAG
from sidecar.dev.devstack import Sidecar, Stack
from sidecar.dev.processes import free_port, wait_for
from tests.e2e.conftest import ENVOY_CONFIG

RULES = """
version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: force-canary
    match: {headers: {x-canary: "1"}}
    route: canary
  - name: ramp
    match: {path: {prefix: /api/}}
    split:
      key: [header:x-user-id, cookie:uid]
      seed: e2e
      to: [{cluster: stable, weight: 70}, {cluster: canary, weight: 30}]
      when_key_missing: stable
"""

ROLLOUT_RULES = """
version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: ramp
    split:
      key: [header:x-user-id]
      to: [{cluster: stable, weight: 100}, {cluster: canary, weight: 0}]
    rollout:
      canary: canary
      steps: [{weight: 20, hold: 1h}, {weight: 100}]
      analysis: {window: 3s, min_requests: 20, max_error_rate: 0.1}
      on_failure: rollback
"""
USERS = [f"user-{i}" for i in range(1000)]


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[Stack]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    with Stack(rules, ENVOY_CONFIG, tmp_path) as running:
        yield running


def base_url(stack: Stack) -> str:
    assert stack.sidecar is not None
    return f"http://127.0.0.1:{stack.sidecar.http}"


@pytest.fixture()
def features(stack: Stack) -> Iterator[OpenFeatureClient]:
    """An OpenFeature client whose provider is the sidecar's OFREP (a domain of its own)."""
    api.set_provider(OFREPProvider(base_url(stack), timeout=5), "graysteer-e2e")
    yield api.get_client("graysteer-e2e")
    api.clear_providers()


def lane(features: OpenFeatureClient, flag: str, user: str) -> str:
    details = features.get_string_details(flag, "unknown", EvaluationContext(targeting_key=user))
    assert details.error_code is None, details.error_message
    return details.value


def routed(stack: Stack, users: list[str]) -> dict[str, str]:
    """The backend the real Envoy sends each user's request under the split's path to."""
    client = stack.client()
    answers = {}
    for user in users:
        status, echo = client.get("/api/orders", {"x-user-id": user})
        assert status == 200, echo
        answers[user] = echo["backend"]
    return answers


def bulk(stack: Stack, user: str, etag: str = "") -> requests.Response:
    headers = {"if-none-match": etag} if etag else {}
    return requests.post(
        f"{base_url(stack)}/ofrep/v1/evaluate/flags",
        json={"context": {"targetingKey": user}},
        headers=headers,
        timeout=5,
    )


def test_a_users_flag_is_the_lane_envoy_routes_the_user_to(stack: Stack, features: OpenFeatureClient) -> None:
    envoy = routed(stack, USERS)
    flags = {user: lane(features, "ramp", user) for user in USERS}
    assert flags == envoy
    assert 200 < sum(v == "canary" for v in flags.values()) < 400  # both lanes, 30% canary
    details = features.get_string_details("ramp", "unknown", EvaluationContext(targeting_key="user-1"))
    assert details.reason == Reason.SPLIT and details.variant == details.value
    assert details.flag_metadata["rule"] == "ramp" and details.flag_metadata["key_source"] == "targetingKey"
    # the split's own key names decide before targetingKey, as the router reads them
    named = EvaluationContext("someone-else", {"header:X-User-Id": "user-7"})
    assert features.get_string_value("ramp", "unknown", named) == envoy["user-7"]


def test_after_set_weight_the_etag_changes_and_the_answers_follow(
    stack: Stack, features: OpenFeatureClient
) -> None:
    assert stack.sidecar is not None
    first = bulk(stack, "user-1")
    assert first.status_code == 200 and first.headers["etag"]
    assert bulk(stack, "user-1", first.headers["etag"]).status_code == 304
    assert bulk(stack, "user-2", first.headers["etag"]).status_code == 200  # another context
    assert main(["set-weight", "ramp", "canary=100", "--admin", stack.sidecar.admin]) == 0
    after = bulk(stack, "user-1", first.headers["etag"])
    assert after.status_code == 200 and after.headers["etag"] != first.headers["etag"]
    (ramp,) = [flag for flag in after.json()["flags"] if flag["key"] == "ramp"]
    assert ramp["value"] == "canary"
    users = USERS[:100]
    assert {lane(features, "ramp", user) for user in users} == {"canary"}
    assert set(routed(stack, users).values()) == {"canary"}


def test_after_a_rollout_step_the_etag_changes_and_the_answers_follow(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ROLLOUT_RULES)
    admin_port = free_port()
    args = ["--envoy-admin", f"127.0.0.1:{admin_port}", "--rollout-poll", "0.25"]
    with Stack(rules, ENVOY_CONFIG, tmp_path, envoy_admin_port=admin_port, sidecar_args=args) as stack:
        assert stack.sidecar is not None
        sidecar = stack.sidecar

        def weight() -> int:
            return int(json.loads(sidecar.http_get("/rollouts/ramp")[1])["canary_weight"])

        wait_for(lambda: weight() == 20, 10, "the rollout's first step")
        api.set_provider(OFREPProvider(base_url(stack), timeout=5), "graysteer-rollout")
        try:
            features = api.get_client("graysteer-rollout")
            users = USERS[:300]
            before = bulk(stack, "user-1")
            lanes = {user: lane(features, "ramp", user) for user in users}
            assert lanes == routed(stack, users) and set(lanes.values()) == {"stable", "canary"}
            assert main(["rollout", "promote", "ramp", "--admin", sidecar.admin]) == 0
            wait_for(lambda: weight() == 100, 10, "the rollout's last step")
            after = bulk(stack, "user-1", before.headers["etag"])
            assert after.status_code == 200 and after.headers["etag"] != before.headers["etag"]
            assert {lane(features, "ramp", user) for user in users} == {"canary"}
            assert set(routed(stack, users).values()) == {"canary"}
        finally:
            api.clear_providers()


CASES = [
    {"path": "/api/orders", "header:x-user-id": "user-3"},
    {"path": "/api/orders", "cookie:uid": "user-9"},
    {"path": "/api/orders"},
    {"path": "/home", "header:x-user-id": "user-3"},
    {"path": "/api/orders", "header:x-canary": "1", "method": "POST"},
    {"host": "shop.example.com", "path": "/api/x?y=1", "header:x-user-id": "u"},
]


@pytest.mark.parametrize("attributes", CASES)
def test_the_whole_table_flag_is_what_explain_says(
    stack: Stack, features: OpenFeatureClient, attributes: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert stack.sidecar is not None
    details = features.get_string_details(TABLE_FLAG, "unknown", EvaluationContext(None, dict(attributes)))
    argv = ["explain", "--admin", stack.sidecar.admin, "--path", attributes.get("path", "/")]
    argv += ["--method", attributes.get("method", "GET")]
    if "host" in attributes:
        argv += ["--host", attributes["host"]]
    for name, value in attributes.items():
        if name.startswith("header:"):
            argv += ["-H", f"{name[len('header:') :]}: {value}"]
        if name.startswith("cookie:"):
            argv += ["--cookie", f"{name[len('cookie:') :]}={value}"]
    assert main(argv) == 0
    explained = json.loads(capsys.readouterr().out)
    assert details.value == details.variant == explained["cluster"]
    metadata = details.flag_metadata
    for field in ("rule", "reason", "bucket", "key_source", "version"):
        assert metadata.get(field) == explained.get(field), field
    expected = {"route": Reason.TARGETING_MATCH, "split": Reason.SPLIT, "default": Reason.DEFAULT}
    assert details.reason == expected[explained["reason"]]


def test_unknown_flags_and_missing_keys_get_ofreps_errors(stack: Stack, features: OpenFeatureClient) -> None:
    for flag in ("nope", "force-canary"):  # no such rule; a rule that is no split
        details = features.get_string_details(flag, "fallback", EvaluationContext("user-1"))
        assert (details.value, details.error_code) == ("fallback", ErrorCode.FLAG_NOT_FOUND)
    details = features.get_string_details("ramp", "fallback", EvaluationContext(None, {"plan": "gold"}))
    assert (details.value, details.error_code) == ("fallback", ErrorCode.TARGETING_KEY_MISSING)
    details = features.get_string_details(
        "ramp", "fallback", EvaluationContext(None, {"header:x-user-id": 7})
    )
    assert (details.value, details.error_code) == ("fallback", ErrorCode.INVALID_CONTEXT)
    answer = requests.post(f"{base_url(stack)}/ofrep/v1/evaluate/flags", json={"context": {}}, timeout=5)
    flags = {flag["key"]: flag for flag in answer.json()["flags"]}
    assert flags["ramp"]["errorCode"] == "TARGETING_KEY_MISSING"
    assert flags[TABLE_FLAG]["value"] == "stable" and flags[TABLE_FLAG]["reason"] == "DEFAULT"


def test_with_a_token_file_only_a_caller_with_the_token_is_answered(tmp_path: Path) -> None:
    rules, token = tmp_path / "rules.yaml", tmp_path / "ofrep-token"
    rules.write_text(RULES)
    token.write_text("app-secret\n")
    token.chmod(0o600)
    sidecar = Sidecar(rules, tmp_path, ["--ofrep-token-file", str(token)])
    try:
        url = f"http://127.0.0.1:{sidecar.http}"
        bearer = {"authorization": "Bearer app-secret"}
        api.set_provider(OFREPProvider(url, headers_factory=lambda: dict(bearer)), "with-token")
        api.set_provider(OFREPProvider(url), "without-token")
        context = EvaluationContext("user-1")
        assert api.get_client("with-token").get_string_details("ramp", "none", context).error_code is None
        refused = api.get_client("without-token").get_string_details("ramp", "none", context)
        assert (refused.value, refused.error_code, refused.error_message) == (
            "none",
            ErrorCode.GENERAL,
            "unauthorized",
        )
    finally:
        api.clear_providers()
        sidecar.stop()
