"""A SPIRE-agent-like SDS server for the tests: Envoy's SecretDiscoveryService (StreamSecrets,
state of the world) on a unix socket, serving what a SPIRE agent serves a workload's Envoy:
`default` (the X509-SVID with its key) and `ROOTCA` (the trust bundle, for Envoy's SPIFFE
certificate validator, as SPIRE sends it to Envoy 1.18 and later).

`publish()` is a rotation: a new version goes to every open stream. The protocol is SPIRE's
(pkg/agent/endpoints/sdsv3): each response carries a new version and nonce and only the names
the stream asked for; a request with another nonce than the last one sent is stale and
ignored; one with the last nonce is an ACK (or, with error_detail, a NACK) and is not
answered, else the two sides would ping-pong forever.
"""

import itertools
import queue
import secrets
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2 as spiffe
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from sidecar.envoyconf.sds import SPIRE_BUNDLE_SECRET, SPIRE_SVID_SECRET

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
PUSH = object()  # a stream's queue item: a new version to send


@dataclass
class Published:
    version: int
    svid: tuple[bytes, bytes]  # (key PEM, certificate chain PEM)
    bundle: bytes  # the trust domain's CA certificates, PEM


@dataclass
class Stream:
    events: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    names: tuple[str, ...] = ()
    nonce: str = ""
    sent: int = 0  # the version last sent
    acked: str = ""  # the version Envoy last accepted
    nacks: list[str] = field(default_factory=list)


def pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class SdsServer(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """SPIRE's agent, as far as Envoy can tell, for trust domain `trust_domain`."""

    def __init__(self, socket: Path, trust_domain: str, svid: tuple[bytes, bytes], bundle: bytes) -> None:
        self.trust_domain = trust_domain
        self._lock = threading.Lock()
        self._versions = itertools.count(1)
        self.current = Published(next(self._versions), svid, bundle)
        self.streams: list[Stream] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix:{socket}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0).wait(5)

    def publish(self, svid: tuple[bytes, bytes] | None = None, bundle: bytes | None = None) -> int:
        """A new SVID and/or bundle, pushed to every stream; returns its version."""
        with self._lock:
            old = self.current
            self.current = Published(next(self._versions), svid or old.svid, bundle or old.bundle)
            for stream in self.streams:
                stream.events.put(PUSH)
            return self.current.version

    def applied(self, version: int) -> bool:
        """Whether Envoy accepted `version` on every secret it asks for."""
        with self._lock:
            names = {name for stream in self.streams for name in stream.names}
            accepted = {name for s in self.streams if s.acked == str(version) for name in s.names}
            return names == {SPIRE_SVID_SECRET, SPIRE_BUNDLE_SECRET} and accepted == names

    def nacks(self) -> list[str]:
        with self._lock:
            return [message for stream in self.streams for message in stream.nacks]

    def secret(self, name: str) -> secret_pb2.Secret | None:
        published = self.current
        if name == SPIRE_SVID_SECRET:
            key, chain = published.svid
            return secret_pb2.Secret(
                name=name,
                tls_certificate=common_pb2.TlsCertificate(
                    certificate_chain=base_pb2.DataSource(inline_bytes=chain),
                    private_key=base_pb2.DataSource(inline_bytes=key),
                ),
            )
        if name == SPIRE_BUNDLE_SECRET:
            validator = spiffe.SPIFFECertValidatorConfig(
                trust_domains=[
                    spiffe.SPIFFECertValidatorConfig.TrustDomain(
                        name=self.trust_domain,
                        trust_bundle=base_pb2.DataSource(inline_bytes=published.bundle),
                    )
                ]
            )
            context = common_pb2.CertificateValidationContext(
                custom_validator_config=extension_pb2.TypedExtensionConfig(
                    name=SPIFFE_VALIDATOR, typed_config=pack(validator)
                )
            )
            return secret_pb2.Secret(name=name, validation_context=context)
        return None  # SPIRE refuses names the workload has no right to; Envoy then waits

    def StreamSecrets(self, requests: Any, context: grpc.ServicerContext) -> Any:
        stream = Stream()

        def read() -> None:
            try:
                for request in requests:
                    stream.events.put(request)
            except grpc.RpcError:
                pass
            finally:
                stream.events.put(None)

        with self._lock:
            self.streams.append(stream)
        threading.Thread(target=read, daemon=True).start()
        try:
            while (event := stream.events.get()) is not None:
                response = self._answer(stream, event)
                if response is not None:
                    yield response
        finally:
            with self._lock:
                self.streams.remove(stream)

    def _answer(self, stream: Stream, event: Any) -> discovery_pb2.DiscoveryResponse | None:
        with self._lock:
            if event is not PUSH:
                if stream.nonce and event.response_nonce != stream.nonce:
                    return None  # stale: answers a response this stream has since replaced
                names = tuple(sorted(event.resource_names))
                if stream.nonce and event.error_detail.message:
                    stream.nacks.append(event.error_detail.message)
                elif stream.nonce:
                    stream.acked = event.version_info
                if names == stream.names and stream.sent == self.current.version:
                    return None  # an ACK or NACK of what was sent: nothing new to say
                stream.names = names
            if not stream.names:
                return None  # a push before Envoy asked for anything
            stream.nonce = secrets.token_hex(8)
            stream.sent = self.current.version
            found = [s for s in (self.secret(name) for name in stream.names) if s is not None]
            return discovery_pb2.DiscoveryResponse(
                version_info=str(stream.sent),
                nonce=stream.nonce,
                type_url=SECRET_TYPE,
                resources=[pack(s) for s in found],
            )
