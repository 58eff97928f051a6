"""The fast path's messages, pure: a deny answer never 5xx (Envoy would treat it as a failed
check), the rule's status kept in the decision's headers."""

from sidecar.core import Decision, Steering
from sidecar.transports.http_check import answer_bytes


def test_a_5xx_deny_status_is_answered_403_never_5xx() -> None:
    decision = Decision("stable", "down", "v1", deny_status=503, deny_reason="maintenance")
    head, _, body = answer_bytes(Steering(decision)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"x-graysteer-decision-deny-status: 503" in head
    assert body == b"maintenance"
    head_only = answer_bytes(Steering(decision), head_only=True)
    assert head_only.endswith(b"\r\n\r\n") and b"content-length: 11" in head_only
