"""JSON Schema of the rules file (structure only; meaning is checked in compile.py).

Kept as a Python literal so the core reads no files. Every object refuses unknown
keys, so a typo such as `rout:` is an error instead of a silently ignored field.
"""

from typing import Any

from sidecar.core.cookies import COOKIE_NAME_PATTERN, COOKIE_PATH_PATTERN, SAME_SITE

# Defaults of optional fields, used alike by validation and compilation.
DEFAULT_ROUTING_HEADER = "x-route-cluster"
DEFAULT_COLOR_HEADER = "x-graysteer-lane"
DEFAULT_BAGGAGE_KEY = "graysteer.lane"
DEFAULT_MIRROR_HEADER = "x-mirror-cluster"

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
KEY_SOURCE_PATTERN = r"^((header|cookie|query):[^\s]+|identity)$"
LANE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
GRPC_SERVICE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"  # package.Service
GRPC_METHOD_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

_string_match: dict[str, Any] = {
    "type": "object",
    "properties": {
        "exact": {"type": "string"},
        "prefix": {"type": "string", "minLength": 1},
        "regex": {"type": "string"},
    },
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
}

_header_match: dict[str, Any] = {
    "type": ["string", "object"],
    "properties": {
        "exact": {"type": "string"},
        "prefix": {"type": "string", "minLength": 1},
        "regex": {"type": "string"},
        "semver": {"type": "string", "minLength": 1},
        "present": {"type": "boolean"},
        "absent": {"type": "boolean"},
    },
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
}

_identity_match: dict[str, Any] = {
    "type": "object",
    "properties": {
        "exact": {"type": "string", "pattern": "^spiffe://"},
        "glob": {"type": "string", "minLength": 1},
        "trust_domain": {"type": "string", "minLength": 1},
        "regex": {"type": "string"},
        "dns": {"type": "string", "minLength": 1},
        "present": {"type": "boolean"},
        "absent": {"type": "boolean"},
    },
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
}

_match: dict[str, Any] = {
    "type": "object",
    "properties": {
        "headers": {
            "type": "object",
            "propertyNames": {"pattern": HEADER_NAME_PATTERN},
            "additionalProperties": _header_match,
            "minProperties": 1,
        },
        "path": _string_match,
        "method": {
            "type": ["array", "string"],
            "items": {"type": "string", "pattern": r"^[A-Za-z]+$"},
            "minItems": 1,
            "pattern": r"^[A-Za-z]+$",
        },
        "identity": _identity_match,
        "host": {
            "type": ["array", "string"],
            "items": {"type": "string", "minLength": 1},
            "minItems": 1,
            "minLength": 1,
        },
        "grpc": {
            "type": "object",
            "properties": {
                "service": {"type": "string", "pattern": GRPC_SERVICE_PATTERN},
                "method": {"type": "string", "pattern": GRPC_METHOD_PATTERN},
            },
            "required": ["service"],
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

_split: dict[str, Any] = {
    "type": "object",
    "properties": {
        "key": {
            "type": "array",
            "items": {"type": "string", "pattern": KEY_SOURCE_PATTERN},
            "minItems": 1,
        },
        "seed": {"type": "string"},
        "to": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "cluster": {"type": "string"},
                    "weight": {"type": "integer", "minimum": 0},
                },
                "required": ["cluster", "weight"],
                "additionalProperties": False,
            },
        },
        # 'random', a cluster name, or a new key in a cookie (sidecar.core.cookies)
        "when_key_missing": {
            "if": {"type": "object"},
            "then": {
                "type": "object",
                "properties": {
                    "assign": {
                        "type": "object",
                        "properties": {
                            "cookie": {"type": "string", "pattern": COOKIE_NAME_PATTERN},
                            "max_age": {"type": ["string", "integer"]},
                            "secure": {"type": "boolean"},
                            "same_site": {"enum": list(SAME_SITE)},
                            "path": {"type": "string", "pattern": COOKIE_PATH_PATTERN},
                        },
                        "required": ["cookie"],
                        "additionalProperties": False,
                    }
                },
                "required": ["assign"],
                "additionalProperties": False,
            },
            "else": {"type": "string"},
        },
    },
    "required": ["key", "to"],
    "additionalProperties": False,
}

# A rollout's PromQL check (sidecar.core.metric_checks): at least one threshold (validate.py)
MAX_METRICS = 8
_metric: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 64},
        "query": {"type": "string", "minLength": 1, "maxLength": 4096},
        "max": {"type": "number"},
        "min": {"type": "number"},
        "max_vs_baseline": {"type": "number", "exclusiveMinimum": 0},
        "min_vs_baseline": {"type": "number", "exclusiveMinimum": 0},
        "dry_run": {"type": "boolean"},
        "timeout": {"type": "string"},
    },
    "required": ["name", "query"],
    "additionalProperties": False,
}

