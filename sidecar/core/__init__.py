"""The decision core: rule model, validation, matching and bucketing.

Pure: it imports nothing from gRPC, Prometheus, YAML or the filesystem. Adapters
(ext_proc, ext_authz, CLI, reload) build a `Request`, ask a `Table` for a `Decision`.
"""

from sidecar.core.compile import DEFAULT_ROUTING_HEADER, Problem, RulesError, compile_table
from sidecar.core.identity import NO_IDENTITY, Identity, SpiffeId, parse_spiffe_id
from sidecar.core.model import Decision, ErrorCode, Reason, Steering, decision_fields
from sidecar.core.request import Request
from sidecar.core.steering import steer
from sidecar.core.table import DEFAULT_RULE, Table

__all__ = [
    "DEFAULT_ROUTING_HEADER",
    "DEFAULT_RULE",
    "NO_IDENTITY",
    "Decision",
    "ErrorCode",
    "Identity",
    "Problem",
    "Reason",
    "Request",
    "RulesError",
    "SpiffeId",
    "Steering",
    "Table",
    "compile_table",
    "decision_fields",
    "parse_spiffe_id",
    "steer",
]
