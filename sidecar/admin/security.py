"""Who may call the admin API: a bearer token, TLS client certificates with an allow-list of
identities, or both; and the unix socket's file mode.

Every container of a Kubernetes pod shares its loopback, so an unauthenticated admin API on
127.0.0.1 is open to all of them. The token file is read again when it changes (rotation
without a restart); tokens are compared in constant time. With TLS, a client certificate
from `ca` is required and its SANs must match one `allow` entry (a SPIFFE ID, a SPIFFE glob
`spiffe://td/path/*`, or a DNS name, `*.` for one label), matched as the rules file matches
identities. The token file must not be readable by other users nor writable by group or
others (checked at start-up and on every read: a file that becomes readable stops being
accepted); a group-readable one (a Kubernetes Secret volume with fsGroup) is logged. The TLS
certificate, key and CA are read again when they change too, by the admin API
(`server_credentials`) and the operator endpoint's HTTPS (`HttpTls`) alike.

Every kind of call is checked by the same function, before the method runs: a streaming
call that is refused sends no message.
"""

import hmac
import inspect
import logging
import os
import ssl
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from sidecar.core.identity import Identity, IdentityMatcher, identity_form_problem, identity_matcher
from sidecar.tlsfiles import TlsFiles, TlsPem, TlsReloads

log = logging.getLogger("graysteer.admin")

TOKEN_METADATA = "authorization"
SOCKET_MODE = 0o600  # the unix socket: the sidecar's user only


@dataclass(frozen=True)
class AdminAuth:
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None  # with cert and key: client certificates from this CA are required
    allow: Sequence[str] = field(default_factory=tuple)  # identities allowed with TLS

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def authenticates(self) -> bool:
        return self.token_file is not None or self.tls

    def problem(self) -> str | None:
        """What is wrong with these settings, or None."""
        parts = (self.tls_cert, self.tls_key, self.tls_ca)
        if any(parts) and not all(parts):
            return "--admin-tls-cert, --admin-tls-key and --admin-tls-ca go together"
        if self.tls and not self.allow:
            return "--admin-tls-* needs at least one --admin-allow IDENTITY (who may call)"
        if self.allow and not self.tls:
            return "--admin-allow needs --admin-tls-cert/-key/-ca (identities come from client certificates)"
        for entry in self.allow:
            problem = identity_form_problem(allow_form(entry))
            if problem:
                return f"--admin-allow {entry!r}: {problem}"
        if self.token_file is not None:
            try:
                TokenFile(self.token_file).token()
            except (OSError, ValueError) as error:
                return f"--admin-token-file {self.token_file}: {error}"
        return None


def allow_form(entry: str) -> dict[str, str]:
    """An --admin-allow entry as a rules-file identity form."""
    if entry.startswith("spiffe://"):
        return {"glob": entry} if "*" in entry else {"exact": entry}
    return {"dns": entry}


def token_mode_problem(path: Path, mode: int) -> str | None:
    """Why a token file with this mode must not be used (others can read it, or group or
    others can change it), or None."""
    mode = stat.S_IMODE(mode)
    fix = f"run `chmod 600 {path}` (a Kubernetes Secret volume: defaultMode: 0440 with the pod's fsGroup)"
    if mode & stat.S_IROTH:
        return f"mode {mode:04o} lets every user read the admin token: {fix}"
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"mode {mode:04o} lets other users change the admin token: {fix}"
    return None


class TokenFile:
    """A bearer token in a file, read again when the file changes. Its mode is checked on
    every read (a chmod changes neither the content nor the mtime)."""

    def __init__(self, path: str, what: str = "admin token file") -> None:
        self.path = Path(path)
        self.what = what  # names it in messages
        self._seen: tuple[float, int] | None = None
        self._token = b""
        self._reported: str | None = None  # the refusal last logged: each is logged once
        self.mode = 0  # the file's permission bits at the last read
        self._warned_mode: int | None = None  # the group-readable mode last logged

    def token(self) -> bytes:
        """The token; OSError when unreadable, ValueError when empty or its mode is unsafe."""
        info = self.path.stat()
        problem = token_mode_problem(self.path, info.st_mode)
        if problem:
            raise ValueError(problem)
        if self._seen != (info.st_mtime, info.st_size):
            token = self.path.read_bytes().strip()
            if not token:
                raise ValueError("the token file is empty")
            self._token, self._seen = token, (info.st_mtime, info.st_size)
        self.mode = stat.S_IMODE(info.st_mode)
        return self._token

    def current(self) -> bytes | None:
        """The token, or None (nobody gets in): a refusal is logged once per reason, a
        group-readable mode once per mode."""
        try:
            token = self.token()
        except (OSError, ValueError) as error:
            reason = str(error.strerror or error) if isinstance(error, OSError) else str(error)
            if reason != self._reported:
                self._reported = reason
                log.error("%s %s: %s: refusing every call", self.what, self.path, reason)
            return None
        if self._reported is not None:
            self._reported = None
            log.info("%s %s: readable and safe again", self.what, self.path)
        if self.mode & stat.S_IRGRP and self._warned_mode != self.mode:
            self._warned_mode = self.mode
            log.warning(
                "%s %s: mode %04o lets its group read the token (accepted: a Kubernetes "
                "Secret volume with fsGroup); `chmod 600` keeps it to this user",
                self.what,
                self.path,
                self.mode,
            )
        return token

    def accepts(self, metadata: Sequence[tuple[str, Any]]) -> bool:
        return self.accepts_header(next((v for k, v in metadata if k == TOKEN_METADATA), ""))

    def accepts_header(self, sent: str | bytes | None) -> bool:
        """Whether an Authorization header's value is `Bearer TOKEN` (compared in constant time)."""
        token = self.current()
        if token is None:
            return False  # no usable token: nobody gets in
        sent = sent or ""
        sent_bytes = sent.encode("utf-8", "surrogateescape") if isinstance(sent, str) else bytes(sent)
        return hmac.compare_digest(sent_bytes, b"Bearer " + token)


