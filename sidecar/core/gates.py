"""Webhook gates, the pure part: what a rollout asks before it moves on (Flagger's
confirm-promotion), and how a wait for one is told. Asking is the controller's
(sidecar/rollouts/gates.py): it passes the answers in."""

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

BEFORE_PROMOTE, BEFORE_STEP = "promote", "step"  # a gate guards the promotion, or every move
DEFAULT_GATE_TIMEOUT, MAX_GATE_TIMEOUT = 5.0, 60.0


@dataclass(frozen=True)
class Gate:
    """A webhook asked before a move: the move waits until it answers 2xx."""

    url: str
    before: str  # BEFORE_PROMOTE: the move to the last step; BEFORE_STEP: every move forward
    timeout: float  # seconds, at most MAX_GATE_TIMEOUT

    def guards(self, to_step: int, last: int) -> bool:
        return self.before == BEFORE_STEP or to_step == last


@dataclass(frozen=True)
class GateResult:
    """A gate's last answer for the pending move: passed (2xx) or why not."""

    passed: bool
    detail: str  # "HTTP 200", "HTTP 503: frozen", "no answer within 5s", ...


def gate_wait(gate: Gate, answer: GateResult | None) -> str:
    """Why a move waits for a gate, with its last answer."""
    return f"waiting for the gate before {gate.before} {shown_url(gate.url)}: " + (
        answer.detail if answer is not None else "asking"
    )


# Query parameters whose values are not shown: their names say they hold a secret.
SECRET_NAME = re.compile(r"token|secret|passw|pwd|key|sig|auth|credential|session|cookie", re.IGNORECASE)
HIDDEN = "***"


def shown_url(url: str) -> str:
    """A gate's URL as shown and stored: the whole destination (scheme, host, port, path and
    query, which are all sent), with its user information (a user name can be a token) and the values of
    query parameters whose names say they are secrets (token, key, sig, ...) as ***; the
    fragment is not sent and not shown."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    user = f"{HIDDEN}@" if parts.username is not None else ""  # a user name can be a token too
    query = "&".join(_shown_parameter(p) for p in parts.query.split("&")) if parts.query else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}" + (f"?{query}" if query else "")


def _shown_parameter(parameter: str) -> str:
    name, equals, _ = parameter.partition("=")
    return f"{name}={HIDDEN}" if equals and SECRET_NAME.search(unquote(name)) else parameter
