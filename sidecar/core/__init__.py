"""The decision core: rule model, validation, matching and bucketing.

Pure: it imports nothing from gRPC, Prometheus, YAML or the filesystem. Adapters
(ext_proc, ext_authz, CLI, reload) build a `Request`, ask a `Table` for a `Decision`.
"""

from sidecar.core.compile import DEFAULT_ROUTING_HEADER, Problem, RulesError, compile_table
from sidecar.core.identity import NO_IDENTITY, Identity, SpiffeId, parse_spiffe_id
from sidecar.core.request import Request
from sidecar.core.steering import Steering, steer
from sidecar.core.table import DEFAULT_RULE, Decision, Table

__all__ = [
    "DEFAULT_ROUTING_HEADER",
    "DEFAULT_RULE",
    "NO_IDENTITY",
    "Decision",
    "Identity",
    "Problem",
    "Request",
    "RulesError",
    "SpiffeId",
    "Steering",
    "Table",
    "compile_table",
    "parse_spiffe_id",
    "steer",
]