def peer_identity(auth_context: dict[str, list[bytes]]) -> Identity:
    """The verified client certificate's identity, from gRPC's auth context."""
    pems = auth_context.get("x509_pem_cert") or []
    if not pems:
        return Identity()
    return certificate_identity(x509.load_pem_x509_certificate(pems[0]))


def certificate_identity(certificate: x509.Certificate) -> Identity:
    """A verified client certificate's identity: its URI and DNS SANs."""
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return Identity(mtls=True)
    uris = tuple(sans.get_values_for_type(x509.UniformResourceIdentifier))
    dns = tuple(sans.get_values_for_type(x509.DNSName))
    return Identity.from_sans(True, uris, dns)


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]
Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]

# (request streaming, response streaming) -> the handler's behaviour for that kind of call,
# and how to make a handler of that kind.
_KINDS: dict[tuple[object, object], tuple[str, Callable[..., grpc.RpcMethodHandler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


UNAUTHENTICATED, NOT_ALLOWED = "unauthenticated", "not allowed"  # why a caller is refused


class AdminGate:
    """Who may act as an operator: every configured check must pass (the bearer token, and
    with TLS an allowed client identity). The admin API's interceptor and the operator
    endpoint's page actions both ask it, so both are authenticated the same way."""

    def __init__(self, auth: AdminAuth) -> None:
        self.tokens = TokenFile(auth.token_file) if auth.token_file else None
        self.allowed: tuple[IdentityMatcher, ...] = tuple(identity_matcher(allow_form(a)) for a in auth.allow)
        self.tls = auth.tls
        if self.tokens is not None:
            self.tokens.current()  # log a group-readable or unusable token file at start-up

    def refusal(
        self, authorization: str | bytes | None, identity: Callable[[], Identity]
    ) -> tuple[str, str] | None:
        """Why a caller who sent this authorization value, with this verified client
        identity (asked only when needed), may not proceed (UNAUTHENTICATED or NOT_ALLOWED,
        and a message), or None."""
        if self.tokens is not None and not self.tokens.accepts(
            [(TOKEN_METADATA, authorization)] if authorization is not None else []
        ):
            return UNAUTHENTICATED, "a valid admin bearer token is required"
        if self.tls and not any(matches(identity()) for matches in self.allowed):
            return NOT_ALLOWED, "this client certificate is not on the admin allow-list"
        return None


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses a call (UNAUTHENTICATED / PERMISSION_DENIED) unless it passes the AdminGate.
    Every kind of call (unary or streaming, either way) goes through `refusal` before its
    method runs; a handler of a kind this does not know is refused, never passed through
    unchecked."""

    def __init__(self, auth: AdminAuth) -> None:
        self.gate = AdminGate(auth)

    def refusal(self, context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
        """Why this call may not proceed (a status code and its message), or None."""
        sent = next((v for k, v in context.invocation_metadata() or () if k == TOKEN_METADATA), None)
        refused = self.gate.refusal(sent, lambda: peer_identity(context.auth_context()))
        if refused is None:
            return None
        code = (
            grpc.StatusCode.UNAUTHENTICATED
            if refused[0] == UNAUTHENTICATED
            else grpc.StatusCode.PERMISSION_DENIED
        )
        return code, refused[1]

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        refused = self.refusal(context)
        if refused is not None:
            await context.abort(*refused)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # no such method: gRPC answers UNIMPLEMENTED, nothing runs
        flags = (getattr(handler, "request_streaming", None), getattr(handler, "response_streaming", None))
        kind = _KINDS.get(flags)
        behaviour = getattr(handler, kind[0], None) if kind is not None else None
        if kind is None or behaviour is None:
            return grpc.stream_stream_rpc_method_handler(_refuse_unknown_kind)
        checked = self._stream(behaviour) if handler.response_streaming else self._unary(behaviour)
        return kind[1](
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, behaviour: Behaviour) -> Behaviour:
        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._check(context)
            return await behaviour(request, context)

        return checked

    def _stream(self, behaviour: Behaviour) -> Behaviour:
        async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._check(context)
            responses = behaviour(request, context)
            if inspect.isawaitable(responses):  # a method that writes with context.write()
                await responses
                return
            async for response in responses:
                yield response

        return checked


async def _refuse_unknown_kind(requests: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        "the admin API cannot authenticate this kind of call: refused",
    )


def admin_tls_files(auth: AdminAuth, reloads: TlsReloads | None = None) -> TlsFiles:
    """The admin certificate, key and CA, read again when they change; one instance serves
    the admin API and the operator endpoint's HTTPS alike (one log line and one count per
    rotation). The certificate must chain to the CA: the CLI verifies the server with it.
    OSError or ValueError naming the file when they cannot be used at start-up."""
    assert auth.tls_cert and auth.tls_key and auth.tls_ca
    return TlsFiles(
        "admin", Path(auth.tls_ca), Path(auth.tls_cert), Path(auth.tls_key), reloads, verify_chain=True
    )


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS requiring client certificates, with the certificate, key and CA files read again
    when they change: gRPC asks before every handshake (sidecar.tlsfiles keeps that to a stat
    of each file), so new connections use rotated files and open ones go on."""
    served = [files.current()]

    def configuration(pem: TlsPem) -> grpc.ServerCertificateConfiguration:
        assert pem.key is not None and pem.chain is not None
        return grpc.ssl_server_certificate_configuration([(pem.key, pem.chain)], root_certificates=pem.ca)

    def changed() -> grpc.ServerCertificateConfiguration | None:
        try:
            pem = files.current()
        except Exception:  # never fail a handshake for want of new files: the last ones stay
            log.exception("admin TLS files: cannot check for changes")
            return None
        if pem is served[0]:
            return None  # gRPC keeps the configuration it has
        served[0] = pem
        return configuration(pem)

    return grpc.dynamic_ssl_server_credentials(
        configuration(served[0]), changed, require_client_authentication=True
    )


def http_tls_context(pem: TlsPem) -> ssl.SSLContext:
    """HTTPS for the operator endpoint with the admin API's certificate: a client certificate
    from the admin CA is asked for and verified when sent, not required (Prometheus and the
    probes connect without one; only the live page's actions need an allowed one)."""
    assert pem.chain is not None and pem.key is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=pem.ca.decode("ascii"))
    # The ssl module loads a certificate and key from files only: the checked bytes go to a
    # private directory (0700) for the call, so what is served is what sidecar.tlsfiles checked.
    with tempfile.TemporaryDirectory(prefix="graysteer-tls-") as directory:
        chain, key = Path(directory, "chain.pem"), Path(directory, "key.pem")
        key.touch(0o600)
        key.write_bytes(pem.key)
        chain.write_bytes(pem.chain)
        context.load_cert_chain(chain, key)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


class HttpTls:
    """The operator endpoint's TLS context for the next connection: built again when the admin
    TLS files changed and were taken (sidecar.tlsfiles), so new connections handshake with the
    rotated certificate and CA and open ones go on. Called from the endpoint's own thread."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._pem = files.current()
        self._context = http_tls_context(self._pem)

    def __call__(self) -> ssl.SSLContext:
        pem = self.files.current()
        if pem is not self._pem:
            self._pem = pem  # tried once: a failure is logged once, the last context stays
            try:
                self._context = http_tls_context(pem)
            except (ssl.SSLError, ValueError, OSError):
                log.exception("admin TLS files: cannot build the operator endpoint's TLS context")
        return self._context


def restrict_socket(address: str) -> None:
    """Give a unix socket the mode SOCKET_MODE (the sidecar's user only)."""
    if address.startswith("unix:"):
        os.chmod(address[len("unix:") :].removeprefix("//"), SOCKET_MODE)


@dataclass(frozen=True)
class ClientAuth:
    """How the CLI authenticates to the admin API."""

    token_file: str | None = None
    tls_ca: str | None = None  # verify the server with this CA (TLS)
    tls_cert: str | None = None  # and present this client certificate
    tls_key: str | None = None

    def channel(self, address: str) -> grpc.Channel:
        if self.tls_ca is None:
            return grpc.insecure_channel(address)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(self.tls_ca).read_bytes(),
            private_key=Path(self.tls_key).read_bytes() if self.tls_key else None,
            certificate_chain=Path(self.tls_cert).read_bytes() if self.tls_cert else None,
        )
        return grpc.secure_channel(address, credentials)

    def metadata(self) -> list[tuple[str, str]]:
        if self.token_file is None:
            return []
        return [(TOKEN_METADATA, "Bearer " + Path(self.token_file).read_text().strip())]
