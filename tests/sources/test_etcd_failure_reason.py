"""Why a member failed, as /readyz, `status --fleet` and the log say it: gRPC's text without
its preamble, a refused certificate in plain words, whatever the address family."""

import aetcd
import grpc
import pytest

from sidecar.sources.etcd_client import MAX_REASON, EtcdMember, failure_reason

PREAMBLE = "failed to connect to all addresses; last error: UNKNOWN: "
NOT_SIGNED = "TLS: the member's certificate is not signed by the etcd CA (--etcd-ca)"
HANDSHAKE = "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"


def rpc_error(details: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def wrapped(details: str) -> aetcd.ClientError:
    """As aetcd raises it: its own error, gRPC's as the cause."""
    try:
        raise aetcd.ConnectionFailedError(details) from rpc_error(details)
    except aetcd.ClientError as error:
        return error


@pytest.mark.parametrize(
    ("member", "details", "reason"),
    [
        (
            EtcdMember("10.0.0.3", 2379),
            f"{PREAMBLE}ipv4:10.0.0.3:2379: {HANDSHAKE}OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
            "unable to get local issuer certificate: OK",
            f"{NOT_SIGNED}: unable to get local issuer certificate: refused",
        ),
        (
            EtcdMember("::1", 2379),
            f"{PREAMBLE}ipv6:[::1]:2379: {HANDSHAKE}OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
            "certificate has expired: OK",
            f"{NOT_SIGNED}: certificate has expired: refused",
        ),
        (
            EtcdMember("etcd-2.example", 2379),
            f"{PREAMBLE}ipv4:10.0.0.2:2379: Custom verification check failed with error: "
            "UNAUTHENTICATED: Hostname Verification Check failed.",
            "TLS: the member's certificate is not for its address etcd-2.example "
            "(not among its subject alternative names): refused",
        ),
        (
            EtcdMember("::1", 2379),
            f"{PREAMBLE}ipv6:[::1]:2379: Failed to connect to remote host: Connection refused",
            "Failed to connect to remote host: Connection refused",
        ),
        (EtcdMember("10.0.0.1", 2379), "etcdserver: no leader", "etcdserver: no leader"),
    ],
)
def test_reasons(member: EtcdMember, details: str, reason: str) -> None:
    assert failure_reason(rpc_error(details), member) == reason
    assert failure_reason(wrapped(details), member) == reason


def test_other_errors_keep_their_text_or_name_and_are_bounded() -> None:
    member = EtcdMember("10.0.0.1", 2379)
    assert failure_reason(TimeoutError(), member) == "TimeoutError"
    assert failure_reason(ConnectionError("x" * 1000), member) == "x" * MAX_REASON