_rule: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "match": _match,
        "route": {"type": "string"},
        "split": _split,
        "rollout": {
            "type": "object",
            "properties": {
                "canary": {"type": "string"},
                "steps": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "weight": {"type": "integer", "minimum": 0},
                            "hold": {"type": "string"},
                            "approve": {"type": "boolean"},
                        },
                        "required": ["weight"],
                        "additionalProperties": False,
                    },
                },
                "analysis": {
                    "type": "object",
                    "properties": {
                        "window": {"type": "string"},
                        "min_requests": {"type": "integer", "minimum": 1},
                        "max_error_rate": {"type": "number", "minimum": 0, "maximum": 1},
                        "max_error_rate_vs_stable": {"type": "number", "exclusiveMinimum": 0},
                        "max_p99_ms": {"type": "number", "exclusiveMinimum": 0},
                        "metrics": {"type": "array", "maxItems": MAX_METRICS, "items": _metric},
                    },
                    "required": ["window", "min_requests", "max_error_rate"],
                    "additionalProperties": False,
                },
                "on_failure": {
                    "description": "rollback, pause, or {ramp_down: DURATION}",
                    "oneOf": [
                        {"enum": ["rollback", "pause"]},
                        {
                            "type": "object",
                            "properties": {"ramp_down": {"type": "string"}},
                            "required": ["ramp_down"],
                            "additionalProperties": False,
                        },
                    ],
                },
                "gates": {
                    "type": "array",
                    "maxItems": 8,
                    "items": {
                        "type": "object",
                        "properties": {
                            "url": {"type": "string", "maxLength": 2048},
                            "before": {"enum": ["promote", "step"]},
                            "timeout": {"type": "string"},
                        },
                        "required": ["url", "before"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["canary", "steps", "analysis"],
            "additionalProperties": False,
        },
        "mirror": {
            "type": "object",
            "properties": {
                "cluster": {"type": "string"},
                "percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
            },
            "required": ["cluster", "percent"],
            "additionalProperties": False,
        },
        "deny": {
            "type": "object",
            "properties": {
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "reason": {"type": "string", "maxLength": 200},
            },
            "required": ["status"],
            "additionalProperties": False,
        },
    },
    "required": ["name"],
    "additionalProperties": False,
}

RULES_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "version": {"const": 1},
        "clusters": {
            "type": "array",
            "items": {"type": "string", "pattern": NAME_PATTERN},
            "minItems": 1,
            "uniqueItems": True,
        },
        "default": {"type": "string"},
        "routing_header": {"type": "string", "pattern": HEADER_NAME_PATTERN},
        "mirror_header": {"type": "string", "pattern": HEADER_NAME_PATTERN},
        "rules": {"type": "array", "items": _rule},
        "trust": {
            "type": "object",
            "properties": {
                "identities": {"type": "array", "items": _identity_match},
                "plaintext": {"type": "boolean"},
                "listener_ports": {
                    "type": "array",
                    "uniqueItems": True,
                    "items": {"type": "integer", "minimum": 1, "maximum": 65535},
                },
                "xfcc": {"type": "boolean"},
                "override_headers": {
                    "type": "array",
                    "uniqueItems": True,
                    "items": {"type": "string", "pattern": HEADER_NAME_PATTERN},
                },
            },
            "additionalProperties": False,
        },
        "coloring": {
            "type": "object",
            "properties": {
                "header": {"type": "string", "pattern": HEADER_NAME_PATTERN},
                "baggage": {"type": ["string", "null"], "pattern": r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"},
                "lanes": {
                    "type": "object",
                    "propertyNames": {"pattern": LANE_PATTERN},
                    "additionalProperties": {"type": "string"},
                    "minProperties": 1,
                },
                "fallback": {"type": "string"},
            },
            "required": ["lanes"],
            "additionalProperties": False,
        },
        "decision_log": {
            "type": "object",
            "properties": {
                # headers whose values a decision log line shows as <redacted>
                # (authorization, proxy-authorization and cookie always are)
                "redact": {
                    "type": "array",
                    "uniqueItems": True,
                    "items": {"type": "string", "pattern": HEADER_NAME_PATTERN},
                },
            },
            "additionalProperties": False,
        },
    },
    "required": ["version", "clusters", "default"],
    "additionalProperties": False,
}
