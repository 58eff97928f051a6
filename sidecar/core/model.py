"""The decision core's vocabulary: what a decision is, why it was taken, how it failed,
and what steering a request means. Plain data: `table` and `steering` both build on it.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from sidecar.core.baggage import member_value
from sidecar.core.cookies import Issued
from sidecar.core.identity import NO_IDENTITY, Identity, IdentityMatcher


class Reason(StrEnum):
    """What kind of step decided a request: a closed set, used as a metric label, in
    dynamic metadata, logs, `explain` and the admin API."""

    ROUTE = "route"  # a rule with a fixed route
    SPLIT = "split"  # a rule's weighted split
    LANE = "lane"  # a lane received from a trusted caller
    DENY = "deny"  # a deny rule refused the request
    DEFAULT = "default"  # no rule matched: the default cluster
    FALLBACK = "fallback"  # deciding failed: the default cluster, caller treated as untrusted


class ErrorCode(StrEnum):
    """Why deciding failed (the `error` of a FALLBACK decision): a closed set, used alike in
    logs, the `graysteer_decision_errors_total{reason}` label and dynamic metadata. The
    exception itself is logged, never turned into a label."""

    ENGINE = "engine_error"  # the core raised on this request: a bug, or input it cannot handle
    ADAPTER = "adapter_error"  # the transport could not read Envoy's message or build its answer


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes, and why."""

    cluster: str
    rule: str  # the deciding rule's name, "default", or "lane:<lane>"
    version: str  # the config version (hash of the rules file content)
    bucket: int | None = None  # the split bucket, None when no split decided
    key_source: str | None = None  # e.g. "header:x-user-id", "random", "missing"
    error: "ErrorCode | None" = None  # why deciding failed and `default` was used
    lane: str | None = None  # the traffic color passed on (with `coloring`)
    identity: str | None = None  # the caller's SPIFFE ID or DNS name, when known
    deny_status: int | None = None  # set when a deny rule decided: answer this status
    deny_reason: str | None = None
    reason: Reason = Reason.ROUTE  # what kind of step decided
    mirror: str | None = None  # a cluster that gets a copy of the request (its answer ignored)
    issued: Issued | None = None  # a new key for a visitor without one, and its cookie

    def carrying(self, lane: str | None, identity: str | None) -> "Decision":
        """This decision with the lane passed on and the caller's identity."""
        return self._with(lane, identity, self.mirror)

    def mirrored(self, cluster: str) -> "Decision":
        """This decision with a copy of the request sent to `cluster`."""
        return self._with(self.lane, self.identity, cluster)

    def _with(self, lane: str | None, identity: str | None, mirror: str | None) -> "Decision":
        # Built directly: `dataclasses.replace` costs a fifth of a whole steering.
        return Decision(
            self.cluster,
            self.rule,
            self.version,
            self.bucket,
            self.key_source,
            self.error,
            lane,
            identity,
            self.deny_status,
            self.deny_reason,
            self.reason,
            mirror,
            self.issued,
        )

    def as_dict(self) -> dict[str, object]:
        """Every field by name, None for those not set (see `decision_fields`)."""
        return {
            "cluster": self.cluster,
            "rule": self.rule,
            "reason": str(self.reason),
            "bucket": self.bucket,
            "key_source": self.key_source,
            "version": self.version,
            "error": None if self.error is None else str(self.error),
            "lane": self.lane,
            "mirror": self.mirror,
            "identity": self.identity,
            "deny_status": self.deny_status,
            "deny_reason": self.deny_reason,
            "issued_cookie": None if self.issued is None else self.issued.name,
        }


DECISION_FIELDS = tuple(Decision("", "", "").as_dict())  # every field name, in order


def decision_fields(decision: Decision) -> dict[str, str | int]:
    """The one conversion of a decision to named fields, for every transport (dynamic
    metadata, decision headers), `explain`, the admin API and the CLI: the fields that are
    set, as strings and integers."""
    return {key: value for key, value in decision.as_dict().items() if isinstance(value, str | int)}


@dataclass(frozen=True, slots=True)
class Trust:
    identities: tuple[IdentityMatcher, ...] = ()
    plaintext: bool = False
    listener_ports: frozenset[int] = frozenset()
    xfcc: bool = False
    protected: frozenset[str] = frozenset()  # override headers + the color header

    def allows(self, identity: Identity, listener_port: int | None) -> bool:
        if listener_port is not None and listener_port in self.listener_ports:
            return True
        if not identity.mtls:
            return self.plaintext
        return any(matches(identity) for matches in self.identities)


@dataclass(frozen=True, slots=True)
class Coloring:
    header: str
    baggage: str | None
    lanes: Mapping[str, str]  # lane -> this service's cluster
    fallback: str
    lane_of: Mapping[str, str] = field(default_factory=dict)  # cluster -> lane

    def received_lane(self, headers: Mapping[str, str]) -> str | None:
        """The lane a caller sent (color header, else baggage member), as written."""
        lane = headers.get(self.header)
        if not lane and self.baggage and "baggage" in headers:
            lane = member_value(headers["baggage"], self.baggage)
        return lane or None

    def rule_label(self, lane: str) -> str:
        """The decision's `rule` for a received lane: named after this service's lanes only,
        so the label set (metrics, logs) is bounded by the rules file, not by callers."""
        return f"lane:{lane}" if lane in self.lanes else UNKNOWN_LANE_RULE


MAX_LANE_LENGTH = 64
_LANE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # the rules file's lane names (schema LANE_PATTERN)
UNKNOWN_LANE_RULE = "lane:unknown"


def lane_problem(lane: str) -> str | None:
    """Why a received lane cannot be honoured or passed on, or None. A lane travels on as a
    header and a baggage member: `stable, canary` would add a member, and a long one makes the
    request too large for the next hop."""
    if len(lane) > MAX_LANE_LENGTH:
        return "too long"
    if not _LANE.fullmatch(lane):
        return "not a lane name"
    return None


@dataclass(frozen=True, slots=True)
class Steering:
    """What to do with one request."""

    decision: Decision
    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    baggage_dropped: bool = False  # the lane member was left out: baggage over its size limits
    malformed: tuple[str, ...] = ()  # inputs ignored as malformed: "xfcc", "baggage", "lane", "version"
    identity: Identity = NO_IDENTITY  # the identity the decision used (mTLS, else XFCC)
    # headers to add to the client's response: the `set-cookie` of an issued key
    response_headers: tuple[tuple[str, str], ...] = ()

    @property
    def denied(self) -> bool:
        return self.decision.deny_status is not None
