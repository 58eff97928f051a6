"""What the sidecar does with each request Envoy decided itself (envoy_decides), besides
counting it (sidecar.transports.access_log): the decision log, the shadow table's comparison
and the steering events, exactly as for the requests it decides.

They need the request, so only while one of them is on (a decision log, or a shadow table
loaded) does the generated Lua file each decided request's inputs (`capture`: the headers
the live and the shadow table read, and what every log line shows); otherwise the Lua
writes nothing more and the sidecar reads nothing more. The request is read back
(sidecar.transports.envoy_inputs) and decided again by the live table, which gives what the
decision's metadata does not carry (the identity as the core reads it, the untrusted headers
removed, what was malformed); the decision logged and compared is Envoy's, as it filed it
(a random split's draw is Envoy's own). The log's sample and the shadow's sample and budget
apply as in every mode.

A new visitor's key (`when_key_missing: {assign: ...}`) is drawn by the Lua, which files it
in the decision's `set_cookie`; the inputs are taken before the Lua adds it to the request,
so the replay takes the key from there (`issued_key`): the log, the shadow's comparison and
the decision are those of the key Envoy issued, and nothing draws or counts a second one
(the access log counts it, sidecar.transports.access_log).
"""

import dataclasses
import logging
from collections.abc import Mapping

from sidecar.core import Decision, Steering, Table
from sidecar.core.cookies import Issued, well_formed
from sidecar.core.model import Reason
from sidecar.core.text import is_encodable
from sidecar.ops.metrics import Metrics
from sidecar.ops.request_metrics import steering_events
from sidecar.table.decider import Decider
from sidecar.transports.envoy_inputs import MTLS_UNNAMED, InputsRefused, inputs_request

log = logging.getLogger("graysteer.envoy_decided")

TRANSPORT = "envoy_decides"  # the decision log's `transport` of the requests Envoy decided
ALWAYS_CAPTURED = ("traceparent", "x-request-id")  # every log line's decision_id and trace
MAX_FIELD_CHARS = 1024  # a decision field longer than this is not Envoy's
_REASONS = frozenset(str(reason) for reason in Reason)


def captured_headers(live: Table, shadow: Table | None) -> tuple[str, ...]:
    """The headers the Lua files for `live` (and `shadow`): those they read, and those every
    decision log line shows."""
    names = set(live.read_headers) | set(ALWAYS_CAPTURED)
    if shadow is not None:
        names |= shadow.read_headers
    return tuple(sorted(names))


class Feeds:
    """The decision log, the shadow table and the steering events, fed from Envoy's decisions."""

    def __init__(self, decider: Decider, metrics: Metrics) -> None:
        self.decider, self.metrics = decider, metrics
        self._refused = metrics.envoy_decision_logs.labels("refused_inputs")
        self._logged: set[str] = set()

    def wanted(self) -> bool:
        """Whether anything reads the requests' inputs now."""
        shadow = self.decider.shadow
        return self.decider.log is not None or (shadow is not None and shadow.engine is not None)

    def capture(self, live: Table) -> tuple[str, ...]:
        """The headers the Lua for `live` files with each decision; () when nothing reads them."""
        if not self.wanted():
            return ()
        shadow = self.decider.shadow
        return captured_headers(live, shadow.table if shadow is not None else None)

    def replay(self, table: Table, fields: Mapping[str, str], inputs: str | None) -> bool:
        """One request Envoy decided with `table` (its decision's `fields`, its `inputs`; None:
        not a string): events counted, the shadow's comparison, the log line offered. Whether
        it was replayed (its events counted: else the caller counts those the Lua filed).
        Never raises."""
        try:
            if inputs is None:
                raise InputsRefused("layout")
            request = inputs_request(inputs)
        except InputsRefused as why:
            self._refuse(str(why))
            return False
        engine = self.decider.holder.engine
        issued = issued_key(fields)
        if issued is not None:  # the key Envoy issued, never one of the replay's own
            request.draw_key = lambda: issued.key
        try:
            replayed = engine.steer(request)
        except Exception:  # counted by what the request path counts; not served here
            self._refuse("replay_failed")
            return False
        served = served_decision(replayed.decision, fields, issued)
        steering = replayed if served is replayed.decision else dataclasses.replace(replayed, decision=served)
        self.count_events(steering)
        if request.identity is MTLS_UNNAMED:  # as the fast path counts it (authz_http)
            self.metrics.count_event("malformed_xfcc")
        differing = self.decider.shadow_decision(request, served)
        if self.decider.log is not None:
            self.decider.log.offer(TRANSPORT, request, steering, table, differing)
        return True

    def count_events(self, steering: Steering) -> None:
        for event in steering_events(steering):
            self.metrics.count_event(event)

    def _refuse(self, why: str) -> None:
        self._refused.inc()
        if why not in self._logged:  # a closed set of reasons: logged once each
            self._logged.add(why)
            log.warning(
                "inputs of a request Envoy decided refused (%s): neither logged nor compared; "
                "later refusals of this kind are only counted",
                why,
            )


def issued_key(fields: Mapping[str, str]) -> Issued | None:
    """The key Envoy's Lua issued to a new visitor, from its decision's `issued_cookie` and
    `set_cookie` (`NAME=KEY; attributes`); None when it issued none, or filed no key of the
    shape issued (then nothing is taken from it)."""
    name, set_cookie = fields.get("issued_cookie"), fields.get("set_cookie")
    if not name or set_cookie is None or len(set_cookie) > MAX_FIELD_CHARS:
        return None
    filed_name, _, key = set_cookie.partition(";")[0].partition("=")
    if filed_name != name or well_formed(key) is None:
        return None
    return Issued(name, key, set_cookie)


def served_decision(replayed: Decision, fields: Mapping[str, str], issued: Issued | None = None) -> Decision:
    """The decision Envoy filed (`fields`, `issued`: the key it issued): the replayed one when
    they agree (every decision but a random draw's), else one built from the fields."""
    bucket = str(replayed.bucket) if replayed.bucket is not None else None
    if (
        replayed.cluster == fields.get("cluster")
        and replayed.rule == fields.get("rule")
        and bucket == fields.get("bucket")
        and replayed.mirror == fields.get("mirror")
        and replayed.key_source == fields.get("key_source")
        and replayed.lane == fields.get("lane")
        and replayed.issued == issued
    ):
        return replayed
    reason = fields.get("reason", "")
    return Decision(
        fields["cluster"],
        fields["rule"],
        _text(fields, "version") or replayed.version,
        _number(fields.get("bucket")),
        _text(fields, "key_source"),
        None,
        _text(fields, "lane"),
        replayed.identity,
        _number(fields.get("deny_status")),
        _text(fields, "deny_reason"),
        Reason(reason) if reason in _REASONS else replayed.reason,
        _text(fields, "mirror"),
        issued,
    )


def _text(fields: Mapping[str, str], name: str) -> str | None:
    value = fields.get(name)
    if value is None or len(value) > MAX_FIELD_CHARS or not is_encodable(value):
        return None
    return value


def _number(text: str | None) -> int | None:
    if text is None or not (text.isascii() and text.isdecimal()) or len(text) > 12:
        return None
    return int(text)
