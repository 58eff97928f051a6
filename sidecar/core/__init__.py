"""The decision core: rule model, validation, matching and bucketing.

Pure: it imports nothing from gRPC, Prometheus, YAML or the filesystem. Adapters
(ext_proc, ext_authz, CLI, reload) build a `Request`, ask a `Table` for a `Decision`.
"""

from sidecar.core.compile import DEFAULT_ROUTING_HEADER, Problem, RulesError, compile_table
from sidecar.core.request import Request
from sidecar.core.table import DEFAULT_RULE, Decision, Table

__all__ = [
    "DEFAULT_ROUTING_HEADER",
    "DEFAULT_RULE",
    "Decision",
    "Problem",
    "Request",
    "RulesError",
    "Table",
    "compile_table",
]
