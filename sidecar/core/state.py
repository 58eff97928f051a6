"""The runtime state document: weight overrides set by operators and rollout states.

The sidecar writes it (to the state file, or a fleet's etcd key PREFIX/state) and every
process of a deployment reads it back, so it is input like the rules: a document that does
not pass this schema is refused whole, and whoever reads it keeps the last state it could
read. Reading a broken state as "no state" would move traffic: weights would fall back to
the rules file's and an aborted rollout would start again.

Known sections are checked strictly; unknown top-level keys and unknown fields of an entry
are left alone, so a newer sidecar's additions do not stop an older one in a mixed fleet.
"""

from typing import Any

from sidecar.core.checker import Validator
from sidecar.core.rollout import PHASES, WAITS
from sidecar.core.text import unencodable, why_unencodable

STATE_FORMAT = 1
MAX_RULE_NAME = 253
MAX_ENTRIES = 10_000

_WEIGHTS = {
    "type": "object",
    "maxProperties": 1000,
    "propertyNames": {"maxLength": MAX_RULE_NAME},
    "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 1_000_000_000},
}

STATE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format"],
    "properties": {
        "format": {"const": STATE_FORMAT},
        "weight_overrides": {
            "type": "object",
            "maxProperties": MAX_ENTRIES,
            "propertyNames": {"maxLength": MAX_RULE_NAME},
            "additionalProperties": {
                "type": "object",
                "required": ["weights", "base"],
                "properties": {"weights": _WEIGHTS, "base": _WEIGHTS},
            },
        },
        "rollouts": {
            "type": "object",
            "maxProperties": MAX_ENTRIES,
            "propertyNames": {"maxLength": MAX_RULE_NAME},
            "additionalProperties": {
                "type": "object",
                "required": ["phase", "step", "step_started"],
                "properties": {
                    "phase": {"enum": list(PHASES)},
                    "step": {"type": "integer", "minimum": 0, "maximum": 10_000},
                    "step_started": {"type": "number"},
                    "changed_at": {"type": "number"},
                    "reason": {"type": "string", "maxLength": 4096},
                    "fingerprint": {"type": "string", "maxLength": 128},
                    "numbers": {"type": "object", "maxProperties": 64},
                    "step_clock": {
                        "type": "object",
                        "required": ["boot", "at"],
                        "properties": {
                            "boot": {"type": "string", "minLength": 1, "maxLength": 64},
                            "at": {"type": "number", "minimum": 0},
                        },
                    },
                    "waiting": {"enum": ["", *WAITS]},
                    "approved_step": {"type": "integer", "minimum": 0, "maximum": 10_000},
                    "ramp": {
                        "type": "object",
                        "required": ["from", "weight"],
                        "properties": {
                            "from": {"type": "integer", "minimum": 0, "maximum": 1_000_000_000},
                            "weight": {"type": "integer", "minimum": 0, "maximum": 1_000_000_000},
                        },
                    },
                },
            },
        },
    },
}

_VALIDATOR = Validator(STATE_SCHEMA)


class StateError(ValueError):
    """The runtime state cannot be read: nothing that depends on it may change."""


class StateRemoved(StateError):
    """The stored state was read (or written) by this process and is gone now: not "no
    state" (that would restart rollouts and drop runtime weights); whoever holds the last
    good state writes it back."""


def state_problems(document: Any) -> list[str]:
    """What is wrong with a decoded state document (finite numbers assumed: the decoder
    refuses NaN and infinities), each with its place; [] when it is valid. Text that is not
    UTF-8 (a lone surrogate from a JSON escape) is refused before anything else is read."""
    bad = [f"{_place(path)}: {text!r} {why_unencodable(text)}" for path, text in unencodable(document)]
    if bad:
        return bad[:10]
    return [
        f"{_place(error.absolute_path)}: {error.message}"
        for error in sorted(_VALIDATOR.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    ][:10]


def _place(path: Any) -> str:
    return "/".join(str(p) for p in path) or "(document)"
